"""Test ordering for make test's two pytest-xdist workers."""

# The longest files run first, so the two workers do not end with one of them compiling for a
# TPU alone while the other has nothing left.
LONGEST_FIRST = ("test_tpu_compile.py", "test_train_distributed.py", "test_parallel.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
