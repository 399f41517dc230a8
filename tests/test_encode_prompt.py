"""encode_prompt against diffusers' StableDiffusion3Pipeline.encode_prompt at fp32.

A tiny random SD3 pipeline (both CLIPs, T5, tiny tokenizers built here with the `tokenizers`
machinery, no Hub) is saved with save_pretrained, converted with the real converter and loaded
with load_pipeline. `tiny_sd3_pipeline` is shared with test_pipeline.py.
"""
import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)
from tokenizers import pre_tokenizers

from flowgrpo_jax.models.conversion import convert_folder
from flowgrpo_jax.families.sd3.loading import load_pipeline
from flowgrpo_jax.families.sd3.pipeline import encode_prompt, tokenize

T5_LENGTH = 16
# The third is longer than both the 77 CLIP tokens (one byte per token here) and T5_LENGTH.
PROMPTS = ["a red cube on two cats", "a photo of a dog",
           "two cats and a dog on a red cube, a photo of a cube of cats and dogs on a red dog"]
T5_WORDS = "a red cube on two cats photo of dog and".split()


def rel_l2(ours, reference):
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


def clip_tokenizer(pad_token):
    """Byte-level CLIP tokenizer without merges: each character is a token (word-final ones
    with </w>). CLIP-G's SD3 tokenizer pads with "!", CLIP-L's with the EOS token."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens = alphabet + [c + "</w>" for c in alphabet] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], pad_token=pad_token,
                                      model_max_length=77)


def t5_tokenizer():
    """A Unigram T5 tokenizer over a few words and single letters (ids 0-2 pad, eos, unk)."""
    pieces = ([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
              + [("▁" + w, -2.0) for w in T5_WORDS] + [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz,"])
    return transformers.T5TokenizerFast(vocab=pieces, extra_ids=0)


def _perturbed(model, everything=False):
    """Random init leaves norms at 1 / 0: perturb them (or every float tensor) so each weight's
    mapping shows in the outputs."""
    with torch.no_grad():
        for tensor in model.state_dict(keep_vars=True).values():
            if tensor.is_floating_point() and (everything or tensor.ndim == 1):
                tensor.add_(0.1 * torch.randn_like(tensor))
    return model.eval()


def tiny_sd3_pipeline(seed=0) -> StableDiffusion3Pipeline:
    """SD3.5's layout at toy widths: CLIP-L (quick_gelu) and CLIP-G (gelu) widths 16 + 24 padded
    to T5's 48 = joint_attention_dim, pooled 8 + 12 = 20, a 16-channel VAE with 8x downsampling,
    an MMDiT with dual attention and qk norm, the flow-match scheduler with shift 3."""
    torch.manual_seed(seed)
    tokenizer, tokenizer_2, tokenizer_3 = clip_tokenizer("<|endoftext|>"), clip_tokenizer("!"), t5_tokenizer()
    special = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id, vocab_size=len(tokenizer))
    clip = lambda **kw: _perturbed(transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(
        intermediate_size=32, num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=77,
        **special, **kw)))
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(tokenizer_3), d_model=48, d_kv=8, d_ff=64, num_layers=2, num_heads=3,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=4, sample_size=32,
        scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False)
    transformer = SD3Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=16, out_channels=16, num_layers=3,
        attention_head_dim=8, num_attention_heads=3, joint_attention_dim=48,
        caption_projection_dim=24, pooled_projection_dim=20, pos_embed_max_size=8,
        dual_attention_layers=(0, 1), qk_norm="rms_norm")
    return StableDiffusion3Pipeline(
        transformer=_perturbed(transformer, everything=True),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_perturbed(vae),
        text_encoder=clip(hidden_size=16, projection_dim=8, hidden_act="quick_gelu"),
        text_encoder_2=clip(hidden_size=24, projection_dim=12, hidden_act="gelu"),
        text_encoder_3=_perturbed(t5), tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        tokenizer_3=tokenizer_3)


def saved_and_converted(tmp_path_factory):
    """(tiny_sd3_pipeline(), its save_pretrained folder, that folder converted)."""
    reference = tiny_sd3_pipeline()
    src, dst = tmp_path_factory.mktemp("diffusers"), tmp_path_factory.mktemp("flax")
    reference.save_pretrained(src)
    convert_folder(str(src), str(dst), log=lambda *_: None)
    return reference, src, dst


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    reference, _, dst = saved_and_converted(tmp_path_factory)
    return reference, load_pipeline(str(dst)), dst


def reference_encode(reference, prompts, **kwargs):
    with torch.no_grad():
        out = reference.encode_prompt(prompts, None, None, max_sequence_length=T5_LENGTH, **kwargs)
    return [None if t is None else t.numpy() for t in out]


def assert_matches(ours, expected):
    for name, a, b in zip(("prompt_embeds", "negative_prompt_embeds", "pooled", "negative_pooled"),
                          ours, expected):
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape, (name, a.shape, b.shape)
        error = rel_l2(a, b)
        print(f"{name}: relative L2 {error:.2e}")
        assert error < 1e-5, (name, error)


def test_tokens_are_padded_and_truncated_like_diffusers(pipelines):
    reference, ours, _ = pipelines
    tokens = tokenize(ours, PROMPTS, T5_LENGTH)
    assert tokens.clip_l.shape == tokens.clip_g.shape == (3, 77) and tokens.t5.shape == (3, T5_LENGTH)
    # CLIP-G pads with "!" and CLIP-L with EOS, so the two CLIP rows differ after the prompt.
    assert (tokens.clip_l[0] != tokens.clip_g[0]).any()
    for ids, tokenizer, length in ((tokens.clip_l, reference.tokenizer, 77),
                                   (tokens.clip_g, reference.tokenizer_2, 77),
                                   (tokens.t5, reference.tokenizer_3, T5_LENGTH)):
        expected = tokenizer(PROMPTS, padding="max_length", max_length=length, truncation=True,
                             return_tensors="np").input_ids
        np.testing.assert_array_equal(ids, expected)
    assert tokens.t5[2, -1] == ours.tokenizer_3.eos_token_id  # truncated, EOS kept last


def test_encode_prompt_matches_diffusers(pipelines):
    reference, ours, _ = pipelines
    expected = reference_encode(reference, PROMPTS)
    got = encode_prompt(ours, PROMPTS, max_sequence_length=T5_LENGTH)
    assert got[0].shape == (3, 77 + T5_LENGTH, 48) and got[2].shape == (3, 20)
    assert_matches(got, expected)


def test_negative_prompts_and_no_guidance(pipelines):
    reference, ours, _ = pipelines
    negatives = ["blurry", "a dog", ""]
    expected = reference_encode(reference, PROMPTS, negative_prompt=negatives)
    assert_matches(encode_prompt(ours, PROMPTS, negative_prompt=negatives,
                                 max_sequence_length=T5_LENGTH), expected)
    expected = reference_encode(reference, PROMPTS[:1], do_classifier_free_guidance=False)
    assert_matches(encode_prompt(ours, PROMPTS[:1], max_sequence_length=T5_LENGTH,
                                 do_classifier_free_guidance=False), expected)
    with pytest.raises(ValueError, match="2 negative prompts for 3 prompts"):
        encode_prompt(ours, PROMPTS, negative_prompt=negatives[:2])


def test_without_t5_the_t5_part_is_zeros_like_diffusers(pipelines, tmp_path):
    reference, _, converted = pipelines
    components = dict(reference.components, text_encoder_3=None, tokenizer_3=None)
    without_t5 = StableDiffusion3Pipeline(**components)
    expected = reference_encode(without_t5, PROMPTS[:2])
    # a converted folder whose model_index.json lists no T5, as a user would trim it
    folder = tmp_path / "no_t5"
    shutil.copytree(converted, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps(
        {k: v for k, v in index.items() if k not in ("text_encoder_3", "tokenizer_3")}))
    ours = load_pipeline(str(folder))
    assert ours.text_encoder_3 is None and ours.tokenizer_3 is None
    got = encode_prompt(ours, PROMPTS[:2], max_sequence_length=T5_LENGTH)
    assert not np.asarray(got[0][:, 77:]).any()
    assert_matches(got, expected)
