"""Populations: runs of one config that differ only in their seed or in numeric
hyperparameters, trained together as one program (docs/design.md, section 14).

    --config.population.seeds=8                       # seeds seed, seed+1, ..., seed+7
    --config.population.vmap="train.learning_rate=1e-4,2e-4 train.beta=0,0.01"
    --config.mesh.population=8                        # the members split over 8 devices

The members are the product of the vmapped values (in the order given) and the seeds. Each
member is the solo run of its own config (`Member.config`: the population keys cleared): the
same prompts, noise, shuffles and initial LoRA, the same checkpoints in its own folder, which
`sample`, `export` or a solo resume read as they read any run's. A vmapped key must reach the
programs only as a hyperparameter of the train state (update.TrainState.hyper: rates, KL
weight, clip range, noise level, guidance, EMA decay, NFT's beta and decay): one whose value
changes a program's shapes or control flow is refused here, and stays a separate run
(tools/ablate.py --grid).
"""
import dataclasses
import itertools
from typing import Any

import jax
import jax.numpy as jnp

class PopulationError(ValueError):
    """A population the trainer cannot run as one program; the message names the key."""


def parse_value(config, key: str, text: str):
    """`text` as the type of config's current value at dotted `key`."""
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
        if part not in node:
            raise KeyError(f"config has no key {key!r} ({part!r} is missing)")
        node = node[part]
    if leaf not in node:
        raise KeyError(f"config has no key {key!r}")
    current = node[leaf]
    if isinstance(current, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"{key}={text!r}: expected true or false")
        return text.lower() in ("true", "1")
    if isinstance(current, (int, float, str)):
        try:
            return type(current)(text)
        except ValueError:
            raise ValueError(f"{key}={text!r}: expected {type(current).__name__}") from None
    raise ValueError(f"{key} holds a {type(current).__name__}; only bool, int, float and str keys "
                     f"can be set from the command line")


def parse_assignment(text: str) -> tuple[str, list[str]]:
    """"KEY=V1,V2" -> (KEY, [V1, V2])."""
    key, sep, values = text.partition("=")
    if not sep or not key or not values:
        raise ValueError(f"{text!r} is not KEY=VALUE[,VALUE...]")
    return key, values.split(",")


def apply(config, overrides: dict):
    """A copy of `config` with the dotted keys of `overrides` set."""
    config = config.copy_and_resolve_references()
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def run_name(overrides: dict) -> str:
    """A folder name for a run with `overrides`: "learning_rate=0.0002_seed=3"."""
    return "_".join(f"{k.split('.')[-1]}={v}" for k, v in overrides.items()) or "base"


@dataclasses.dataclass(frozen=True)
class Member:
    name: str  # its folder in the population's workdir
    overrides: dict  # the keys it sets, "seed" included when the population has seeds
    config: Any  # its solo run's config


def is_population(config) -> bool:
    return bool(config.population.seeds or config.population.vmap)


def vmap_axes(config) -> list:
    """config.population.vmap as [(key, [values...])], each value of its key's type."""
    axes = []
    for text in config.population.vmap.split():
        try:
            key, values = parse_assignment(text)
            axes.append((key, [parse_value(config, key, v) for v in values]))
        except (KeyError, ValueError) as e:
            raise PopulationError(f"config.population.vmap={config.population.vmap!r}: "
                                  f"{e.args[0]}") from None
    keys = [key for key, _ in axes]
    for key in keys:
        if keys.count(key) > 1 or key in ("seed", "population.seeds", "population.vmap"):
            raise PopulationError(f"config.population.vmap: {key!r} is given twice or is not a "
                                  f"hyperparameter (seeds: config.population.seeds)")
    return axes


def members(config) -> list[Member]:
    """The members of a population config, in order (vmapped values, then seeds); a solo
    config is its one member, named ""."""
    if not is_population(config):
        return [Member("", {}, config)]
    axes = [[(key, v) for v in values] for key, values in vmap_axes(config)]
    seeds = config.population.seeds
    if seeds:
        axes.append([("seed", config.seed + i) for i in range(seeds)])
    result = []
    for combination in itertools.product(*axes):
        overrides = dict(combination)
        solo = apply(config, {**overrides, "population.seeds": 0, "population.vmap": "",
                              "mesh.population": 1})
        result.append(Member(run_name(overrides), overrides, solo))
    return result


def check(config, settings_of, hyperparameters_of) -> list[Member]:
    """The population's members, after checking that they make one program: their update
    settings (`settings_of(config)`) agree, CFG is on for all or none, and every vmapped key
    changes a hyperparameter of the train state (`hyperparameters_of(config)`)."""
    found = members(config)
    if len(found) < 2 and is_population(config):
        raise PopulationError(f"config.population gives {len(found)} member; a population has "
                              f"two or more (population.seeds, population.vmap)")
    base = found[0].config
    for key, values in vmap_axes(config):
        hypers = [hyperparameters_of(apply(base, {key: v})) for v in values]
        if all(h == hypers[0] for h in hypers):
            raise PopulationError(
                f"config.population.vmap: {key} changes no hyperparameter of the train state "
                f"({', '.join(sorted(hypers[0]))}), so its values cannot share one program; "
                f"run them as separate runs (tools/ablate.py --grid)")
    for m in found[1:]:
        if settings_of(m.config) != settings_of(base):
            raise PopulationError(f"config.population.vmap: member {m.name} changes the update's "
                                  f"shapes or control flow (e.g. train.beta 0 turns the KL term "
                                  f"off); run such values as separate runs (tools/ablate.py --grid)")
        if (m.config.sample.guidance_scale == 1.0) != (base.sample.guidance_scale == 1.0):
            raise PopulationError(f"config.population.vmap: member {m.name} turns CFG "
                                  f"{'off' if m.config.sample.guidance_scale == 1.0 else 'on'} "
                                  f"(sample.guidance_scale 1.0); run it as a separate run")
    return found


def stack(trees):
    """Per-member pytrees -> one pytree with a leading population axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def member_of(tree, index: int):
    """Member `index`'s slice of a stacked pytree."""
    return jax.tree.map(lambda leaf: leaf[index], tree)
