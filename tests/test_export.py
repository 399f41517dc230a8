"""Trained weights to and from PyTorch on the tiny random SD3 pipeline of test_encode_prompt.py,
fp32: PEFT adapters and diffusers LoRA files both ways, the merged diffusers transformer, and
Hub ids resolved from a fake local cache.

One run trains here (sd35m_pickscore.py:tiny, the jpeg reward, 1 epoch) starting from an adapter
made with PEFT itself; its workdir is exported in every format and loaded back into diffusers.
Velocities are compared on the same inputs, as relative L2 of the whole velocity and of the
LoRA's part of it (velocity with the LoRA minus without), so a mapping error in the LoRA cannot
hide behind the base model's agreement.
"""
import copy
import hashlib
import importlib.util
import json
import os
import re
import types

import jax
import jax.numpy as jnp
import huggingface_hub
import ml_collections
import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel
from flax import nnx
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.numpy import load_file, save_file

from flowgrpo_jax import config as config_lib
from flowgrpo_jax import evaluate as ev
from flowgrpo_jax import export as export_cli
from flowgrpo_jax import families, lora_io
from flowgrpo_jax.convert import hub
from flowgrpo_jax.convert.core import ConversionError, plan, source_keys, target_shapes
from flowgrpo_jax.convert.safetensors_io import SafetensorsFolder, read_metadata, write_sharded
from flowgrpo_jax.families.sd3.loading import load_pipeline, load_transformer
from flowgrpo_jax.families.sd3.pipeline import apply_transformer, decode, sample_latents
from flowgrpo_jax.models.components import component_for_class
from flowgrpo_jax.models.conversion import convert_folder
from flowgrpo_jax.programs import build_trainable_model
from flowgrpo_jax.train import train
from test_encode_prompt import T5_LENGTH, saved_and_converted
from train_runs import ROOT

# The PyTorch Flow-GRPO's target_modules (PEFT matches them as name suffixes).
TARGETS = ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
           "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v"]
RANK, ALPHA = 4, 8.0  # the :tiny variants'


def rel_l2(ours, reference) -> float:
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


def inputs():
    rng = np.random.default_rng(1)
    return dict(x=rng.standard_normal((2, 4, 6, 16), dtype=np.float32),
                t=np.array([250.0, 900.0], np.float32),
                text=rng.standard_normal((2, 7, 48), dtype=np.float32),
                pooled=rng.standard_normal((2, 20), dtype=np.float32))


def torch_velocity(transformer, x) -> np.ndarray:
    with torch.no_grad():
        out = transformer(hidden_states=torch.from_numpy(x["x"]).permute(0, 3, 1, 2),
                          timestep=torch.from_numpy(x["t"]),
                          encoder_hidden_states=torch.from_numpy(x["text"]),
                          pooled_projections=torch.from_numpy(x["pooled"])).sample
    return out.permute(0, 2, 3, 1).numpy()


_forward = nnx.jit(lambda model, *args: model(*args))


def our_velocity(model, x) -> np.ndarray:
    """`model` an MMDiT, or an evaluate.Model (velocity_fn on its params); jitted (one compile
    per model structure is cheaper than running it op by op)."""
    if isinstance(model, ev.Model):
        model = nnx.merge(nnx.graphdef(model.generator.model), *model.params)
    return np.asarray(_forward(model, *(jnp.asarray(x[k]) for k in ("x", "t", "text", "pooled"))))


def assert_same_velocity(ours, theirs, base, what: str):
    """The whole velocity and the LoRA's part of it (against `base`, the model without it)."""
    whole, delta = rel_l2(ours, theirs), rel_l2(ours - base, theirs - base)
    size = float(np.linalg.norm(theirs - base) / np.linalg.norm(base))
    print(f"{what}: velocity rel L2 {whole:.2e}, LoRA part rel L2 {delta:.2e} "
          f"(the LoRA moves the velocity by {size:.1%})")
    assert size > 1e-2, "the LoRA barely changes the velocity: the comparison would mean little"
    assert whole < 1e-5 and delta < 1e-4, (what, whole, delta)


def tiny_config(model_path, **lora) -> ml_collections.ConfigDict:
    config = config_lib.load_file(str(ROOT / "configs" / "sd35m_pickscore.py") + ":tiny")
    config.model.path = str(model_path)
    config.reward.rewards = "jpeg_compressibility:1.0"
    for key, value in lora.items():
        config.lora[key] = value
    return config


def peft_adapter(transformer, folder, *, rank=RANK, alpha=ALPHA, targets=TARGETS, seed=0):
    """An adapter made with PEFT itself: gaussian A, and B random too (not PEFT's zeros)."""
    model = get_peft_model(copy.deepcopy(transformer), LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=targets, init_lora_weights="gaussian"))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(str(folder))
    return str(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(diffusers pipeline, its save_pretrained folder, the converted folder)."""
    return saved_and_converted(tmp_path_factory)


@pytest.fixture(scope="module")
def adapter(tiny, tmp_path_factory):
    return peft_adapter(tiny[0].transformer, tmp_path_factory.mktemp("peft"))


@pytest.fixture(scope="module")
def run(tiny, adapter, tmp_path_factory):
    """A workdir trained from the PEFT adapter: one epoch of 8 images, 2 SDE steps without CFG
    (the fewest programs to compile), one update."""
    workdir = tmp_path_factory.mktemp("run")
    config = tiny_config(tiny[2], init_from=adapter)
    config.num_epochs = 1
    s = config.sample
    s.num_steps, s.guidance_scale, s.group_size, s.groups_per_epoch = 2, 1.0, 2, 4
    config.train.updates_per_epoch = 1
    train(config, str(workdir))
    return workdir


def stub_generator(converted):
    """What build_trainable_model takes of a generator: the transformer and how to apply it."""
    return types.SimpleNamespace(model=load_transformer(str(converted)), apply=apply_transformer)


def run_model(workdir) -> ev.Model:
    """The run's EMA params on our model, as evaluation restores them."""
    return ev.workdir_model(str(workdir))[1]


def test_a_peft_adapter_made_with_peft_gives_peft_velocity(tiny, adapter):
    reference, _, converted = tiny
    config = tiny_config(converted, init_from=adapter)
    generator = stub_generator(converted)
    build_trainable_model(config, families.load("sd3"), generator)
    x = inputs()
    theirs = torch_velocity(PeftModel.from_pretrained(copy.deepcopy(reference.transformer), adapter), x)
    base = torch_velocity(reference.transformer, x)
    assert_same_velocity(our_velocity(generator.model, x), theirs, base, "PEFT adapter imported")
    # evaluate --lora: LoRA on the adapter's own modules, at its rank and scale
    config = tiny_config(converted, rank=8, alpha=1.0)
    _, model = ev.resolve(config, None, lora=adapter)
    assert_same_velocity(our_velocity(model, x), theirs, base, "evaluate --lora")


def test_a_run_from_a_peft_adapter_trains_and_exports_to_peft_diffusers_and_merged(
        tiny, adapter, run, tmp_path):
    """One test, so that the run trains once whatever worker runs it."""
    reference = tiny[0]
    x = inputs()
    ours, base = our_velocity(run_model(run), x), torch_velocity(reference.transformer, x)

    # Training continued from the adapter: the raw trained LoRA, exported with PEFT's names,
    # is the adapter's moved by one small Adam update.
    assert export_cli.main(["--workdir", str(run), "--out", str(tmp_path / "raw"), "--no-ema"]) == 0
    before = load_file(os.path.join(adapter, lora_io.PEFT_WEIGHTS))
    after = load_file(str(tmp_path / "raw" / lora_io.PEFT_WEIGHTS))
    assert sorted(after) == sorted(before)
    change = max(float(np.abs(after[k] - before[k]).max()) for k in before)
    scale = min(float(np.abs(before[k]).max()) for k in before)
    print(f"largest change of a LoRA weight in training: {change:.1e} (weights up to {scale:.2f})")
    assert 0 < change < 5e-3 < scale

    # peft (the EMA params, by default)
    out = tmp_path / "peft"
    assert export_cli.main(["--workdir", str(run), "--out", str(out)]) == 0
    config = json.loads((out / lora_io.PEFT_CONFIG).read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (RANK, ALPHA, "LORA")
    assert "transformer_blocks.0.attn.to_out.0" in config["target_modules"]
    assert all(k.startswith("base_model.model.") and ".lora_" in k
               for k in load_file(str(out / lora_io.PEFT_WEIGHTS)))
    peft_model = PeftModel.from_pretrained(copy.deepcopy(reference.transformer), str(out))
    assert_same_velocity(ours, torch_velocity(peft_model, x), base, "PEFT export")

    # diffusers
    out = tmp_path / "diffusers"
    assert export_cli.main(["--workdir", str(run), "--out", str(out), "--format", "diffusers"]) == 0
    assert sorted(os.listdir(out)) == [lora_io.DIFFUSERS_WEIGHTS]
    pipe = copy.deepcopy(reference)
    pipe.load_lora_weights(str(out))
    assert_same_velocity(ours, torch_velocity(pipe.transformer, x), base, "diffusers LoRA export")

    # merged, sharded
    out = tmp_path / "merged"
    assert export_cli.main(["--workdir", str(run), "--out", str(out), "--format", "merged",
                            "--max_shard_size", "40KB"]) == 0
    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    merged = SD3Transformer2DModel.from_pretrained(str(out)).eval()
    assert sorted(merged.state_dict()) == sorted(index["weight_map"])
    assert_same_velocity(ours, torch_velocity(merged, x), base, "merged export, diffusers")
    back = tmp_path / "back"
    convert_folder(str(out), str(back), log=lambda *_: None)
    assert_same_velocity(ours, our_velocity(load_transformer(str(back)), x), base,
                         "merged export, converted back")


@pytest.mark.slow  # compiles our sampler and runs both pipelines (~20 s)
def test_the_pipeline_with_the_diffusers_lora_samples_our_images(tiny, run, tmp_path):
    """Pipeline output with the exported LoRA, as test_pipeline.py compares it: 4 Euler steps
    with CFG from the same initial latents."""
    reference, _, converted = tiny
    out = tmp_path / "diffusers"
    assert export_cli.main(["--workdir", str(run), "--out", str(out), "--format", "diffusers"]) == 0
    pipe = copy.deepcopy(reference)
    pipe.load_lora_weights(str(out))
    prompts, steps = ["a red cube on two cats", "a photo of a dog"], 4
    latents = np.random.default_rng(0).standard_normal((2, 4, 6, 16), np.float32)
    with torch.no_grad():
        expected = pipe(prompts, num_inference_steps=steps, guidance_scale=4.5, height=32,
                        width=48, max_sequence_length=T5_LENGTH, output_type="np",
                        latents=torch.from_numpy(latents).permute(0, 3, 1, 2)).images
    ours = load_pipeline(str(converted))
    model = run_model(run)
    transformer = nnx.merge(nnx.graphdef(model.generator.model), *model.params)
    final = sample_latents(ours._replace(transformer=transformer), prompts, steps=steps,
                           guidance=4.5, key=jax.random.key(0), latents=latents,
                           max_sequence_length=T5_LENGTH)
    error = rel_l2(decode(ours, final), expected)
    print(f"pipeline images with the LoRA: rel L2 {error:.2e}")
    assert error < 1e-4


def test_every_key_table_runs_backwards_to_the_pytorch_names(tiny):
    """source_keys inverts each net's conversion table exactly: every parameter gets the key
    the forward table maps to it, so export names what conversion read."""
    reference = tiny[0]
    for name in ("transformer", "vae", "text_encoder", "text_encoder_3"):
        module = getattr(reference, name)
        if hasattr(module.config, "to_dict"):  # transformers: what config.json holds
            config = {**module.config.to_dict(), "architectures": [type(module).__name__]}
        else:
            config = dict(module.config)
        component = component_for_class(type(module).__name__)
        target = target_shapes(component.abstract_model(config))
        forward = plan({k: tuple(v.shape) for k, v in module.state_dict().items()},
                       component.conversion_rules(), target)
        backward = source_keys(component.conversion_rules(), list(target))
        assert {key: path for key, (path, _) in forward.items()} == {
            key: path for path, (key, _) in backward.items()}, name
    with pytest.raises(ConversionError, match="unmapped"):
        source_keys(component.conversion_rules(), [("no", "such", "param")])


def test_sharded_writing_reads_back_with_its_index_and_metadata(tmp_path):
    tensors = {f"w{i}": np.full((10, 10), i, np.float32) for i in range(5)}  # 400 bytes each
    files = write_sharded(str(tmp_path), "model", tensors, 1000, {"format": "pt"})
    assert [os.path.basename(f) for f in files] == [
        "model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors",
        "model-00003-of-00003.safetensors", "model.safetensors.index.json"]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 2000 and index["weight_map"]["w4"].startswith("model-00003")
    folder = SafetensorsFolder(str(tmp_path))
    assert sorted(folder) == sorted(tensors) and float(folder["w3"][0, 0]) == 3.0
    assert read_metadata(files[0]) == {"format": "pt"}
    assert write_sharded(str(tmp_path / "one"), "model", tensors, 10**6) == [
        str(tmp_path / "one" / "model.safetensors")]


@pytest.mark.parametrize("case", ["rank", "missing", "other_model", "untargeted"])
def test_an_adapter_that_does_not_fit_is_refused_by_name(tiny, adapter, tmp_path, case):
    reference, _, converted = tiny
    if case == "rank":
        path, expected = peft_adapter(reference.transformer, tmp_path / "r2", rank=2), "rank 2"
    elif case == "untargeted":
        path = peft_adapter(reference.transformer, tmp_path / "ff", targets=TARGETS + ["ff.net.2"])
        expected = "outside config.lora.targets: transformer_blocks.0.ff.net.2"
    else:
        tensors = load_file(os.path.join(adapter, lora_io.PEFT_WEIGHTS))
        if case == "missing":
            tensors = {k: v for k, v in tensors.items() if ".1.attn.to_k." not in k}
            expected = "missing from the adapter: transformer_blocks.1.attn.to_k"
        else:  # a Flux LoRA, as diffusers saves it
            tensors = {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight":
                       np.zeros((RANK, 24), np.float32),
                       "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight":
                       np.zeros((24, RANK), np.float32)}
            expected = "not in this model: single_transformer_blocks.0.attn.to_q"
        path = str(tmp_path / "lora.safetensors")
        save_file(tensors, path)
    config = tiny_config(converted, init_from=path)
    with pytest.raises(lora_io.AdapterError, match=expected) as error:
        build_trainable_model(config, families.load("sd3"), stub_generator(converted))
    assert "\n" not in str(error.value) and "config.lora.init_from=" in str(error.value)


def test_init_from_is_checked_with_the_config(tiny, tmp_path, monkeypatch):
    use_hub_cache(monkeypatch, tmp_path / "cache")
    for value, message in ((str(tmp_path / "nowhere"), "no such file or folder"),
                           ("acme/no-such-lora", "not in the Hugging Face cache")):
        config = tiny_config(tiny[2], init_from=value)
        with pytest.raises(config_lib.ConfigError, match=f"config.lora.init_from=.*{message}"):
            config_lib.validate(config, 1)
    config = tiny_config(tiny[2], init_from=str(tmp_path), enabled=False)
    with pytest.raises(config_lib.ConfigError, match="needs lora.enabled=True"):
        config_lib.validate(config, 1)


def test_export_refuses_what_has_no_pytorch_form(tmp_path, capsys):
    for family, lora, fmt, message in (
            ("toy", True, "peft", "model family 'toy' has no PyTorch counterpart"),
            ("sd3", False, "peft", "fine-tuned every weight .* --format merged")):
        workdir = tmp_path / f"{family}-{lora}"
        (workdir / "checkpoints").mkdir(parents=True)
        (workdir / "config.json").write_text(json.dumps(
            {"model": {"family": family}, "lora": {"enabled": lora}}))
        assert export_cli.main(["--workdir", str(workdir), "--out", str(tmp_path / "out"),
                                "--format", fmt]) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert re.search(message, err), err


def fake_hub_cache(cache, repo_id: str, folder) -> str:
    """`folder` laid out as huggingface_hub's download leaves it: blobs by hash, a snapshot of
    symlinks into them, refs/main naming the snapshot."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = root / "snapshots" / commit
    for dirpath, _, names in os.walk(folder):
        for name in names:
            source = os.path.join(dirpath, name)
            data = open(source, "rb").read()
            blob = root / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.write_bytes(data)
            link = snapshot / os.path.relpath(source, folder)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    return str(snapshot)


def use_hub_cache(monkeypatch, cache) -> None:
    """Points huggingface_hub at `cache`, as HF_HUB_CACHE set before the process starts does."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))


def convert_weights_cli():
    spec = importlib.util.spec_from_file_location("convert_weights",
                                                  ROOT / "tools" / "convert_weights.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_a_hub_id_converts_from_the_local_cache(tiny, tmp_path, monkeypatch, capsys):
    _, src, converted = tiny
    cache = tmp_path / "hub"
    snapshot = fake_hub_cache(cache, "acme/tiny-sd3", src)
    assert os.path.islink(os.path.join(snapshot, "transformer", "config.json"))
    use_hub_cache(monkeypatch, cache)
    main = convert_weights_cli()
    assert main(["--src", "acme/tiny-sd3", "--dst", str(tmp_path / "out")]) == 0
    for name in ("transformer", "vae", "text_encoder_3"):
        assert ((tmp_path / "out" / name / "params.safetensors").read_bytes()
                == (converted / name / "params.safetensors").read_bytes()), name
    # The loaders take a Hub id too (here of a converted folder someone shared).
    fake_hub_cache(cache, "acme/tiny-sd3-flax", converted)
    x = inputs()
    np.testing.assert_array_equal(our_velocity(load_transformer("acme/tiny-sd3-flax"), x),
                                  our_velocity(load_transformer(str(converted)), x))

    capsys.readouterr()
    assert main(["--src", "acme/not-downloaded", "--dst", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "acme/not-downloaded: not a local path, and not in " \
        "the Hugging Face cache" in err and str(cache) in err, err
    assert not (tmp_path / "none").exists()


def test_hub_cache_location_and_incomplete_snapshots(tmp_path, monkeypatch):
    use_hub_cache(monkeypatch, tmp_path / "cache")
    assert hub.parse_id("owner/name@v1.0") == ("owner/name", "v1.0")
    assert hub.parse_id("/abs/path") is None and hub.parse_id("plain") is None
    assert hub.local_path("plain") == "plain"  # not an id: the caller reports it missing

    folder = tmp_path / "repo"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    snapshot = fake_hub_cache(tmp_path / "cache", "acme/repo", folder)
    assert hub.local_path("acme/repo") == snapshot
    assert hub.local_path(f"acme/repo@{os.path.basename(snapshot)}") == snapshot
    with pytest.raises(hub.NotCachedError, match="revision 'v2'"):
        hub.local_path("acme/repo@v2")
    for blob in (tmp_path / "cache" / "models--acme--repo" / "blobs").iterdir():
        blob.unlink()
    with pytest.raises(hub.NotCachedError, match="incomplete .* config.json"):
        hub.local_path("acme/repo")
