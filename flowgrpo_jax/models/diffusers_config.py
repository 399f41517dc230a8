"""The architecture settings of a diffusers model's config.json, read strictly."""
import dataclasses
from collections.abc import Mapping

# Run-time settings of the model configs, never in a diffusers config.json.
RUNTIME_FIELDS = {"remat", "attention_impl", "scan_layers"}


def architecture_values(cls, config: Mapping, class_name: str, optional: Mapping) -> dict:
    """{field: value} of dataclass `cls` from a diffusers config.json dict of `class_name`.

    Bookkeeping keys (`_class_name`, `_diffusers_version`, ...) are ignored; `optional` gives
    the defaults of keys older configs lack; a config of another class, an unknown
    architecture key or a missing required one is an error, so no setting is silently lost.
    """
    found = config.get("_class_name", class_name)
    if found != class_name:
        raise ValueError(f"config is for {found!r}, not {class_name!r}")
    keys = {f.name for f in dataclasses.fields(cls)} - RUNTIME_FIELDS
    unknown = sorted(k for k in config if k not in keys and not k.startswith("_"))
    if unknown:
        raise ValueError(f"unknown keys in the {class_name} config: {unknown}")
    values = {**optional, **{k: config[k] for k in keys if k in config}}
    missing = sorted(keys - values.keys())
    if missing:
        raise ValueError(f"the {class_name} config lacks required keys {missing}")
    return values
