"""`distillbev extract-teacher`: run the frozen CenterPoint teacher over a split into a zarr teacher-feature cache.

    distillbev extract-teacher --config configs/synthetic/teacher.yaml --dataroot data/synthetic \
        --checkpoint runs/teacher/teacher.pth --cache runs/cache.zarr --split synth_train --views 4 --workers 2

Before any teacher compute, a pre-flight pass checks every input the split needs (tables, every key-frame and sweep
file, the checkpoint) and reports all problems at once; with `--infos` (mmdet3d's info files, where the dataroot
may hold no tables) it checks the files of the split index built from them. The same command resumes an
interrupted extraction (sample-views marked done are re-checked, those that fail are redone), and on a finished
store checks that every chunk is present; `--repair` reads and CRC-checks every chunk and re-extracts the damaged
sample-views. A store written from another teacher, config, grid, split, view set, dtype or dataset content is
refused with the list of differences unless --overwrite, and a resume or repair with other compute settings
(device, TF32, batch size, threads, torch) than the store records unless --allow-settings-change. One extraction
at a time per store (a lock). The recipe itself is `pipeline/cache/run.py:run_extraction`; see docs/cache.md.
"""

from __future__ import annotations

import click

from .options import infos_option, infos_override, storage_option

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
@click.option("--allow-settings-change", is_flag=True,
              help="Resume or repair a store with another device, TF32 setting, batch size, thread count or torch "
                   "than it records (listed, then used): the sample-views computed now may differ in their last bits "
                   "from those already stored, so the store is no longer bit-identical to an uninterrupted "
                   "extraction. Refused otherwise.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Config override, e.g. data.num_sweeps=4.")
@infos_option
def command(config_path: str, dataroot: str, checkpoint: str, cache_path: str, storage_options: tuple[str, ...],
            split: str, views: int, seed: int, workers: int, dtype: str, int8_error: float, layers: str,
            batch_size: int, no_background_writer: bool, overwrite: bool, repair: bool, device: str,
            allow_settings_change: bool, overrides: tuple[str, ...], infos: str | None,
            trust_checkpoint: bool) -> None:
    """Extract teacher features, heatmaps and attention for every sample-view of a split."""
    from ..pipeline.cache.location import StoreLocation, parse_storage_options
    from ..pipeline.cache.run import ExtractionRequest, check_layout, run_extraction
    from ..pipeline.config import load_config
    from ..pipeline.teacher.config import TeacherExperimentConfig

    cache = StoreLocation.parse(cache_path, parse_storage_options(storage_options))
    check_layout(device, workers, cache)  # a device or process layout that cannot work, before anything is read
    config = load_config(TeacherExperimentConfig, config_path, overrides=[*overrides, *infos_override(infos)])
    request = ExtractionRequest(
        config=config, config_path=config_path, dataroot=dataroot, checkpoint=checkpoint,
        cache=cache, split=split,
        layers=tuple(name.strip() for name in layers.split(",") if name.strip()), views=views, seed=seed,
        workers=workers, dtype=dtype, int8_error=int8_error, batch_size=batch_size,
        background_writer=not no_background_writer, overwrite=overwrite, repair=repair, device=device,
        overrides=tuple(overrides), infos=infos, trust_checkpoint=trust_checkpoint,
        allow_settings_change=allow_settings_change)
    result = run_extraction(request)
    if result is None:  # a rank other than 0: rank 0 reports
        return
    location = request.cache
    if result.state == "complete":
        checked = ("every chunk read and its CRC32C checked" if result.checked == "crc"
                   else "every chunk present; `--repair` also reads and CRC-checks them")
        click.echo(f"{location}: already complete ({result.total} sample-views of split {split!r}; {checked})")
        return
    if result.redone:
        click.echo(f"{location}: re-extracted {len(result.redone)} damaged sample-views")
    rate = result.written / max(result.seconds, 1e-9)
    click.echo(f"{location}: complete: {result.total} sample-views ({result.total // views} samples x {views} views), "
               f"{result.written} written, {result.skipped} resumed, {result.seconds:.1f} s, {rate:.2f} views/s, "
               f"{result.raw_bytes / max(result.seconds, 1e-9) / 1e6:.1f} MB/s raw")
