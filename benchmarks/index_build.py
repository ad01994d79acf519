"""The saved split index at v1.0-trainval scale: build once, then map it from every process.

A small world-2 synthetic dataroot (six cameras, LiDAR sweeps) is replicated with `index_memory.replicate` (new
tokens, the sensor files shared through symlinks) until its train split holds at least `--train-samples` key frames
(v1.0-trainval: 28,130). Then, each in a fresh Python process:

- `build`: `open_split_index` of the train split with six cameras and 10 sweep candidates into an empty index
  folder: the devkit load, the index build and the save timed apart, the saved folder's size, the peak RSS;
- `map`: `open_split_index` of the same split (the saved index is mapped), then `NuScenesDetectionDataset` on it and
  one byte read from every page of the index: the times and the peak RSS;
- `8 x map` / `8 x read`: 8 processes that, released together, open the dataset on the saved index, mapped
  (`SplitIndex.load` with mmap, the store's path) or read into private memory (`mmap=False`, for comparison), touch
  every page, and hold it while their PSS (shared pages split between the processes sharing them) is read from
  /proc/<pid>/smaps_rollup; "index PSS" sums only the mappings of the index's files.

    python benchmarks/index_build.py                    # about 10 minutes on 2 cores
    python benchmarks/index_build.py --train-samples 3000 --processes 4   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VERSION = "v1.0-synthetic"
SPLIT = "synth_train"


def peak_rss_mb() -> float:
    """VmHWM of this process in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def memory_of(pid: int, index_folder: str) -> dict[str, float]:
    """RSS, PSS, USS of a process and the PSS of its mappings of files under `index_folder`, in MB."""
    sys.path.insert(0, str(HERE))
    from index_memory import memory_of as rollup

    values = rollup(pid)
    index_pss, current = 0.0, None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if not parts:
                continue
            if "-" in parts[0] and len(parts) >= 5 and not parts[0].endswith(":"):  # a mapping's header line
                current = parts[5] if len(parts) >= 6 else ""
            elif parts[0] == "Pss:" and current and current.startswith(index_folder):
                index_pss += int(parts[1]) / 1024.0
    return values | {"index_pss": index_pss}


def data_config(dataroot: str, index_dir: str):
    from distillbev.pipeline.data.config import CAMERA_CHANNELS, DataConfig

    return DataConfig(dataroot=dataroot, version=VERSION, train_split=SPLIT, load_images=True,
                      camera_channels=CAMERA_CHANNELS, num_sweeps=9, sweep_candidates=10, index_dir=index_dir)


def touch_pages(index) -> int:
    """Read one byte of every page of every array (so the pages are resident); returns the bytes covered."""
    import numpy as np

    total = 0
    for array in index.arrays().values():
        raw = np.asarray(array).reshape(-1).view(np.uint8) if array.size else np.zeros(0, np.uint8)
        int(raw[::4096].sum())
        total += raw.size
    return total


# --------------------------------------------------------------------------------------------- child processes
def child_build(dataroot: str, index_dir: str) -> dict:
    from distillbev.pipeline.data import index_store
    from distillbev.pipeline.data.index import SplitIndex

    timings: dict[str, float] = {}

    def timed(name, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = function(*args, **kwargs)
            timings[name] = time.perf_counter() - start
            return result
        return wrapper

    index_store.load_nuscenes = timed("devkit_load_s", index_store.load_nuscenes)
    index_store.build_split_index = timed("build_s", index_store.build_split_index)
    SplitIndex.save = timed("save_s", SplitIndex.save)
    start = time.perf_counter()
    index = index_store.open_split_index(data_config(dataroot, index_dir), SPLIT, progress=False)
    total = time.perf_counter() - start
    folder = Path(index.tokens.filename).parent
    return timings | {"total_s": total, "samples": len(index), "folder": str(folder),
                      "folder_mb": sum(p.stat().st_size for p in folder.iterdir()) / 2 ** 20,
                      "peak_rss_mb": peak_rss_mb()}


def child_map(dataroot: str, index_dir: str) -> dict:
    from distillbev.pipeline.data.dataset import NuScenesDetectionDataset
    from distillbev.pipeline.data.index_store import open_split_index

    config = data_config(dataroot, index_dir)
    start = time.perf_counter()
    index = open_split_index(config, SPLIT, progress=False)
    mapped = time.perf_counter() - start
    start = time.perf_counter()
    dataset = NuScenesDetectionDataset(config, SPLIT, "train", index=index)
    constructed = time.perf_counter() - start
    start = time.perf_counter()
    covered = touch_pages(dataset.index)
    touched = time.perf_counter() - start
    return {"map_s": mapped, "dataset_s": constructed, "touch_s": touched, "samples": len(dataset),
            "index_mb": covered / 2 ** 20, "peak_rss_mb": peak_rss_mb()}


def child_hold(dataroot: str, index_dir: str, folder: str, mmap: bool) -> None:
    """One of the N processes: report ready, wait for "go", open, report, hold until stdin closes."""
    from distillbev.pipeline.data.dataset import NuScenesDetectionDataset
    from distillbev.pipeline.data.index import SplitIndex

    config = data_config(dataroot, index_dir)
    print("ready", flush=True)
    sys.stdin.readline()
    start = time.time()
    index = SplitIndex.load(folder, dataroot=dataroot, mmap=mmap)
    dataset = NuScenesDetectionDataset(config, SPLIT, "train", index=index)
    touch_pages(dataset.index)
    print(json.dumps({"start": start, "end": time.time(), "pid": os.getpid(), "peak_rss_mb": peak_rss_mb()}),
          flush=True)
    sys.stdin.readline()  # held until the parent has read the memory of every process


def run_child(step: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", step, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{step} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_together(count: int, dataroot: str, index_dir: str, folder: str, mmap: bool) -> dict:
    """`count` processes released together; their wall time, per-process peak and total PSS."""
    args = [sys.executable, __file__, "--child", "hold", dataroot, index_dir, folder, "1" if mmap else "0"]
    processes = [subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                 for _ in range(count)]
    try:
        for p in processes:
            assert p.stdout.readline().strip() == "ready"
        for p in processes:
            p.stdin.write("go\n")
            p.stdin.flush()
        results = [json.loads(p.stdout.readline()) for p in processes]
        memory = [memory_of(r["pid"], folder) for r in results]
    finally:
        for p in processes:
            p.stdin.close()
            p.wait(timeout=60)
    return {"wall_s": max(r["end"] for r in results) - min(r["start"] for r in results),
            "slowest_s": max(r["end"] - r["start"] for r in results),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            "pss_mb": sum(m["pss"] for m in memory), "index_pss_mb": sum(m["index_pss"] for m in memory),
            "uss_mb": sum(m["uss"] for m in memory) / count}


# ---------------------------------------------------------------------------------------------------- main
def make_dataroot(work: Path, scenes: int, samples_per_scene: int) -> tuple[Path, bool]:
    """A small world-2 dataroot (one val scene), reused when a finished one is already there; (path, reused)."""
    small = work / "small"
    if (small / VERSION / "splits.json").is_file():
        return small, True
    subprocess.run([sys.executable, "-m", "distillbev.cli", "make-synthetic", "--out", str(small), "--scenes",
                    str(scenes), "--samples-per-scene", str(samples_per_scene), "--val-scenes", "1", "--world", "2",
                    "--no-masks", "--no-progress", "--overwrite"], check=True, capture_output=True)
    return small, False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-samples", type=int, default=28_130, help="at least this many train key frames")
    parser.add_argument("--scenes", type=int, default=4, help="scenes of the small dataroot (one is val)")
    parser.add_argument("--samples-per-scene", type=int, default=10)
    parser.add_argument("--processes", type=int, default=8, help="processes mapping the saved index at once")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "distillbev_index_build")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        step, *rest = args.child
        if step == "hold":
            child_hold(rest[0], rest[1], rest[2], rest[3] == "1")
        else:
            print(json.dumps({"build": child_build, "map": child_map}[step](*rest)))
        return

    sys.path.insert(0, str(HERE))
    from common import machine_header
    from index_memory import replicate

    print(machine_header())
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    small, reused = make_dataroot(args.work, args.scenes, args.samples_per_scene)
    made = time.perf_counter() - start
    per_copy = len(json.loads((small / VERSION / "splits.json").read_text())[SPLIT]) * args.samples_per_scene
    copies = math.ceil(args.train_samples / per_copy)
    start = time.perf_counter()
    counts = replicate(small, VERSION, copies, args.work / "dataroot")
    replicated = time.perf_counter() - start
    dataroot, index_dir = str(args.work / "dataroot"), str(args.work / "index")
    shutil.rmtree(index_dir, ignore_errors=True)
    origin = "reused from an earlier run" if reused else f"made in {made:.0f} s"
    print(f"\ndataroot: {args.scenes} world-2 scenes x {args.samples_per_scene} key frames (six cameras, sweeps; "
          f"{origin}), tables replicated {copies} times in {replicated:.0f} s: {counts['sample']:,} samples "
          f"({copies * per_copy:,} in {SPLIT}), {counts['sample_data']:,} sample_data, "
          f"{counts['sample_annotation']:,} annotations, {counts['ego_pose']:,} ego poses, "
          f"{counts['table_bytes'] / 2 ** 20:,.0f} MB of tables. Index: split {SPLIT}, six cameras, 10 sweep "
          f"candidates.\n")

    build = run_child("build", dataroot, index_dir)
    mapped = run_child("map", dataroot, index_dir)
    together = {mmap: run_together(args.processes, dataroot, index_dir, build["folder"], mmap)
                for mmap in (True, False)}
    print("| step (fresh process each) | seconds | peak RSS MB | notes |")
    print("|---|---|---|---|")
    print(f"| devkit load (`NuScenes`) | {build['devkit_load_s']:.1f} | | |")
    print(f"| index build (`build_split_index`) | {build['build_s']:.1f} | | {build['samples']:,} samples |")
    print(f"| save (`SplitIndex.save`) | {build['save_s']:.2f} | | folder of {build['folder_mb']:.1f} MB |")
    print(f"| first `open_split_index` (load + build + save) | {build['total_s']:.1f} | {build['peak_rss_mb']:,.0f} "
          f"| one process |")
    print(f"| later `open_split_index` (map) | {mapped['map_s']:.3f} | {mapped['peak_rss_mb']:,.0f} | then the "
          f"dataset on it {mapped['dataset_s']:.2f} s, every page read {mapped['touch_s']:.2f} s "
          f"({mapped['index_mb']:.1f} MB) |")
    print(f"\n| {args.processes} processes at once | wall s | slowest process s | peak RSS MB (max) | total PSS MB | "
          f"index PSS MB (total) | USS MB (mean) |")
    print("|---|---|---|---|---|---|---|")
    for mmap, name in ((True, "map the saved index (mmap)"), (False, "read it into memory (no mmap)")):
        r = together[mmap]
        print(f"| {name} | {r['wall_s']:.2f} | {r['slowest_s']:.2f} | {r['peak_rss_mb']:,.0f} | {r['pss_mb']:,.0f} | "
              f"{r['index_pss_mb']:.1f} | {r['uss_mb']:,.0f} |")


if __name__ == "__main__":
    main()
