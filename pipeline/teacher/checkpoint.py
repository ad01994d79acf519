"""Teacher checkpoints: strict loading with a readable report, mmdet3d-compatible saving, file hashes.

Accepted files: our own ({"state_dict", "config", "meta"}), mmdet3d/mmengine ones ({"state_dict", "meta", ...}),
or a bare state_dict. A `module.` prefix (DistributedDataParallel) is stripped. Loading never drops weights
silently: missing or unexpected keys and shape mismatches are `CheckpointError`s that name the keys.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import to_dict
from ..errors import CheckpointError

LOGGER = logging.getLogger(__name__)

# Top-level modules of the teacher; a checkpoint with none of them belongs to another architecture.
TEACHER_PREFIXES: tuple[str, ...] = ("pts_voxel_encoder.", "pts_backbone.", "pts_neck.", "pts_bbox_head.")
FORMAT_NAME = "distillbev-teacher"
SHOWN_KEYS = 8


@dataclass
class LoadReport:
    """What `load_teacher_checkpoint` loaded."""

    path: str
    source: str  # "distillbev" (our save), "mmdet3d" (a state_dict + meta file) or "state_dict" (bare)
    num_loaded: int  # tensors copied into the model
    missing: list[str] = field(default_factory=list)  # model keys absent from the file (only when strict=False)
    unexpected: list[str] = field(default_factory=list)  # file keys the model lacks (only when strict=False)
    stripped_prefix: str = ""  # prefix removed from every key, e.g. "module."
    config: dict[str, Any] | None = None  # the model config stored by `save_teacher_checkpoint`
    meta: dict[str, Any] | None = None  # meta stored with the checkpoint

    def summary(self) -> str:
        text = f"{self.path}: loaded {self.num_loaded} tensors ({self.source} checkpoint)"
        if self.stripped_prefix:
            text += f", stripped prefix {self.stripped_prefix!r}"
        if self.missing or self.unexpected:
            text += f", {len(self.missing)} missing, {len(self.unexpected)} unexpected"
        return text


def checkpoint_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file (streamed)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found; pass the path of an existing .pth file")
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found; pass the path of an existing .pth file "
                              f"(train one with `distillbev train-teacher` or download the mmdet3d one)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as safe_error:  # noqa: BLE001 - mmdet3d files pickle non-tensor meta objects
        LOGGER.debug("weights-only load of %s failed (%s); retrying with full unpickling", path, safe_error)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc.__class__.__name__}: {exc}); "
                              f"pass a .pth file written by torch.save") from exc


def _state_dict_of(path: Path, payload: Any) -> tuple[dict[str, torch.Tensor], str, dict | None, dict | None]:
    if isinstance(payload, dict) and "state_dict" in payload and isinstance(payload["state_dict"], dict):
        meta = payload.get("meta") if isinstance(payload.get("meta"), dict) else None
        if payload.get("format") == FORMAT_NAME:
            return payload["state_dict"], "distillbev", payload.get("config"), meta
        return payload["state_dict"], "mmdet3d", payload.get("config") if isinstance(
            payload.get("config"), dict) else None, meta
    if isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values()):
        return payload, "state_dict", None, None
    found = f"a dict with keys {sorted(payload)[:SHOWN_KEYS]}" if isinstance(payload, dict) else type(payload).__name__
    raise CheckpointError(f"{path}: expected a checkpoint dict with a 'state_dict' entry (or a bare state_dict), "
                          f"found {found}; pass a teacher checkpoint")


def _strip_prefix(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    for prefix in ("module.", "model."):
        if state and all(k.startswith(prefix) for k in state):
            return {k[len(prefix):]: v for k, v in state.items()}, prefix
    return state, ""


def _first(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return shown + (f", ... (+{len(keys) - SHOWN_KEYS} more)" if len(keys) > SHOWN_KEYS else "")


def load_teacher_checkpoint(model: nn.Module, path: str | Path, strict: bool = True) -> LoadReport:
    """Load a teacher checkpoint into `model` and report what happened.

    strict=True: every model key must be in the file and vice versa. Shape mismatches are always errors.
    """
    path = Path(path)
    payload = _read(path)
    state, source, config, meta = _state_dict_of(path, payload)
    state, prefix = _strip_prefix(state)
    if not any(k.startswith(TEACHER_PREFIXES) for k in state):
        raise CheckpointError(
            f"{path}: not a CenterPoint-pillar teacher checkpoint: none of its {len(state)} keys start with "
            f"{'/'.join(p.rstrip('.') for p in TEACHER_PREFIXES)} (first keys: {_first(sorted(state))}); "
            f"it looks like another architecture (e.g. an image backbone or a student) -- pass the teacher's .pth")
    own = model.state_dict()
    mismatched = [f"{k}: checkpoint {list(state[k].shape)} vs model {list(own[k].shape)}"
                  for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if mismatched:
        hint = ""
        pfn = "pts_voxel_encoder.pfn_layers.0.linear.weight"
        if pfn in state and pfn in own and state[pfn].shape[1] + 1 == own[pfn].shape[1]:
            hint = (" The pillar layer takes one feature less: this is an old 'legacy' pillar checkpoint "
                    "(10 = 4 point features + 6 offsets); use a checkpoint of the current mmdet3d format "
                    "(11 = 5 point features + 6 offsets) or set model.point_features to match.")
        elif pfn in state and pfn in own and state[pfn].shape[1] != own[pfn].shape[1]:
            hint = (f" The checkpoint's pillar layer takes {state[pfn].shape[1] - 6} point features, the config "
                    f"{own[pfn].shape[1] - 6}: an MVP teacher takes 17 (data.point_features: mvp, "
                    f"model.point_features: 17), a LiDAR teacher 5.")
        raise CheckpointError(f"{path}: {len(mismatched)} parameter shape mismatch(es) with the model config: "
                              f"{'; '.join(mismatched)}.{hint} Check that the config matches the checkpoint.")
    missing = sorted(k for k in own if k not in state)
    unexpected = sorted(k for k in state if k not in own)
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (in the model, not in the file): {_first(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (in the file, not in the model): {_first(unexpected)}")
        raise CheckpointError(f"{path}: checkpoint does not fit the teacher model: {'; '.join(parts)}. "
                              f"Check the model config (stages, channels, tasks) against the checkpoint.")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    report = LoadReport(path=str(path), source=source, num_loaded=len(own) - len(missing), missing=missing,
                        unexpected=unexpected, stripped_prefix=prefix, config=config, meta=meta)
    LOGGER.info(report.summary())
    return report


def save_teacher_checkpoint(model: nn.Module, path: str | Path, config: Any = None,
                            meta: dict[str, Any] | None = None) -> Path:
    """Write {"state_dict", "config", "meta", "format"} with mmdet3d key names (mmdet3d loads `state_dict`).

    config: a config dataclass (stored as a plain dict) or a dict. The file is written atomically.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    config_dict = config if isinstance(config, dict) or config is None else to_dict(config)
    payload = {"state_dict": {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
               "config": config_dict, "meta": dict(meta or {}), "format": FORMAT_NAME}
    temporary = path.with_name(path.name + ".tmp")
    torch.save(payload, temporary)
    temporary.replace(path)
    return path
