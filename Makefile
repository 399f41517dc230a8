# `make demo` and `make test` each create .venv on first use and install what they need.
VENV := .venv
PY := $(VENV)/bin/python
# --no-compile: Python byte-compiles the modules a run imports when it first imports them, not
# every module of every package at install (torch's thousands): 39 s instead of 88 s here.
PIP := $(PY) -m pip install -q --disable-pip-version-check --no-compile

$(PY):
	python3 -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PIP) -e '.[test]'
	touch $@ $(VENV)/.installed

.PHONY: demo test test-slow gpu-wheels
demo: $(VENV)/.installed
	$(PY) -m flowgrpo_jax.demo

# Two workers (pytest-xdist): most tests compile or train in one thread. The 25 slowest tests
# are listed at the end, to keep the suite inside its 15 minutes.
test: $(VENV)/.installed-test
	$(PY) -m pytest -q -m "not slow" -n 2 --durations=25

# pytest exits 5 when no test is marked slow: that is not a failure.
test-slow: $(VENV)/.installed-test
	$(PY) -m pytest -q -m slow || [ $$? -eq 5 ]

# The wheels tools/gpu_check.py needs on a lent GPU machine (Python 3.12, jax 0.11, no network)
# beside what it has, into .whl/ (ignored), to carry there: docs/benchmarks.md. flax: the one
# tested with jax 0.11.2 (0.12.8 does not import under it).
GPU_WHEELS := ml_collections==1.1.0 tensorboardX==2.6.5 diffusers==0.42.1 flax==0.12.12
gpu-wheels:
	rm -rf .whl
	python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--platform manylinux1_x86_64 -d .whl $(GPU_WHEELS)
