"""Sampling parity with diffusers' StableDiffusion3Pipeline, and the sample CLI.

The tiny random pipeline of test_encode_prompt.py is saved, converted with the converter CLI,
loaded with load_pipeline and sampled by both from the same initial latents: 8 Euler steps,
CFG 4.5, fp32.
"""
import os
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
import torch
from PIL import Image

from flowgrpo_jax import families
from flowgrpo_jax import sample as sample_cli
from flowgrpo_jax.families.sd3.loading import load_pipeline
from flowgrpo_jax.families.sd3.pipeline import (apply_transformer, decode, encode_prompt, sample,
                                                sample_latents, to_uint8)
from test_encode_prompt import T5_LENGTH, tiny_sd3_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red cube on two cats", "a photo of a dog"]
HEIGHT, WIDTH, STEPS, GUIDANCE = 32, 48, 8, 4.5


def rel_error(ours, reference):
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    reference = tiny_sd3_pipeline()
    src, dst = tmp_path_factory.mktemp("diffusers"), tmp_path_factory.mktemp("flax")
    reference.save_pretrained(src)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_weights.py"),
                             "--src", str(src), "--dst", str(dst)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return reference, load_pipeline(str(dst)), str(dst)


def initial_latents():
    return np.random.default_rng(0).standard_normal((2, HEIGHT // 8, WIDTH // 8, 16), np.float32)


def reference_sample(reference, latents):
    """diffusers' decoded images (output_type "np") and final latents, both NHWC."""
    steps = []

    def keep_latents(pipe, step, timestep, tensors):
        steps.append(tensors["latents"])
        return tensors

    with torch.no_grad():
        images = reference(PROMPTS, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                           height=HEIGHT, width=WIDTH, max_sequence_length=T5_LENGTH,
                           latents=torch.from_numpy(latents).permute(0, 3, 1, 2),
                           output_type="np", callback_on_step_end=keep_latents).images
    return images, steps[-1].permute(0, 2, 3, 1).numpy()


def test_sampling_matches_diffusers(pipelines):
    reference, ours, _ = pipelines
    latents = initial_latents()
    kwargs = dict(steps=STEPS, guidance=GUIDANCE, latents=latents, max_sequence_length=T5_LENGTH)
    final = sample_latents(ours, PROMPTS, key=jax.random.key(0), **kwargs)
    images = np.asarray(decode(ours, final))
    expected, expected_final = reference_sample(reference, latents)
    assert images.shape == expected.shape == (2, HEIGHT, WIDTH, 3)
    latent_error, image_error = rel_error(final, expected_final), rel_error(images, expected)
    clamped = float(np.mean((expected == 0) | (expected == 1)))
    print(f"final latents rel error {latent_error:.2e}, images rel error {image_error:.2e} "
          f"({clamped:.1%} of reference pixels clamped)")
    assert latent_error < 1e-4 and image_error < 1e-4
    assert clamped < 0.5  # the comparison is not trivially between clamped values
    # the uint8 entry point gives the same images, rounded like diffusers' numpy_to_pil
    np.testing.assert_array_equal(sample(ours, PROMPTS, seed=0, **kwargs), to_uint8(images))


def test_stochastic_samplers_follow_the_seed(pipelines):
    _, ours, _ = pipelines
    # the parity test's shapes, so only the SDE rollout compiles anew
    kwargs = dict(steps=STEPS, guidance=GUIDANCE, height=HEIGHT, width=WIDTH, max_sequence_length=T5_LENGTH)
    first = sample(ours, PROMPTS, seed=1, kind="sde", **kwargs)
    assert first.dtype == np.uint8 and first.shape == (2, HEIGHT, WIDTH, 3)
    np.testing.assert_array_equal(first, sample(ours, PROMPTS, seed=1, kind="sde", **kwargs))
    assert (first != sample(ours, PROMPTS, seed=2, kind="sde", **kwargs)).any()
    # same seed, so the same initial latents: only the SDE's added noise tells them apart
    assert (first != sample(ours, PROMPTS, seed=1, kind="ode", **kwargs)).any()


def test_bad_sampling_requests_are_named(pipelines):
    _, ours, _ = pipelines
    with pytest.raises(ValueError, match="multiples of 16"):
        sample(ours, PROMPTS, seed=0, steps=1, height=40, width=WIDTH)
    with pytest.raises(ValueError, match="exactly one of seed or key"):
        sample(ours, PROMPTS, steps=1)
    with pytest.raises(ValueError, match="sampler 'euler' not one of"):
        sample(ours, PROMPTS, seed=0, steps=1, kind="euler")
    with pytest.raises(ValueError, match="3 initial latents for 2 prompts"):
        sample(ours, PROMPTS, seed=0, steps=1, latents=np.zeros((3, 4, 6, 16), np.float32))


def test_image_grid_layout():
    images = np.arange(1, 4, dtype=np.uint8)[:, None, None, None] * np.ones((3, 2, 5, 3), np.uint8)
    grid = sample_cli.image_grid(images)
    assert grid.shape == (4, 10, 3)  # 2x2 cells, the last one black
    assert grid[0, 0, 0] == 1 and grid[0, 5, 0] == 2 and grid[2, 0, 0] == 3 and not grid[2:, 5:].any()


def test_cli_writes_a_png(pipelines, tmp_path, capsys):
    _, ours, folder = pipelines
    out = tmp_path / "images" / "grid.png"
    # the parity test's shapes (2 images, 8 steps, fp32), so nothing compiles anew
    code = sample_cli.main(["--model", folder, "--prompt", PROMPTS[0], "--out", str(out),
                            "--steps", str(STEPS), "--height", str(HEIGHT), "--width", str(WIDTH),
                            "--num_images", "2", "--seed", "3", "--dtype", "float32",
                            "--max_sequence_length", str(T5_LENGTH)])
    assert code == 0, capsys.readouterr().err
    image = Image.open(out)
    assert image.mode == "RGB" and image.size == (2 * WIDTH, HEIGHT)
    expected = sample(ours, PROMPTS[:1] * 2, seed=3, steps=STEPS, guidance=4.5, height=HEIGHT,
                      width=WIDTH, max_sequence_length=T5_LENGTH)
    np.testing.assert_array_equal(np.asarray(image), np.concatenate(list(expected), axis=1))


def test_cli_names_a_bad_model_folder(pipelines, tmp_path, capsys):
    _, _, folder = pipelines
    args = ["--prompt", "x", "--out", str(tmp_path / "x.png")]
    assert sample_cli.main(["--model", str(tmp_path / "nowhere"), *args]) == 1
    assert "nowhere: no such directory" in capsys.readouterr().err
    assert sample_cli.main(["--model", os.path.join(folder, "vae"), *args]) == 1
    assert "no model_index.json" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_generator_serves_the_rl_code_the_same_pieces(pipelines):
    _, ours, folder = pipelines
    generator = families.load("sd3").build(ml_collections.ConfigDict(dict(
        family="sd3", path=folder, dtype="float32", resolution=HEIGHT, max_sequence_length=T5_LENGTH)))
    assert generator.latent_shape == (HEIGHT // 8, HEIGHT // 8, 16) and generator.shift == 3.0
    # prompts then negatives: the batch encode_prompt encodes, so nothing compiles anew
    text = generator.encode(PROMPTS + ["", ""])
    embeds, negative_embeds, pooled, negative_pooled = encode_prompt(
        ours, PROMPTS, max_sequence_length=T5_LENGTH)
    np.testing.assert_array_equal(text.prompt_embeds, np.concatenate([embeds, negative_embeds]))
    np.testing.assert_array_equal(text.pooled, np.concatenate([pooled, negative_pooled]))
    latents = initial_latents()
    np.testing.assert_array_equal(generator.decode(latents), to_uint8(decode(ours, latents)))
    assert generator.apply is apply_transformer and generator.model.config == ours.transformer.config
