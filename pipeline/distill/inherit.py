"""DistillBEV's head inheritance: the student's head starts from the teacher's.

A lift-splat student's CenterHead takes the teacher CenterHead's `task_heads` (BD L367-373). A BEVFormer student
takes the class branches, box branches and decoder of a teacher with a DETR decoder (BFD L266-285, `inherit_head`
and `inherit_decoder`; the object queries are not inherited, as `inherit_query` is off in the reference). The
teacher's head state is read from the cache (`teacher_head/`) or from the live teacher (`head_state()`), with the
decoder's keys under the `detr.` prefix.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..config import from_dict
from ..errors import ConfigError
from ..teacher.config import TeacherModelConfig
from ..teacher.decoder import DECODER_PREFIX, decoder_head_spec

log = logging.getLogger(__name__)

DECODER_PARTS = ("class_branches.", "box_branches.", "decoder.")  # what a BEVFormer student inherits


def inherit_teacher_head(student: torch.nn.Module, head_state: dict[str, torch.Tensor],
                         teacher_config: dict[str, Any] | None = None) -> int:
    """Initialise the student's head from the teacher's; returns the number of tensors copied.

    Copies are strict: a missing key or a shape mismatch is a ConfigError naming it. A BEVFormer student needs a
    teacher with a decoder (`teacher_config`, the teacher's model config, checks that its BEV range is the
    student's, so the inherited box branches decode centres onto the same metres); without one it is skipped with
    a logged reason and 0 is returned.
    """
    if student.config.is_transformer:
        return _inherit_decoder(student, head_state, teacher_config)
    task_state = {k[len("task_heads."):]: v for k, v in head_state.items() if k.startswith("task_heads.")}
    return _copy_strictly(student.head.task_heads, task_state, "task heads",
                          "make model.head match the teacher's head or set inherit_teacher_head: false")


def _inherit_decoder(student: torch.nn.Module, head_state: dict[str, torch.Tensor],
                     teacher_config: dict[str, Any] | None) -> int:
    decoder_state = {k[len(DECODER_PREFIX):]: v for k, v in head_state.items() if k.startswith(DECODER_PREFIX)}
    if not decoder_state:
        log.warning("inherit_teacher_head: skipped for the BEVFormer student: the teacher has no DETR decoder (a "
                    "CenterHead has no object queries or class and box branches to give); the head trains from its "
                    "initialisation. Train a teacher with a model.decoder section to inherit one "
                    "(docs/method.md, BEVFormer student)")
        return 0
    if teacher_config is not None:
        _check_bev_range(student, teacher_config)
    inherited = {k: v for k, v in decoder_state.items() if k.startswith(DECODER_PARTS)}
    own = {k: v for k, v in student.head.state_dict().items() if k.startswith(DECODER_PARTS)}
    return _copy_strictly(student.head, inherited, "decoder, class and box branches",
                          "make model.bevformer (embed_dims, head) match the teacher's model.decoder or set "
                          "inherit_teacher_head: false", own=own)


def _check_bev_range(student: torch.nn.Module, teacher_config: dict[str, Any]) -> None:
    teacher = decoder_head_spec(from_dict(TeacherModelConfig, teacher_config, source="the teacher config"))
    mine = student.config.bevformer.bev
    theirs = teacher.bev
    fields = ("x_min", "x_max", "y_min", "y_max", "z_min", "z_max")
    if any(abs(getattr(mine, name) - getattr(theirs, name)) > 1e-6 for name in fields):
        raise ConfigError(f"cannot inherit the teacher's decoder: its box branches decode centres over x, y, z "
                          f"{[getattr(theirs, name) for name in fields]} (the teacher's head grid and point cloud z "
                          f"range) but model.bevformer.bev spans {[getattr(mine, name) for name in fields]}; make "
                          f"them equal or set inherit_teacher_head: false")


def _copy_strictly(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str, fix: str,
                   own: dict[str, torch.Tensor] | None = None) -> int:
    """Load `state` into `module` (keys relative to it); `own` = the module keys that must all be covered."""
    own = module.state_dict() if own is None else own
    mismatched = [f"{k}: teacher {tuple(v.shape)} vs student {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if mismatched or set(state) != set(own):
        missing = sorted(set(own) - set(state))[:3]
        extra = sorted(set(state) - set(own))[:3]
        detail = mismatched or [f"keys differ ({len(state)} teacher vs {len(own)} student; student-only {missing}, "
                                f"teacher-only {extra})"]
        raise ConfigError(f"cannot inherit the teacher's {what}: " + "; ".join(detail) + f"; {fix}")
    module.load_state_dict(state, strict=False)
    return len(state)
