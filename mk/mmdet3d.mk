# The optional mmdet3d stack: a separate venv for the tests that compare our teacher with mmdet3d's CenterPoint.
# Included from the main Makefile. The recipe lives in scripts/install_mmdet3d.sh (pins and reasons there);
# it builds mmcv 2.1.0 from source, about 11 min on 2 cores the first time, a few minutes once pip's wheel cache
# holds the built mmcv wheel.
VENV_MMDET3D := .venv-mmdet3d

.PHONY: venv-mmdet3d test-mmdet3d clean-venv-mmdet3d

# Stamped by the install script and pyproject.toml: changing either rebuilds (the script itself skips when the
# venv already imports mmdet3d, so delete the venv with `make clean-venv-mmdet3d` to force a full rebuild).
$(VENV_MMDET3D)/.installed: scripts/install_mmdet3d.sh pyproject.toml
	PYTHON=$(PYTHON) bash scripts/install_mmdet3d.sh $(VENV_MMDET3D)
	touch $@

venv-mmdet3d: $(VENV_MMDET3D)/.installed

## Equivalence of our teacher with mmdet3d's CenterPoint (key names, shapes, numerics, checkpoints both ways) and of
## the split index read from mmdet3d's own nuScenes infos with the one built from the tables, and of mmdet3d's
## loading and CenterPoint on the real key frame in tests/real/data.
test-mmdet3d: venv-mmdet3d
	$(VENV_MMDET3D)/bin/python -m pytest -q -m mmdet3d tests/teacher tests/student tests/data tests/real

clean-venv-mmdet3d:
	rm -rf $(VENV_MMDET3D)
