"""JAX's persistent compilation cache for the commands that compile (train, plan, sample, the
demo, ablate): every program a run compiles is written to a folder, and a second start of the
same run, on the same devices with the same software, loads its programs from there instead
of compiling them (docs/benchmarks.md, "Start-up").

The folder is the config's `compilation_cache.dir` (sample.py: --compilation_cache), else
JAX_COMPILATION_CACHE_DIR when set, else $XDG_CACHE_HOME/flowgrpo_jax/jax_compilation
(~/.cache/...); `compilation_cache.enabled=False` (--no_compilation_cache) turns it off.
Every program is cached however fast it compiled (JAX's own default skips those under a
second), so a second start compiles nothing. The folder is capped at MAX_BYTES (unless
JAX_COMPILATION_CACHE_MAX_SIZE says otherwise, -1 for no cap), the least recently used entries
evicted first; with a cap JAX also holds a file lock while it reads or writes an entry, so
processes sharing the folder (the processes of one host) never read one half written, and
scans the whole folder at every write, a cost that grows with the number of entries. A cache
is trusted code: do not share its folder with users you do not trust.

`counts()` says how many programs this process compiled and how many it loaded from the
cache, from JAX's own monitoring events.
"""
import dataclasses
import os

import jax

MAX_BYTES = 20 * 2**30
# The event JAX records for every program it compiles or loads, and the one for each load.
_PROGRAM_EVENT = "/jax/core/compile/backend_compile_duration"
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def default_folder() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "flowgrpo_jax", "jax_compilation")


def setup(enabled: bool = True, folder: str = "") -> str | None:
    """Turns the cache on in `folder` (see above for "") or, with enabled=False, off; returns the
    folder in use (None: off). Call it before the first compile: JAX opens its cache once per
    process."""
    jax.config.update("jax_enable_compilation_cache", enabled)
    if not enabled:
        return None
    folder = os.path.abspath(os.path.expanduser(
        folder or jax.config.jax_compilation_cache_dir or default_folder()))
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    # JAX's default, -1, is no cap and no lock; an explicit JAX_COMPILATION_CACHE_MAX_SIZE wins
    if (jax.config.jax_compilation_cache_max_size == -1
            and "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ):
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return folder


@dataclasses.dataclass(frozen=True)
class Counts:
    """Programs this process asked XLA for, and how many of them came from the cache."""

    programs: int
    loaded: int

    @property
    def compiled(self) -> int:
        return self.programs - self.loaded

    def __str__(self) -> str:
        return f"{self.compiled} compiled, {self.loaded} loaded from the compilation cache"


_counted = {_PROGRAM_EVENT: 0, _CACHE_HIT_EVENT: 0}


def _count(event: str, *args, **kwargs) -> None:
    if event in _counted:
        _counted[event] += 1


# Counted from import on, whether or not setup() was called (a process without the cache
# compiles everything it asks for).
jax.monitoring.register_event_listener(_count)
jax.monitoring.register_event_duration_secs_listener(_count)


def counts() -> Counts:
    return Counts(_counted[_PROGRAM_EVENT], _counted[_CACHE_HIT_EVENT])
