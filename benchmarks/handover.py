"""What it costs the training process to receive a batch from a DataLoader worker, by the number of tensors in it.

    OMP_NUM_THREADS=1 python benchmarks/handover.py [--batches 8] [--out FILE]

A worker hands each tensor over as its own shared-memory segment whose file descriptor crosses a socket, so the
training process pays per tensor, not per byte. Each row times `--batches` batches received from one worker (fork)
that has its next batches ready (the loader prefetches 4 and the worker is given a second to fill them): the wall
and CPU time of `next(iterator)` in the training process, median over batches. Rows: 1, 15 (a baseline student's
batch) and 49 (a distilled one's) tensors of a (80, 80) float32 map each, then the same 49 with a (2, 192, 80, 80)
float32 feature map beside them, each as separate tensors and as views of one block (`share_one_block`, as the
training loaders' collate does since 2026-12-05).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils.data import DataLoader, Dataset

from common import machine_header
from distillbev.pipeline.data.handover import share_one_block_in_worker


class _Batches(Dataset):
    def __len__(self) -> int:
        return 10_000

    def __getitem__(self, index: int) -> int:
        return index


class _Collate:
    """Build one batch of `maps` (80, 80) maps (+ a neck-sized feature map), as separate tensors or one block."""

    def __init__(self, maps: int, feature: bool, one_block: bool) -> None:
        self.maps, self.feature, self.one_block = maps, feature, one_block

    def __call__(self, items: list[int]):
        tensors = [torch.full((80, 80), float(i)) for i in range(self.maps)]
        if self.feature:
            tensors.append(torch.zeros(2, 192, 80, 80))
        return share_one_block_in_worker(tensors) if self.one_block else tensors


def time_receive(maps: int, feature: bool, one_block: bool, batches: int) -> tuple[float, float]:
    """(wall ms, CPU ms) of receiving one batch, medians over `batches`."""
    loader = DataLoader(_Batches(), batch_size=1, num_workers=1, collate_fn=_Collate(maps, feature, one_block),
                        prefetch_factor=4, multiprocessing_context="fork")
    iterator = iter(loader)
    walls, cpus = [], []
    for _ in range(batches):
        time.sleep(1.0)  # the worker fills its prefetch queue: only the handover is timed
        wall, cpu = time.perf_counter(), time.process_time()
        received = next(iterator)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        assert float(received[min(1, maps - 1)][0, 0]) == min(1, maps - 1)
    del iterator
    return 1e3 * statistics.median(walls), 1e3 * statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=8, help="batches timed per row")
    parser.add_argument("--out", default=None, help="also write the markdown here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = [machine_header(), "",
             f"one DataLoader worker (fork), batches ready before each is asked for; median of {args.batches} batches",
             "", "| tensors in the batch | feature map (2, 192, 80, 80) | handed over as | wall ms | CPU ms |",
             "|---|---|---|---|---|"]
    rows = [(1, False, False), (15, False, False), (49, False, False), (49, False, True), (49, True, False),
            (49, True, True)]
    for maps, feature, one_block in rows:
        wall, cpu = time_receive(maps, feature, one_block, args.batches)
        lines.append(f"| {maps + feature} | {'yes' if feature else 'no'} | "
                     f"{'one block' if one_block else 'separate tensors'} | {wall:.2f} | {cpu:.2f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write(text + "\n")


if __name__ == "__main__":
    main()
