"""MVP's virtual-point files: layout, round trip, MVP's reader, and the teacher's 17-dim points."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from distillbev.pipeline.data.virtual_points import (FEATURE_WIDTH, VirtualPoints, mvp_point_features,
                                                     read_virtual_points, virtual_path, write_virtual_points)
from distillbev.pipeline.errors import DataError


def example() -> VirtualPoints:
    virtual = np.zeros((2, 14), np.float32)
    virtual[0, :3], virtual[0, 3 + 7], virtual[0, 13] = (1.0, 2.0, 3.0), 1.0, 0.9  # a pedestrian
    virtual[1, :3], virtual[1, 3 + 0], virtual[1, 13] = (4.0, 5.0, 6.0), 1.0, 0.5  # a car
    real = np.zeros((1, 15), np.float32)
    real[0, :4], real[0, 4 + 9], real[0, 14] = (7.0, 8.0, 9.0, 33.0), 1.0, 0.7  # a barrier, intensity 33
    return VirtualPoints(virtual, real, np.array([1], np.int64))


def test_layout_is_mvps() -> None:
    """samples/LIDAR_TOP/<name>.pcd.bin -> samples/LIDAR_TOP_VIRTUAL/<name>.pcd.bin.pkl.npy (MVP's virtual_gen.py)."""
    assert virtual_path("samples/LIDAR_TOP/n008__LIDAR_TOP__1.pcd.bin") == \
        Path("samples/LIDAR_TOP_VIRTUAL/n008__LIDAR_TOP__1.pcd.bin.pkl.npy")
    assert virtual_path("/d/sweeps/LIDAR_TOP/a.pcd.bin") == Path("/d/sweeps/LIDAR_TOP_VIRTUAL/a.pcd.bin.pkl.npy")


def test_round_trip_and_mvps_reader(tmp_path: Path) -> None:
    path = virtual_path(tmp_path / "samples/LIDAR_TOP/a.pcd.bin")
    write_virtual_points(path, example())
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    back = read_virtual_points(path)
    for field in ("virtual", "real", "real_indices"):
        assert np.array_equal(getattr(back, field), getattr(example(), field))
    # MVP's reader: np.load(..., allow_pickle=True).item(), three keys, widths 14 and 15, float32 / int64
    data = np.load(path, allow_pickle=True).item()
    assert sorted(data) == ["real_points", "real_points_indice", "virtual_points"]
    assert data["virtual_points"].dtype == np.float32 and data["virtual_points"].shape == (2, 14)
    assert data["real_points"].dtype == np.float32 and data["real_points"].shape == (1, 15)
    assert data["real_points_indice"].dtype == np.int64


def test_mvps_empty_file_reads(tmp_path: Path) -> None:
    """MVP writes float64 zeros for a sweep without masks."""
    path = tmp_path / "x.pcd.bin.pkl.npy"
    np.save(path, {"virtual_points": np.zeros([0, 14]), "real_points": np.zeros([0, 15]),
                   "real_points_indice": np.zeros(0)})
    back = read_virtual_points(path)
    assert back.virtual.shape == (0, 14) and back.real.shape == (0, 15) and back.real_indices.dtype == np.int64


def test_the_teachers_17_dim_points() -> None:
    """Hand-worked rows, in the order DistillBEV's MVP loader builds them: plain, painted, virtual."""
    raw = np.array([[0.5, 0.6, 0.7, 12.0, 3.0]], np.float32)  # x, y, z, intensity, ring
    out = mvp_point_features(raw, example(), time_lag=0.05)
    assert out.shape == (4, FEATURE_WIDTH) and out.dtype == np.float32
    plain = [0.5, 0.6, 0.7, 12.0] + [1.0] * 11 + [1.0, 0.05]
    painted = [7.0, 8.0, 9.0, 33.0] + [0.0] * 9 + [1.0] + [0.7, 0.0, 0.05]
    pedestrian = [1.0, 2.0, 3.0, -1.0] + [0.0] * 7 + [1.0, 0.0, 0.0] + [0.9, -1.0, 0.05]
    car = [4.0, 5.0, 6.0, -1.0, 1.0] + [0.0] * 9 + [0.5, -1.0, 0.05]
    assert np.allclose(out, np.array([plain, painted, pedestrian, car], np.float32))


@pytest.mark.parametrize("content", [b"not numpy", None])
def test_bad_files_are_one_line_errors(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "samples/LIDAR_TOP_VIRTUAL/a.pcd.bin.pkl.npy"
    if content is not None:
        path.parent.mkdir(parents=True)
        path.write_bytes(content)
    with pytest.raises(DataError) as caught:
        read_virtual_points(path, "tok123")
    message = str(caught.value)
    assert "\n" not in message and str(path) in message and "tok123" in message
    assert "make-virtual-points" in message


def test_wrong_widths_are_named(tmp_path: Path) -> None:
    path = tmp_path / "a.pkl.npy"
    np.save(path, {"virtual_points": np.zeros([3, 13]), "real_points": np.zeros([0, 15]),
                   "real_points_indice": np.zeros(0)})
    with pytest.raises(DataError, match=r"\(3, 13\).*expected \(V, 14\)"):
        read_virtual_points(path)
