"""Teacher-extraction and teacher-cache benchmarks: full-shape storage, and the real teacher on its own data.

Full-shape part (always): nuScenes teacher shapes on synthetic ReLU-like maps. Layers 128 @ 128^2 (backbone1),
256 @ 64^2 (backbone2), 384 @ 128^2 (neck), heatmap 10 @ 128^2, occupancy 512^2. For fp16+zstd and int8+zstd it
measures write (encode + compress + I/O) and read (+ decode) time per sample-view, sequential and concurrent
reads, stored bytes, the compression ratio against raw fp16 features and int8 fidelity, then splits one
sample-view's read into file I/O, crc32c, zstd decode, conversion to float32 and the rest (zarr's own work).

Real part (`--real`, on by default when --checkpoint and --dataroot are given): the trained teacher of `--config`
on the first `--real-samples` samples of `--split` (test mode, sweeps included, view 0 only). It measures point
loading and teacher forward ms/sample, extraction samples/s with the background writer, with synchronous writes
and without writing at all (loading + forward), the writer overhead, and per stored array the bytes per
sample-view and the fidelity of fp16 and int8 against the fp32 teacher output.

    python benchmarks/extract.py --samples 4 --dir SCRATCH
    python benchmarks/extract.py --dir SCRATCH --checkpoint runs/teacher/latest.pth --dataroot data/synthetic

The synthetic maps are smooth random fields through a ReLU with about `--zero-fraction` zeros; only the real part
says what the trained teacher's features compress to.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from distillbev.cache_schemas import v2
from distillbev.pipeline.cache.extract import spatial_attention
from distillbev.pipeline.heads.center_head import clip_sigmoid
from distillbev.pipeline.cache.manifest import LayerSpec, ViewConfig, build_manifest
from distillbev.pipeline.cache.quantize import dequantize_per_channel
from distillbev.pipeline.cache.reader import TeacherCache
from distillbev.pipeline.cache.checks import sample_view_array_names
from distillbev.pipeline.cache.writer import SampleViewRecord, SampleViewWriter, finalize_store, prepare_store
from distillbev.pipeline.geometry.bev import BEVGrid

from common import trained_teacher

GRID = BEVGrid(-51.2, 51.2, -51.2, 51.2, 0.2)  # the 512^2 pillar canvas
LAYERS = [LayerSpec("backbone1", 128, (128, 128), 0.8, 4.0), LayerSpec("backbone2", 256, (64, 64), 1.6, 8.0),
          LayerSpec("neck", 384, (128, 128), 0.8, 4.0)]
HEATMAP_SHAPE = (128, 128)
OCCUPANCY_SHAPE = (512, 512)


def relu_like(channels: int, size: tuple[int, int], zero_fraction: float, generator: torch.Generator) -> torch.Tensor:
    """(C, Y, X) float32: a smooth random field (4-cell correlation) + noise through a ReLU, per-channel scales."""
    y, x = size
    coarse = torch.randn(1, channels, y // 4, x // 4, generator=generator)
    field = F.interpolate(coarse, size=(y, x), mode="bilinear", align_corners=False)[0]  # (C, Y, X)
    field = field + 0.3 * torch.randn(channels, y, x, generator=generator)
    threshold = torch.quantile(field.flatten()[:: max(1, field.numel() // 100_000)], zero_fraction)
    scale = torch.exp(0.5 * torch.randn(channels, 1, 1, generator=generator))
    return F.relu(field - threshold) * scale


def make_record(index: int, zero_fraction: float) -> SampleViewRecord:
    generator = torch.Generator().manual_seed(index)
    features = {layer.name: relu_like(layer.channels, layer.shape, zero_fraction, generator) for layer in LAYERS}
    heatmap = clip_sigmoid(torch.randn(1, 10, *HEATMAP_SHAPE, generator=generator) * 2 - 4)[0]
    occupancy = torch.rand(*OCCUPANCY_SHAPE, generator=generator) < 0.15
    return SampleViewRecord(
        sample_index=index, view=0, sample_token=f"bench-{index}",
        features={k: v.numpy() for k, v in features.items()}, heatmap=heatmap.numpy(),
        attention={k: spatial_attention(v[None])[0].numpy() for k, v in features.items()},
        occupancy=occupancy.numpy())


def stored_bytes(path: Path, sample_index: int) -> int:
    """Bytes of every chunk file of one sample-view (view 0)."""
    total = 0
    for chunk in path.rglob("*"):
        parts = chunk.relative_to(path).parts
        if chunk.is_file() and "c" in parts and len(parts) > parts.index("c") + 2:
            i = parts.index("c")
            if parts[0] not in ("views", "sample_tokens") and parts[i + 1] == str(sample_index) and parts[i + 2] == "0":
                total += chunk.stat().st_size
    return total


def run(dtype: str, records: list[SampleViewRecord], folder: Path, int8_error: float) -> dict[str, float]:
    path = folder / f"bench_{dtype}.zarr"
    manifest = build_manifest(teacher_config={}, checkpoint_path="", checkpoint_sha256="", grid=GRID, layers=LAYERS,
                              heatmap_shape=HEATMAP_SHAPE, occupancy_shape=OCCUPANCY_SHAPE, dtype=dtype,
                              views=ViewConfig(count=1), sample_tokens=[r.sample_token for r in records],
                              dataset={"dataroot": "", "version": "", "split": "bench", "num_sweeps": 9,
                                       "fingerprint": "", "point_loading": {}},
                              int8_error=int8_error if dtype == "int8" else 0.0)
    prepare_store(path, manifest, [r.sample_token for r in records], {}, overwrite=True)
    writer = SampleViewWriter(path)
    write_times = []
    for record in records:
        start = time.perf_counter()
        writer.write(record)
        write_times.append(time.perf_counter() - start)
    finalize_store(path, [r.sample_token for r in records])
    results: dict[str, float] = {"write_ms": 1000 * statistics.median(write_times)}
    for mode, concurrent in (("read_ms", True), ("read_seq_ms", False)):
        cache = TeacherCache.open(path, concurrent_reads=concurrent)
        cache.read(0, 0)  # open the arrays and warm the thread pool
        times, cpu_times = [], []
        for _ in range(2):
            for index in range(len(records)):
                start, cpu_start = time.perf_counter(), time.process_time()
                cache.read(index, 0)
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)  # all threads of this process
        results[mode] = 1000 * statistics.median(times)
        results[mode.replace("_ms", "_cpu_ms")] = 1000 * statistics.median(cpu_times)
    cache = TeacherCache.open(path)
    cosines, max_abs, rel = [], [], []
    for record in records:
        targets = cache.read(record.sample_index, 0)
        for layer in LAYERS:
            original = torch.from_numpy(record.features[layer.name])
            restored = targets.features[layer.name]
            cosines.append(float(F.cosine_similarity(original.flatten(), restored.flatten(), dim=0)))
            error = (original - restored).abs()
            max_abs.append(float(error.max()))
            ranges = original.amax(dim=(1, 2)) - original.amin(dim=(1, 2))  # (C,)
            rel.append(float((error.amax(dim=(1, 2)) / ranges.clamp(min=1e-12)).max()))
    raw_fp16 = sum(layer.channels * layer.shape[0] * layer.shape[1] * 2 for layer in LAYERS)
    feature_bytes = statistics.mean(
        sum(stored_bytes(path / "features" / n, r.sample_index) for n in [l.name for l in LAYERS]) +
        (sum(stored_bytes(path / "features" / f"{l.name}_{s}", r.sample_index) for l in LAYERS
             for s in ("scale", "offset")) if dtype == "int8" else 0) for r in records)
    results.update(
        bytes_per_view=statistics.mean(stored_bytes(path, r.sample_index) for r in records),
        feature_bytes=feature_bytes, ratio=raw_fp16 / feature_bytes, cosine=min(min(cosines), 1.0), max_abs=max(max_abs),
        max_rel=max(rel))
    return results


def label(dtype: str, args: argparse.Namespace) -> str:
    """How a store's feature codec is named in the tables, e.g. 'int8 (error 0.03)'."""
    return f"int8 (error {args.int8_error:g})" if dtype == "int8" and args.int8_error else dtype


def cpu_ms(function: Callable[[], Any]) -> float:
    """CPU time of all this process's threads during one call, in ms."""
    start = time.process_time()
    function()
    return 1000 * (time.process_time() - start)


def median_ms(function: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def profile_read(path: Path, sample_index: int, repeats: int = 7) -> dict[str, float]:
    """ms to read sample-view (sample_index, 0), split into steps; each step is summed over the arrays.

    io: reading the chunk files (page cache warm); crc32c and zstd: the two codecs of a chunk; to_float32: what
    the reader does after zarr (fp16 -> float32 copy, int8 dequantisation, bool copy); zarr_arrays: zarr's
    `array[s, 0]` per array (io + codecs + zarr's own work); per_array_latency: zarr reading a 1-byte chunk.
    """
    import google_crc32c
    import zarr
    from numcodecs import Zstd

    group = zarr.open_group(str(path), mode="r")
    manifest = dict(group.attrs)
    dtype = manifest["storage"]["dtype"]
    zstd = Zstd()
    steps = dict.fromkeys(("io", "crc32c", "zstd", "zarr_arrays", "to_float32", "to_float32_torch1"), 0.0)
    stored = {}
    names = sample_view_array_names(manifest)
    for name in names:
        array = group[name]
        # one chunk per sample-view: <array>/c/<sample>/<view>/0/...
        file = path.joinpath(name, "c", str(sample_index), "0", *["0"] * (array.ndim - 2))
        payload = file.read_bytes()[:-4]  # the zstd frame; the last 4 bytes are its crc32c
        stored[name] = array[sample_index, 0]
        steps["io"] += median_ms(file.read_bytes, repeats)
        steps["crc32c"] += median_ms(lambda: google_crc32c.value(payload), repeats)
        steps["zstd"] += median_ms(lambda: zstd.decode(payload), repeats)
        steps["zarr_arrays"] += median_ms(lambda: array[sample_index, 0], repeats)
    threads = torch.get_num_threads()
    for name in names:
        values = stored[name]
        if name.endswith(("_scale", "_offset")):
            continue
        if dtype == "int8" and name.startswith("features/"):
            scale, offset = stored[f"{name}_scale"], stored[f"{name}_offset"]
            steps["to_float32"] += median_ms(lambda: dequantize_per_channel(values, scale, offset), repeats)
            torch.set_num_threads(1)  # a DataLoader worker computes with one thread
            steps["to_float32_torch1"] += median_ms(
                lambda: torch.from_numpy(values).float().mul_(torch.from_numpy(scale)[:, None, None])
                .add_(torch.from_numpy(offset)[:, None, None]), repeats)
        else:
            target = bool if values.dtype == bool else np.float32
            steps["to_float32"] += median_ms(lambda: values.astype(target), repeats)
            torch.set_num_threads(1)
            steps["to_float32_torch1"] += median_ms(
                lambda: torch.from_numpy(values).to(torch.bool if target is bool else torch.float32), repeats)
        torch.set_num_threads(threads)
    arrays = {name: group[name] for name in names}

    def read_converting_with_torch() -> dict[str, torch.Tensor]:
        """The reader's sequential read with fp16 -> float32 done by torch; int8 dequantised as the reader does."""
        chunks = {name: array[sample_index, 0] for name, array in arrays.items()}
        out = {}
        for name, values in chunks.items():
            if dtype == "int8" and name.startswith("features/") and not name.endswith(("_scale", "_offset")):
                out[name] = torch.from_numpy(
                    dequantize_per_channel(values, chunks[f"{name}_scale"], chunks[f"{name}_offset"]))
            elif not name.endswith(("_scale", "_offset")):
                out[name] = torch.from_numpy(values).to(torch.bool if values.dtype == bool else torch.float32)
        return out

    torch.set_num_threads(1)
    steps["reader_torch1"] = median_ms(read_converting_with_torch, repeats)
    torch.set_num_threads(threads)
    done = group[v2.DONE]
    steps["per_array_latency"] = median_ms(lambda: done[sample_index, 0], repeats)
    steps["arrays"] = len(names)
    for concurrent, key in ((False, "reader_sequential"), (True, "reader_concurrent")):
        cache = TeacherCache.open(path, concurrent_reads=concurrent)
        cache.read(sample_index, 0)
        steps[key] = median_ms(lambda: cache.read(sample_index, 0), repeats)
    return steps


def print_profile(dtype: str, steps: dict[str, float]) -> None:
    codecs = steps["io"] + steps["crc32c"] + steps["zstd"]
    print(f"| {dtype}+zstd{v2.ZSTD_LEVEL} | {steps['reader_sequential']:.1f} | {steps['reader_concurrent']:.1f} "
          f"| {steps['zarr_arrays']:.1f} | {steps['io']:.1f} | {steps['crc32c']:.1f} | {steps['zstd']:.1f} "
          f"| {steps['zarr_arrays'] - codecs:.1f} | {int(steps['arrays'])} x {steps['per_array_latency']:.2f} "
          f"| {steps['to_float32']:.1f} | {steps['to_float32_torch1']:.1f} | {steps['reader_torch1']:.1f} |")


def full_shape_benchmark(args: argparse.Namespace, folder: Path) -> None:
    records = [make_record(i, args.zero_fraction) for i in range(args.samples)]
    zeros = np.mean([(r.features[l.name] == 0).mean() for r in records for l in LAYERS])
    raw_mb = sum(l.channels * l.shape[0] * l.shape[1] * 2 for l in LAYERS) / 1e6
    print(f"## Full nuScenes shapes, synthetic ReLU-like features: {zeros:.0%} zeros, {args.samples} sample-views, "
          f"raw fp16 features {raw_mb:.1f} MB per sample-view, torch threads {torch.get_num_threads()}\n")
    print("| dtype | write ms | read ms (concurrent) | read CPU ms | read ms (sequential) "
          "| MB / sample-view (all arrays) | feature MB | ratio vs raw fp16 | min cosine | max abs err "
          "| max err / channel range |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    profiles = {}
    for dtype in ("fp16", "int8"):
        r = run(dtype, records, folder, args.int8_error)
        print(f"| {label(dtype, args)}+zstd{v2.ZSTD_LEVEL} | {r['write_ms']:.0f} | {r['read_ms']:.0f} "
              f"| {r['read_cpu_ms']:.0f} | {r['read_seq_ms']:.0f} "
              f"| {r['bytes_per_view'] / 1e6:.2f} | {r['feature_bytes'] / 1e6:.2f} | {r['ratio']:.2f}x "
              f"| {r['cosine']:.6f} | {r['max_abs']:.2e} | {r['max_rel']:.2e} |")
        profiles[dtype] = profile_read(folder / f"bench_{dtype}.zarr", 0)
    print("\nWhere one sample-view's read goes (ms, medians, summed over the arrays; 'zarr own' = zarr reads "
          "- io - crc32c - zstd; torch on 1 thread, as in a DataLoader worker):\n")
    print("| dtype | reader (sequential) | reader (concurrent) | zarr reads | io | crc32c | zstd | zarr own "
          "| arrays x 1-byte read | to float32 (numpy, as the reader) | to float32 (torch, 1 thread) "
          "| sequential read converting with torch (1 thread) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for dtype, steps in profiles.items():
        print_profile(label(dtype, args), steps)
    best = {dtype: min(steps["reader_sequential"], steps["reader_concurrent"]) for dtype, steps in profiles.items()}
    print("\naim read+decode <= 50 ms per sample-view: "
          + ", ".join(f"{d} {ms:.0f} ms ({'met' if ms <= 50 else 'missed'})" for d, ms in best.items()))


REAL_LAYERS = ("backbone1", "backbone2", "neck")  # the distilled layers (extract-teacher's default --layers)


def real_benchmark(args: argparse.Namespace, folder: Path) -> None:
    """Point loading, teacher forward, extraction throughput, stored bytes and fidelity of the trained teacher."""
    from distillbev.pipeline.cache.extract import extract_teacher_cache, records_from_outputs
    from distillbev.pipeline.config import to_dict
    from distillbev.pipeline.geometry.bev import BEVAugmentation
    from distillbev.pipeline.teacher.checkpoint import checkpoint_sha256

    config, model, dataset = trained_teacher(args.config, args.checkpoint, args.dataroot, args.split)
    data_config = dataset.config
    count = min(args.real_samples, len(dataset))
    tokens = list(dataset.sample_tokens[:count])
    canvas, shapes, channels = config.model.canvas_grid, model.feature_shapes, model.feature_channels
    specs = [LayerSpec(n, channels[n], shapes[n], (canvas.x_max - canvas.x_min) / shapes[n][1],
                       canvas.num_x / shapes[n][1]) for n in REAL_LAYERS]
    sha = checkpoint_sha256(args.checkpoint)
    head_state = {k: v.detach().numpy() for k, v in model.pts_bbox_head.state_dict().items()}

    def manifest_for(dtype: str) -> dict[str, Any]:  # as extract-teacher builds it, one view per sample
        return build_manifest(
            teacher_config=to_dict(config.model), checkpoint_path=str(args.checkpoint), checkpoint_sha256=sha,
            grid=canvas, layers=specs, heatmap_shape=config.model.head_grid.shape, occupancy_shape=canvas.shape,
            dtype=dtype, views=ViewConfig(count=1), sample_tokens=tokens,
            int8_error=args.int8_error if dtype == "int8" else 0.0,
            dataset={"dataroot": str(args.dataroot), "version": data_config.version, "split": args.split,
                     "num_sweeps": data_config.num_sweeps, "fingerprint": "", "point_loading": {}})

    def load_points(index: int, bev_aug: BEVAugmentation) -> tuple[str, torch.Tensor]:
        sample = dataset.get(index, bev_aug=bev_aug, with_images=False)
        return sample.sample_token, sample.points

    def run_teacher(points_list: list[torch.Tensor]) -> Any:
        with torch.no_grad():
            return model(points_list)

    identity = BEVAugmentation()
    clouds = [load_points(i, identity)[1] for i in range(count)]  # warms the page cache and the devkit tables
    load_ms = median_ms(lambda: [load_points(i, identity) for i in range(count)], 1) / count
    for points in clouds[:2]:
        run_teacher([points])  # warm-up
    forward_wall, forward_cpu = [], []
    for points in clouds:
        start, cpu_start = time.perf_counter(), time.process_time()
        run_teacher([points])
        forward_wall.append(time.perf_counter() - start)
        forward_cpu.append(time.process_time() - cpu_start)
    print(f"## Trained teacher: {args.checkpoint} ({args.config}), {args.split} of {args.dataroot}, first {count} "
          f"samples, view 0, test mode, {data_config.num_sweeps} sweeps, torch threads {torch.get_num_threads()}\n")
    print("| step | ms / sample |\n|---|---|")
    print(f"| point loading (key frame + sweeps, crop) | {load_ms:.1f} |")
    print(f"| teacher forward, wall (mean after 2 warm-up) | {1000 * statistics.mean(forward_wall):.1f} |")
    print(f"| teacher forward, wall (median) | {1000 * statistics.median(forward_wall):.1f} |")
    print(f"| teacher forward, CPU of all threads | {1000 * statistics.mean(forward_cpu):.1f} |")
    print(f"| points per sample (mean) | {statistics.mean(len(c) for c in clouds):.0f} |\n")

    outputs: list[Any] = []

    def teacher_only() -> None:
        outputs.clear()
        for index in range(count):
            outputs.append(run_teacher([load_points(index, identity)[1]]))

    stores = {"fp16, background writer": ("fp16", True), "fp16, synchronous writes": ("fp16", False),
              "int8, background writer": ("int8", True), "int8, synchronous writes": ("int8", False)}
    paths = {name: folder / f"real_{dtype}_{'background' if background else 'synchronous'}.zarr"
             for name, (dtype, background) in stores.items()}
    names = ["load + forward, no writing", *stores]
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):  # interleaved, so a burst of load on the machine hits every variant alike
        for name in names:
            if name in stores:  # a fresh store, created outside the timed region (a complete one is not redone)
                dtype, background = stores[name]
                manifest = manifest_for(dtype)
                shutil.rmtree(paths[name], ignore_errors=True)
                prepare_store(paths[name], manifest, tokens, head_state, overwrite=True)
            start, cpu_start = time.perf_counter(), time.process_time()
            if name in stores:
                result = extract_teacher_cache(
                    paths[name], manifest=manifest, sample_tokens=tokens, head_state=head_state,
                    run_teacher=run_teacher, load_points=load_points, workers=1, background_writer=background,
                    progress=False)
            else:
                teacher_only()
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - cpu_start)
            if name in stores and result.written != count:
                raise RuntimeError(f"{name}: wrote {result.written} of {count} sample-views")
    base, base_cpu = min(wall["load + forward, no writing"]), min(cpu["load + forward, no writing"])
    print(f"Extraction of {count} samples x 1 view, workers=1, {args.rounds} interleaved rounds; overhead = (time - "
          f"load+forward time) / load+forward time, from the best wall time and the least CPU time of each run:\n")
    print("| run | best s | median s | samples/s (best) | CPU s (least) | overhead, wall | overhead, CPU |")
    print("|---|---|---|---|---|---|---|")
    for name in names:
        best, least = min(wall[name]), min(cpu[name])
        shown = name.replace("int8", label("int8", args))
        print(f"| {shown} | {best:.2f} | {statistics.median(wall[name]):.2f} | {count / best:.2f} | {least:.2f} "
              f"| {100 * (best - base) / base:+.1f}% | {100 * (least - base_cpu) / base_cpu:+.1f}% |")
    post_ms = median_ms(lambda: records_from_outputs(outputs[0], [(0, 0)], [tokens[0]], manifest_for("fp16")), 5)
    records = [record for index, output in enumerate(outputs)
               for record in records_from_outputs(output, [(index, 0)], [tokens[index]], manifest_for("fp16"))]
    write_ms, write_cpu = {}, {}
    for dtype in ("fp16", "int8"):  # one sample-view's chunks + done marker, in the calling thread
        scratch = folder / f"real_{dtype}_write.zarr"
        shutil.rmtree(scratch, ignore_errors=True)
        prepare_store(scratch, manifest_for(dtype), tokens, head_state)
        writer = SampleViewWriter(scratch)
        write_ms[dtype] = statistics.median(median_ms(lambda: writer.write(r), 1) for r in records)
        write_cpu[dtype] = statistics.median(cpu_ms(lambda: writer.write(r)) for r in records)
    post_cpu = statistics.median(cpu_ms(lambda: records_from_outputs(outputs[0], [(0, 0)], [tokens[0]],
                                                                     manifest_for("int8"))) for _ in range(5))
    compute_cpu = load_ms + 1000 * statistics.median(forward_cpu)
    print("\nSteady state per sample-view in CPU time (the machine is shared; a long extraction amortises the per-run "
          "set-up and final checks that the runs above include): "
          + "; ".join(f"{label(d, args)}: records {post_cpu:.1f} ms + write {write_cpu[d]:.1f} ms against load "
                      f"{load_ms:.1f} ms (wall) + forward {1000 * statistics.median(forward_cpu):.1f} ms = "
                      f"{100 * (post_cpu + write_cpu[d]) / compute_cpu:+.1f}%" for d in ("int8", "fp16")))
    print(f"\nPer sample-view, medians: load {load_ms:.1f} ms + forward {1000 * statistics.median(forward_wall):.1f} ms"
          f"; outputs -> records (attention, sigmoid, checks) {post_ms:.1f} ms; write fp16 {write_ms['fp16']:.1f} ms, "
          f"int8 {write_ms['int8']:.1f} ms. A synchronous writer adds (records + write) / (load + forward) = "
          f"fp16 {100 * (post_ms + write_ms['fp16']) / (load_ms + 1000 * statistics.median(forward_wall)):.1f}%, "
          f"int8 {100 * (post_ms + write_ms['int8']) / (load_ms + 1000 * statistics.median(forward_wall)):.1f}%; "
          f"the background writer moves the write off the compute thread.")
    if args.int8_error:
        print(f"\nIn the next table int8 is {label('int8', args)}.")
    real_storage_table(records, paths["fp16, background writer"], paths["int8, background writer"])
    for dtype in ("int8", "fp16"):
        overhead = 100 * (min(wall[f"{dtype}, background writer"]) - base) / base
        overhead_cpu = 100 * (min(cpu[f"{dtype}, background writer"]) - base_cpu) / base_cpu
        print(f"\naim writer overhead <= 10% of teacher compute: {label(dtype, args)} background writer "
              f"{overhead:+.1f}% wall, {overhead_cpu:+.1f}% CPU ({'met' if overhead <= 10 else 'missed'} on wall time)")


def paper_teacher_benchmark(args: argparse.Namespace, folder: Path) -> None:
    """Writer cost against teacher compute at the paper's shapes: configs/nuscenes/teacher_pillar02.yaml, randomly
    initialised (no trained nuScenes teacher exists here; the forward's cost does not depend on its weights), on a
    synthetic cloud of `--paper-points` points whose density falls with range like a spinning LiDAR's. Compute and
    writing are timed per sample-view in this thread (CPU time: the machine is shared), so the ratio is the steady
    state of a long extraction, without the per-run set-up and final checks."""
    from distillbev.pipeline.cache.extract import records_from_outputs
    from distillbev.pipeline.config import load_config
    from distillbev.pipeline.teacher.config import TeacherExperimentConfig
    from distillbev.pipeline.teacher.model import CenterPointTeacher

    config_path = Path(__file__).resolve().parents[1] / "configs" / "nuscenes" / "teacher_pillar02.yaml"
    config = load_config(TeacherExperimentConfig, config_path, overrides=[])
    torch.manual_seed(0)
    model = CenterPointTeacher(config.model).eval()
    generator = torch.Generator().manual_seed(0)
    clouds = []
    for _ in range(args.paper_repeats):
        count = args.paper_points
        radius = 1.0 + 59.0 * torch.rand(count, generator=generator) ** 2  # denser near the sensor
        angle = 2 * torch.pi * torch.rand(count, generator=generator)
        z = -1.8 + 3.0 * torch.rand(count, generator=generator) ** 3
        clouds.append(torch.stack([radius * torch.cos(angle), radius * torch.sin(angle), z,
                                   torch.rand(count, generator=generator),
                                   0.05 * torch.randint(0, 10, (count,), generator=generator).float()], dim=1))
    canvas, shapes, channels = config.model.canvas_grid, model.feature_shapes, model.feature_channels
    specs = [LayerSpec(n, channels[n], shapes[n], (canvas.x_max - canvas.x_min) / shapes[n][1],
                       canvas.num_x / shapes[n][1]) for n in REAL_LAYERS]
    tokens = [f"paper-{i}" for i in range(len(clouds))]
    with torch.no_grad():
        model([clouds[0]])  # warm-up
        forward_wall, forward_cpu, outputs = [], [], []
        for points in clouds:
            start, cpu_start = time.perf_counter(), time.process_time()
            outputs.append(model([points]))
            forward_wall.append(time.perf_counter() - start)
            forward_cpu.append(time.process_time() - cpu_start)
    rows = {}
    for dtype in ("int8", "fp16"):
        manifest = build_manifest(
            teacher_config={}, checkpoint_path="", checkpoint_sha256="", grid=canvas, layers=specs,
            heatmap_shape=config.model.head_grid.shape, occupancy_shape=canvas.shape, dtype=dtype,
            views=ViewConfig(count=1), sample_tokens=tokens,
            dataset={"dataroot": "", "version": "", "split": "bench", "num_sweeps": 9, "fingerprint": "",
                     "point_loading": {}}, int8_error=args.int8_error if dtype == "int8" else 0.0)
        path = folder / f"paper_{dtype}.zarr"
        prepare_store(path, manifest, tokens, {}, overwrite=True)
        writer = SampleViewWriter(path)
        records_cpu, write_wall, write_cpu = [], [], []
        for index, output in enumerate(outputs):
            cpu_start = time.process_time()
            record = records_from_outputs(output, [(index, 0)], [tokens[index]], manifest)[0]
            records_cpu.append(time.process_time() - cpu_start)
            start, cpu_start = time.perf_counter(), time.process_time()
            writer.write(record)
            write_wall.append(time.perf_counter() - start)
            write_cpu.append(time.process_time() - cpu_start)
        rows[label(dtype, args)] = (statistics.median(records_cpu), statistics.median(write_wall),
                                    statistics.median(write_cpu), stored_bytes(path, 0))
    forward = statistics.median(forward_cpu)
    print(f"## Paper shapes: writer cost against teacher compute ({config_path.name}, random weights, "
          f"{args.paper_points} synthetic points, {len(clouds)} sample-views, torch threads "
          f"{torch.get_num_threads()})\n")
    print(f"Teacher forward per sample-view: {1000 * statistics.median(forward_wall):.0f} ms wall, "
          f"{1000 * forward:.0f} ms CPU (median). Features "
          f"{', '.join(f'{s.name} {s.channels} @ {s.shape[0]}^2' for s in specs)}."
          f" Overhead = (outputs -> records + write) CPU / forward CPU; the write includes quantisation, zstd, "
          f"CRC32C, the file writes and their fsyncs. Random weights make features that compress differently from a "
          f"trained teacher's, so the stored MB here are not the codec study's.\n")
    print("| codec | outputs -> records CPU ms | write wall ms | write CPU ms | stored MB | overhead, CPU |")
    print("|---|---|---|---|---|---|")
    for name, (records, wall, cpu, size) in rows.items():
        print(f"| {name} | {1000 * records:.0f} | {1000 * wall:.0f} | {1000 * cpu:.0f} | {size / 1e6:.2f} "
              f"| {100 * (records + cpu) / forward:+.1f}% |")


def real_storage_table(records: list[SampleViewRecord], fp16_path: Path, int8_path: Path) -> None:
    """Per stored array: bytes per sample-view in each store, ratio to raw, fidelity against the fp32 records."""
    caches = {"fp16": TeacherCache.open(fp16_path), "int8": TeacherCache.open(int8_path)}
    targets = {dtype: [cache.read(r.sample_index, 0) for r in records] for dtype, cache in caches.items()}
    paths = {"fp16": fp16_path, "int8": int8_path}

    def on_disk(dtype: str, names: list[str]) -> float:
        return statistics.mean(sum(stored_bytes(paths[dtype] / n, r.sample_index) for n in names) for r in records)

    def fidelity(dtype: str, pick: Callable[[Any], Any]) -> tuple[float, float, float]:
        cosines, errors, peaks = [], [], []
        for record, target in zip(records, targets[dtype]):
            original = torch.from_numpy(np.asarray(pick(record), dtype=np.float32))
            restored = pick(target).float()
            cosines.append(float(F.cosine_similarity(original.flatten(), restored.flatten(), dim=0)))
            errors.append(float((original - restored).abs().max()))
            peaks.append(float(original.abs().max()))
        return min(min(cosines), 1.0), max(errors), max(errors) / max(max(peaks), 1e-12)

    rows = []  # (array, raw bytes, {dtype: stored names}, pick)
    for layer in caches["fp16"].layers:
        name = layer.name
        rows.append((f"features/{name} ({layer.channels} @ {layer.shape[0]}x{layer.shape[1]})",
                     layer.channels * layer.shape[0] * layer.shape[1] * 2,
                     {"fp16": [v2.feature_array(name)], "int8": [v2.feature_array(name), v2.feature_scale_array(name),
                                                                 v2.feature_offset_array(name)]},
                     lambda r, name=name: r.features[name]))
    for layer in caches["fp16"].layers:
        name = layer.name
        rows.append((f"attention/{name} (float32)", layer.shape[0] * layer.shape[1] * 4,
                     {d: [v2.attention_array(name)] for d in caches}, lambda r, name=name: r.attention[name]))
    heatmap, occupancy = records[0].heatmap.shape, records[0].occupancy.shape
    rows.append((f"heatmap (fp16, 10 @ {heatmap[1]}x{heatmap[2]})", 10 * heatmap[1] * heatmap[2] * 2,
                 {d: [v2.HEATMAP] for d in caches}, lambda r: r.heatmap))
    rows.append((f"occupancy (bool, {occupancy[0]}x{occupancy[1]})", occupancy[0] * occupancy[1],
                 {d: [v2.OCCUPANCY] for d in caches}, lambda r: r.occupancy))
    print(f"\nStored bytes per sample-view (mean over {len(records)}) and fidelity against the fp32 teacher output "
          f"(min cosine and max abs error over the samples; int8 bytes include the per-channel scale and offset; "
          f"raw = uncompressed in fp16 for features and heatmap, float32 attention, 1 byte per occupancy cell):\n")
    print("| array | raw KB | fp16 store KB | ratio | int8 store KB | ratio | fp16 / int8 disk | fp16 cosine "
          "| fp16 max abs err (/ max abs) | int8 cosine | int8 max abs err (/ max abs) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    totals = {"raw": 0.0, "fp16": 0.0, "int8": 0.0, "features_fp16": 0.0, "features_int8": 0.0}
    worst_int8_cosine = 1.0
    for label, raw, names, pick in rows:
        sizes = {d: on_disk(d, names[d]) for d in caches}
        quality = {d: fidelity(d, pick) for d in caches}
        totals["raw"] += raw
        for d in caches:
            totals[d] += sizes[d]
            if label.startswith("features/"):
                totals[f"features_{d}"] += sizes[d]
        if label.startswith("features/"):
            worst_int8_cosine = min(worst_int8_cosine, quality["int8"][0])
        cells = [label, f"{raw / 1e3:.1f}", f"{sizes['fp16'] / 1e3:.1f}", f"{raw / sizes['fp16']:.2f}x",
                 f"{sizes['int8'] / 1e3:.1f}", f"{raw / sizes['int8']:.2f}x", f"{sizes['fp16'] / sizes['int8']:.2f}x"]
        for d in caches:
            cells += [f"{quality[d][0]:.6f}", f"{quality[d][1]:.2e} ({quality[d][2]:.1e})"]
        print("| " + " | ".join(cells) + " |")
    print(f"| all arrays | {totals['raw'] / 1e3:.1f} | {totals['fp16'] / 1e3:.1f} | {totals['raw'] / totals['fp16']:.2f}x "
          f"| {totals['int8'] / 1e3:.1f} | {totals['raw'] / totals['int8']:.2f}x "
          f"| {totals['fp16'] / totals['int8']:.2f}x | | | | |")
    disk = totals["features_fp16"] / totals["features_int8"]
    met = worst_int8_cosine >= 0.999 and disk >= 2
    print(f"\naim int8 cosine >= 0.999 with >= 2x less disk than fp16 (features): min cosine {worst_int8_cosine:.6f}, "
          f"{disk:.2f}x less feature disk ({'met' if met else 'missed'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=4, help="full-shape sample-views written and read per dtype")
    parser.add_argument("--zero-fraction", type=float, default=0.5, help="fraction of zeros after the ReLU")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--full-shape", action=argparse.BooleanOptionalAction, default=True,
                        help="run the full-shape storage part")
    parser.add_argument("--real", action=argparse.BooleanOptionalAction, default=None,
                        help="run the trained-teacher part (default: when --checkpoint and --dataroot are given)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="trained teacher checkpoint (.pth)")
    parser.add_argument("--dataroot", type=Path, default=None, help="dataroot the teacher was trained on")
    parser.add_argument("--config", type=Path, default=Path(__file__).resolve().parents[1] / "configs" / "synthetic"
                        / "teacher.yaml", help="teacher experiment config")
    parser.add_argument("--split", default="synth_train", help="split to extract from")
    parser.add_argument("--real-samples", type=int, default=24, help="samples extracted per run (1 view each)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved repetitions of every extraction run")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--paper-teacher", action=argparse.BooleanOptionalAction, default=False,
                        help="time the randomly initialised paper-shape teacher against the writer")
    parser.add_argument("--paper-points", type=int, default=250_000, help="points per cloud of --paper-teacher")
    parser.add_argument("--paper-repeats", type=int, default=3, help="sample-views of --paper-teacher")
    parser.add_argument("--int8-error", type=float, default=v2.DEFAULT_INT8_ERROR,
                        help="int8 error budget of the int8 stores (extract-teacher's --int8-error)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    real = args.real if args.real is not None else (args.checkpoint is not None and args.dataroot is not None)
    if real and (args.checkpoint is None or args.dataroot is None):
        parser.error("--real needs --checkpoint and --dataroot")
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="cache_bench_", dir=args.dir))
    print(f"machine: {os.cpu_count()} CPUs, {cpu_model()}; torch {torch.__version__}; load average at start "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}\n")
    try:
        if args.full_shape:
            full_shape_benchmark(args, folder)
            print()
        if real:
            real_benchmark(args, folder)
        if args.paper_teacher:
            print()
            paper_teacher_benchmark(args, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"\nload average at end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


if __name__ == "__main__":
    main()
