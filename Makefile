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

## The test suite, as CI runs it (slow tests included; mmdet3d tests when .venv-mmdet3d exists).
test: venv
	$(PY) -m pytest -q -m "not mmdet3d"
	@if [ -x .venv-mmdet3d/bin/python ]; then .venv-mmdet3d/bin/python -m pytest -q -m mmdet3d tests/teacher; \
	else echo "mmdet3d tests: .venv-mmdet3d missing, run 'make venv-mmdet3d' (CI does)"; fi

## Quick loop while developing: skip slow tests.
test-fast: venv
	$(PY) -m pytest -q -m "not slow and not mmdet3d" -x

clean-venv:
	rm -rf $(VENV)

-include mk/mmdet3d.mk
