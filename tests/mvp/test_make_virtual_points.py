"""`distillbev make-virtual-points` on a tiny street world: files, resume, identical bytes, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from distillbev.cli import main
from distillbev.pipeline.data.virtual_points import read_virtual_points
from distillbev.pipeline.mvp.mask_report import mask_report


def virtual_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("*/LIDAR_TOP_VIRTUAL/*"))}


@pytest.mark.slow
def test_resume_after_a_partial_run_gives_identical_files(street_dataroot: Path, tmp_path: Path, capsys) -> None:
    root = tmp_path / "data"
    shutil.copytree(street_dataroot, root)
    main(["make-virtual-points", "--dataroot", str(root), "--no-progress"])
    first = virtual_files(root)
    summary = json.loads((root / "virtual_points_summary.json").read_text())
    assert summary["jobs"] == summary["written"] == len(first) and summary["num_virtual"] == 50
    (root / "virtual_points_summary.json").unlink()  # a killed run never wrote it
    lidar = sorted(root.glob("*/LIDAR_TOP/*.pcd.bin"))
    # every LIDAR_TOP record: 4 key frames and 2 sweeps before each (the first key frame of a scene has none)
    assert len(first) == len(lidar) == 4 + 2 * 2
    total_virtual = 0
    for name in first:
        points = read_virtual_points(root / name)
        total_virtual += len(points.virtual)
        assert np.all(np.isfinite(points.virtual)) and np.all(points.real_indices < 200_000)
    assert total_virtual > 0
    # a run killed half way: some files missing, a temporary file left behind
    removed = list(first)[::2]
    for name in removed:
        (root / name).unlink()
    stale = root / list(first)[1]
    stale.with_name(f".{stale.name}.999.tmp").write_bytes(b"partial")
    capsys.readouterr()
    main(["make-virtual-points", "--dataroot", str(root), "--workers", "2", "--no-progress"])
    assert f"{len(first)} LiDAR sample_data, {len(removed)} written, {len(first) - len(removed)} already done" in \
        capsys.readouterr().out
    assert virtual_files(root) == first
    assert json.loads((root / "virtual_points_summary.json").read_text())["skipped"] == len(first) - len(removed)


@pytest.mark.slow
def test_virtual_points_sit_on_annotated_objects(street_dataroot: Path, tmp_path: Path) -> None:
    """Most virtual points of a key frame fall inside an annotation box grown by 0.5 m: the masks are a
    segmenter's (false masks, loose edges) and a drawn pixel may take the depth of a point behind the object, so
    not all."""
    from nuscenes.nuscenes import NuScenes
    from nuscenes.utils.geometry_utils import points_in_box

    root = tmp_path / "data"
    shutil.copytree(street_dataroot, root)
    main(["make-virtual-points", "--dataroot", str(root), "--sweeps", "0", "--no-progress"])
    nusc = NuScenes(version="v1.0-synthetic", dataroot=str(root), verbose=False)
    inside, total = 0, 0
    for sample in nusc.sample:
        token = sample["data"]["LIDAR_TOP"]
        path, boxes, _ = nusc.get_sample_data(token)
        points = read_virtual_points(Path(path).parent.parent / "LIDAR_TOP_VIRTUAL" / f"{Path(path).name}.pkl.npy")
        for box in boxes:
            box.wlh = box.wlh + 1.0  # 0.5 m around the box
        hit = np.zeros(len(points.virtual), dtype=bool)
        for box in boxes:
            hit |= points_in_box(box, points.virtual[:, :3].T.astype(np.float64))
        inside += int(hit.sum())
        total += len(hit)
    print(f"virtual points near a box: {inside / total:.3f}")
    assert total > 0 and inside / total > 0.6


@pytest.mark.slow
def test_missing_masks_name_the_sample_data_and_the_command(street_dataroot: Path, tmp_path: Path, capsys) -> None:
    root = tmp_path / "data"
    shutil.copytree(street_dataroot, root)
    png = sorted((root / "masks" / "CAM_BACK").glob("*.png"))[0]
    png.unlink()
    with pytest.raises(SystemExit):
        main(["make-virtual-points", "--dataroot", str(root), "--sweeps", "0", "--no-progress"])
    message = capsys.readouterr().err.strip()
    assert message.count("\n") == 0 and str(png) in message
    assert "camera sample_data" in message and "LIDAR_TOP sample_data" in message
    assert "distillbev make-synthetic --masks" in message


@pytest.mark.slow
def test_mask_report_table(street_dataroot: Path) -> None:
    table, rates = mask_report(street_dataroot)
    assert table.startswith("24 images") and "| car |" in table and "recall" in table
    assert rates["all"]["all"]["true"] > 0
