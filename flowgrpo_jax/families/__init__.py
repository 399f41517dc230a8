"""The model families, by the name a config's `model.family` gives.

Each family is a package of this folder; `FAMILY` (a `generator.Family`), in the package or
one of its modules, builds its `Generator` and declares what the trainer needs from it. The
core imports this registry, never a family: adding one is a folder and a line in `FAMILIES`,
or `register` from elsewhere.
"""
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # not at run time: the reward server imports a family's checker without JAX
    from flowgrpo_jax.generator import Family

# name -> module holding FAMILY
FAMILIES = {
    "flux": "flowgrpo_jax.families.flux",
    "sd3": "flowgrpo_jax.families.sd3",
    "toy": "flowgrpo_jax.families.toy.family",
}


def register(name: str, module: str) -> None:
    """Adds a family whose FAMILY lives in `module` (a dotted import name)."""
    if FAMILIES.get(name, module) != module:
        raise ValueError(f"model family {name!r} is already registered as {FAMILIES[name]!r}")
    FAMILIES[name] = module


def load(name: str) -> "Family":
    """The Family registered as `name`."""
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(FAMILIES)}")
    return importlib.import_module(FAMILIES[name]).FAMILY
