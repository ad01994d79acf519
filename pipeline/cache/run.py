"""Stage one's recipe: a teacher checkpoint and a split in, a complete teacher-feature store out.

    path = "configs/synthetic/teacher.yaml"
    report = run_extraction(ExtractionRequest(
        config=load_config(TeacherExperimentConfig, path), config_path=path, dataroot="data/synthetic",
        checkpoint="runs/teacher/teacher.pth", cache=StoreLocation.parse("runs/cache.zarr"), split="synth_train",
        layers=("backbone1", "backbone2", "neck")))

`distillbev extract-teacher` loads the config, parses its other options into an `ExtractionRequest` and prints the
report. The steps:
a pre-flight pass over every input (tables, key-frame and sweep files, the checkpoint) that reports all problems at
once before any teacher compute; the teacher loaded from the checkpoint's bytes (hashed as read); the manifest;
then the engine (`extract.py`, or `distributed.py` under torchrun) creates, resumes or repairs the store.

A resume or repair computes sample-views beside ones already stored, so it must compute them as they were: with
the device, arithmetic, TF32 setting, batch size, threads and torch the store records (`manifest.settings_changes`).
Otherwise it is refused before anything is written, unless `allow_settings_change`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...cache_schemas import v2
from ..config import to_dict
from ..data.dataset import NuScenesDetectionDataset
from ..data.digest import InputDigests
from ..data.index_store import open_split_index
from ..data.preflight import check_index_inputs, point_loading_settings, preflight_message, preflight_split
from ..distributed import check_device, init_from_env, world_from_env
from ..errors import CacheError, CheckpointError, ConfigError, DataError
from ..geometry.bev import BEVAugmentation
from ..teacher.checkpoint import load_teacher_checkpoint
from ..teacher.config import TeacherExperimentConfig
from ..teacher.model import CenterPointTeacher
from .distributed import extract_distributed
from .extract import ExtractionReport, extract_teacher_cache
from .location import StoreLocation, recorded_options
from .manifest import LayerSpec, ViewConfig, build_manifest, manifest_diff, settings_changes
from .state import read_manifest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExtractionRequest:
    """Everything one extraction is asked for (the options of `distillbev extract-teacher`)."""

    config: TeacherExperimentConfig  # the teacher experiment: config_path loaded with the overrides and infos
    config_path: str  # the teacher experiment YAML (data, model, train), recorded in the store's command
    dataroot: str  # the nuScenes-format dataroot
    checkpoint: str  # the teacher checkpoint (.pth)
    cache: StoreLocation  # the output store: a folder or an object-store URL, with its storage options
    split: str  # the split to extract, e.g. train, mini_train, synth_train
    layers: tuple[str, ...]  # the teacher layers to store, e.g. ("backbone1", "backbone2", "neck")
    views: int = 4  # BEV-augmented views per sample (view 0 is the identity)
    seed: int = 0  # seed of the view draws
    workers: int = 1  # forked extraction processes on the CPU (torchrun replaces them: one process per rank)
    dtype: str = "int8"  # feature storage: "int8" (per-channel scale/offset) or "fp16"
    int8_error: float = v2.DEFAULT_INT8_ERROR  # int8 only: RMS quantisation error per map as a fraction of its RMS
    batch_size: int = 1  # sample-views per teacher forward pass
    background_writer: bool = True  # compress and write in a thread beside the compute
    overwrite: bool = False  # replace a store of this tool that was written differently
    repair: bool = False  # read and CRC-check every chunk of a complete store; re-extract the damaged sample-views
    device: str = "cpu"  # cpu, cuda or cuda:N; under torchrun cpu or cuda (each rank takes cuda:LOCAL_RANK)
    overrides: tuple[str, ...] = ()  # the config overrides KEY=VALUE in `config` (recorded), e.g. data.num_sweeps=4
    infos: str | None = None  # the folder of mmdet3d's info files whose data.infos `config` holds (recorded)
    trust_checkpoint: bool = False  # load the checkpoint with full unpickling (runs any code it carries)
    allow_settings_change: bool = False  # resume or repair with other compute settings than the recorded ones


def check_layout(device: str, workers: int, location: StoreLocation) -> None:
    """ConfigError for a device or process layout that cannot work, before any process group is joined (the stage
    runs it before it even reads the config)."""
    check_device(device)
    if device.startswith("cuda") and workers > 1:
        count = torch.cuda.device_count()
        raise ConfigError(f"--workers {workers} forks CPU processes, which cannot share a CUDA context; for several "
                          f"GPUs on one node launch one process per GPU with torchrun: torchrun --standalone "
                          f"--nproc-per-node {min(workers, count)} -m distillbev.cli extract-teacher ... --device cuda "
                          f"(each rank takes cuda:LOCAL_RANK; this node has {count} CUDA device(s)), or pass "
                          f"--workers 1 for one GPU")
    if workers > 1 and not location.is_local:
        raise ConfigError(f"--workers {workers} forks processes, and object-store clients do not survive a fork; "
                          f"for several extraction processes on {location} use torchrun --nproc-per-node {workers}")
    if world_from_env().distributed and workers > 1:
        raise ConfigError("under torchrun every rank is one extraction process: drop --workers (or set it to 1) "
                          "and choose the number of processes with --nproc-per-node")


def reproduce_command(request: ExtractionRequest, device: str) -> str:
    """The command that reproduces the store (absolute paths), named by --verify and training errors for repairs;
    `device` is this process's (under torchrun, cuda:LOCAL_RANK).

    Recorded and shown, so it never holds a credential: the URL without user info, allow-listed storage options.
    """
    location = request.cache
    storage = [arg for name, value in recorded_options(dict(location.options)).items()
               for arg in ("--storage-option", f"{name}={value}")]
    return shlex.join([
        "distillbev", "extract-teacher", "--config", str(Path(request.config_path).resolve()), "--dataroot",
        str(Path(request.dataroot).resolve()), "--checkpoint", str(Path(request.checkpoint).resolve()), "--cache",
        str(location.resolved()), *storage, "--split", request.split, "--views", str(request.views),
        "--seed", str(request.seed), "--workers", str(request.workers), "--dtype", request.dtype,
        *(["--int8-error", repr(request.int8_error)] if request.dtype == "int8" else []),
        "--layers", ",".join(request.layers), "--batch-size", str(request.batch_size), "--device", device,
        *([] if request.background_writer else ["--no-background-writer"]),
        *[arg for item in request.overrides for arg in ("--set", item)],
        *(["--infos", str(Path(request.infos).resolve())] if request.infos is not None else [])])


def compute_settings(device: str, batch_size: int, workers: int) -> dict[str, Any]:
    """The manifest's `extraction` entries that decide the computed values in their last bits (volatile: not the
    store's identity, but compared on resume and repair by `manifest.settings_changes`).

    device_model: the GPU's name on CUDA, the CPU's vector instruction level that torch's kernels use (AVX2,
    AVX512, ...) on a CPU. precision: the teacher's arithmetic (extraction has no autocast: float32).
    matmul_precision: `torch.get_float32_matmul_precision()` ("high" lets CUDA matmuls use TF32, "medium" bf16).
    tf32: on CUDA, whether matmuls and cuDNN convolutions may use TF32 (None on a CPU, which has none).
    threads: torch threads of this process; each of `workers` forked processes computes with threads // workers.
    """
    cuda = torch.device(device).type == "cuda"
    return {"batch_size": batch_size, "workers": workers, "device": device,
            "device_model": torch.cuda.get_device_name(device) if cuda else torch.backends.cpu.get_cpu_capability(),
            "precision": "fp32", "matmul_precision": torch.get_float32_matmul_precision(),
            "tf32": ({"matmul": bool(torch.backends.cuda.matmul.allow_tf32),
                      "cudnn": bool(torch.backends.cudnn.allow_tf32)} if cuda else None),
            "ranks": int(os.environ.get("WORLD_SIZE", "1")), "threads": torch.get_num_threads()}


@dataclass
class SettingsGuard:
    """The check the engine runs on the store before writing anything (under its lock; rank 0 under torchrun).

    A store of the same identity that is resumed (status "writing"), or repaired (`repair` on a complete store),
    must be computed with the settings it records: a CacheError lists each difference "recorded -> now" and names
    --allow-settings-change, with which the differences are logged and the run goes on. A new store, another one
    (refused or replaced by the engine) and a plain rerun of a complete store are not compared: the rerun only
    checks, and should its quick check find a chunk missing, `unchecked` holds the differences it re-extracted with.
    """

    manifest: dict[str, Any]  # the requested manifest
    repair: bool
    allow: bool
    unchecked: list[str] = field(default_factory=list)

    def __call__(self, path: StoreLocation) -> None:
        stored = read_manifest(path)
        if stored is None or manifest_diff(stored, self.manifest):
            return
        changes = settings_changes(stored, self.manifest)
        if not changes:
            return
        if stored["status"] == v2.STATUS_COMPLETE and not self.repair:
            self.unchecked = changes
            return
        doing = "repairing" if stored["status"] == v2.STATUS_COMPLETE else "resuming"
        if self.allow:
            logger.warning("%s: %s with other settings than the store's sample-views were computed with "
                           "(recorded -> now: %s), as --allow-settings-change permits: the sample-views computed "
                           "now may differ in their last bits from an uninterrupted extraction's", path, doing,
                           "; ".join(changes))
            return
        raise CacheError(f"{path}: {doing} would compute sample-views with other settings than the store's were "
                         f"computed with (recorded -> now: {'; '.join(changes)}), so the store would no longer be "
                         f"bit-identical to an uninterrupted extraction; nothing was changed; rerun with the "
                         f"recorded settings, or pass --allow-settings-change to go on with these")


def run_extraction(request: ExtractionRequest) -> ExtractionReport | None:
    """Pre-flight, load the teacher, build the manifest and fill the store; returns what the engine did (None on
    ranks other than 0 under torchrun, where rank 0 alone reports).

    Raises DataError listing every input problem (and the checkpoint's) before any teacher compute, ConfigError
    for options that cannot work, CheckpointError, and CacheError for a store that cannot be used as asked.
    """
    check_layout(request.device, request.workers, request.cache)
    location = request.cache
    world, device = init_from_env(request.device)  # joins the process group; a CUDA rank takes cuda:LOCAL_RANK
    config = request.config
    data_config = dataclasses.replace(config.data, dataroot=str(request.dataroot), load_images=False)
    layer_names = list(request.layers)

    model = CenterPointTeacher(config.model)
    unknown = [name for name in layer_names if name not in model.feature_channels]
    if not layer_names or unknown:
        raise ConfigError(f"--layers {','.join(request.layers)!r}: unknown layer(s) {unknown}; the teacher has "
                          f"{sorted(model.feature_channels)}")
    # pre-flight: every input problem (data and checkpoint) in one error, before any teacher compute
    checkpoint_error: CheckpointError | None = None
    sha = ""
    try:  # logs what it loaded; read once, so its SHA-256 is that of the bytes loaded (latest.pth may be replaced)
        sha = load_teacher_checkpoint(model, request.checkpoint, trust_checkpoint=request.trust_checkpoint).sha256
    except CheckpointError as exc:
        checkpoint_error = exc
    virtual = data_config.point_features == "mvp"
    nusc = index = None
    try:
        if data_config.infos:  # the split index from mmdet3d's infos: the dataroot may hold no tables
            index = open_split_index(data_config, request.split)
            inputs = check_index_inputs(index, data_config.num_sweeps, progress=True, virtual=virtual)
        else:
            nusc, _, inputs = preflight_split(request.dataroot, data_config.version, request.split,
                                              data_config.num_sweeps, data_config.sweep_candidates, progress=True,
                                              virtual=virtual)
        problems = list(inputs.problems)
    except DataError as exc:  # the dataroot, its tables, the infos or the split: nothing further can be checked
        problems = [str(exc)]
    if checkpoint_error is not None and not problems:
        raise checkpoint_error
    if checkpoint_error is not None:
        problems.insert(0, str(checkpoint_error))
    if problems:
        raise DataError(f"pre-flight found {preflight_message(problems)}; nothing was computed or written")
    logger.info("pre-flight: %d samples, %d input files (%.1f GB) present and well-formed", inputs.sample_count,
                inputs.files, inputs.bytes / 1e9)
    model = model.to(device).eval()

    # the saved split index, mapped (built from the pre-flight's devkit tables when none is saved)
    if index is None:
        index = open_split_index(data_config, request.split, nusc=nusc)
    dataset = NuScenesDetectionDataset(data_config, request.split, mode="test", index=index)
    del nusc  # the dataset keeps a flat index; the devkit tables are not needed past this point
    canvas = config.model.canvas_grid
    shapes, channels = model.feature_shapes, model.feature_channels
    specs = [LayerSpec(name, channels[name], shapes[name], (canvas.x_max - canvas.x_min) / shapes[name][1],
                       canvas.num_x / shapes[name][1]) for name in layer_names]
    view_config = ViewConfig(count=request.views, seed=request.seed,
                             rotation_range=tuple(data_config.bev_rotation_lim),
                             scale_range=tuple(data_config.bev_scale_lim), flip_x_prob=data_config.bev_flip_x_prob,
                             flip_y_prob=data_config.bev_flip_y_prob)
    command_line = reproduce_command(request, device)
    options = dict(location.options)
    left_out = [*(["the URL's user info"] if location.user_info else []),
                *(f"--storage-option {name}" for name in sorted(set(options) - set(recorded_options(options))))]
    if left_out:
        logger.info("%s: the recorded command leaves out the credentials given (%s); give them again, or through "
                    "the environment, to resume or repair this store", location, ", ".join(left_out))
    int8_error = request.int8_error if request.dtype == "int8" else 0.0
    manifest = build_manifest(
        teacher_config=to_dict(config.model), checkpoint_path=str(request.checkpoint), checkpoint_sha256=sha,
        grid=canvas, layers=specs, heatmap_shape=config.model.head_grid.shape, occupancy_shape=canvas.shape,
        dtype=request.dtype, views=view_config, sample_tokens=list(dataset.sample_tokens), int8_error=int8_error,
        dataset={"dataroot": str(request.dataroot), "version": data_config.version, "split": request.split,
                 "num_sweeps": data_config.num_sweeps, "fingerprint": inputs.fingerprint,
                 "point_loading": point_loading_settings(data_config)},
        extraction={"command": command_line, **compute_settings(device, request.batch_size, request.workers)})
    head_state = {name: value.detach().cpu().numpy() for name, value in model.head_state().items()}

    def run_teacher(points_list: list[torch.Tensor]):
        with torch.no_grad():
            return model([points.to(device) for points in points_list])

    def load_points(index: int, bev_aug: BEVAugmentation):
        inputs = InputDigests()  # the SHA-256 of every file read, taken while reading it
        sample = dataset.get(index, bev_aug=bev_aug, with_images=False, digests=inputs)
        return sample.sample_token, sample.points, inputs

    guard = SettingsGuard(manifest, request.repair, request.allow_settings_change)
    common = dict(manifest=manifest, sample_tokens=list(dataset.sample_tokens), head_state=head_state,
                  run_teacher=run_teacher, load_points=load_points, batch_size=request.batch_size,
                  background_writer=request.background_writer, overwrite=request.overwrite, repair=request.repair,
                  command=command_line, check_store=guard)
    if world.distributed:
        report = extract_distributed(location, **common)
        if not world.is_main:
            return None
    else:
        report = extract_teacher_cache(location, workers=request.workers, **common)
    if report.state == "repaired" and guard.unchecked:
        logger.warning("%s: the %d re-extracted sample-views were computed with other settings than the rest of the "
                       "store (recorded -> now: %s): they may differ in their last bits from an uninterrupted "
                       "extraction's (with --repair, a repair with other settings is refused before it starts)",
                       location, len(report.redone), "; ".join(guard.unchecked))
    return report
