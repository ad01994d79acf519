"""mmdet3d 1.4's own nuScenes converter writes the infos; the index read from them equals the devkit-built one.

A synthetic dataroot in the official v1.0-mini layout (10 scenes of 2 key frames, one LiDAR sweep between them) goes
through mmdet3d's `create_nuscenes_infos` and `update_infos_to_v2.update_pkl_infos` as installed, exactly as
`tools/create_data.py nuscenes` chains them. `update_pkl_infos` opens the devkit at ./data/nuscenes, so both run in
a subprocess whose working directory holds that link.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from module_loader import load_tests_module

pytest.importorskip("mmdet3d", reason="mmdet3d is not installed; build the optional venv with `make venv-mmdet3d`")

from distillbev.pipeline.data.index import build_split_index  # noqa: E402
from distillbev.pipeline.data.infos import index_from_infos, infos_file, read_infos  # noqa: E402
from distillbev.pipeline.data.loading import load_nuscenes  # noqa: E402
from distillbev.pipeline.errors import DataError  # noqa: E402
from distillbev.pipeline.synthetic.generate import SyntheticConfig, generate_dataset  # noqa: E402

pytestmark = [pytest.mark.mmdet3d, pytest.mark.slow]

CONVERT = textwrap.dedent("""
    import importlib.util, sys
    from pathlib import Path
    import mmdet3d

    tools = Path(mmdet3d.__file__).parent / ".mim" / "tools" / "dataset_converters"

    def load(name):
        spec = importlib.util.spec_from_file_location(name, tools / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    out = sys.argv[1]
    load("nuscenes_converter").create_nuscenes_infos("./data/nuscenes", "nuscenes", version="v1.0-mini",
                                                     max_sweeps=10)
    update = load("update_infos_to_v2")
    for split in ("train", "val"):
        update.update_pkl_infos("nuscenes", out_dir=out, pkl_path=f"./data/nuscenes/nuscenes_infos_{split}.pkl")
""")


def test_mmdet3d_converter_infos_read_into_the_devkit_index(tmp_path):
    helpers = load_tests_module("data/test_index_infos.py")
    root = tmp_path / "mini"
    generate_dataset(root, SyntheticConfig(version="v1.0-mini", num_scenes=10, val_scenes=2, samples_per_scene=2,
                                           sweeps_per_key_frame=1, lidar_azimuth_steps=64), progress=False)
    work, out = tmp_path / "work", tmp_path / "infos"
    (work / "data").mkdir(parents=True)
    out.mkdir()
    (work / "data" / "nuscenes").symlink_to(root)
    run = subprocess.run([sys.executable, "-c", CONVERT, str(out)], cwd=work, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]

    nusc = load_nuscenes(root, "v1.0-mini")
    for split, scenes in (("mini_train", 8), ("mini_val", 2)):
        path = infos_file(out, split)
        metainfo, data_list = read_infos(path)
        assert metainfo["info_version"] == "1.1" and len(data_list) == 2 * scenes
        # world 2 casts no sweep before a scene's first key frame; the second holds its sweep and the first key frame
        assert sorted(len(info.get("lidar_sweeps", ())) for info in data_list) == [0] * scenes + [2] * scenes
        expected = build_split_index(nusc, split, 2, helpers.CAMERAS, progress=False)
        found = index_from_infos(path, root, "v1.0-mini", split, 2, helpers.CAMERAS, progress=False)
        helpers.assert_same_index(found, expected, velocity_atol=0.02)
        assert found.labels.size > 0 and (found.attributes >= 0).any()
        assert found.previous.tolist() == [-1 if k % 2 == 0 else k - 1 for k in range(2 * scenes)]
    with pytest.raises(DataError, match="at most 2 LiDAR sweeps"):
        index_from_infos(infos_file(out, "mini_val"), root, "v1.0-mini", "mini_val", 3)
