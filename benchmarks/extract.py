"""Teacher-cache storage benchmark at full nuScenes teacher shapes, on synthetic ReLU-like maps.

Layers 128 @ 128^2 (backbone1), 256 @ 64^2 (backbone2), 384 @ 128^2 (neck), heatmap 10 @ 128^2, occupancy 512^2.
For fp16+zstd and int8+zstd it measures: write (encode + compress + I/O) and read (+ decode) time per sample-view,
sequential and concurrent reads, stored bytes per sample-view, the compression ratio against raw fp16 features,
and int8 fidelity (cosine similarity, max abs error, max error / channel range). Prints a markdown table.

    python benchmarks/extract.py --samples 4 [--zero-fraction 0.5] [--dir /tmp/bench]

The maps are smooth random fields through a ReLU with about `--zero-fraction` zeros; real teacher features must
be measured on a real cache (`distillbev inspect-cache --stats`).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from distillbev.pipeline.cache.extract import clip_sigmoid, spatial_attention
from distillbev.pipeline.cache.manifest import LayerSpec, ViewConfig, build_manifest
from distillbev.pipeline.cache.reader import TeacherCache
from distillbev.pipeline.cache.writer import SampleViewRecord, SampleViewWriter, finalize_store, prepare_store
from distillbev.pipeline.geometry.bev import BEVGrid

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


def run(dtype: str, records: list[SampleViewRecord], folder: Path) -> dict[str, float]:
    path = folder / f"bench_{dtype}.zarr"
    manifest = build_manifest(teacher_config={}, checkpoint_path="", checkpoint_sha256="", grid=GRID, layers=LAYERS,
                              heatmap_shape=HEATMAP_SHAPE, occupancy_shape=OCCUPANCY_SHAPE, dtype=dtype,
                              views=ViewConfig(count=1), sample_count=len(records),
                              dataset={"dataroot": "", "version": "", "split": "bench", "num_sweeps": 9})
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=4, help="sample-views written and read per dtype")
    parser.add_argument("--zero-fraction", type=float, default=0.5, help="fraction of zeros after the ReLU")
    parser.add_argument("--dir", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="cache_bench_", dir=args.dir))
    try:
        records = [make_record(i, args.zero_fraction) for i in range(args.samples)]
        zeros = np.mean([(r.features[l.name] == 0).mean() for r in records for l in LAYERS])
        raw_mb = sum(l.channels * l.shape[0] * l.shape[1] * 2 for l in LAYERS) / 1e6
        print(f"synthetic ReLU-like features, {zeros:.0%} zeros, {args.samples} sample-views, raw fp16 features "
              f"{raw_mb:.1f} MB per sample-view, torch threads {torch.get_num_threads()}\n")
        print("| dtype | write ms | read ms (concurrent) | read CPU ms | read ms (sequential) "
              "| MB / sample-view (all arrays) | feature MB | ratio vs raw fp16 | min cosine | max abs err "
              "| max err / channel range |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for dtype in ("fp16", "int8"):
            r = run(dtype, records, folder)
            print(f"| {dtype}+zstd3 | {r['write_ms']:.0f} | {r['read_ms']:.0f} | {r['read_cpu_ms']:.0f} "
                  f"| {r['read_seq_ms']:.0f} "
                  f"| {r['bytes_per_view'] / 1e6:.2f} | {r['feature_bytes'] / 1e6:.2f} | {r['ratio']:.2f}x "
                  f"| {r['cosine']:.6f} | {r['max_abs']:.2e} | {r['max_rel']:.2e} |")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
