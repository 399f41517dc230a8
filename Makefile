# `make demo` and `make test` each create .venv on first use and install what they need.
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

$(PY):
	python3 -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PIP) -e '.[test]'
	touch $@ $(VENV)/.installed

.PHONY: demo test test-slow
demo: $(VENV)/.installed
	$(PY) -m flowgrpo_jax.demo

# Two workers (pytest-xdist): most tests compile or train in one thread.
test: $(VENV)/.installed-test
	$(PY) -m pytest -q -m "not slow" -n 2

# pytest exits 5 when no test is marked slow: that is not a failure.
test-slow: $(VENV)/.installed-test
	$(PY) -m pytest -q -m slow || [ $$? -eq 5 ]
