"""Flax CLIP text (with projection) and T5 encoders against transformers at fp32.

Tiny random models are saved with save_pretrained and converted through the real tables; the
real SD3.5-Medium configs are checked by shape and parameter count without any weights.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from transformers.models.t5.modeling_t5 import T5Attention as TorchT5Attention

from flowgrpo_jax.models import clip_table, t5_table
from flowgrpo_jax.models.abstract import abstract_module
from flowgrpo_jax.convert.core import plan, target_shapes
from flowgrpo_jax.convert.safetensors_io import SafetensorsFolder
from flowgrpo_jax.models.clip_text import (CLIPTextConfig, CLIPTextModel,
                                           CLIPTextModelWithProjection)
from flowgrpo_jax.models.t5 import T5Config, T5EncoderModel, relative_position_buckets
from flowgrpo_jax.families.sd3.loading import SD35M_CONFIGS
from converted import converted_module

DATA = SD35M_CONFIGS
TOLERANCE = 1e-5
VOCAB, BOS, EOS = 100, 98, 99


def rel_l2(ours, reference):
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


def saved_random(model, tmp_path):
    """Perturbs every 1-D parameter (norms start at 1 / 0), saves, reads back the safetensors."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    return SafetensorsFolder(str(tmp_path))


def prompts(length, pad, eos=EOS):
    """Two prompts of different lengths: BOS, words, EOS, then `pad` up to `length`."""
    rng = np.random.default_rng(0)
    ids = np.full((2, length), pad, np.int64)
    for row, words in enumerate((5, 20)):
        ids[row, : words + 2] = [BOS, *rng.integers(1, 90, words), eos]
    return ids


def parameter_count(module):
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


def sd35m(name):
    with open(os.path.join(DATA, f"{name}.json")) as f:
        config = json.load(f)
    with open(os.path.join(DATA, "param_counts.json")) as f:
        counts = json.load(f)
    return config, next(v for k, v in counts.items() if k.split(" ")[0] == name)


# eos_token_id 2 is transformers' legacy rule: pool at the largest id (EOS is the last token of
# the vocabulary); SD3's CLIP-L has it. Otherwise pool at the first EOS: here an EOS below BOS,
# padding with EOS, so the two rules pick different positions. FLUX's CLIP-L is CLIPTextModel
# (its pooled output, no projection), SD3's CLIPTextModelWithProjection.
@pytest.mark.parametrize("hidden_act,eos_token_id,pad,projected", [
    ("quick_gelu", 2, 0, True), ("gelu", 95, 95, True), ("quick_gelu", 2, 0, False)])
def test_clip_matches_transformers(tmp_path, hidden_act, eos_token_id, pad, projected):
    config = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, projection_dim=24,
                  num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=77,
                  hidden_act=hidden_act, eos_token_id=eos_token_id, bos_token_id=BOS,
                  pad_token_id=pad)
    torch.manual_seed(0)
    reference_class, ours_class = ((transformers.CLIPTextModelWithProjection,
                                    CLIPTextModelWithProjection) if projected
                                   else (transformers.CLIPTextModel, CLIPTextModel))
    reference = reference_class(transformers.CLIPTextConfig(**config)).eval()
    tensors = saved_random(reference, tmp_path)
    make = lambda rngs: ours_class(CLIPTextConfig.from_transformers(config), rngs=rngs)
    model = converted_module(make, tensors, clip_table.RULES)

    ids = prompts(77, pad, eos=EOS if eos_token_id == 2 else eos_token_id)
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids), output_hidden_states=True)
    ours = nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids))

    assert len(ours.hidden_states) == len(expected.hidden_states) == 4
    errors = {f"hidden_states[{i}]": rel_l2(a, b.numpy())
              for i, (a, b) in enumerate(zip(ours.hidden_states, expected.hidden_states))}
    errors["last_hidden_state"] = rel_l2(ours.last_hidden_state, expected.last_hidden_state.numpy())
    if projected:
        errors["text_embeds"] = rel_l2(ours.text_embeds, expected.text_embeds.numpy())
    else:
        assert ours.text_embeds is None
        errors["pooler_output"] = rel_l2(ours.pooler_output, expected.pooler_output.numpy())
        # transformers 5 saves this class's keys without "text_model."; FLUX.1-dev's hold it
        prefixed = {"text_model." + k: tensors[k] for k in tensors.keys()}
        again = converted_module(make, prefixed, clip_table.RULES)
        for a, b in zip(jax.tree.leaves(nnx.state(again)), jax.tree.leaves(nnx.state(model))):
            np.testing.assert_array_equal(a, b)
    print(f"{reference_class.__name__} ({hidden_act}, eos_token_id={eos_token_id}) relative L2 "
          f"errors: {errors}")
    assert all(e < TOLERANCE for e in errors.values()), errors


@pytest.mark.parametrize("feed_forward_proj", ["gated-gelu", "relu"])
def test_t5_matches_transformers(tmp_path, feed_forward_proj):
    # Few buckets and a short max distance so a 40-token prompt reaches the log-spaced and the
    # clamped buckets.
    config = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
                  relative_attention_num_buckets=8, relative_attention_max_distance=20,
                  feed_forward_proj=feed_forward_proj)
    torch.manual_seed(0)
    reference = transformers.T5EncoderModel(transformers.T5Config(**config)).eval()
    tensors = saved_random(reference, tmp_path)
    model = converted_module(lambda rngs: T5EncoderModel(T5Config.from_transformers(config),
                                                       rngs=rngs), tensors, t5_table.RULES)

    ids = prompts(40, pad=0)
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).last_hidden_state.numpy()
    error = rel_l2(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(ids)), expected)
    print(f"T5 ({feed_forward_proj}) last_hidden_state relative L2 error: {error:.3g}")
    assert error < TOLERANCE


@pytest.mark.parametrize("buckets,max_distance", [(32, 128), (8, 20)])
def test_t5_position_buckets_match_transformers(buckets, max_distance):
    length = 300
    relative = torch.arange(length)[None, :] - torch.arange(length)[:, None]
    expected = TorchT5Attention._relative_position_bucket(
        relative, bidirectional=True, num_buckets=buckets, max_distance=max_distance)
    np.testing.assert_array_equal(relative_position_buckets(length, buckets, max_distance),
                                  expected.numpy())


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="hidden_act"):
        CLIPTextConfig(hidden_act="swish")
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Config(feed_forward_proj="gated-swish")
    model = CLIPTextModelWithProjection(
        CLIPTextConfig(vocab_size=VOCAB, hidden_size=8, intermediate_size=8, projection_dim=8,
                       num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=4),
        rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="length <= 4"):
        model(jnp.zeros((1, 5), jnp.int32))


@pytest.mark.parametrize("name,reference_class,ours,parse,rules", [
    ("text_encoder", "CLIPTextModelWithProjection", CLIPTextModelWithProjection,
     CLIPTextConfig.from_transformers, clip_table.RULES),
    ("text_encoder_2", "CLIPTextModelWithProjection", CLIPTextModelWithProjection,
     CLIPTextConfig.from_transformers, clip_table.RULES),
    ("text_encoder_3", "T5EncoderModel", T5EncoderModel, T5Config.from_transformers,
     t5_table.RULES),
])
def test_sd35_medium_shapes_and_parameter_counts(name, reference_class, ours, parse, rules):
    config, recorded = sd35m(name)
    config_class = (transformers.T5Config if reference_class == "T5EncoderModel"
                    else transformers.CLIPTextConfig)
    with torch.device("meta"):
        reference = getattr(transformers, reference_class)(config_class(**config))
    abstract = abstract_module(lambda rngs: ours(parse(config), rngs=rngs))

    theirs = sum(p.numel() for p in reference.parameters())  # tied embeddings counted once
    assert parameter_count(abstract) == theirs == recorded
    # Every real checkpoint key (tied copies included) maps onto a parameter of the right shape.
    plan({k: tuple(v.shape) for k, v in reference.state_dict().items()}, rules,
         target_shapes(abstract))
