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
    """(S, V) bool: a marker not all zero is done; an unreadable marker chunk counts as not done (verify names it)."""
    try:
        values = np.asarray(done_array[...])
        return values.reshape(*values.shape[:2], -1).any(axis=-1)
    except Exception:
        out = np.zeros(done_array.shape[:2], dtype=bool)
        for index in np.ndindex(*done_array.shape[:2]):
            try:
                out[index] = bool(np.asarray(done_array[index]).any())
            except Exception:
                pass
        return out
