"""The toy model: shipped checkpoint, Generator interface, save/load, and pretraining."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from flowgrpo_jax import families
from flowgrpo_jax.families.toy.family import latents_to_images
from flowgrpo_jax.families.toy import model as toy_model
from flowgrpo_jax.families.toy import pretrain
from flowgrpo_jax.families.toy.prompts import DATA_DIR, load_metadata
from flowgrpo_jax.families.toy.text import Tokenizer

TINY = toy_model.ToyModelConfig(image_size=24, patch_size=6, width=32, heads=2, layers=1,
                                text_width=16, text_layers=1, text_heads=2)


def test_shipped_checkpoint_gives_a_generator_with_the_right_shapes():
    generator = families.load("toy").build(ml_collections.ConfigDict({"family": "toy"}))
    with open(os.path.join(toy_model.SHIPPED, toy_model.CONFIG_FILE)) as f:
        size = json.load(f)["image_size"]
    assert generator.latent_shape == (size, size, 3)
    h, w, c = generator.latent_shape
    text = generator.encode(["a photo of a red circle", ""])
    x = jax.random.normal(jax.random.key(0), (2, h, w, c))
    apply = nnx.jit(generator.apply)  # eager, the MMDiT's hundreds of small ops are slow
    v = apply(generator.model, x, jnp.array([1000.0, 500.0]), text)
    assert v.shape == (2, h, w, c) and v.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(v)))
    # conditioning matters: a prompt and the empty prompt give different velocities
    v_empty = apply(generator.model, x, jnp.array([1000.0, 500.0]), generator.encode(["", ""]))
    assert float(jnp.abs(v[0] - v_empty[0]).max()) > 1e-3


@pytest.fixture(scope="module")
def tiny_model():
    return toy_model.ToyModel(TINY, rngs=nnx.Rngs(3))


def test_save_load_round_trip_is_exact(tmp_path, tiny_model):
    model = tiny_model
    toy_model.save(str(tmp_path), model)
    loaded = toy_model.load(str(tmp_path))
    ids, mask = Tokenizer(max_length=TINY.max_length).encode(["a photo of two squares"])
    x = jax.random.normal(jax.random.key(1), (1, 24, 24, 3))
    t = jnp.array([700.0])
    velocity = nnx.jit(lambda m: m.velocity(x, t, ids, mask))
    np.testing.assert_array_equal(velocity(model), velocity(loaded))


def test_load_names_missing_and_misshaped_params(tmp_path, tiny_model):
    toy_model.save(str(tmp_path), tiny_model)
    params = dict(np.load(tmp_path / toy_model.PARAMS_FILE))
    dropped = "transformer/proj_out/bias"
    del params[dropped]
    params["text_encoder/position"] = np.zeros((3, 3), np.float32)
    np.savez(tmp_path / toy_model.PARAMS_FILE, **params)
    with pytest.raises(ValueError, match="missing.*proj_out/bias.*wrong shape.*text_encoder/position"):
        toy_model.load(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="config.json"):
        toy_model.load(str(tmp_path / "nothing"))


def test_position_table_tells_every_cell_apart():
    """Any two cells of the 3x3 grid differ in the position features by most of their norm
    (SD3's geometric frequencies gave 1.3 against a norm of 6.9: cells nearly alike)."""
    table = toy_model.sincos_positions(3, 96)
    norm = np.linalg.norm(table, axis=1)
    distances = [np.linalg.norm(table[i] - table[j]) for i in range(9) for j in range(i + 1, 9)]
    assert min(distances) > 0.9 * norm.mean()


def test_decode_clips_to_uint8():
    images = latents_to_images(np.array([[[[-2.0, -1.0, 0.0], [1.0, 3.0, 0.5]]]]))
    np.testing.assert_array_equal(images, [[[[0, 0, 128], [255, 255, 191]]]])
    assert images.dtype == np.uint8


def test_short_pretraining_decreases_the_loss():
    prompts = load_metadata(DATA_DIR / "train.jsonl")[:64]
    x0, texts = pretrain.Batches(prompts, 16, 0.0, seed=123, image_size=TINY.image_size).next()
    held_out = (jnp.asarray(x0),) + Tokenizer(max_length=TINY.max_length).encode(texts)

    @nnx.jit
    def loss_of(model):  # mean over several noise draws: one draw is too noisy to compare
        return jnp.mean(jnp.stack([pretrain.flow_matching_loss(model, *held_out, jax.random.key(k))
                                   for k in range(8)]))

    before = loss_of(toy_model.ToyModel(TINY, rngs=nnx.Rngs(0)))
    model, losses = pretrain.pretrain(
        TINY, prompts, steps=30, batch_size=16, lr=3e-3, warmup=5, weight_decay=1e-4, cfg_dropout=0.1,
        seed=0, progress=False)
    assert len(losses) == 30 and np.all(np.isfinite(losses))
    after = loss_of(model)
    assert after < 0.7 * before, (before, after)


@pytest.mark.slow  # 40 s of pretraining; the loss test above runs the same loop
def test_pretraining_with_ema_returns_the_average_of_the_weights(tmp_path):
    """The EMA (decay ramped as (1 + step) / (10 + step), capped) of the weights of the same run
    without it, whose per-step snapshots are the weights themselves."""
    prompts = load_metadata(DATA_DIR / "train.jsonl")[:32]
    kw = dict(steps=3, batch_size=8, lr=3e-3, warmup=1, weight_decay=1e-4, cfg_dropout=0.1, seed=0,
              progress=False)
    pretrain.pretrain(TINY, prompts, save_every=1, out=str(tmp_path), **kw)
    weights = [nnx.state(toy_model.ToyModel(TINY, rngs=nnx.Rngs(0)), nnx.Param)] + [
        nnx.state(toy_model.load(str(tmp_path / f"step_{s}")), nnx.Param) for s in (1, 2, 3)]
    expected = weights[0]
    for step in (1, 2, 3):
        decay = min(0.2, (1 + step) / (10 + step))
        expected = jax.tree.map(lambda e, w: decay * e + (1 - decay) * w, expected, weights[step])
    ema_model, _ = pretrain.pretrain(TINY, prompts, ema_decay=0.2, **kw)
    got = nnx.state(ema_model, nnx.Param)
    assert not np.allclose(jax.tree.leaves(got)[0], jax.tree.leaves(weights[3])[0])
    for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-6)
