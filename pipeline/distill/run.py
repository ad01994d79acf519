"""Wiring of a stage-two run: data, cache, student, DistillBEV loss, optimiser, resume, evaluation.

Under torchrun (`world.distributed`, from `distributed.init_from_env`) every rank builds the same run from the same
seed, trains a DistributedDataParallel replica of the student and the DistillBEV loss on its shard of each epoch
(`train.train_sampler`, with `train.batch_size` per rank), and takes part in every evaluation: the ranks take rank
0's BatchNorm statistics, predict val samples r, r + W, ..., and rank 0 scores the gathered predictions. Rank 0
alone writes into the run directory (config, log, checkpoints, cache identity, evaluations, attention snapshots).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..cache.input_digest import DEFAULT_VERIFY_SAMPLES, verify_input_files
from ..cache.location import strip_user_info
from ..cache.manifest import manifest_diff
from ..cache.reader import TeacherCache
from ..config import from_dict, to_dict
from ..data.classes import DETECTION_CLASSES
from ..data.collate import collate_samples
from ..data.config import DataConfig
from ..data.dataset import NuScenesDetectionDataset
from ..data.handover import loader_workers
from ..data.preflight import dataset_fingerprint, index_fingerprint
from ..distributed import World, barrier, broadcast_buffers, gather_ordered, prepare_model, rank_indices
from ..errors import CacheError, CheckpointError, ConfigError
from ..eval import detections_to_results, evaluate_results, format_metrics_table
from ..losses.attention import spatial_attention
from ..losses.distill import DistillBEVLoss
from ..precision import resolve_precision, set_memory_format, training_precision
from ..safe_pickle import load_checkpoint
from ..student.build import build_student
from ..teacher.checkpoint import checkpoint_sha256, load_teacher_checkpoint
from ..teacher.config import TeacherExperimentConfig, TeacherModelConfig
from ..teacher.model import CenterPointTeacher
from .cbgs import cbgs_indices, dataset_class_ids
from .config import StudentExperimentConfig
from .inherit import inherit_teacher_head
from .progress import TrainingProgress, reset_progress
from .targets import DistillationDataset, TargetsMode, step_precompute
from .train import (DistillationSetup, TrainableModules, load_resume, run_epochs, seed_everything, steps_per_epoch,
                    train_sampler, write_config)

log = logging.getLogger(__name__)


def expected_cache_fields(cfg: StudentExperimentConfig) -> dict:
    """The manifest entries a cache must match for this student config (checked before the first step)."""
    bev = cfg.model.bev
    teacher_layers = sorted({pair.teacher for pair in cfg.distill.layers})
    return {
        "bev_grid": {"x_min": bev.x_min, "x_max": bev.x_max, "y_min": bev.y_min, "y_max": bev.y_max},
        "heatmap": {"shape": list(cfg.model.head.grid.shape)},
        "dataset": {"version": cfg.data.version, "split": cfg.data.train_split},
        "_layers": teacher_layers,
    }


def open_checked_cache(path: Path, cfg: StudentExperimentConfig, train_dataset=None,
                       teacher_checkpoint: Path | None = None) -> TeacherCache:
    """Open a complete cache and refuse it, with a readable diff, if it does not fit this run.

    Compared before the first step: the grid extent and head grid (with the layer shapes, which the loss checks,
    they fix every resolution), version and split, the distilled layers, and, when given, the train dataset's
    content fingerprint (so a regenerated or edited dataroot is caught) and the teacher checkpoint's SHA-256.
    """
    cache = TeacherCache.open(path)
    expected = expected_cache_fields(cfg)
    layers = expected.pop("_layers")
    if teacher_checkpoint is not None:
        expected["teacher"] = {"checkpoint_sha256": checkpoint_sha256(teacher_checkpoint)}
    if train_dataset is not None:
        loading = cache.manifest["dataset"]["point_loading"]
        num_sweeps = int(loading.get("num_sweeps", cache.manifest["dataset"]["num_sweeps"]))
        virtual = loading.get("point_features", "lidar") == "mvp"  # an MVP teacher also read the virtual points
        if train_dataset.index.sweeps.files.shape[1] >= num_sweeps:
            fingerprint = index_fingerprint(train_dataset.index, num_sweeps, virtual)
        else:  # the student's index walked fewer sweeps than the teacher read: walk them with the devkit
            fingerprint = dataset_fingerprint(train_dataset.devkit(), list(train_dataset.sample_tokens), num_sweeps,
                                              int(loading.get("sweep_candidates", num_sweeps)), virtual)
        expected["dataset"]["fingerprint"] = fingerprint
    cache.check_compatible(expected)
    missing = [name for name in layers if name not in cache.manifest["layers"]]
    if missing:
        raise CacheError(f"{path}: the config distils teacher layers {missing} but the cache holds "
                         f"{sorted(cache.manifest['layers'])}; extract them with --layers or change distill.layers")
    return cache


def check_live_teacher_grid(cfg: StudentExperimentConfig, teacher, checkpoint: Path,
                            data: DataConfig | None = None) -> None:
    """ConfigError when the online teacher's BEV extent, head grid or point width differ from the student's (the
    fields a cache is checked on, and the columns of the points the train loader gives the teacher: `data`, default
    the student's `cfg.data`), listing "field: teacher -> student" for each."""
    data = cfg.data if data is None else data
    bev, canvas, head = cfg.model.bev, teacher.canvas_grid, teacher.head_grid
    differences = [f"bev_grid.{key}: {getattr(canvas, key)} -> {getattr(bev, key)}"
                   for key in ("x_min", "x_max", "y_min", "y_max")
                   if float(getattr(canvas, key)) != float(getattr(bev, key))]
    if tuple(head.shape) != tuple(cfg.model.head.grid.shape):
        differences.append(f"heatmap.shape: {list(head.shape)} -> {list(cfg.model.head.grid.shape)}")
    if teacher.config.point_features != data.point_dims:
        differences.append(f"point_features: {teacher.config.point_features} -> {data.point_dims} "
                           f"(data.point_features {data.point_features!r})")
    if differences:
        raise ConfigError(f"{checkpoint}: the online teacher's grid does not fit the student (teacher -> student: "
                          f"{'; '.join(differences)}); use a teacher config with the student's BEV range and head "
                          f"grid, or change model.bev / model.head.grid / data.point_features")


def log_view_coverage(num_views: int) -> None:
    """Say what BEV augmentation a cached run gets: one of the cache's views per sample and epoch."""
    if num_views == 1:
        log.warning("the cache holds 1 view per sample (un-augmented): this distilled run gets no BEV augmentation, "
                    "while a baseline draws a fresh one every step; extract with --views 4 (docs/method.md)")
    else:
        log.info("the cache holds %d views per sample (view 0 un-augmented): each epoch replays one of them, while a "
                 "baseline draws a fresh BEV augmentation every step (docs/method.md)", num_views)


def cache_identity(manifest: dict) -> dict:
    """What a distilled run's targets depend on; a resumed run must find the same (a repair keeps it)."""
    return {"teacher_checkpoint_sha256": manifest["teacher"]["checkpoint_sha256"],
            "teacher_config": manifest["teacher"]["config"], "bev_grid": manifest["bev_grid"],
            "layers": manifest["layers"], "heatmap": manifest["heatmap"], "views": manifest["views"],
            "storage": manifest["storage"],
            "dataset": {key: manifest["dataset"][key] for key in ("version", "split", "fingerprint",
                                                                  "sample_tokens_sha256", "point_loading")}}


def check_resume_identity(out_dir: Path, identity: dict, resume: bool, write: bool = True) -> None:
    """Record the cache identity of a fresh run (when `write`: rank 0 under torchrun); refuse to resume a run
    against a different cache."""
    path = out_dir / "cache_identity.json"
    if resume and path.exists():
        diff = manifest_diff(json.loads(path.read_text()), identity, ignore=())
        if diff:
            raise CacheError(f"{path}: this run was trained on other teacher targets than the cache given now "
                             f"(run -> cache: {'; '.join(diff)}); resume with the run's own cache or start a new "
                             f"run in another --out")
        return
    if write:
        path.write_text(json.dumps(identity, indent=1, sort_keys=True))


def build_distill_loss(cfg: StudentExperimentConfig, student: torch.nn.Module,
                       teacher_layers: dict[str, dict]) -> DistillBEVLoss:
    """The DistillBEV loss module; teacher channels and shapes come from the cache manifest (or the live teacher)."""
    bev = cfg.model.bev
    return DistillBEVLoss(
        cfg.distill,
        student_channels=student.feature_channels,
        teacher_channels={name: int(spec["channels"]) for name, spec in teacher_layers.items()},
        student_shapes=student.feature_shapes,
        teacher_shapes={name: tuple(spec["shape"]) for name, spec in teacher_layers.items()},
        bev_extent=(bev.x_min, bev.x_max, bev.y_min, bev.y_max),
        precision=resolve_precision(cfg.train.adapter_precision, next(student.parameters()).device)[0],
    )


@dataclasses.dataclass(frozen=True)
class OnlineTeacherSettings:
    """What the live teacher of `online` targets is built from and fed."""

    model: dict[str, Any]  # its TeacherModelConfig as a plain dict
    data: DataConfig  # the student's data config with the teacher's num_sweeps and point_features: the train
    # loader's (the teacher runs on its points, the student takes only the key frame's depth points from them)
    source: str  # where the settings come from, for the log


def online_teacher_settings(cfg: StudentExperimentConfig, checkpoint: Path,
                            teacher_config: TeacherExperimentConfig | None = None, *,
                            trust_checkpoint: bool = False) -> OnlineTeacherSettings:
    """The live teacher's model config and data settings: from `teacher_config` (--teacher-config, a teacher
    experiment YAML) when given, else from what the checkpoint records (a teacher run's latest.pth: `config` and
    `training.experiment.data`). A file that records less (an mmdet3d file, a checkpoints/epoch_N.pth) is refused:
    a teacher fed other sweeps or point features than it was trained with gives wrong targets without any error,
    so the student's own settings are never used in their place. `cfg` is not modified."""
    if teacher_config is not None:
        model = to_dict(teacher_config.model)
        num_sweeps, point_features = teacher_config.data.num_sweeps, teacher_config.data.point_features
        source = "--teacher-config"
    else:
        model, recorded = recorded_teacher_settings(checkpoint, trust_checkpoint=trust_checkpoint)
        num_sweeps, point_features = recorded["num_sweeps"], recorded["point_features"]
        source = f"{checkpoint.name} (training.experiment)"
    try:
        data = dataclasses.replace(cfg.data, num_sweeps=num_sweeps, point_features=point_features,
                                   sweep_candidates=max(cfg.data.sweep_candidates, num_sweeps))
    except ValueError as exc:
        raise ConfigError(f"{checkpoint}: the teacher's data settings from {source} do not fit the student's data "
                          f"config: {exc}") from exc
    log.info("online teacher settings from %s: %d sweeps, %s points (the student's config: %d sweeps, %s points)",
             source, data.num_sweeps, data.point_features, cfg.data.num_sweeps, cfg.data.point_features)
    return OnlineTeacherSettings(model=model, data=data, source=source)


def recorded_teacher_settings(checkpoint: Path, *, trust_checkpoint: bool = False
                              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model config dict, {"num_sweeps", "point_features"}) recorded in our own teacher run's latest.pth.

    Read without running code (`safe_pickle.load_checkpoint`; trust_checkpoint: full unpickling, --trust-checkpoint):
    our files hold tensors and plain data only, and an mmdet3d/mmengine file records neither. CheckpointError
    naming what is missing and --teacher-config as the fix otherwise.
    """
    fix = ("pass the teacher's experiment YAML with --teacher-config (e.g. configs/nuscenes/teacher_pillar02.yaml "
           "for the released mmdet3d pillar checkpoint), or the teacher run's latest.pth")
    if not checkpoint.is_file():
        raise CheckpointError(f"{checkpoint}: teacher checkpoint not found; pass the path of an existing .pth file")
    payload = load_checkpoint(checkpoint, trust=trust_checkpoint, what="teacher checkpoint", fix=(
        f"a distillbev teacher file holds nothing else, so this one records no teacher model config or data "
        f"settings (nor does an mmdet3d/mmengine file); the live teacher needs both: {fix}; and to load the file "
        f"itself, pass --trust-checkpoint if you made it or trust its source"))
    payload = payload if isinstance(payload, dict) else {}
    model = payload.get("config")
    if not isinstance(model, dict):
        raise CheckpointError(
            f"{checkpoint}: records no teacher model config (no 'config' entry: an mmdet3d/mmengine checkpoint or "
            f"a bare state_dict); the live teacher needs its model config and the sweeps and point features it was "
            f"trained with: {fix}")
    training = payload.get("training")
    experiment = training.get("experiment") if isinstance(training, dict) else None
    data = experiment.get("data") if isinstance(experiment, dict) else None
    missing = [key for key in ("num_sweeps", "point_features") if not isinstance(data, dict) or key not in data]
    if missing:
        raise CheckpointError(
            f"{checkpoint}: records the teacher's model config but not the data settings it was trained with "
            f"(training.experiment.data.{' / '.join(missing)} missing: a checkpoints/epoch_N.pth file holds only "
            f"the model); a live teacher fed other sweeps or point features than it was trained with gives wrong "
            f"targets, and the student's settings are no substitute: {fix}")
    return model, {"num_sweeps": int(data["num_sweeps"]), "point_features": str(data["point_features"])}


def live_teacher(config_dict: dict, checkpoint: Path, device: torch.device, *, trust_checkpoint: bool = False):
    """The frozen teacher for `online` targets (eval mode, no grad, not a submodule of the student);
    trust_checkpoint: unpickle the file fully (--trust-checkpoint)."""
    teacher = CenterPointTeacher(from_dict(TeacherModelConfig, config_dict, source=str(checkpoint)))
    load_teacher_checkpoint(teacher, checkpoint, trust_checkpoint=trust_checkpoint)
    return teacher.to(device).eval().requires_grad_(False)


def evaluate_student(cfg: StudentExperimentConfig, student: torch.nn.Module, out_dir: Path,
                     device: torch.device, eval_dir: Path | None = None,
                     dataset: NuScenesDetectionDataset | None = None, verbose: bool = True,
                     world: World = World()) -> dict | None:
    """Decode the val split (test mode) and score it with the devkit; writes eval_dir (default out_dir/eval/).

    dataset: the val split in test mode, when the caller keeps one for several evaluations; verbose: log the whole
    metrics table (else nothing: the caller logs its own line). Under torchrun rank r decodes samples r, r + W, ...
    (no padding), and rank 0 gathers them in dataset order, writes and scores them and returns the summary (the
    other ranks return None); the ranks must hold the same BatchNorm statistics (`broadcast_buffers`).
    """
    if dataset is None:
        dataset = NuScenesDetectionDataset(cfg.data, cfg.data.val_split, mode="test")
    indices = rank_indices(len(dataset), world)
    part = dataset if not world.distributed else torch.utils.data.Subset(dataset, indices)
    loader = DataLoader(part, batch_size=cfg.train.batch_size, shuffle=False,
                        num_workers=loader_workers(cfg.train.num_workers), collate_fn=collate_samples)
    student.eval()
    detections = []
    with torch.no_grad():
        for batch in tqdm(loader, desc="evaluate", unit="batch", leave=False, disable=not world.is_main):
            batch = batch.to(device)
            outputs = student(batch)
            detections += student.head.decode(outputs.head, batch.sample_tokens, batch.bev_aug)
    detections = gather_ordered(list(zip(indices, detections)), len(dataset), world)
    if not world.is_main:
        return None
    eval_dir = out_dir / "eval" if eval_dir is None else eval_dir
    eval_dir.mkdir(parents=True, exist_ok=True)
    results = detections_to_results(detections, dataset, use_camera=True)
    result_path = eval_dir / "results_nusc.json"
    result_path.write_text(json.dumps(results))
    summary = evaluate_results(result_path, dataset, eval_dir)
    if verbose:
        log.info("student evaluation on %s:\n%s", cfg.data.val_split, format_metrics_table(summary))
    return summary


def teacher_attention_source(targets: TargetSource, temperature: float, device: torch.device):
    """A function (samples, pair) -> (teacher attention (S, Yt, Xt) float32 of the samples, source) or None, for
    the attention snapshots: the cache's view 0 (the identity view the snapshot samples are drawn in), else the
    live teacher on the samples' points (read again with `teacher_data`, the teacher's sweeps and point features),
    else None (a baseline run has no teacher)."""
    cache, teacher, teacher_data = targets.cache, targets.teacher, targets.teacher_data
    teacher_dataset: list[NuScenesDetectionDataset] = []  # opened at the first snapshot

    def from_cache(samples, pair) -> tuple[np.ndarray, str] | None:
        stored_temperature = cache.manifest["storage"]["attention_temperature"]
        maps = []
        for sample in samples:
            index = cache.index_of(sample.sample_token)
            if not cache.bev_aug(index, 0).is_identity:
                log.warning("%s: view 0 of sample %s is not the identity view; the attention snapshots are saved "
                            "without the teacher's maps", cache.path, sample.sample_token)
                return None
            targets = cache.read(index, 0)
            if stored_temperature == temperature:
                maps.append(targets.attention[pair.teacher].numpy())
            else:
                maps.append(spatial_attention(targets.features[pair.teacher][None], temperature)[0].numpy())
        return np.stack(maps).astype(np.float32), f"cache {cache.path.name} (view 0)"

    def teacher_points(samples) -> list[torch.Tensor]:
        if teacher_data is None:
            return [sample.points for sample in samples]
        if not teacher_dataset:  # test mode: the snapshot samples' identity view with the nearest sweeps
            teacher_dataset.append(NuScenesDetectionDataset(teacher_data, teacher_data.train_split, mode="test"))
        dataset = teacher_dataset[0]
        return [dataset.get(dataset.index_of(sample.sample_token), with_images=False).points for sample in samples]

    @torch.no_grad()
    def from_teacher(samples, pair) -> tuple[np.ndarray, str]:
        features = teacher([points.to(device) for points in teacher_points(samples)]).features[pair.teacher]
        return spatial_attention(features, temperature).cpu().numpy(), "live teacher"

    if cache is not None:
        return from_cache
    if teacher is not None:
        return from_teacher
    return lambda samples, pair: None


def warn_if_random_backbone(cfg: StudentExperimentConfig) -> None:
    """Say loudly when the image backbone starts from random weights: every reference student starts from ImageNet
    weights, and without them the camera students score far below the paper's table."""
    backbone = cfg.model.backbone
    if backbone.pretrained:
        return
    log.warning("=" * 100)
    log.warning("the image backbone (ResNet-%d) starts from RANDOM weights: model.backbone.pretrained is null. The "
                "paper's students start from torchvision's ImageNet ResNet file (e.g. resnet50-0676ba61.pth); set "
                "--set model.backbone.pretrained=PATH (docs/real_nuscenes.md), or expect far lower mAP and NDS.",
                backbone.depth)
    log.warning("=" * 100)


@dataclasses.dataclass(frozen=True)
class TargetSource:
    """Where a run's teacher targets come from, decided once by `open_targets` and only read afterwards.

    mode "none" (a baseline) has no teacher; "cache" and "approximate" read `cache`; "online" runs `teacher` on the
    points of `teacher_data` (the sweeps and point features it was trained with).
    """

    mode: TargetsMode
    train_dataset: NuScenesDetectionDataset  # the train split the targets pair with (online: read with teacher_data)
    teacher_layers: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # teacher layer ->
    # {"channels": C, "shape": (Y, X)}, as a cache manifest records them; empty for a baseline
    head_state: dict[str, torch.Tensor] | None = None  # the teacher's head, for `inherit_teacher_head`
    teacher_model_config: dict[str, Any] | None = None  # the teacher's TeacherModelConfig as a plain dict
    cache: TeacherCache | None = None  # cache / approximate
    teacher: CenterPointTeacher | None = None  # online: the frozen live teacher
    teacher_data: DataConfig | None = None  # online: the data settings of the train loader the teacher reads

    @property
    def distilled(self) -> bool:
        return self.mode != "none"

    def uses_cached_attention(self, temperature: float) -> bool:
        """Whether the cache's attention maps were computed at the run's temperature (else they are recomputed)."""
        return self.cache is not None and self.cache.manifest["storage"]["attention_temperature"] == temperature


def open_targets(cfg: StudentExperimentConfig, out_dir: Path, device: torch.device, *, cache_path=None,
                 teacher_checkpoint: Path | None = None, teacher_config: TeacherExperimentConfig | None = None,
                 resume: bool = False, world: World = World(), trust_checkpoint: bool = False,
                 verify_data: str = str(DEFAULT_VERIFY_SAMPLES)) -> TargetSource:
    """The run's target source: a baseline's train split, the checked cache, or the live teacher (ConfigError when
    the mode's input is missing; the cache or the teacher is checked against `cfg` before the first step).
    verify_data: which samples' input files are re-hashed against a cache's digests (`verify_input_files`)."""
    if not cfg.distillation:
        return TargetSource("none", NuScenesDetectionDataset(cfg.data, cfg.data.train_split, mode="train"))
    if cfg.targets == "online":
        return open_live_teacher(cfg, teacher_checkpoint, teacher_config, device, trust_checkpoint)
    return open_cache_targets(cfg, cache_path, teacher_checkpoint, out_dir, resume, world, verify_data)


def open_cache_targets(cfg: StudentExperimentConfig, cache_path, teacher_checkpoint: Path | None, out_dir: Path,
                       resume: bool, world: World, verify_data: str = str(DEFAULT_VERIFY_SAMPLES)) -> TargetSource:
    """`cache` / `approximate` targets: the cache, checked against the config, the train split's fingerprint, the
    bytes of the input files of `verify_data` samples (re-hashed, `verify_input_files`) and the teacher checkpoint
    (when given), and against the cache a resumed run was trained on."""
    if cache_path is None:
        raise ConfigError(f"targets {cfg.targets!r} needs --cache STORE (or --targets online with "
                          f"--teacher-checkpoint, or --baseline)")
    train_dataset = NuScenesDetectionDataset(cfg.data, cfg.data.train_split, mode="train")
    cache = open_checked_cache(cache_path, cfg, train_dataset, teacher_checkpoint)
    verify_input_files(cache.path, cache.manifest, cache.sample_tokens, train_dataset, verify_data, rank=world.rank,
                       world_size=world.world_size, progress=world.is_main)
    check_resume_identity(out_dir, cache_identity(cache.manifest), resume, write=world.is_main)
    log_view_coverage(cache.num_views)
    return TargetSource(cfg.targets, train_dataset, teacher_layers=cache.manifest["layers"],
                        head_state=cache.read_teacher_head(), teacher_model_config=cache.manifest["teacher"]["config"],
                        cache=cache)


def open_live_teacher(cfg: StudentExperimentConfig, teacher_checkpoint: Path | None,
                      teacher_config: TeacherExperimentConfig | None, device: torch.device,
                      trust_checkpoint: bool) -> TargetSource:
    """`online` targets: the frozen teacher of `teacher_checkpoint`, checked against the student's grid, and the
    train split read with the teacher's sweeps and point features (`online_teacher_settings`)."""
    if teacher_checkpoint is None:
        raise ConfigError("targets 'online' needs --teacher-checkpoint (with --teacher-config when the file "
                          "does not record the teacher's config: an mmdet3d or epoch_N.pth checkpoint)")
    online = online_teacher_settings(cfg, Path(teacher_checkpoint), teacher_config, trust_checkpoint=trust_checkpoint)
    teacher = live_teacher(online.model, teacher_checkpoint, device, trust_checkpoint=trust_checkpoint)
    check_live_teacher_grid(cfg, teacher, teacher_checkpoint, online.data)
    # the live teacher sees the sweeps and points it was trained with (an MVP teacher: its 17-dim points): the train
    # loader reads them, the student takes only the key frame's depth points from them
    train_dataset = NuScenesDetectionDataset(online.data, cfg.data.train_split, mode="train")
    teacher_layers = {name: {"channels": teacher.feature_channels[name], "shape": teacher.feature_shapes[name]}
                      for name in {pair.teacher for pair in cfg.distill.layers}}
    return TargetSource("online", train_dataset, teacher_layers=teacher_layers, head_state=teacher.head_state(),
                        teacher_model_config=online.model, teacher=teacher, teacher_data=online.data)


def inherit_head(cfg: StudentExperimentConfig, student: torch.nn.Module, targets: TargetSource,
                 device: torch.device) -> None:
    """Initialise the student's head from the teacher's when the run is distilled and `inherit_teacher_head`."""
    if not (targets.distilled and cfg.inherit_teacher_head):
        return
    count = inherit_teacher_head(student, {k: v.to(device) for k, v in targets.head_state.items()},
                                 targets.teacher_model_config)
    if count:
        log.info("student head initialised from the teacher's (%d tensors)", count)


def cbgs_train_indices(cfg: StudentExperimentConfig, train_dataset: NuScenesDetectionDataset) -> list[int] | None:
    """The class-balanced resampling of the train split (`train.cbgs`), drawn once from the run's seed; None: every
    sample once per epoch."""
    if not cfg.train.cbgs:
        return None
    indices = cbgs_indices(dataset_class_ids(train_dataset), len(DETECTION_CLASSES),
                           np.random.default_rng(cfg.train.seed))
    log.info("CBGS: %d samples resampled to %d per epoch", len(train_dataset), len(indices))
    return indices


def resolved_precisions(cfg: StudentExperimentConfig, device: torch.device,
                        world: World) -> StudentExperimentConfig:
    """A copy of `cfg` with `train.precision` and `train.adapter_precision` resolved for `device` (`auto` -> bf16 or
    fp32; the choice logged once, by rank 0): config.yaml, latest.pth and run_info.json record what ran."""
    precision = training_precision(cfg.train.precision, device, "train-student", announce=world.is_main)
    adapter_precision = cfg.train.adapter_precision
    if cfg.distillation:
        adapter_precision = training_precision(adapter_precision, device, "train-student (DistillBEV adapters)",
                                               announce=world.is_main and adapter_precision != "fp32")
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision,
                                                              adapter_precision=adapter_precision))


def train_student(cfg: StudentExperimentConfig, out_dir: Path, cache_path: Path | None = None,
                  device: str = "cpu", resume: bool = False, teacher_checkpoint: Path | None = None,
                  teacher_config: TeacherExperimentConfig | None = None, max_steps: int | None = None,
                  world: World = World(), sync_bn: bool = False, trust_checkpoint: bool = False,
                  verify_data: str = str(DEFAULT_VERIFY_SAMPLES)) -> dict | None:
    """Train (baseline or distilled) and evaluate; returns the devkit's metrics summary (None on ranks other than 0).

    teacher_config: `online` targets: the live teacher's experiment config (its model, and the sweeps and point
    features it reads), needed when `teacher_checkpoint` does not record them (`online_teacher_settings`);
    world: this rank under torchrun (`distributed.init_from_env`), the default a single process; sync_bn: convert
    BatchNorm to SyncBatchNorm (CUDA ranks only); trust_checkpoint: load `teacher_checkpoint` with full unpickling
    (--trust-checkpoint), which runs any code it carries; verify_data: "all", "none" or a number of samples whose
    input files are re-hashed and compared with the cache's digests before the first step. `cfg` is not modified:
    what is derived from it (the resolved precisions, the live teacher's data settings) lives in copies.
    """
    device_t = torch.device(device)
    if not resume and (out_dir / "latest.pth").exists():
        raise ConfigError(f"{out_dir}: already holds a student run (latest.pth); pass --resume to continue it or "
                          f"choose another --out")
    cfg = resolved_precisions(cfg, device_t, world)
    seed_everything(cfg.train.seed)  # every rank: the same initial weights, CBGS list and draws
    if world.is_main:
        write_config(cfg, out_dir)
        if not resume:
            (out_dir / "train_log.jsonl").unlink(missing_ok=True)  # a fresh run starts a fresh log
            reset_progress(out_dir, 0)  # and a fresh evaluation history (progress.py)
    student = set_memory_format(build_student(cfg.model).to(device_t), cfg.train.channels_last)
    if not resume and world.is_main:
        warn_if_random_backbone(cfg)
    targets = open_targets(cfg, out_dir, device_t, cache_path=cache_path, teacher_checkpoint=teacher_checkpoint,
                           teacher_config=teacher_config, resume=resume, world=world,
                           trust_checkpoint=trust_checkpoint, verify_data=verify_data)
    distill_loss = (build_distill_loss(cfg, student, targets.teacher_layers).to(device_t) if targets.distilled
                    else None)
    inherit_head(cfg, student, targets, device_t)
    bev = cfg.model.bev
    train_set = DistillationDataset(
        targets.train_dataset, mode=targets.mode, cache=targets.cache,
        indices=cbgs_train_indices(cfg, targets.train_dataset),
        seed=cfg.train.seed, bev_extent=(bev.x_min, bev.x_max, bev.y_min, bev.y_max),
        use_cached_attention=targets.uses_cached_attention(cfg.distill.temperature),
        # the loss's student-independent inputs (masks, scales, GT heatmap, teacher attention) come from the workers
        precompute=None if distill_loss is None else step_precompute(distill_loss, cfg.model.head, cfg.model.head.grid))
    sampler = train_sampler(train_set, world, cfg.train.seed)
    epoch_steps = steps_per_epoch(cfg, train_set, sampler)
    params = list(student.parameters()) + ([] if distill_loss is None else list(distill_loss.parameters()))
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    setup = DistillationSetup(student=student, distill_loss=distill_loss, teacher=targets.teacher,
                              layers=[(pair.student, pair.teacher) for pair in cfg.distill.layers],
                              precision=cfg.train.precision)
    start_epoch = start_iteration = 0
    latest = out_dir / "latest.pth"
    if resume and latest.exists():
        start_epoch, start_iteration = load_resume(latest, setup, optimizer, epoch_steps)
        log.info("resuming from %s at epoch %d (iteration %d)", latest, start_epoch, start_iteration)
    model = None  # one process steps `setup` itself, exactly as before torchrun support
    if world.distributed or sync_bn:
        model = prepare_model(TrainableModules(setup, cfg.model.head.grid), world, str(device_t), sync_bn)
    log.info("training %s student (%s targets) on %d samples for %d epochs", cfg.model.variant, targets.mode,
             len(train_set), cfg.train.epochs)
    log.info("training on %d rank(s): batch %d per rank, effective batch %d, %d steps per epoch", world.world_size,
             cfg.train.batch_size, cfg.train.batch_size * world.world_size, epoch_steps)
    val_dataset: list[NuScenesDetectionDataset] = []  # loaded once, at the first evaluation

    def evaluate(eval_dir: Path, final: bool) -> dict | None:
        if not val_dataset:
            val_dataset.append(NuScenesDetectionDataset(cfg.data, cfg.data.val_split, mode="test"))
        if model is not None:
            broadcast_buffers(model, world)  # every rank predicts with rank 0's (the checkpoint's) BN statistics
        return evaluate_student(cfg, student, out_dir, device_t, eval_dir, val_dataset[0], verbose=final,
                                world=world)

    progress = TrainingProgress(cfg, out_dir, setup, device_t, start_epoch, evaluate,
                                teacher_attention_source(targets, cfg.distill.temperature, device_t), world)
    iteration = run_epochs(cfg, setup, train_set, optimizer, out_dir, device_t, cfg.model.head.grid, start_epoch,
                           start_iteration, max_steps, after_epoch=progress.after_epoch, world=world, model=model,
                           sampler=sampler)
    summary = progress.finish(iteration)
    if world.is_main:
        (out_dir / "run_info.json").write_text(json.dumps(run_info(cfg, targets, cache_path), indent=2))
    barrier(world)  # every rank leaves after rank 0 has written its checkpoints and evaluation
    return summary


def run_info(cfg: StudentExperimentConfig, targets: TargetSource, cache_path) -> dict[str, Any]:
    """RUN/run_info.json: the targets mode, the cache, the config that ran and, for a live teacher, the data
    settings its loader read instead of the student's."""
    # the cache's URL without user info (a password in it is never written)
    info = {"targets": targets.mode, "cache": None if cache_path is None else strip_user_info(str(cache_path)),
            "config": to_dict(cfg)}
    if targets.teacher_data is not None:
        info["teacher_data"] = {key: getattr(targets.teacher_data, key)
                                for key in ("num_sweeps", "sweep_candidates", "point_features")}
    return info
