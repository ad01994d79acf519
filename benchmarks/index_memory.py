"""Resident memory of DataLoader workers: the flat split index against a dataset that holds the devkit object.

A dataroot as large as this machine can make is built by replicating the tables of an existing nuScenes-format
dataroot `--copies` times (new tokens, scene names and logs; the sensor files are shared through symlinks), so
the tables grow like a bigger dataset while the disk does not. Then, in a fresh Python process per variant:

- `index`: `NuScenesDetectionDataset` as shipped (the devkit tables are read once into a `SplitIndex`, then
  dropped);
- `devkit`: the same dataset with the devkit `NuScenes` object kept on it and, per item, the table lookups a
  devkit-backed loader does (sample, LiDAR/sweep sample_data with calibration and ego pose, annotations with
  their velocity), as distillbev's loader did before the index.

Each variant iterates `--batches` batches of a DataLoader with `--workers` workers and then reads, for the main
process and every worker, RSS, PSS (shared pages split between the processes sharing them) and USS (pages only
this process holds) from /proc/<pid>/smaps_rollup. The total PSS is the memory the job really costs.

    python benchmarks/index_memory.py --dataroot DIR/data --version v1.0-synthetic --copies 100

where DIR is a main job's output folder (`distillbev demo --out DIR`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPLICATED = ("scene", "sample", "sample_data", "sample_annotation", "instance", "ego_pose", "log")
SHARED = ("category", "attribute", "visibility", "sensor", "calibrated_sensor", "map")


def replicate(dataroot: Path, version: str, copies: int, out: Path) -> dict:
    """Write a dataroot at `out` whose tables are `copies` renamed copies of `dataroot`'s; returns counts."""
    if out.exists():
        shutil.rmtree(out)
    (out / version).mkdir(parents=True)
    for folder in ("samples", "sweeps", "maps"):
        if (dataroot / folder).exists():
            (out / folder).symlink_to((dataroot / folder).resolve())
    tables = {name: json.loads((dataroot / version / f"{name}.json").read_text()) for name in REPLICATED + SHARED}
    own = {record["token"] for name in REPLICATED for record in tables[name]}

    def rename(value, copy: int):
        if isinstance(value, str) and value in own:
            return f"{value[:-6]}{copy:06x}" if copy else value
        if isinstance(value, list):
            return [rename(v, copy) for v in value]
        if isinstance(value, dict):
            return {k: rename(v, copy) for k, v in value.items()}
        return value

    out_tables = {name: [] for name in REPLICATED}
    for copy in range(copies):
        for name in REPLICATED:
            for record in tables[name]:
                record = rename(record, copy)
                if name in ("scene", "log") and copy:
                    key = "name" if name == "scene" else "logfile"
                    record[key] = f"{record[key]}-copy{copy}"
                out_tables[name].append(record)
    logs = [record["token"] for record in out_tables["log"]]
    for record in tables["map"]:
        record["log_tokens"] = logs
    for name in REPLICATED:
        (out / version / f"{name}.json").write_text(json.dumps(out_tables[name]))
    for name in SHARED:
        (out / version / f"{name}.json").write_text(json.dumps(tables[name]))
    splits = json.loads((dataroot / version / "splits.json").read_text())
    splits = {split: [name if copy == 0 else f"{name}-copy{copy}" for copy in range(copies) for name in names]
              for split, names in splits.items()}
    (out / version / "splits.json").write_text(json.dumps(splits))
    return {name: len(out_tables[name]) for name in REPLICATED} | {
        "table_bytes": sum(p.stat().st_size for p in (out / version).glob("*.json"))}


def memory_of(pid: int) -> dict[str, float]:
    """RSS, PSS and USS of one process in MB, from /proc/<pid>/smaps_rollup."""
    values = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                values[parts[0][:-1]] = int(parts[1]) / 1024.0
    return {"rss": values["Rss"], "pss": values["Pss"],
            "uss": values.get("Private_Clean", 0.0) + values.get("Private_Dirty", 0.0)}


def measure(variant: str, dataroot: str, version: str, split: str, workers: int, batches: list[int]) -> dict:
    """Run in a fresh process: build the dataset, iterate, read the memory of main + workers after each number of
    `batches` (ascending)."""
    import gc

    import torch

    from distillbev.pipeline.data.collate import collate_samples
    from distillbev.pipeline.data.config import DataConfig
    from distillbev.pipeline.data.dataset import NuScenesDetectionDataset
    from distillbev.pipeline.data.loading import load_nuscenes

    class DevkitHeldDataset(NuScenesDetectionDataset):
        """The shipped dataset plus a devkit object on it, touched per item as a devkit-backed loader does."""

        def __init__(self, config, split, mode, nusc):
            super().__init__(config, split, mode, nusc=nusc)
            self.nusc = nusc

        def get(self, index, bev_aug=None, rng=None):
            nusc = self.nusc
            sample = nusc.get("sample", self.sample_tokens[index])
            record = nusc.get("sample_data", sample["data"]["LIDAR_TOP"])
            for _ in range(self.config.num_sweeps + 1):
                nusc.get("calibrated_sensor", record["calibrated_sensor_token"])
                nusc.get("ego_pose", record["ego_pose_token"])
                if not record["prev"]:
                    break
                record = nusc.get("sample_data", record["prev"])
            for token in sample["anns"]:
                nusc.get("sample_annotation", token)
                nusc.box_velocity(token)
            return super().get(index, bev_aug, rng)

    config = DataConfig(dataroot=dataroot, version=version, num_sweeps=9, load_images=False,
                        point_cloud_range=(-51.2, -51.2, -5.0, 51.2, 51.2, 3.0))
    start = time.perf_counter()
    nusc = load_nuscenes(dataroot, version)
    load_seconds = time.perf_counter() - start
    start = time.perf_counter()
    if variant == "devkit":
        dataset = DevkitHeldDataset(config, split, "train", nusc)
    else:
        dataset = NuScenesDetectionDataset(config, split, "train", nusc=nusc)
    build_seconds = time.perf_counter() - start
    del nusc
    gc.collect()
    main_before = memory_of(os.getpid())
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=True, num_workers=workers,
                                         collate_fn=collate_samples, generator=torch.Generator().manual_seed(0))
    iterator = iter(loader)
    snapshots, done = {}, 0
    for target in batches:
        for _ in range(target - done):
            next(iterator)
        done = target
        worker_pids = [w.pid for w in iterator._workers]  # the DataLoader's worker processes
        snapshots[target] = {"main": memory_of(os.getpid())} | {f"worker {k}": memory_of(pid)
                                                                for k, pid in enumerate(worker_pids)}
    del iterator
    return {"variant": variant, "samples": len(dataset), "devkit_load_s": load_seconds, "build_s": build_seconds,
            "index_mb": dataset.index.nbytes / 2 ** 20, "main_before_mb": main_before, "snapshots": snapshots}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataroot", type=Path, required=True, help="nuScenes-format dataroot to replicate")
    parser.add_argument("--version", default="v1.0-synthetic")
    parser.add_argument("--split", default="synth_train")
    parser.add_argument("--copies", type=int, default=100, help="copies of the tables (1: the dataroot as is)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--batches", default="200,1000", help="measure after these many batches of 2 (ascending)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "distillbev_index_memory")
    parser.add_argument("--variant", choices=["index", "devkit"], help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(measure(args.variant, str(args.dataroot), args.version, args.split, args.workers,
                                 sorted(int(b) for b in args.batches.split(",")))))
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine_header

    print(machine_header())
    start = time.perf_counter()
    counts = replicate(args.dataroot, args.version, args.copies, args.work / "dataroot")
    print(f"\ndataroot: {args.copies} copies of {args.dataroot} tables in {time.perf_counter() - start:.0f} s: "
          f"{counts['sample']} samples, {counts['sample_data']} sample_data, {counts['sample_annotation']} "
          f"annotations, {counts['table_bytes'] / 2 ** 20:.0f} MB of tables; split {args.split}, "
          f"{args.workers} workers, batches of 2 (LiDAR key frame + 9 sweeps), measured after {args.batches} "
          f"batches\n")
    results = []
    for variant in ("devkit", "index"):
        out = subprocess.run([sys.executable, __file__, "--variant", variant, "--dataroot",
                              str(args.work / "dataroot"), "--version", args.version, "--split", args.split,
                              "--workers", str(args.workers), "--batches", args.batches],
                             capture_output=True, text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print_table(["variant", "samples in split", "devkit load s", "dataset build s", "index MB"],
                [[r["variant"], r["samples"], f"{r['devkit_load_s']:.1f}", f"{r['build_s']:.1f}",
                  f"{r['index_mb']:.1f}"] for r in results])
    print_table(["variant", "after batches", "process", "RSS MB", "PSS MB", "USS MB"],
                [[r["variant"], target, name, f"{m['rss']:.0f}", f"{m['pss']:.0f}", f"{m['uss']:.0f}"]
                 for r in results for target, processes in r["snapshots"].items() for name, m in processes.items()])
    totals = []
    for r in results:
        for target, processes in r["snapshots"].items():
            workers = [m for name, m in processes.items() if name != "main"]
            totals.append([r["variant"], target, f"{sum(m['pss'] for m in processes.values()):.0f}",
                           f"{sum(m['uss'] for m in workers) / len(workers):.0f}"])
    print_table(["variant", "after batches", "total PSS MB (main + workers)", "worker USS MB (mean)"], totals)


def print_table(header: list[str], rows: list[list]) -> None:
    """One markdown table, preceded by a blank line."""
    print("\n| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")

if __name__ == "__main__":
    main()
