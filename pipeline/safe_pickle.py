"""Reading pickled inputs without running code they carry: mmdet3d info files, MVP virtual-point files, checkpoints.

Unpickling calls whatever functions and classes a file names, so a crafted file runs code as soon as it is read.
Every pickle this project reads from outside is therefore read with an allow list, by name:
- `RestrictedUnpickler` (info files, the payload of an MVP `.npy`): numpy arrays, dtypes and scalars, and plain
  Python values.
- `load_checkpoint` (every `.pth`): torch's weights-only unpickler (tensors and plain Python values) plus
  `CHECKPOINT_GLOBALS`, the few classes an mmdet3d 1.x / mmengine checkpoint keeps in its `meta` and
  `message_hub`: numpy arrays, scalars and numeric dtypes, and mmengine's `HistoryBuffer` (rebuilt as
  `HistoryBufferRecord`, so mmengine need not be installed). Anything else is a `CheckpointError` naming the file
  and the class; `trust=True` (the `--trust-checkpoint` flag) loads it with full unpickling, with a warning.
"""

from __future__ import annotations

import io
import logging
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from .errors import CheckpointError

LOGGER = logging.getLogger(__name__)
TRUST_FLAG = "--trust-checkpoint"


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle names a global outside the unpickler's allow list."""

    def __init__(self, module: str, name: str):
        super().__init__(f"global {module}.{name} is not allowed")
        self.qualified_name = f"{module}.{name}"


class RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds only numpy arrays, dtypes and scalars and plain Python values (dict, list, tuple, str, numbers and
    the builtins below). Any other global is a `ForbiddenGlobal`, raised before anything of it runs."""

    ALLOWED = {
        ("numpy", "dtype"), ("numpy", "ndarray"),
        ("numpy.core.multiarray", "scalar"), ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # protocol-2 pickles spell bytes (a numpy scalar's buffer) this way
        ("collections", "OrderedDict"),
        *(("builtins", name) for name in ("set", "frozenset", "bytearray", "complex", "slice", "range")),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise ForbiddenGlobal(module, name)
        return super().find_class(module, name)


def restricted_load(handle: BinaryIO, encoding: str = "ASCII") -> Any:
    """One pickle from `handle`, read with `RestrictedUnpickler`."""
    return RestrictedUnpickler(handle, encoding=encoding).load()


# ----------------------------------------------------------------------------------------------- checkpoints
class HistoryBufferRecord:
    """What is kept of an mmengine `HistoryBuffer` (a logged scalar's recent values, in a checkpoint's
    `message_hub`): its pickled attributes, set as they are (`_log_history`, `_count_history`, `max_length`, ...).
    Nothing in this project reads it; it exists so that such a file loads without mmengine and without running
    mmengine's code."""

    STATISTICS = ("min", "max", "mean", "current")  # the methods a HistoryBuffer's pickle looks up by name


def _history_buffer_method(owner: Any, name: str) -> str:
    """Stands in for `getattr` in a checkpoint: mmengine pickles a HistoryBuffer's statistics methods as
    getattr(HistoryBuffer, "min"), ... An unrestricted getattr would reach any attribute of any object the file
    builds (and through them, any function); this one answers only those lookups, with the method's name."""
    if owner is not HistoryBufferRecord or name not in HistoryBufferRecord.STATISTICS:
        raise pickle.UnpicklingError(f"getattr({getattr(owner, '__name__', type(owner).__name__)}, {name!r}) is "
                                     f"not allowed (only mmengine HistoryBuffer statistics methods)")
    return f"HistoryBuffer.{name}"


def _numpy_function(name: str) -> Any:
    from numpy._core import multiarray  # numpy >= 1.26 (numpy.core.multiarray in 1.x, without a warning in 2.x)

    return getattr(multiarray, name)


_NUMERIC_DTYPES = "?bBhHiIlLqQefdgFDG"
# (object, the name a pickle gives it): torch's weights-only unpickler looks a GLOBAL up by that name, and checks
# the object before it constructs or fills anything (numpy 1.x pickles say numpy.core, numpy 2.x numpy._core).
CHECKPOINT_GLOBALS: list[tuple[Any, str]] = [
    (np.ndarray, "numpy.ndarray"),
    (np.dtype, "numpy.dtype"),
    *((_numpy_function(function), f"{module}.multiarray.{function}")
      for function in ("scalar", "_reconstruct") for module in ("numpy.core", "numpy._core")),
    # a dtype is rebuilt as numpy.dtype(...) and then filled by its own class: the numeric ones only (no object dtype)
    *((type(np.dtype(code)), f"numpy.dtypes.{type(np.dtype(code)).__name__}") for code in _NUMERIC_DTYPES),
    (HistoryBufferRecord, "mmengine.logging.history_buffer.HistoryBuffer"),
    (_history_buffer_method, "builtins.getattr"),
]
ALLOWED_NAMES = frozenset(name for _, name in CHECKPOINT_GLOBALS)
ALLOWED_SUMMARY = ("tensors, plain Python values, numpy arrays / scalars / numeric dtypes and mmengine's "
                   "HistoryBuffer")


def _offending_globals(path: Path | BinaryIO) -> list[str] | None:
    """The globals the file's pickle names that neither torch nor `CHECKPOINT_GLOBALS` allow (read, not run);
    None for a file that cannot be scanned (not a torch zip checkpoint)."""
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - a file too broken to scan: the load error says what is wrong
        return None
    return [name for name in found if name not in ALLOWED_NAMES]


def load_checkpoint(path: str | Path, *, trust: bool = False, what: str = "checkpoint",
                    fix: str | None = None, data: bytes | None = None) -> Any:
    """The content of the torch checkpoint `path`, on the CPU, unpickled without running code it may carry.

    trust=True loads it with full unpickling (any class; code in the file runs), logged as a WARNING.
    what: what the file is, for the messages ("teacher checkpoint", "resume checkpoint"); fix: what to do when the
    file needs a class outside the allow list (default: pass `--trust-checkpoint` if you trust the file).
    A missing file, an unreadable one or one that needs another class is a `CheckpointError` naming the file.
    data: the file's bytes when the caller has read them (to hash what it loads): loaded from memory, and `path`
    only names them in messages.
    """
    path = Path(path)

    def source() -> Path | BinaryIO:
        return path if data is None else io.BytesIO(data)

    if data is None and not path.is_file():
        raise CheckpointError(f"{path}: {what} not found; pass the path of an existing .pth file")
    if trust:
        LOGGER.warning("%s: %s: loading the %s with full unpickling, which runs any code the file carries; do "
                       "this only for a file from a source you trust", path, TRUST_FLAG, what)
        try:
            return torch.load(source(), map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc.__class__.__name__}: {exc}); "
                                  f"pass a .pth file written by torch.save") from exc
    try:
        with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
            return torch.load(source(), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        offending = _offending_globals(source())
        if offending is None:
            raise CheckpointError(f"{path}: not a readable torch checkpoint ({' '.join(str(exc).split())[:300]}); "
                                  f"pass a .pth file written by torch.save") from None
        if not offending:  # every global is allowed, but one was used in a way that is not (e.g. getattr)
            text = str(exc)
            reason = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0] if text.strip() else ""
            offending_text = f"what the weights-only loader refuses ({' '.join(reason.split())[:300]})"
        else:
            offending_text = f"the class(es) {', '.join(offending)}"
        fix = fix or (f"if you made the file or trust its source, pass {TRUST_FLAG} to load it with full "
                      f"unpickling")
        raise CheckpointError(f"{path}: refused to load the {what}: it needs {offending_text}, outside what a "
                              f"checkpoint may hold ({ALLOWED_SUMMARY}), and unpickling it could run code the file "
                              f"carries; {fix}") from None
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc.__class__.__name__}: "
                              f"{' '.join(str(exc).split())[:300]}); pass a .pth file written by torch.save") from exc
