"""Reward functions registered by name, and their weighted combination.

A reward *factory* loads whatever the reward needs (models, sessions) once and returns a plain
host function

    fn(images: uint8 (N, H, W, 3), prompts: list[str], metadata: list[dict]) -> dict[str, (N,)]

whose dict holds "score" (the value that enters the weighted sum) and optionally named
sub-scores, which are only logged. Registering a new reward is one decorator:

    @register("my_reward")
    def my_reward(**options):
        return lambda images, prompts, metadata: {"score": ...}

The built-in rewards are listed below; others come from plugin modules (`load_plugin`): a run's
`reward.plugins` and its model family's own (the toy family's `toy_geneval`).
"""

import importlib
import importlib.util
import inspect
import math
import pathlib

import numpy as np

_FACTORIES = {}
# Modules holding the built-in rewards; imported on first look-up. Their heavy imports (torch,
# onnxruntime) happen inside the factories, so listing them costs nothing.
_BUILTIN_MODULES = (
    "flowgrpo_jax.rewards.jpeg",
    "flowgrpo_jax.rewards.brightness",
    "flowgrpo_jax.rewards.ocr",
    "flowgrpo_jax.rewards.pickscore",
    "flowgrpo_jax.rewards.clipscore",
    "flowgrpo_jax.rewards.aesthetic",
    "flowgrpo_jax.rewards.geneval_remote",
)


def register(name: str):
    """Decorator registering a reward factory under `name`."""

    def wrap(factory):
        if name in _FACTORIES and _FACTORIES[name] is not factory:
            raise ValueError(f"reward {name!r} is already registered by {_FACTORIES[name]!r}")
        _FACTORIES[name] = factory
        return factory

    return wrap


def registered() -> list:
    _import_builtins()
    return sorted(_FACTORIES)


def build(name: str, **options):
    """Calls the factory of `name` (loads its models) and returns the reward function."""
    _import_builtins()
    if name not in _FACTORIES:
        raise KeyError(f"unknown reward {name!r}; registered rewards: {', '.join(registered())}")
    factory = _FACTORIES[name]
    _check_options(name, factory, options)
    return factory(**options)


def _check_options(name: str, factory, options: dict) -> None:
    """A ValueError naming the options a factory takes, rather than a TypeError from its call."""
    signature = inspect.signature(factory)
    try:
        signature.bind(**options)
    except TypeError as e:
        takes = ", ".join(signature.parameters) or "none"
        raise ValueError(f"reward {name!r}: {e} (options it takes: {takes})") from None


def load_plugin(spec: str) -> None:
    """Imports a module (dotted name, or a path to a .py file) whose import registers rewards."""
    if spec.endswith(".py"):
        path = pathlib.Path(spec).resolve()
        if not path.is_file():
            raise FileNotFoundError(f"reward plugin file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(f"reward_plugin_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        importlib.import_module(spec)


def parse_weights(text: str) -> dict:
    """'ocr:1.0,pickscore:0.5' -> {'ocr': 1.0, 'pickscore': 0.5}; a bare name weighs 1."""
    weights = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, weight = item.partition(":")
        try:
            value = float(weight) if weight else 1.0
        except ValueError:
            value = None
        if value is None or not math.isfinite(value):
            raise ValueError(f"bad weight {weight!r} for reward {name!r} in {text!r}")
        weights[name.strip()] = value
    if not weights:
        raise ValueError(f"no reward named in {text!r}; expected e.g. 'ocr:1.0,pickscore:0.5'")
    return weights


def options_in_use(weights: dict, options: dict) -> dict:
    """The entries of `options` ({reward: {key: value}}) of the rewards `weights` names, so a
    config keeps its reward's options when a run weighs other rewards."""
    return {name: values for name, values in options.items() if name in weights}


def merged_options(options: dict, overrides: dict) -> dict:
    """`options` ({reward: {key: value}}) with `overrides` laid over them, reward by reward."""
    return {name: {**options.get(name, {}), **overrides.get(name, {})}
            for name in {**options, **overrides}}


class WeightedReward:
    """Several rewards built once; a call gives the weighted total and every component.

    Components are named after the reward ("ocr") and, for sub-scores, "ocr/<sub-score>".
    """

    def __init__(self, weights: dict, options: dict | None = None):
        options = options or {}
        unknown = set(options) - set(weights)
        if unknown:
            raise ValueError(f"options given for rewards not in use: {sorted(unknown)}")
        self.weights = dict(weights)
        self.functions = {name: build(name, **options.get(name, {})) for name in weights}

    def __call__(self, images, prompts, metadata):
        n = len(images)
        total = np.zeros(n, np.float64)
        components = {}
        for name, fn in self.functions.items():
            outputs = fn(images, prompts, metadata)
            if "score" not in outputs:
                raise ValueError(f"reward {name!r} returned {sorted(outputs)} without 'score'")
            for key, value in outputs.items():
                value = np.asarray(value, np.float64)
                if value.shape != (n,):
                    raise ValueError(
                        f"reward {name!r} gave {key!r} of shape {value.shape} for {n} images")
                components[name if key == "score" else f"{name}/{key}"] = value
            total += self.weights[name] * components[name]
        return total, components


def _import_builtins() -> None:
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
