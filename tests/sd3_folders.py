"""Converted SD3 pipeline folders of configs only (no weights: the planner reads none), for
compiling SD3.5 Medium's programs at a reduced depth or width."""
import json
import os

from flowgrpo_jax.families.sd3.loading import SD35M_CONFIGS

_KINDS = {"transformer": "transformer", "vae": "vae", "text_encoder": "clip_text",
          "text_encoder_2": "clip_text", "text_encoder_3": "t5_encoder"}


def sd35m_folder(folder, num_layers: int, overrides: dict | None = None) -> str:
    """SD3.5 Medium's configs with the MMDiT cut to its first `num_layers - 1` layers plus the
    context_pre_only last one, and `overrides` ({component: {key: value}}) applied on top."""
    index = {"_class_name": "StableDiffusion3Pipeline", "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "tokenizer_3": ["transformers", "T5TokenizerFast"]}
    for name, kind in _KINDS.items():
        with open(os.path.join(SD35M_CONFIGS, f"{name}.json")) as f:
            config = json.load(f)
        if name == "transformer":
            config["num_layers"] = num_layers
            config["dual_attention_layers"] = [i for i in config["dual_attention_layers"] if i < num_layers - 1]
        config.update((overrides or {}).get(name, {}))
        os.makedirs(os.path.join(folder, name))
        for file, content in (("config.json", config), ("flowgrpo_jax.json", {"format": 2, "kind": kind})):
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
