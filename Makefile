# Set-up and the two everyday commands. `make demo` and `make test` each build the venv first if needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= out/demo

.PHONY: demo test test-fast venv clean-venv

# The venv is stamped by pyproject.toml: torch is pinned and installed first, so pip never reaches for a CUDA build.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

venv: $(VENV)/.installed

## The main job: the whole pipeline on the embedded synthetic nuScenes-format dataset.
demo: venv
	$(VENV)/bin/distillbev demo --out $(DEMO_OUT)

## The test suite, as CI runs it: everything, slow tests included, then the mmdet3d equivalence tests in their
## own venv (built on first use: mmcv compiles from source, about 11 min on 2 cores).
test: venv venv-mmdet3d
	$(PY) -m pytest -q -m "not mmdet3d"
	$(MAKE) --no-print-directory test-mmdet3d

## Quick loop while developing: skip slow tests.
test-fast: venv
	$(PY) -m pytest -q -m "not slow and not mmdet3d" -x

clean-venv:
	rm -rf $(VENV)

-include mk/mmdet3d.mk
