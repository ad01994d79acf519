"""Teacher extraction with 1 process against 2 torchrun ranks on CPU, on a real dataroot and trained teacher.

Runs the real `distillbev extract-teacher` command three ways over the same split and views:
  1 process, 1 torch thread;  1 process, 2 torch threads;  torchrun 2 ranks (gloo), 1 torch thread each;
optionally with the store on S3 (a SeaweedFS server on 127.0.0.1, `--s3`). It reports wall time from launch to
exit (process start-up and pre-flight included, as a user sees it) and sample-views per second over the
extraction itself (the command's own report), and checks that the 2-rank store equals the 1-process 1-thread
store chunk for chunk (the same thread count per process gives the same bytes).

    python benchmarks/extract_ranks.py --dataroot DIR/data --checkpoint DIR/teacher/latest.pth \
        --config configs/synthetic/teacher.yaml --split synth_train --views 1 --s3

where DIR is a world-1 main job's output folder (`distillbev demo --world 1 --out DIR`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import machine_header  # noqa: E402
from s3_server import SeaweedS3  # noqa: E402

from distillbev.pipeline.cache.location import StoreLocation  # noqa: E402

NOT_CHUNKS = ("zarr.json", "distillbev_cache.json", "distillbev.lock")


def chunks(location: str) -> dict[str, bytes]:
    store = StoreLocation.parse(location)
    return {key: store.get(key) for key in store.keys() if key.rsplit("/", 1)[-1] not in NOT_CHUNKS}


def extract(args: argparse.Namespace, cache: str, ranks: int, threads: int, env: dict) -> tuple[float, float]:
    """(wall seconds, views/s reported by the command)."""
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
                 "-m", "distillbev.cli"] if ranks > 1 else [sys.executable, "-m", "distillbev.cli"])
    command = [*launcher, "extract-teacher", "--config", str(args.config), "--dataroot", str(args.dataroot),
               "--checkpoint", str(args.checkpoint), "--split", args.split, "--views", str(args.views),
               "--cache", cache, "--batch-size", "1"]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": str(threads)})
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    rate = re.search(r"([0-9.]+) views/s", result.stdout)
    return wall, float(rate.group(1)) if rate else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataroot", type=Path, required=True)
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=Path("configs/synthetic/teacher.yaml"))
    parser.add_argument("--split", default="synth_train")
    parser.add_argument("--views", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=Path(tempfile.gettempdir()) / "bench_ranks")
    parser.add_argument("--s3", action="store_true", help="also extract into S3 (SeaweedFS on 127.0.0.1)")
    args = parser.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    args.dir.mkdir(parents=True)
    print(machine_header())
    runs = [("1 process, 1 thread", 1, 1), ("1 process, 2 threads", 1, 2), ("torchrun 2 ranks x 1 thread", 2, 1)]
    targets = [("local disk", lambda name: str(args.dir / f"{name}.zarr"), dict(os.environ))]
    server = None
    if args.s3:
        server = SeaweedS3(args.dir / "s3").start()
        targets.append(("S3 (loopback)", server.url, {**os.environ, **server.env()}))
    try:
        print(f"\n{args.split} of {args.dataroot}, {args.views} view(s) per sample, batch 1\n")
        print("| store | run | wall time, launch to exit (s) | extraction (sample-views/s) | store equals the "
              "1-process 1-thread one |")
        print("|---|---|---|---|---|")
        for store_name, make, env in targets:
            if server is not None:
                os.environ.update(server.env())
            stores = {}
            for label, ranks, threads in runs:
                cache = make(f"r{ranks}t{threads}")
                wall, rate = extract(args, cache, ranks, threads, env)
                stores[label] = cache
                equal = ("(reference)" if label == runs[0][0] else
                         "yes" if chunks(cache) == chunks(stores[runs[0][0]]) else "no")
                print(f"| {store_name} | {label} | {wall:.1f} | {rate:.2f} | {equal} |", flush=True)
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
