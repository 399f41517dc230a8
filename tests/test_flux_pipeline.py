"""The FLUX.1 family against diffusers' FluxPipeline at fp32, and its Generator and sample CLI.

A tiny random FluxPipeline (transformer with the guidance embedding, a 16-channel VAE with
FLUX's scaling and shift, CLIPTextModel, T5, the tokenizers of test_encode_prompt.py, the
dynamically shifted flow-match scheduler with non-default token counts), every weight
perturbed, is saved with save_pretrained, converted with the real converter and loaded with
load_pipeline. Both sample a non-square batch of 2 from the same initial latents.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline,
                       FluxTransformer2DModel)
from flax import nnx
from PIL import Image

import flowgrpo_jax
from flowgrpo_jax import families
from flowgrpo_jax import sample as sample_cli
from flowgrpo_jax.config import ConfigError
from flowgrpo_jax.families.flux.loading import load_pipeline
from flowgrpo_jax.families.flux.pipeline import (decode, encode_prompt, latent_image_ids,
                                                 pack_latents, sample, sample_latents, schedule,
                                                 to_uint8, tokenize, unpack_latents)
from flowgrpo_jax.models.conversion import convert_folder
from test_encode_prompt import PROMPTS as ENCODE_PROMPTS
from test_encode_prompt import _perturbed, clip_tokenizer, rel_l2, t5_tokenizer

FLUX1_DEV = os.path.join(os.path.dirname(flowgrpo_jax.__file__), "families", "flux", "flux1dev")
T5_LENGTH = 16
PROMPTS = ["a red cube on two cats", "a photo of a dog"]
# 2x8 packed tokens: the token count of a 64 px square, the Generator's resolution below.
HEIGHT, WIDTH, RESOLUTION, STEPS, GUIDANCE = 32, 128, 64, 4, 3.5
SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_image_seq_len=8, max_image_seq_len=64,
                 base_shift=0.5, max_shift=1.15, num_train_timesteps=1000)


def tiny_flux_pipeline(seed=0) -> FluxPipeline:
    """FLUX.1-dev's layout at toy widths: CLIP-L's pooled 16 wide, T5's states 32 wide, a
    transformer of 1 double- and 2 single-stream blocks embedding guidance, a 16-channel VAE
    with 8x downsampling and FLUX's scaling and shift factors."""
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = clip_tokenizer("<|endoftext|>"), t5_tokenizer()
    clip = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, projection_dim=16,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
        hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    t5 = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[8, 16, 16, 16], layers_per_block=1, norm_num_groups=4, sample_size=32,
        scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
        guidance_embeds=True, axes_dims_rope=(4, 6, 6))
    return FluxPipeline(
        transformer=_perturbed(transformer, everything=True),
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=_perturbed(vae, everything=True),
        text_encoder=_perturbed(clip, everything=True), text_encoder_2=_perturbed(t5, everything=True),
        tokenizer=tokenizer, tokenizer_2=tokenizer_2)


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    reference = tiny_flux_pipeline()
    src, dst = tmp_path_factory.mktemp("diffusers"), tmp_path_factory.mktemp("flax")
    reference.save_pretrained(src)
    convert_folder(str(src), str(dst), log=lambda *_: None)
    return reference, load_pipeline(str(dst)), str(dst)


def initial_latents():
    return np.random.default_rng(0).standard_normal((2, HEIGHT // 8, WIDTH // 8, 16), np.float32)


def test_encode_prompt_matches_diffusers(pipelines):
    reference, ours, _ = pipelines
    tokens = tokenize(ours, ENCODE_PROMPTS, T5_LENGTH)
    assert tokens.clip.shape == (3, 77) and tokens.t5.shape == (3, T5_LENGTH)
    for ids, tokenizer, length in ((tokens.clip, reference.tokenizer, 77),
                                   (tokens.t5, reference.tokenizer_2, T5_LENGTH)):
        expected = tokenizer(ENCODE_PROMPTS, padding="max_length", max_length=length,
                             truncation=True, return_tensors="np").input_ids
        np.testing.assert_array_equal(ids, expected)
    with torch.no_grad():
        embeds, pooled, text_ids = reference.encode_prompt(ENCODE_PROMPTS, None,
                                                           max_sequence_length=T5_LENGTH)
    assert not text_ids.any()
    got = encode_prompt(ours, ENCODE_PROMPTS, max_sequence_length=T5_LENGTH)
    assert got.prompt_embeds.shape == (3, T5_LENGTH, 32) and got.pooled.shape == (3, 16)
    for name, a, b in (("prompt_embeds", got.prompt_embeds, embeds), ("pooled", got.pooled, pooled)):
        error = rel_l2(a, b.numpy())
        print(f"{name}: relative L2 {error:.2e}")
        assert error < 1e-5, (name, error)
    with pytest.raises(ValueError, match=r"max_sequence_length must be in 1\.\.512"):
        tokenize(ours, PROMPTS, 513)


def test_packing_is_diffusers_order():
    latents = np.random.default_rng(1).standard_normal((2, 6, 10, 16), np.float32)
    packed = np.array(pack_latents(jnp.asarray(latents)))
    nchw = torch.from_numpy(latents).permute(0, 3, 1, 2)
    expected = FluxPipeline._pack_latents(nchw, 2, 16, 6, 10).numpy()
    np.testing.assert_array_equal(packed, expected)
    np.testing.assert_array_equal(np.asarray(unpack_latents(jnp.asarray(packed), 6, 10)), latents)
    # diffusers unpacks from image pixels; its output is NCHW
    unpacked = FluxPipeline._unpack_latents(torch.from_numpy(packed), 6 * 8, 10 * 8, 8)
    np.testing.assert_array_equal(unpacked.permute(0, 2, 3, 1).numpy(), latents)
    np.testing.assert_array_equal(latent_image_ids(3, 5),
                                  FluxPipeline._prepare_latent_image_ids(1, 3, 5, "cpu", torch.float32))
    with pytest.raises(ValueError, match="cannot be packed"):
        pack_latents(jnp.zeros((1, 3, 4, 16)))


def reference_sample(reference, latents):
    """diffusers' images (output_type "np"), its final latents (NHWC) and its sigmas."""
    steps = []

    def keep_latents(pipe, step, timestep, tensors):
        steps.append(tensors["latents"])
        return tensors

    packed = pack_latents(jnp.asarray(latents))
    with torch.no_grad():
        images = reference(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                           height=HEIGHT, width=WIDTH, max_sequence_length=T5_LENGTH,
                           latents=torch.from_numpy(np.array(packed)), output_type="np",
                           callback_on_step_end=keep_latents).images
    final = unpack_latents(jnp.asarray(steps[-1].numpy()), HEIGHT // 8, WIDTH // 8)
    return images, np.asarray(final), reference.scheduler.sigmas.numpy()


def test_sampling_and_generator_match_diffusers(pipelines):
    reference, ours, folder = pipelines
    latents = initial_latents()
    kwargs = dict(steps=STEPS, guidance=GUIDANCE, latents=latents, max_sequence_length=T5_LENGTH)
    final = sample_latents(ours, PROMPTS, key=jax.random.key(0), **kwargs)
    images = np.asarray(decode(ours, final))
    expected, expected_final, expected_sigmas = reference_sample(reference, latents)
    assert images.shape == expected.shape == (2, HEIGHT, WIDTH, 3)
    latent_error, image_error = rel_l2(final, expected_final), rel_l2(images, expected)
    clamped = float(np.mean((expected == 0) | (expected == 1)))
    print(f"final latents rel error {latent_error:.2e}, images rel error {image_error:.2e} "
          f"({clamped:.1%} of reference pixels clamped)")
    assert latent_error < 1e-4 and image_error < 1e-4
    assert clamped < 0.5  # the comparison is not trivially between clamped values
    np.testing.assert_array_equal(sample(ours, PROMPTS, seed=0, **kwargs), to_uint8(images))

    # The schedule is the scheduler's, shifted for this token count (not FLUX's defaults').
    sigmas = schedule(ours, HEIGHT, WIDTH)(STEPS)
    np.testing.assert_array_equal(sigmas, expected_sigmas)
    generator = families.load("flux").build(ml_collections.ConfigDict(dict(
        family="flux", path=folder, dtype="float32", resolution=RESOLUTION,
        max_sequence_length=T5_LENGTH, guidance=GUIDANCE)))
    np.testing.assert_array_equal(generator.sigmas(STEPS), expected_sigmas)
    assert generator.latent_shape == (RESOLUTION // 8, RESOLUTION // 8, 16)
    text = generator.encode(PROMPTS)
    ours_text = encode_prompt(ours, PROMPTS, max_sequence_length=T5_LENGTH)
    np.testing.assert_array_equal(text.prompt_embeds, ours_text.prompt_embeds)
    np.testing.assert_array_equal(text.pooled, ours_text.pooled)
    # the generator's velocity (NHWC in, NHWC out, t on the 0..1000 scale) is the one sampled with
    t = jnp.full((2,), 1000.0 * sigmas[1])
    velocity = generator.apply(generator.model, jnp.asarray(latents), t, text)
    packed = torch.from_numpy(np.array(pack_latents(jnp.asarray(latents))))
    with torch.no_grad():
        expected_velocity = reference.transformer(
            hidden_states=packed, timestep=torch.from_numpy(np.array(t)) / 1000,
            guidance=torch.full((2,), GUIDANCE), pooled_projections=torch.from_numpy(np.array(text.pooled)),
            encoder_hidden_states=torch.from_numpy(np.array(text.prompt_embeds)),
            txt_ids=torch.zeros(T5_LENGTH, 3),
            img_ids=torch.from_numpy(latent_image_ids(HEIGHT // 16, WIDTH // 16)),
            return_dict=False)[0]
    error = rel_l2(pack_latents(velocity), expected_velocity.numpy())
    print(f"generator velocity rel error {error:.2e}")
    assert error < 1e-4  # the transformer alone is within about 1e-5 of diffusers (test_flux.py)
    np.testing.assert_array_equal(generator.decode(final), to_uint8(images))


def test_unsupported_schedulers_are_refused_in_one_line(pipelines, tmp_path):
    _, _, folder = pipelines
    copy = tmp_path / "flux"
    shutil.copytree(folder, copy)
    path = copy / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    for change, message in (
            (dict(use_dynamic_shifting=False), "use_dynamic_shifting is off"),
            (dict(_class_name="EulerDiscreteScheduler"), "'EulerDiscreteScheduler' not supported"),
            (dict(use_karras_sigmas=True), "use_karras_sigmas=True not supported")):
        path.write_text(json.dumps(dict(config, **change)))
        with pytest.raises(ValueError, match=message) as error:
            load_pipeline(str(copy))
        assert "\n" not in str(error.value)


def test_flux1_dev_shapes_without_weights():
    family = families.load("flux")
    generator = family.build(ml_collections.ConfigDict(dict(family="flux", path="nowhere",
                                                            dtype="bfloat16")), abstract=True)
    assert generator.latent_shape == (64, 64, 16) and generator.tokenize is None
    assert generator.token_shapes.clip.shape == (77,) and generator.token_shapes.t5.shape == (512,)
    assert generator.apply.keywords == {"guidance": 3.5} and family.negative_prompt == ""
    with open(os.path.join(FLUX1_DEV, "scheduler.json")) as f:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(json.load(f))
    mu = 1024 * (1.15 - 0.5) / (4096 - 256) + 0.5 - 256 * (1.15 - 0.5) / (4096 - 256)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 28, 28), mu=mu)
    np.testing.assert_array_equal(generator.sigmas(28), scheduler.sigmas.numpy())

    def count(module):
        return sum(x.size for x in jax.tree.leaves(jax.eval_shape(lambda: nnx.state(module, nnx.Param))))

    def config(name):
        with open(os.path.join(FLUX1_DEV, name, "config.json")) as f:
            return json.load(f)

    with torch.device("meta"):
        references = {
            "vae": AutoencoderKL(**config("vae")),
            "text_encoder": transformers.CLIPTextModel(transformers.CLIPTextConfig(**config("text_encoder"))),
            "text_encoder_2": transformers.T5EncoderModel(transformers.T5Config(**config("text_encoder_2")))}
    vae, (clip, t5) = generator.decoder, generator.encoder
    for name, ours in (("vae", vae), ("text_encoder", clip), ("text_encoder_2", t5)):
        theirs = sum(p.numel() for p in references[name].parameters())
        print(f"{name}: ours {count(ours):,}, reference {theirs:,}")
        assert count(ours) == theirs
    assert count(generator.model) == 11_901_408_320
    for key, value, message in (("resolution", 520, "a positive multiple of 16"),
                                ("max_sequence_length", 1024, r"an integer in 1\.\.512"),
                                ("guidance", "high", "a number >= 0")):
        with pytest.raises(ConfigError, match=f"config.model.{key}={value!r}: must be {message}"):
            family.build(ml_collections.ConfigDict({"path": "nowhere", key: value}), abstract=True)


def test_cli_writes_images_for_a_flux_folder(pipelines, tmp_path, capsys):
    _, ours, folder = pipelines
    out = tmp_path / "images" / "grid.png"
    # the parity test's shapes (2 images, fp32), so nothing compiles anew
    code = sample_cli.main(["--model", folder, "--prompt", PROMPTS[0], "--out", str(out),
                            "--steps", str(STEPS), "--height", str(HEIGHT), "--width", str(WIDTH),
                            "--num_images", "2", "--seed", "3", "--dtype", "float32",
                            "--max_sequence_length", str(T5_LENGTH)])
    assert code == 0, capsys.readouterr().err
    image = Image.open(out)
    assert image.mode == "RGB" and image.size == (2 * WIDTH, HEIGHT)
    expected = sample(ours, PROMPTS[:1] * 2, seed=3, steps=STEPS, guidance=GUIDANCE, height=HEIGHT,
                      width=WIDTH, max_sequence_length=T5_LENGTH)
    np.testing.assert_array_equal(np.asarray(image), np.concatenate(list(expected), axis=1))

    args = ["--prompt", "x", "--out", str(tmp_path / "x.png")]
    assert sample_cli.main(["--model", folder, "--negative_prompt", "blurry", *args]) == 1
    assert "FLUX.1 takes none" in capsys.readouterr().err
    other = tmp_path / "sdxl"
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    assert sample_cli.main(["--model", str(other), *args]) == 1
    err = capsys.readouterr().err
    assert "pipeline 'StableDiffusionXLPipeline' not supported; expected one of ['FluxPipeline', " \
           "'StableDiffusion3Pipeline']" in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()
