"""Teacher checkpoints: strict loading with a readable report, mmdet3d-compatible saving, file hashes.

Accepted files: our own ({"state_dict", "config", "meta"}), mmdet3d/mmengine ones ({"state_dict", "meta", ...}),
or a bare state_dict. A `module.` prefix (DistributedDataParallel) is stripped. Loading never drops weights
silently: missing or unexpected keys and shape mismatches are `CheckpointError`s that name the keys. A file is
unpickled with an allow list (`safe_pickle.load_checkpoint`: tensors, plain values, the numpy and mmengine classes
of an mmengine file's meta); one that needs any other class is refused unless the caller trusts it.

Before the keys are matched, two checks catch files whose keys would fit, or nearly fit, but whose weights cannot
mean what our teacher computes (docs/teacher_checkpoints.md lists the released files and what each gets):
- architecture: a CenterPoint-voxel file (sparse 3D convolutions, `pts_middle_encoder.*`) or one with the DCN head
  (a deformable convolution per task, `...feature_adapt_cls.conv_offset.*`) is refused by name.
- box convention: mmdet3d v1.0.0rc0 changed its LiDAR boxes (sizes (w, l, h) became (l, w, h), yaw became
  -yaw - pi/2). A file trained before it has our keys and shapes but decodes every box with length
  and width swapped and a wrong heading, so a file whose meta says mmdet3d 0.x is refused. A file that says
  nothing (a bare state_dict, or meta without any version) cannot be checked: it loads with a warning. Our own
  files and mmengine-era files (mmdet3d >= 1.1, which records `mmengine_version`) use the current convention.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import to_dict
from ..errors import CheckpointError
from ..safe_pickle import load_checkpoint

LOGGER = logging.getLogger(__name__)

# Top-level modules of the teacher; a checkpoint with none of them belongs to another architecture.
TEACHER_PREFIXES: tuple[str, ...] = ("pts_voxel_encoder.", "pts_backbone.", "pts_neck.", "pts_bbox_head.")
FORMAT_NAME = "distillbev-teacher"
SHOWN_KEYS = 8

# The first mmdet3d release with the current LiDAR box convention (docs/en/notes/compatibility.md of mmdet3d).
BOX_CONVENTION_VERSION = "1.0.0rc0"
# The mmdet3d 1.x model zoo's CenterPoint files (its configs/centerpoint/metafile.yml): mmdet3d config name ->
# (released file name, what our teacher makes of it: "loads" into configs/nuscenes/teacher_pillar02.yaml, or is
# refused as "voxel" or "dcn" by `check_architecture`). docs/teacher_checkpoints.md has the whole table;
# tests/teacher/test_released_checkpoints.py keeps it true against mmdet3d.
RELEASED_CHECKPOINTS: dict[str, tuple[str, str]] = {
    "centerpoint_voxel01_second_secfpn_head-circlenms_8xb4-cyclic-20e_nus-3d": (
        "centerpoint_01voxel_second_secfpn_circlenms_4x8_cyclic_20e_nus_20220810_030004-9061688e.pth", "voxel"),
    "centerpoint_voxel01_second_secfpn_head-dcn-circlenms_8xb4-cyclic-20e_nus-3d": (
        "centerpoint_01voxel_second_secfpn_dcn_circlenms_4x8_cyclic_20e_nus_20220810_052355-a6928835.pth", "voxel"),
    "centerpoint_voxel0075_second_secfpn_head-circlenms_8xb4-cyclic-20e_nus-3d": (
        "centerpoint_0075voxel_second_secfpn_circlenms_4x8_cyclic_20e_nus_20220810_011659-04cb3a3b.pth", "voxel"),
    "centerpoint_voxel0075_second_secfpn_head-dcn-circlenms_8xb4-cyclic-20e_nus-3d": (
        "centerpoint_0075voxel_second_secfpn_dcn_circlenms_4x8_cyclic_20e_nus_20220810_025930-657f67e0.pth", "voxel"),
    "centerpoint_pillar02_second_secfpn_head-circlenms_8xb4-cyclic-20e_nus-3d": (
        "centerpoint_02pillar_second_secfpn_circlenms_4x8_cyclic_20e_nus_20220811_031844-191a3822.pth", "loads"),
    "centerpoint_pillar02_second_secfpn_head-dcn_8xb4-cyclic-20e_nus-3d": (
        "centerpoint_02pillar_second_secfpn_dcn_4x8_cyclic_20e_nus_20220811_045458-808e69ad.pth", "dcn"),
}
LOADABLE_RELEASE = RELEASED_CHECKPOINTS["centerpoint_pillar02_second_secfpn_head-circlenms_8xb4-cyclic-20e_nus-3d"][0]
PILLAR_DCN_RELEASE = RELEASED_CHECKPOINTS["centerpoint_pillar02_second_secfpn_head-dcn_8xb4-cyclic-20e_nus-3d"][0]
VOXEL_RELEASES = ("centerpoint_01voxel_second_secfpn_[dcn_]circlenms_4x8_cyclic_20e_nus_*.pth, "
                  "centerpoint_0075voxel_second_secfpn_[dcn_]circlenms_4x8_cyclic_20e_nus_*.pth")
WHAT_TO_USE = (f"use the released {LOADABLE_RELEASE} with configs/nuscenes/teacher_pillar02.yaml, or train a "
               f"teacher with `distillbev train-teacher` (docs/teacher_checkpoints.md)")


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
    mmdet3d_version: str | None = None  # meta["mmdet3d_version"] of an mmdet3d file, when it records one
    box_convention: str = ""  # why the boxes are taken to be in the current convention, or "unknown (...)"
    sha256: str = ""  # hex SHA-256 of the bytes that were loaded (read once: not a second read of `path`)

    def summary(self) -> str:
        text = f"{self.path}: loaded {self.num_loaded} tensors ({self.source} checkpoint)"
        if self.stripped_prefix:
            text += f", stripped prefix {self.stripped_prefix!r}"
        if self.box_convention:
            text += f", boxes: {self.box_convention}"
        if self.missing or self.unexpected:
            text += f", {len(self.missing)} missing, {len(self.unexpected)} unexpected"
        return text


def checkpoint_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file (streamed). For a checkpoint that is also loaded, take `LoadReport.sha256` instead:
    the file may be replaced between two reads (`train-teacher` rewrites latest.pth every epoch)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file not found; pass the path of an existing .pth file")
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read(path: Path, trust: bool) -> tuple[Any, str]:
    """(the checkpoint's content, the hex SHA-256 of its bytes): the file is read once, hashed and loaded from
    memory, so the hash is that of what was loaded even when the file is replaced meanwhile."""
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise CheckpointError(f"{path}: checkpoint file not found; pass the path of an existing .pth file "
                              f"(train one with `distillbev train-teacher` or download the mmdet3d one)") from None
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({exc.strerror or exc}); check the file's "
                              f"permissions and the disk") from exc
    return load_checkpoint(path, trust=trust, what="teacher checkpoint", data=data), hashlib.sha256(data).hexdigest()


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


def check_architecture(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Refuse, by name and with the reason, the released CenterPoint variants our pillar teacher cannot run.

    Voxel files hold a sparse 3D convolution encoder (`pts_middle_encoder.*`, mmdet3d's SparseEncoder); DCN-head
    files hold a deformable convolution per task (DCNSeparateHead: `feature_adapt_cls` / `feature_adapt_reg`, each
    with a `conv_offset` layer predicting the sampling offsets). Neither has a counterpart in our model, and loading
    the rest would silently give another network.
    """
    sparse = sorted(k for k in state if k.startswith("pts_middle_encoder."))
    deformable = sorted(k for k in state if k.startswith("pts_bbox_head.")
                        and (".conv_offset." in k or ".feature_adapt_" in k or ".dcn." in k))
    dcn_note = (f" It also has the DCN head ({len(deformable)} deformable-convolution keys such as "
                f"{deformable[0]})." if deformable else "")
    if sparse:
        raise CheckpointError(
            f"{path}: a CenterPoint-voxel checkpoint ({len(sparse)} sparse 3D convolution keys such as {sparse[0]}; "
            f"released as {VOXEL_RELEASES}), not CenterPoint-pillar: its SparseEncoder over 0.1 m / 0.075 m voxels "
            f"has no counterpart in our teacher, which scatters 2D pillars into a dense canvas.{dcn_note} "
            f"Refused; {WHAT_TO_USE}")
    if deformable:
        raise CheckpointError(
            f"{path}: a CenterPoint checkpoint with the DCN head (DCNSeparateHead, released as {PILLAR_DCN_RELEASE} "
            f"and the voxel *_dcn_* files): {len(deformable)} of its head keys belong to deformable convolutions "
            f"(e.g. {_first(deformable[:2])}). Our CenterHead has no deformable convolution, so its heatmap and box "
            f"branches would run on features the DCN layers never saw. Refused; {WHAT_TO_USE}")


def _version_tuple(version: str) -> tuple[int, int] | None:
    match = re.match(r"\s*v?(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else None


def check_box_convention(path: Path, source: str, meta: dict[str, Any] | None, payload: Any) -> tuple[str | None, str]:
    """(meta["mmdet3d_version"] or None, the evidence for the box convention). Refuses a file written by
    mmdet3d < 1.0 (the old LiDAR box convention); warns when a file gives no version information at all.

    Evidence, in order: our own format; meta["mmdet3d_version"] (mmdet3d <= 1.0's runners write it; 0.x is refused);
    meta["mmengine_version"] or mmengine's "message_hub" (only mmdet3d >= 1.1 trains with mmengine); else unknown.
    """
    meta = meta or {}
    if source == "distillbev":
        return None, "distillbev checkpoint"
    version = meta.get("mmdet3d_version")
    if version is not None:
        version = str(version)
        parsed = _version_tuple(version)
        if parsed is not None and parsed[0] == 0:
            raise CheckpointError(
                f"{path}: written by mmdet3d {version} (meta['mmdet3d_version']), before mmdet3d "
                f"{BOX_CONVENTION_VERSION} changed its LiDAR box convention (sizes (w, l, h) became (l, w, h), yaw "
                f"became -yaw - pi/2): its keys fit our teacher but its head decodes every box with length and width "
                f"swapped and a wrong heading. Refused; {WHAT_TO_USE}; the model zoo's v1.0.0_models files were "
                f"trained in the current convention")
        if parsed is not None:
            return version, f"mmdet3d {version} (meta['mmdet3d_version'], >= {BOX_CONVENTION_VERSION})"
        unknown = f"meta['mmdet3d_version'] is {version!r}, not a version number"
    elif "mmengine_version" in meta or (isinstance(payload, dict) and "message_hub" in payload):
        engine = meta.get("mmengine_version", "?")
        return None, f"mmengine {engine} file (mmdet3d >= 1.1, current convention)"
    else:
        unknown = ("a bare state_dict" if source == "state_dict" else
                   "its meta records no mmdet3d or mmengine version" + (f" (keys: {sorted(meta)[:SHOWN_KEYS]})"
                                                                         if meta else " (no meta)"))
    LOGGER.warning(
        "%s: cannot tell which LiDAR box convention this checkpoint was trained in (%s). A file trained with "
        "mmdet3d < %s has the same keys but decodes boxes with length and width swapped and a wrong heading; "
        "if it came from mmdet3d's model zoo, use a v1.0.0_models file (docs/teacher_checkpoints.md), and check "
        "the decoded boxes before trusting it (`distillbev evaluate-teacher`: swapped sizes and headings show as an "
        "mASE and mAOE far above a working teacher's).", path, unknown, BOX_CONVENTION_VERSION)
    return None, f"unknown ({unknown})"


def load_teacher_checkpoint(model: nn.Module, path: str | Path, strict: bool = True, *,
                            trust_checkpoint: bool = False) -> LoadReport:
    """Load a teacher checkpoint into `model` and report what happened.

    strict=True: every model key must be in the file and vice versa. Shape mismatches are always errors.
    The file is read once: the report's `sha256` is that of the bytes loaded (record it, not a second hash).
    The file is unpickled without running code (`safe_pickle.load_checkpoint`): a file that needs a class outside
    its allow list is refused unless trust_checkpoint=True (`--trust-checkpoint`), which unpickles anything.
    """
    path = Path(path)
    payload, sha256 = _read(path, trust_checkpoint)
    state, source, config, meta = _state_dict_of(path, payload)
    state, prefix = _strip_prefix(state)
    if not any(k.startswith(TEACHER_PREFIXES) for k in state):
        raise CheckpointError(
            f"{path}: not a CenterPoint-pillar teacher checkpoint: none of its {len(state)} keys start with "
            f"{'/'.join(p.rstrip('.') for p in TEACHER_PREFIXES)} (first keys: {_first(sorted(state))}); "
            f"it looks like another architecture (e.g. an image backbone or a student) -- pass the teacher's .pth")
    check_architecture(path, state)
    mmdet3d_version, convention = check_box_convention(path, source, meta, payload)
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
                        unexpected=unexpected, stripped_prefix=prefix, config=config, meta=meta,
                        mmdet3d_version=mmdet3d_version, box_convention=convention, sha256=sha256)
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
