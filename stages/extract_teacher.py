"""`distillbev extract-teacher`: run the frozen CenterPoint teacher over a split into a zarr teacher-feature cache.

    distillbev extract-teacher --config configs/synthetic/teacher.yaml --dataroot data/synthetic \
        --checkpoint runs/teacher/teacher.pth --cache runs/cache.zarr --split synth_train --views 4 --workers 2

Before any teacher compute, a pre-flight pass checks every input the split needs (tables, every key-frame and sweep
file, the checkpoint) and reports all problems at once; with `--infos` (mmdet3d's info files, where the dataroot
may hold no tables) it checks the files of the split index built from them. The same command resumes an
interrupted extraction (sample-views marked done are re-checked, those that fail are redone), and on a finished
store checks that every chunk is present; `--repair` reads and CRC-checks every chunk and re-extracts the damaged
sample-views. A store written from another teacher, config, grid, split, view set, dtype or dataset content is
refused with the list of differences unless --overwrite. One extraction at a time per store (a lock). See
docs/cache.md.
"""

from __future__ import annotations

import click

from .options import (infos_option, infos_override, recorded_storage_options, storage_option,
                      unrecorded_storage_options)

from ..cache_schemas.v2 import DEFAULT_INT8_ERROR, MAX_INT8_ERROR

DEFAULT_LAYERS = "backbone1,backbone2,neck"  # DistillBEV's distilled teacher layers (B1, B2, pre-head)


@click.command("extract-teacher")
@click.option("--config", "config_path", required=True, type=click.Path(dir_okay=False),
              help="Teacher experiment config (YAML: data, model, train).")
@click.option("--dataroot", required=True, type=click.Path(file_okay=False), help="nuScenes-format dataroot.")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False), help="Teacher checkpoint (.pth).")
@click.option("--trust-checkpoint", is_flag=True,
              help="Load the teacher checkpoint with full unpickling, for a file that needs classes outside the "
                   "weights-only allow list (which is refused otherwise): unpickling runs any code the file carries, "
                   "so only for a file you made or whose source you trust. Logged as a warning.")
@click.option("--cache", "cache_path", required=True, help="Output zarr store: a folder or an s3:// (fsspec) URL.")
@storage_option
@click.option("--split", required=True, help="Split to extract, e.g. train, mini_train, synth_train.")
@click.option("--views", default=4, show_default=True, type=click.IntRange(min=1),
              help="BEV-augmented views per sample (view 0 is the identity); a distilled student replays one of "
                   "them per sample and epoch, so 1 view means no BEV augmentation (docs/method.md).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the view draws.")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1),
              help="Extraction processes on the CPU, each owning a contiguous run of samples. For several GPUs (or "
                   "an object store) launch the command under torchrun instead: torchrun --nproc-per-node N ... "
                   "--device cuda, one process per GPU.")
@click.option("--dtype", default="int8", show_default=True, type=click.Choice(["fp16", "int8"]),
              help="Feature storage: int8 with a per-channel scale/offset per sample-view, or float16 "
                   "(docs/cache.md, Codecs).")
@click.option("--int8-error", default=DEFAULT_INT8_ERROR, show_default=True, type=click.FloatRange(0, MAX_INT8_ERROR),
              help="int8 only: RMS quantisation error per feature map as a fraction of its RMS; coarser steps take "
                   "fewer bytes (0: steps of range/255; ignored with --dtype fp16).")
@click.option("--layers", default=DEFAULT_LAYERS, show_default=True, help="Comma-separated teacher layers to store.")
@click.option("--batch-size", default=1, show_default=True, type=click.IntRange(min=1),
              help="Sample-views per teacher forward pass (part of what makes a resumed run bit-identical).")
@click.option("--no-background-writer", is_flag=True, help="Write in the compute thread (no overlap).")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing teacher cache that was written differently (never a folder of anything else).")
@click.option("--repair", is_flag=True,
              help="Read and CRC-check every chunk of a complete store; re-extract the damaged sample-views.")
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda or cuda:N; under torchrun cpu or cuda (each rank takes cuda:LOCAL_RANK).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Config override, e.g. data.num_sweeps=4.")
@infos_option
def command(config_path: str, dataroot: str, checkpoint: str, cache_path: str, storage_options: tuple[str, ...],
            split: str, views: int, seed: int, workers: int, dtype: str, int8_error: float, layers: str,
            batch_size: int, no_background_writer: bool, overwrite: bool, repair: bool, device: str,
            overrides: tuple[str, ...], infos: str | None, trust_checkpoint: bool) -> None:
    """Extract teacher features, heatmaps and attention for every sample-view of a split."""
    import dataclasses
    import logging
    import os
    import shlex
    from pathlib import Path

    import torch

    from ..pipeline.cache.extract import extract_teacher_cache
    from ..pipeline.cache.location import StoreLocation, parse_storage_options
    from ..pipeline.cache.manifest import LayerSpec, ViewConfig, build_manifest
    from ..pipeline.config import load_config, to_dict
    from ..pipeline.distributed import check_device, init_from_env, world_from_env
    from ..pipeline.data.dataset import NuScenesDetectionDataset
    from ..pipeline.data.digest import InputDigests
    from ..pipeline.data.index_store import open_split_index
    from ..pipeline.data.preflight import (check_index_inputs, point_loading_settings, preflight_message,
                                           preflight_split)
    from ..pipeline.errors import CheckpointError, ConfigError, DataError
    from ..pipeline.geometry.bev import BEVAugmentation
    from ..pipeline.teacher.checkpoint import load_teacher_checkpoint
    from ..pipeline.teacher.config import TeacherExperimentConfig
    from ..pipeline.teacher.model import CenterPointTeacher

    logger = logging.getLogger("distillbev.extract_teacher")
    check_device(device)
    if device.startswith("cuda") and workers > 1:
        count = torch.cuda.device_count()
        raise ConfigError(f"--workers {workers} forks CPU processes, which cannot share a CUDA context; for several "
                          f"GPUs on one node launch one process per GPU with torchrun: torchrun --standalone "
                          f"--nproc-per-node {min(workers, count)} -m distillbev.cli extract-teacher ... --device cuda "
                          f"(each rank takes cuda:LOCAL_RANK; this node has {count} CUDA device(s)), or pass "
                          f"--workers 1 for one GPU")
    options = parse_storage_options(storage_options)
    location = StoreLocation.parse(cache_path, options)
    distributed = world_from_env().distributed  # launched by torchrun with several ranks
    if workers > 1 and not location.is_local:
        raise ConfigError(f"--workers {workers} forks processes, and object-store clients do not survive a fork; "
                          f"for several extraction processes on {location} use torchrun --nproc-per-node {workers}")
    if distributed and workers > 1:
        raise ConfigError("under torchrun every rank is one extraction process: drop --workers (or set it to 1) "
                          "and choose the number of processes with --nproc-per-node")
    _, device = init_from_env(device)  # joins the process group; a CUDA rank takes cuda:LOCAL_RANK
    config = load_config(TeacherExperimentConfig, config_path, overrides=[*overrides, *infos_override(infos)])
    data_config = dataclasses.replace(config.data, dataroot=str(dataroot), load_images=False)
    layer_names = [name.strip() for name in layers.split(",") if name.strip()]

    model = CenterPointTeacher(config.model)
    unknown = [name for name in layer_names if name not in model.feature_channels]
    if not layer_names or unknown:
        raise ConfigError(f"--layers {layers!r}: unknown layer(s) {unknown}; the teacher has "
                          f"{sorted(model.feature_channels)}")
    # pre-flight: every input problem (data and checkpoint) in one error, before any teacher compute
    checkpoint_error: CheckpointError | None = None
    try:  # logs what it loaded; read once, so its SHA-256 is that of the bytes loaded (latest.pth may be replaced)
        sha = load_teacher_checkpoint(model, checkpoint, trust_checkpoint=trust_checkpoint).sha256
    except CheckpointError as exc:
        checkpoint_error = exc
    virtual = data_config.point_features == "mvp"
    nusc = index = None
    try:
        if data_config.infos:  # the split index from mmdet3d's infos: the dataroot may hold no tables
            index = open_split_index(data_config, split)
            inputs = check_index_inputs(index, data_config.num_sweeps, progress=True, virtual=virtual)
        else:
            nusc, _, inputs = preflight_split(dataroot, data_config.version, split, data_config.num_sweeps,
                                              data_config.sweep_candidates, progress=True, virtual=virtual)
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
        index = open_split_index(data_config, split, nusc=nusc)
    dataset = NuScenesDetectionDataset(data_config, split, mode="test", index=index)
    del nusc  # the dataset keeps a flat index; the devkit tables are not needed past this point
    canvas = config.model.canvas_grid
    shapes, channels = model.feature_shapes, model.feature_channels
    specs = [LayerSpec(name, channels[name], shapes[name], (canvas.x_max - canvas.x_min) / shapes[name][1],
                       canvas.num_x / shapes[name][1]) for name in layer_names]
    view_config = ViewConfig(count=views, seed=seed, rotation_range=tuple(data_config.bev_rotation_lim),
                             scale_range=tuple(data_config.bev_scale_lim), flip_x_prob=data_config.bev_flip_x_prob,
                             flip_y_prob=data_config.bev_flip_y_prob)
    # the command that reproduces this store (absolute paths), named by --verify and training errors for repairs;
    # recorded and shown, so it never holds a credential: the URL without user info, allow-listed storage options
    command_line = shlex.join([
        "distillbev", "extract-teacher", "--config", str(Path(config_path).resolve()), "--dataroot",
        str(Path(dataroot).resolve()), "--checkpoint", str(Path(checkpoint).resolve()), "--cache",
        str(location.resolved()), *recorded_storage_options(options), "--split", split, "--views", str(views),
        "--seed", str(seed), "--workers", str(workers), "--dtype", dtype,
        *(["--int8-error", repr(int8_error)] if dtype == "int8" else []), "--layers", ",".join(layer_names),
        "--batch-size", str(batch_size), "--device", device,
        *(["--no-background-writer"] if no_background_writer else []),
        *[arg for item in overrides for arg in ("--set", item)],
        *(["--infos", str(Path(infos).resolve())] if infos is not None else [])])
    left_out = [*(["the URL's user info"] if location.user_info else []),
                *(f"--storage-option {name}" for name in unrecorded_storage_options(options))]
    if left_out:
        logger.info("%s: the recorded command leaves out the credentials given (%s); give them again, or through "
                    "the environment, to resume or repair this store", location, ", ".join(left_out))
    manifest = build_manifest(
        teacher_config=to_dict(config.model), checkpoint_path=str(checkpoint), checkpoint_sha256=sha, grid=canvas,
        layers=specs, heatmap_shape=config.model.head_grid.shape, occupancy_shape=canvas.shape, dtype=dtype,
        views=view_config, sample_tokens=list(dataset.sample_tokens), int8_error=int8_error if dtype == "int8" else 0.0,
        dataset={"dataroot": str(dataroot), "version": data_config.version, "split": split,
                 "num_sweeps": data_config.num_sweeps, "fingerprint": inputs.fingerprint,
                 "point_loading": point_loading_settings(data_config)},
        extraction={"command": command_line, "batch_size": batch_size, "workers": workers, "device": device,
                    "ranks": int(os.environ.get("WORLD_SIZE", "1")),
                    "threads": torch.get_num_threads()})
    head_state = {name: value.detach().cpu().numpy() for name, value in model.head_state().items()}

    def run_teacher(points_list: list[torch.Tensor]):
        with torch.no_grad():
            return model([points.to(device) for points in points_list])

    def load_points(index: int, bev_aug: BEVAugmentation):
        inputs = InputDigests()  # the SHA-256 of every file read, taken while reading it
        sample = dataset.get(index, bev_aug=bev_aug, with_images=False, digests=inputs)
        return sample.sample_token, sample.points, inputs

    common = dict(manifest=manifest, sample_tokens=list(dataset.sample_tokens), head_state=head_state,
                  run_teacher=run_teacher, load_points=load_points, batch_size=batch_size,
                  background_writer=not no_background_writer, overwrite=overwrite, repair=repair,
                  command=command_line)
    if distributed:
        from ..pipeline.cache.distributed import extract_distributed

        result = extract_distributed(location, **common)
        if torch.distributed.get_rank() != 0:
            return
    else:
        result = extract_teacher_cache(location, workers=workers, **common)
    if result.state == "complete":
        checked = ("every chunk read and its CRC32C checked" if result.checked == "crc"
                   else "every chunk present; `--repair` also reads and CRC-checks them")
        click.echo(f"{location}: already complete ({result.total} sample-views of split {split!r}; {checked})")
        return
    if result.redone:
        click.echo(f"{location}: re-extracted {len(result.redone)} damaged sample-views")
    rate = result.written / max(result.seconds, 1e-9)
    click.echo(f"{location}: complete: {result.total} sample-views ({len(dataset)} samples x {views} views), "
               f"{result.written} written, {result.skipped} resumed, {result.seconds:.1f} s, {rate:.2f} views/s, "
               f"{result.raw_bytes / max(result.seconds, 1e-9) / 1e6:.1f} MB/s raw")
