"""A store's arrays as inspection walks them: every array under a group, and the done markers read leniently."""

from __future__ import annotations

from typing import Any

import numpy as np


def all_arrays(group: Any, prefix: str = ""):
    """(path under `group` with `prefix`, array) for every zarr array below `group`, in name order."""
    import warnings

    import zarr

    with warnings.catch_warnings():  # the marker and lock files beside the zarr nodes are not zarr objects
        warnings.filterwarnings("ignore", message="Object at distillbev", category=UserWarning)
        members = sorted(group.members())
    for name, node in members:
        if isinstance(node, zarr.Array):
            yield f"{prefix}{name}", node
        else:
            yield from all_arrays(node, f"{prefix}{name}/")


def read_done_tolerant(done_array: Any) -> np.ndarray:
    """(S, V) bool; an unreadable marker chunk counts as not done (verify names it)."""
    try:
        return np.asarray(done_array[...]).astype(bool)
    except Exception:
        out = np.zeros(done_array.shape, dtype=bool)
        for index in np.ndindex(*done_array.shape):
            try:
                out[index] = bool(done_array[index])
            except Exception:
                pass
        return out
