"""Reading the teacher cache from a local disk and from S3 (a SeaweedFS server on 127.0.0.1), side by side.

A full-shape fp16 store (nuScenes teacher shapes: 128 @ 128^2, 256 @ 64^2, 384 @ 128^2, heatmap 10 @ 128^2,
occupancy 512^2, attention per layer; about 12 MB stored per sample-view) is written once on the local disk and
copied key by key to the S3 server. Then, for each store:

1. one sample-view read + checked + decoded by `TeacherCache.read`, its 10 arrays fetched one after another or
   concurrently (the reader's default), median and spread over every sample;
2. a DataLoader epoch over every sample-view: in the main process (no prefetching), and with 2 workers and
   prefetch_factor 2 (forkserver for S3: object-store clients do not survive a fork), sample-views per second.

    python benchmarks/cache_remote.py --samples 12 --dir SCRATCH

Loopback S3 has no network latency, so these numbers are the client's and the server's own costs; a real object
store adds its round trips to the sequential reads first, which is what the concurrent reads and prefetching hide.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import machine_header, write_random_cache  # noqa: E402
from extract import GRID, HEATMAP_SHAPE, LAYERS  # noqa: E402
from s3_server import SeaweedS3  # noqa: E402

from distillbev.pipeline.cache.location import StoreLocation  # noqa: E402
from distillbev.pipeline.cache.reader import TeacherCache  # noqa: E402


class SampleViews(torch.utils.data.Dataset):
    """Every sample-view of a cache, read as training reads it (features, heatmap, attention, occupancy)."""

    def __init__(self, cache: TeacherCache) -> None:
        self.cache = cache

    def __len__(self) -> int:
        return self.cache.num_samples * self.cache.num_views

    def __getitem__(self, index: int) -> int:
        targets = self.cache.read(index // self.cache.num_views, index % self.cache.num_views)
        return sum(t.numel() for t in targets.features.values())


def copy_store(source: StoreLocation, target: StoreLocation) -> int:
    """Copy every key of `source` to `target`; returns the bytes copied."""
    total = 0
    for key in source.keys():
        data = source.get(key)
        target.put(key, data)
        total += len(data)
    return total


def read_times(location: StoreLocation, concurrent: bool, rounds: int) -> list[float]:
    cache = TeacherCache.open(location, concurrent_reads=concurrent)
    cache.read(0, 0)  # open the arrays and the client
    times = []
    for _ in range(rounds):
        for sample in range(cache.num_samples):
            start = time.perf_counter()
            cache.read(sample, 0)
            times.append((time.perf_counter() - start) * 1000)
    return times


def epoch_rate(location: StoreLocation, workers: int) -> float:
    cache = TeacherCache.open(location)
    cache.read(0, 0)  # the parent has used the store, as training does before its workers start
    options = {"num_workers": workers}
    if workers:
        options.update(prefetch_factor=2, multiprocessing_context=cache.worker_start_method or "fork",
                       persistent_workers=False)
    loader = torch.utils.data.DataLoader(SampleViews(cache), batch_size=None, shuffle=False, **options)
    iterator = iter(loader)
    next(iterator)  # worker start-up is not part of the epoch
    start = time.perf_counter()
    count = 1 + sum(1 for _ in iterator)
    return (count - 1) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2, help="passes over the samples for the per-read times")
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "bench_remote")
    args = parser.parse_args()
    torch.set_num_threads(1)
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    local = StoreLocation.parse(args.dir / "full.zarr")
    tokens = [f"bench-{i:04d}" for i in range(args.samples)]
    write_random_cache(local.path, LAYERS, GRID, HEATMAP_SHAPE, tokens, views=1)
    print(machine_header())
    with SeaweedS3(args.dir / "s3") as server:
        import os

        os.environ.update(server.env())
        remote = StoreLocation.parse(server.url("full.zarr"))
        stored = copy_store(local, remote)
        print(f"\nstore: {args.samples} sample-views, {stored / 1e6 / args.samples:.1f} MB stored per sample-view "
              f"(fp16 + zstd), S3 at {server.endpoint}\n")
        stores = [("local disk", local), ("S3, obstore", remote),
                  ("S3, fsspec (s3fs)", StoreLocation.parse(server.url("full.zarr"), {"backend": "fsspec"}))]
        print("| store | read+decode, arrays one by one (ms) | read+decode, arrays concurrently (ms) | "
              "DataLoader, main process (views/s) | DataLoader, 2 workers, prefetch 2 (views/s) |")
        print("|---|---|---|---|---|")
        for name, location in stores:
            cells = []
            for concurrent in (False, True):
                times = read_times(location, concurrent, args.rounds)
                cells.append(f"{statistics.median(times):.0f} (p10 {sorted(times)[len(times) // 10]:.0f}, "
                             f"p90 {sorted(times)[len(times) * 9 // 10]:.0f})")
            for workers in (0, 2):
                cells.append(f"{epoch_rate(location, workers):.1f}")
            print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
