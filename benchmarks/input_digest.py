"""What the input digests cost: the teacher's point loading with and without the SHA-256 of every file read.

extract-teacher hashes each LiDAR (and virtual-point) file from the bytes its loader has just read
(`pipeline/data/digest.py`), once per sample-view. This loads the first `--samples` samples of a split in test mode
(key frame + `--num-sweeps` nearest sweeps, no images), alternating plain and hashed loads `--repeats` times after
one warm-up pass (so both read from the page cache), and prints per sample: the files and bytes read, the median
load time of each, the difference, and the same bytes hashed alone. `train-student --verify-data` re-reads files
from disk (`file_digest`), so its cost is the last column on a warm cache, or the disk's read rate on a cold one.

    python benchmarks/input_digest.py --dataroot DATAROOT --split synth_train --num-sweeps 9
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import time

from distillbev.pipeline.data.config import DataConfig
from distillbev.pipeline.data.dataset import NuScenesDetectionDataset
from distillbev.pipeline.data.digest import InputDigests, file_digest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataroot", required=True)
    parser.add_argument("--version", default="v1.0-synthetic")
    parser.add_argument("--split", default="synth_train")
    parser.add_argument("--num-sweeps", type=int, default=9, help="sweeps per sample (nuScenes teachers read 9)")
    parser.add_argument("--samples", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    config = DataConfig(dataroot=args.dataroot, version=args.version, num_sweeps=args.num_sweeps,
                        sweep_candidates=max(args.num_sweeps, 10), load_images=False)
    dataset = NuScenesDetectionDataset(config, args.split, "test")
    samples = range(min(args.samples, len(dataset)))
    files: list[str] = []
    for index in samples:  # warm-up: the page cache, the index's pages
        digests = InputDigests()
        dataset.get(index, digests=digests)
        files += digests.paths
    plain, hashed = [], []
    for _ in range(args.repeats):
        for index in samples:
            start = time.perf_counter()
            dataset.get(index)
            plain.append(time.perf_counter() - start)
            start = time.perf_counter()
            dataset.get(index, digests=InputDigests())
            hashed.append(time.perf_counter() - start)
    contents = [open(path, "rb").read() for path in files]
    start = time.perf_counter()
    for _ in range(args.repeats):
        for data in contents:
            hashlib.sha256(data).digest()
    hash_only = (time.perf_counter() - start) / args.repeats / len(samples)
    start = time.perf_counter()
    for path in files:
        file_digest(path)
    from_disk = (time.perf_counter() - start) / len(samples)
    per_sample_bytes = sum(len(data) for data in contents) / len(samples)
    plain_ms, hashed_ms = statistics.median(plain) * 1e3, statistics.median(hashed) * 1e3
    print(f"{len(samples)} samples of {args.split}, {len(files) / len(samples):.1f} files and "
          f"{per_sample_bytes / 1e6:.2f} MB per sample, {args.repeats} repeats, page cache warm\n")
    print("| load (ms/sample) | load + SHA-256 (ms/sample) | difference | SHA-256 alone (ms/sample) | "
          "re-hash from disk, `--verify-data` (ms/sample) |")
    print("|---:|---:|---:|---:|---:|")
    extra = f"{hashed_ms - plain_ms:+.1f} ({(hashed_ms / plain_ms - 1) * 100:+.0f} %)"
    print(f"| {plain_ms:.1f} | {hashed_ms:.1f} | {extra} | {hash_only * 1e3:.1f} "
          f"({per_sample_bytes / hash_only / 1e9:.2f} GB/s) | {from_disk * 1e3:.1f} |")


if __name__ == "__main__":
    main()
