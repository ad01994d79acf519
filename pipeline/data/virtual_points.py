"""MVP's virtual-point files: layout, format, reader, writer and the 17-dim point features of the MVP teacher.

Layout (as MVP's `virtual_gen.py` writes and its released 80 GB set holds): the file of LiDAR sample_data
`samples/LIDAR_TOP/<name>.pcd.bin` is `samples/LIDAR_TOP_VIRTUAL/<name>.pcd.bin.pkl.npy` (sweeps likewise under
`sweeps/LIDAR_TOP_VIRTUAL/`).

Format: `np.save` of a Python dict (a pickled 0-d object array, which `np.load(path, allow_pickle=True).item()` reads;
here the .npy header is read with numpy.lib.format and the pickle with `safe_pickle.RestrictedUnpickler`, so a
crafted file cannot run code):
    virtual_points      (V, 14) float32  x, y, z (LiDAR frame of that sample_data), 10 one-hot class, score
    real_points         (R, 15) float32  x, y, z, intensity, 10 one-hot class, score: the LiDAR points inside a mask
    real_points_indice  (R,)    int64    their rows in the .pcd.bin
The one-hot order is that of MVP's segmenter (CenterNet2 trained on nuImages), `MVP_CLASSES`. MVP writes float64
zeros (0, 14) / (0, 15) / (0,) for a sweep without masks; the reader accepts either dtype.

The MVP teacher's 17-dim point (DistillBEV's loader of the MVP config): x, y, z, intensity, 10 class slots, score,
virtual flag, time lag. A plain LiDAR point has intensity, ones in the 11 class / score slots and flag 1; a painted
point (a `real_points` row) has its class, score and flag 0; a virtual point has intensity -1 and flag -1. The
plain points keep every LiDAR point, so a painted point appears twice (once plain, once painted), as in MVP.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npy_format

from ..errors import DataError
from ..safe_pickle import ForbiddenGlobal, restricted_load

MVP_CLASSES = ("car", "truck", "trailer", "bus", "construction_vehicle", "bicycle", "motorcycle", "pedestrian",
               "traffic_cone", "barrier")
VIRTUAL_WIDTH = 14  # x, y, z, 10 one-hot, score
REAL_WIDTH = 15  # x, y, z, intensity, 10 one-hot, score
FEATURE_WIDTH = 17  # the MVP teacher's point: x, y, z, intensity, 10 class, score, virtual flag, time lag
VIRTUAL_SUFFIX = "_VIRTUAL"
FILE_SUFFIX = ".pkl.npy"
MAKE_COMMAND = "distillbev make-virtual-points --dataroot D --version V"


@dataclass
class VirtualPoints:
    """One LiDAR sample_data's MVP points: virtual (V, 14) float32, real (R, 15) float32, real_indices (R,) int64."""

    virtual: np.ndarray
    real: np.ndarray
    real_indices: np.ndarray

    @classmethod
    def empty(cls) -> "VirtualPoints":
        return cls(np.zeros((0, VIRTUAL_WIDTH), np.float32), np.zeros((0, REAL_WIDTH), np.float32),
                   np.zeros(0, np.int64))


def virtual_path(lidar_path: str | Path) -> Path:
    """The virtual-point file of a LiDAR file `.../<folder>/<name>.pcd.bin`: `.../<folder>_VIRTUAL/<name>.pcd.bin
    .pkl.npy` (works on absolute paths and on sample_data filenames relative to the dataroot)."""
    path = Path(lidar_path)
    return path.parent.parent / f"{path.parent.name}{VIRTUAL_SUFFIX}" / f"{path.name}{FILE_SUFFIX}"


def write_virtual_points(path: str | Path, points: VirtualPoints) -> None:
    """Write one file in MVP's format, atomically (a temporary file in the same folder, then renamed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"virtual_points": np.ascontiguousarray(points.virtual, dtype=np.float32).reshape(-1, VIRTUAL_WIDTH),
               "real_points": np.ascontiguousarray(points.real, dtype=np.float32).reshape(-1, REAL_WIDTH),
               "real_points_indice": np.ascontiguousarray(points.real_indices, dtype=np.int64).reshape(-1)}
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "wb") as handle:
        np.save(handle, payload, allow_pickle=True)
    os.replace(temporary, path)


def _read_dict(data: bytes) -> dict:
    """The dict an MVP file's bytes hold: the .npy header must describe a 0-d object array, whose pickle (the rest of
    the file) is read with the restricted unpickler (numpy arrays and plain values only)."""
    with io.BytesIO(data) as handle:
        version = npy_format.read_magic(handle)
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(handle)
        elif version == (2, 0):
            shape, _, dtype = npy_format.read_array_header_2_0(handle)
        else:
            raise ValueError(f".npy format version {version}, expected 1.0 or 2.0 (np.save's)")
        if shape != () or dtype != np.dtype(object):
            raise ValueError(f"a {shape} {dtype} array, expected a 0-d object array holding a dict")
        # np.load's own pickle encoding would be ASCII; latin1 also reads arrays pickled by Python 2
        array = restricted_load(handle, encoding="latin1")
    if not isinstance(array, np.ndarray) or array.shape != () or not isinstance(array.item(), dict):
        raise ValueError(f"the pickle holds {type(array).__name__}, expected a 0-d object array holding a dict")
    return array.item()


def read_virtual_points(path: str | Path, sample_data_token: str = "",
                        digests: Any = None) -> VirtualPoints:
    """Read one file written by MVP or by `write_virtual_points`; a missing or malformed file is a one-line
    DataError naming it, the sample_data and what to do. The file is read once; `digests` (a `data.digest.InputDigests`)
    records the SHA-256 of those bytes."""
    path = Path(path)
    owner = f" of LIDAR_TOP sample_data {sample_data_token}" if sample_data_token else ""
    if not path.is_file():
        raise DataError(f"{path}: virtual-point file{owner} not found; run `{MAKE_COMMAND}` or put MVP's released "
                        f"LIDAR_TOP_VIRTUAL folders next to samples/ and sweeps/")
    try:
        raw = path.read_bytes()
        if digests is not None:
            digests.add(path, raw)
        data = _read_dict(raw)
        virtual, real = np.asarray(data["virtual_points"]), np.asarray(data["real_points"])
        indices = np.asarray(data["real_points_indice"])
    except ForbiddenGlobal as exc:
        raise DataError(f"{path}: refused: the pickle in this virtual-point file{owner} names "
                        f"{exc.qualified_name}, and an MVP file holds only numpy arrays in a dict (unpickling other "
                        f"objects could run code the file carries); delete it and rerun `{MAKE_COMMAND}`") from None
    except (OSError, ValueError, KeyError, AttributeError, EOFError, TypeError, IndexError,
            pickle.UnpicklingError) as exc:
        raise DataError(f"{path}: not an MVP virtual-point file{owner} ({type(exc).__name__}: "
                        f"{' '.join(str(exc).split())}); delete it and rerun `{MAKE_COMMAND}`") from None
    shapes_ok = virtual.ndim == 2 and virtual.shape[1] == VIRTUAL_WIDTH and real.ndim == 2 and \
        real.shape[1] == REAL_WIDTH and indices.ndim == 1 and len(indices) == len(real)
    if not shapes_ok:
        raise DataError(f"{path}: virtual_points {virtual.shape}, real_points {real.shape}, real_points_indice "
                        f"{indices.shape}{owner}; expected (V, {VIRTUAL_WIDTH}), (R, {REAL_WIDTH}), (R,); delete it "
                        f"and rerun `{MAKE_COMMAND}`")
    return VirtualPoints(virtual.astype(np.float32), real.astype(np.float32), indices.astype(np.int64))


def mvp_point_features(raw: np.ndarray, points: VirtualPoints, time_lag: float = 0.0) -> np.ndarray:
    """The MVP teacher's input of one sample_data, in its own LiDAR frame.

    raw: (P, >= 4) float32 LiDAR points (x, y, z, intensity, ...). Returns (P + R + V, 17) float32: the plain points,
    then the painted ones, then the virtual ones (see the module doc), with `time_lag` [s] in the last column.
    DistillBEV's sweep loader keeps the ring index of a sweep's plain points in column 4 (where a key frame has 1);
    here every plain point has 1 there, as the key frame does.
    """
    plain = np.ones((len(raw), FEATURE_WIDTH), dtype=np.float32)
    plain[:, :4] = raw[:, :4]
    painted = np.zeros((len(points.real), FEATURE_WIDTH), dtype=np.float32)
    painted[:, :REAL_WIDTH] = points.real
    virtual = np.zeros((len(points.virtual), FEATURE_WIDTH), dtype=np.float32)
    virtual[:, :3] = points.virtual[:, :3]
    virtual[:, 3] = -1.0
    virtual[:, 4:REAL_WIDTH] = points.virtual[:, 3:]
    virtual[:, REAL_WIDTH] = -1.0
    out = np.concatenate([plain, painted, virtual], axis=0)
    out[:, FEATURE_WIDTH - 1] = time_lag
    return out
