"""Writes SD3.5 Medium as a converted pipeline folder of configs only (no weights), its MMDiT
cut to fewer layers, for the planner: it reads no weights, so this compiles SD3.5-M's programs
at a reduced depth, e.g. to measure how their FLOPs grow per layer (docs/benchmarks.md).

    python tools/sd35m_configs.py /tmp/sd35m-3 --layers 3 --dual 0,1
    python -m flowgrpo_jax.plan --config configs/sd35m_geneval.py --topology v5e:2x4 \
        --nosearch --programs "train step" --config.model.path=/tmp/sd35m-3

--layers keeps the first layers - 1 MMDiT layers and the context_pre_only last one; --dual
names the layers with SD3.5's second attention (default: SD3.5 Medium's among those kept).
"""
import argparse
import json
import os

from flowgrpo_jax.families.sd3.loading import SD35M_CONFIGS

_KINDS = {"transformer": "transformer", "vae": "vae", "text_encoder": "clip_text",
          "text_encoder_2": "clip_text", "text_encoder_3": "t5_encoder"}
_INDEX = {"_class_name": "StableDiffusion3Pipeline",
          "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
          "tokenizer": ["transformers", "CLIPTokenizer"],
          "tokenizer_2": ["transformers", "CLIPTokenizer"],
          "tokenizer_3": ["transformers", "T5TokenizerFast"]}


def write_folder(folder, num_layers: int, overrides: dict | None = None) -> str:
    """SD3.5 Medium's configs in `folder`, the MMDiT cut to `num_layers`, then `overrides`
    ({component: {key: value}}) applied."""
    index = dict(_INDEX)
    for name, kind in _KINDS.items():
        with open(os.path.join(SD35M_CONFIGS, f"{name}.json")) as f:
            config = json.load(f)
        if name == "transformer":
            config["num_layers"] = num_layers
            config["dual_attention_layers"] = [i for i in config["dual_attention_layers"]
                                               if i < num_layers - 1]
        config.update((overrides or {}).get(name, {}))
        os.makedirs(os.path.join(folder, name))
        for file, content in (("config.json", config),
                              ("flowgrpo_jax.json", {"format": 2, "kind": kind})):
            with open(os.path.join(folder, name, file), "w") as f:
                json.dump(content, f)
        index[name] = ["diffusers", config.get("_class_name", kind)]
    os.makedirs(os.path.join(folder, "scheduler"))
    with open(os.path.join(SD35M_CONFIGS, "scheduler.json")) as f:
        scheduler = f.read()
    with open(os.path.join(folder, "scheduler", "scheduler_config.json"), "w") as f:
        f.write(scheduler)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f)
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="where to write it (must not exist)")
    parser.add_argument("--layers", type=int, required=True, help="MMDiT layers, at least 2")
    parser.add_argument("--dual", default=None,
                        help="comma-separated layers with the second attention")
    args = parser.parse_args()
    if args.layers < 2:
        parser.error(f"--layers {args.layers}: the MMDiT needs at least 2 (the last is special)")
    if os.path.exists(args.folder):
        parser.error(f"{args.folder} exists; name a new folder")
    overrides = {}
    if args.dual is not None:
        dual = [int(i) for i in args.dual.split(",") if i]
        if any(not 0 <= i < args.layers - 1 for i in dual):
            parser.error(f"--dual {args.dual}: layers 0..{args.layers - 2} can have it")
        overrides["transformer"] = {"dual_attention_layers": dual}
    print(write_folder(args.folder, args.layers, overrides))


if __name__ == "__main__":
    main()
