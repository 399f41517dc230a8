"""Test ordering for make test's two pytest-xdist workers, and the compilation cache they share."""
import os

import pytest

from flowgrpo_jax import compile_cache

# The longest files run first, so the two workers do not end with one of them compiling for a
# TPU alone while the other has nothing left.
LONGEST_FIRST = ("test_tpu_compile.py", "test_train_distributed.py", "test_gpu_check.py",
                 "test_parallel.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
    """One persistent JAX compilation cache for the run, in pytest's temporary folder of this
    run (never the user's): its workers and every process a test starts (they inherit the
    environment) compile the tiny configs' programs once, not once a process. Uncapped: a
    capped cache scans its folder at every write (compile_cache.py), and the suite writes
    thousands of programs."""
    run_folder = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        run_folder = run_folder.parent  # shared by the workers
    folder = str(run_folder / "jax_compilation_cache")
    os.environ.update({"JAX_COMPILATION_CACHE_DIR": folder,
                       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
                       "JAX_COMPILATION_CACHE_MAX_SIZE": "-1"})
    compile_cache.setup(folder=folder)
