"""Same seed, same bytes; another seed, another dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

from distillbev.pipeline.synthetic.generate import SyntheticConfig, generate_dataset

# Smaller than the shared fixture: determinism does not need many frames.
SMALL = dict(num_scenes=2, samples_per_scene=2, val_scenes=1, sweeps_per_key_frame=2, objects_per_scene=14)


def _files(root: Path, pattern: str) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob(pattern))}


@pytest.mark.slow
@pytest.mark.parametrize("world, clouds_per_scene", [(2, 2 + 2), (1, 2 * 3)], ids=["world2", "world1"])
def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path, world, clouds_per_scene):
    """2 key frames of 2 sweeps each per scene; world 2, like nuScenes, has no sweep before a scene's first."""
    make = SyntheticConfig if world == 2 else SyntheticConfig.boxes
    roots = {}
    for name, seed in (("first", 5), ("again", 5), ("other", 6)):
        roots[name] = tmp_path / name
        generate_dataset(roots[name], make(seed=seed, **SMALL), progress=False)
    tables = {name: _files(root, "*.json") for name, root in roots.items()}
    tables = {name: {k: v for k, v in files.items() if k.startswith("v1.0-synthetic")} for name, files in tables.items()}
    assert len(tables["first"]) == 14  # 13 tables + splits.json
    assert tables["first"] == tables["again"]
    clouds = {name: _files(root, "*.pcd.bin") for name, root in roots.items()}
    assert len(clouds["first"]) == 2 * clouds_per_scene
    assert clouds["first"] == clouds["again"]
    assert _files(roots["first"], "*.jpg") == _files(roots["again"], "*.jpg")
    assert tables["first"]["v1.0-synthetic/sample_annotation.json"] != tables["other"]["v1.0-synthetic/sample_annotation.json"]
    assert set(clouds["first"].values()).isdisjoint(clouds["other"].values())
