"""What a student run records about its own progress, for `distillbev figures`; none of it changes the training.

- `RUN/eval_history.jsonl`: one line per evaluation of the val split, {"epoch", "iteration", "eval_dir", "mAP",
  "NDS", "mATE", "mASE", "mAOE", "mAVE", "mAAE"} (metrics as fractions). `train.eval_every = N` evaluates after every
  N-th epoch (into `eval/epoch_XXX/`) as well as after the last (into `eval/`, as every run does).
- `RUN/attention/epoch_XXX.npz` (`train.attention_snapshots`): the student's spatial attention
  A = Y*X * softmax(mean_c |F| / T) (pipeline/losses/attention.py) at the pre-head pair, after the first and the
  last epoch, on `train.attention_samples` train samples evenly spaced over the split. The inputs are the test-mode
  samples at BEV view 0 (identity augmentation, no image augmentation), so every run and epoch sees the same
  images. F is the adapted student feature of a distilled run (as the loss sees it) and the raw pre-head feature of
  a baseline. When the run has teacher targets (a cache's view 0, or the live teacher), the teacher's attention of
  the same samples is stored alongside.

Both are cut back to the checkpoint's epoch when a run resumes, so a resumed run never holds an entry twice, and
the evaluations and snapshots run with the random state saved and restored around them, so a run with them trains
exactly as one without.

Under torchrun every rank takes part in each evaluation (it predicts its share of the val split) and rank 0 alone
scores it, records it and takes the snapshots.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..data.collate import collate_samples
from ..data.dataset import NuScenesDetectionDataset
from ..distributed import World
from ..eval.nuscenes_eval import summary_metrics
from ..losses.attention import spatial_attention
from ..losses.config import DistillConfig, LayerPairConfig

log = logging.getLogger(__name__)

HISTORY_FILE = "eval_history.jsonl"
ATTENTION_DIR = "attention"
PRE_HEAD = "neck"  # the student feature the head runs on (the pair `H` of the paper)
_SNAPSHOT_NAME = re.compile(r"epoch_(\d+)\.npz")


# ------------------------------------------------------------------------------------------- evaluation history
def epoch_eval_dir(out_dir: Path, epoch: int) -> Path:
    """Where the evaluation after `epoch` (1-based) goes when it is not the final one."""
    return out_dir / "eval" / f"epoch_{epoch:03d}"


def read_history(path: Path) -> list[dict]:
    """The lines of an eval_history.jsonl, by epoch; [] when the file does not exist."""
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(records, key=lambda record: record["epoch"])


def write_history(path: Path, records: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(record) + "\n" for record in records))
    tmp.replace(path)


def record_evaluation(out_dir: Path, epoch: int, iteration: int, eval_dir: Path, summary: dict) -> dict:
    """Add the evaluation after `epoch` to RUN/eval_history.jsonl, replacing an earlier line of the same epoch.

    An earlier epoch's line that named the same folder (eval/ of a run since resumed for more epochs) keeps its
    metrics, and its eval_dir becomes null: the folder now holds the new evaluation.
    """
    path = out_dir / HISTORY_FILE
    record = {"epoch": int(epoch), "iteration": int(iteration), "eval_dir": str(eval_dir.relative_to(out_dir)),
              **summary_metrics(summary)}
    kept = [r if r["eval_dir"] != record["eval_dir"] else {**r, "eval_dir": None}
            for r in read_history(path) if r["epoch"] != epoch]
    write_history(path, kept + [record])
    return record


def reset_progress(out_dir: Path, keep_through_epoch: int) -> None:
    """Drop history lines and attention snapshots after `keep_through_epoch` (0 for a fresh run: all of them)."""
    path = out_dir / HISTORY_FILE
    if path.exists():
        kept = [r for r in read_history(path) if r["epoch"] <= keep_through_epoch]
        if kept:
            write_history(path, kept)
        else:
            path.unlink()
    for snapshot in snapshot_paths(out_dir):
        if snapshot_epoch(snapshot) > keep_through_epoch:
            snapshot.unlink()


@contextlib.contextmanager
def preserved_rng():
    """Restore the torch (CPU and initialised CUDA), numpy and python random states on exit: an evaluation's
    DataLoader draws its base seed from torch's generator, which would otherwise shift every later draw."""
    torch_state, numpy_state, python_state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_rng_state(torch_state)
        np.random.set_state(numpy_state)
        random.setstate(python_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


# ------------------------------------------------------------------------------------------- attention snapshots
@dataclass
class AttentionSnapshot:
    """One attention snapshot: maps (S, Y, X) float32 of the student, teacher_maps (S, Yt, Xt) or None."""

    epoch: int
    iteration: int
    tokens: list[str]
    maps: np.ndarray
    feature: str  # "adapted" (the distilled run's adapter output) or "raw" (the pre-head feature itself)
    student_feature: str
    teacher_layer: str
    temperature: float
    view: int
    teacher_maps: np.ndarray | None = None
    teacher_source: str = ""

    @property
    def feature_label(self) -> str:
        return f"{self.feature} {self.student_feature}"


def snapshot_path(out_dir: Path, epoch: int) -> Path:
    return out_dir / ATTENTION_DIR / f"epoch_{epoch:03d}.npz"


def snapshot_epoch(path: Path) -> int:
    return int(_SNAPSHOT_NAME.fullmatch(path.name).group(1))


def snapshot_paths(out_dir: Path) -> list[Path]:
    """RUN/attention/epoch_XXX.npz files, by epoch."""
    folder = out_dir / ATTENTION_DIR
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if _SNAPSHOT_NAME.fullmatch(p.name)), key=snapshot_epoch)


def save_snapshot(path: Path, snapshot: AttentionSnapshot) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"epoch": np.int64(snapshot.epoch), "iteration": np.int64(snapshot.iteration),
              "tokens": np.asarray(snapshot.tokens, dtype=str), "maps": snapshot.maps.astype(np.float32),
              "feature": np.asarray(snapshot.feature), "student_feature": np.asarray(snapshot.student_feature),
              "teacher_layer": np.asarray(snapshot.teacher_layer), "temperature": np.float64(snapshot.temperature),
              "view": np.int64(snapshot.view)}
    if snapshot.teacher_maps is not None:
        arrays["teacher_maps"] = snapshot.teacher_maps.astype(np.float32)
        arrays["teacher_source"] = np.asarray(snapshot.teacher_source)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    tmp.replace(path)


def load_snapshot(path: Path) -> AttentionSnapshot:
    with np.load(path, allow_pickle=False) as data:
        return AttentionSnapshot(
            epoch=int(data["epoch"]), iteration=int(data["iteration"]), tokens=[str(t) for t in data["tokens"]],
            maps=data["maps"], feature=str(data["feature"]), student_feature=str(data["student_feature"]),
            teacher_layer=str(data["teacher_layer"]), temperature=float(data["temperature"]), view=int(data["view"]),
            teacher_maps=data["teacher_maps"] if "teacher_maps" in data else None,
            teacher_source=str(data["teacher_source"]) if "teacher_source" in data else "")


def pre_head_pair(config: DistillConfig) -> LayerPairConfig:
    """The distilled pair on the pre-head feature (H), or neck <-> neck when the config distils no such pair."""
    for pair in config.layers:
        if pair.student == PRE_HEAD:
            return pair
    return LayerPairConfig(student=PRE_HEAD, teacher=PRE_HEAD, adapter="conv1x1")


def snapshot_indices(num_samples: int, count: int) -> list[int]:
    """`count` indices evenly spaced over 0..num_samples-1 (first and last included), without repeats."""
    return sorted({int(i) for i in np.linspace(0, num_samples - 1, min(count, num_samples)).round()})


@torch.no_grad()
def student_attention(student: torch.nn.Module, distill_loss, pair: LayerPairConfig, batch,
                      temperature: float) -> tuple[torch.Tensor, str]:
    """(B, Y, X) attention of the batch at `pair`'s student feature, and "adapted" or "raw".

    The feature goes through the pair's adapter when the run has one (distill_loss holds the pair), as the loss
    sees it; otherwise (a baseline) it is the raw student feature. The caller sets eval mode.
    """
    feature = student(batch).features[pair.student]
    if distill_loss is not None and pair.name in distill_loss.layers:
        return spatial_attention(distill_loss.layers[pair.name].adapt(feature), temperature), "adapted"
    return spatial_attention(feature, temperature), "raw"


def attention_similarity(student_maps: np.ndarray, teacher_maps: np.ndarray) -> np.ndarray:
    """Pearson correlation r (S,) between each sample's student and teacher attention map, over its Y*X cells.

    r = sum (a - mean a)(b - mean b) / sqrt(sum (a - mean a)^2 * sum (b - mean b)^2): 1 for maps equal up to a
    positive scale and offset, 0 for unrelated ones, NaN when either map is constant. student_maps (S, Y, X) is
    resampled bilinearly (align_corners, as the adapters upsample) when teacher_maps (S, Yt, Xt) has another grid.
    """
    student_maps = np.asarray(student_maps, dtype=np.float64)
    teacher_maps = np.asarray(teacher_maps, dtype=np.float64)
    if student_maps.shape[0] != teacher_maps.shape[0]:
        raise ValueError(f"attention maps of {student_maps.shape[0]} student and {teacher_maps.shape[0]} teacher "
                         f"samples; compare the maps of the same samples")
    if student_maps.shape[1:] != teacher_maps.shape[1:]:
        student_maps = torch.nn.functional.interpolate(
            torch.from_numpy(student_maps)[:, None], size=teacher_maps.shape[1:], mode="bilinear",
            align_corners=True)[:, 0].numpy()
    a = student_maps.reshape(len(student_maps), -1)
    b = teacher_maps.reshape(len(teacher_maps), -1)
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denominator = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (a * b).sum(axis=1) / denominator, np.nan)


# ------------------------------------------------------------------------------------------- the training hook
class TrainingProgress:
    """Per-epoch evaluation and attention snapshots of one run; `after_epoch` is `run_epochs`' epoch callback.

    evaluate(eval_dir, final) runs the devkit evaluation of the val split into eval_dir and returns its summary
    (None on the ranks other than 0, which only predict their share); teacher_attention(samples, pair) returns the
    teacher's (S, Yt, Xt) maps and their source, or None.
    """

    def __init__(self, cfg, out_dir: Path, setup, device: torch.device, start_epoch: int,
                 evaluate: Callable[[Path, bool], dict | None],
                 teacher_attention: Callable[[list, LayerPairConfig], tuple[np.ndarray, str] | None],
                 world: World = World()) -> None:
        self.cfg = cfg
        self.out_dir = out_dir
        self.setup = setup
        self.device = device
        self.evaluate = evaluate
        self.teacher_attention = teacher_attention
        self.completed = start_epoch
        self.pair = pre_head_pair(cfg.distill)
        self.world = world
        self._samples: list | None = None
        self._teacher: tuple[np.ndarray, str] | None = None
        if world.is_main:
            reset_progress(out_dir, start_epoch)

    def after_epoch(self, epoch: int, iteration: int) -> None:
        """After epoch `epoch` (1-based), before its checkpoint: the early snapshot and the intermediate
        evaluations (the last epoch's are taken by `finish`)."""
        self.completed = epoch
        train = self.cfg.train
        if epoch >= train.epochs:
            return
        with preserved_rng():
            if train.attention_snapshots and epoch == 1 and self.world.is_main:
                self.snapshot(epoch, iteration)
            if train.eval_every and epoch % train.eval_every == 0:
                eval_dir = epoch_eval_dir(self.out_dir, epoch)
                summary = self.evaluate(eval_dir, False)
                if self.world.is_main:
                    record = record_evaluation(self.out_dir, epoch, iteration, eval_dir, summary)
                    log.info("epoch %d: mAP %.4f, NDS %.4f (%s)", epoch, record["mAP"], record["NDS"], eval_dir)
        self.setup.student.train()

    def finish(self, iteration: int) -> dict | None:
        """The final snapshot and evaluation (into RUN/eval/); returns the devkit summary (None on ranks other
        than 0)."""
        # a run stopped by --max-steps ends inside the epoch after the last completed one
        epoch = self.cfg.train.epochs if self.completed >= self.cfg.train.epochs else self.completed + 1
        if self.cfg.train.attention_snapshots and self.world.is_main:
            self.snapshot(epoch, iteration)
        eval_dir = self.out_dir / "eval"
        summary = self.evaluate(eval_dir, True)
        if self.world.is_main:
            record_evaluation(self.out_dir, epoch, iteration, eval_dir, summary)
        return summary

    def _snapshot_samples(self) -> list:
        if self._samples is None:
            dataset = NuScenesDetectionDataset(self.cfg.data, self.cfg.data.train_split, mode="test")
            self._samples = [dataset.get(i) for i in snapshot_indices(len(dataset), self.cfg.train.attention_samples)]
            self._teacher = self.teacher_attention(self._samples, self.pair)
        return self._samples

    @torch.no_grad()
    def snapshot(self, epoch: int, iteration: int) -> AttentionSnapshot:
        samples = self._snapshot_samples()
        modules = [m for m in (self.setup.student, self.setup.distill_loss) if m is not None]
        modes = [m.training for m in modules]
        for module in modules:
            module.eval()
        maps, feature = [], "raw"
        batch_size = max(1, self.cfg.train.batch_size)
        for start in range(0, len(samples), batch_size):
            batch = collate_samples(samples[start:start + batch_size]).to(self.device)
            attention, feature = student_attention(self.setup.student, self.setup.distill_loss, self.pair, batch,
                                                   self.cfg.distill.temperature)
            maps.append(attention.cpu().numpy())
        for module, mode in zip(modules, modes):
            module.train(mode)
        teacher_maps, teacher_source = self._teacher if self._teacher is not None else (None, "")
        snapshot = AttentionSnapshot(epoch, iteration, [s.sample_token for s in samples], np.concatenate(maps),
                                     feature, self.pair.student, self.pair.teacher, self.cfg.distill.temperature,
                                     0, teacher_maps, teacher_source)
        path = snapshot_path(self.out_dir, epoch)
        save_snapshot(path, snapshot)
        if teacher_maps is not None:
            similarity = np.nanmean(attention_similarity(snapshot.maps, teacher_maps))
            log.info("attention after epoch %d (%s): Pearson r with the teacher %.3f (mean of %d samples) -> %s",
                     epoch, snapshot.feature_label, similarity, len(samples), path)
        else:
            log.info("attention after epoch %d (%s) -> %s", epoch, snapshot.feature_label, path)
        return snapshot
