"""Memory and time of BEVFormer's spatial cross-attention (SCA) at the full nuScenes shapes, and the cost of the
Hungarian matching the BEVFormer head runs on the CPU.

SCA: batch 1, a 200x200 BEV (+-51.2 m at 0.512 m, z in [-5, 3], 4 z anchors per pillar) seen by the six cameras of
the real nuScenes rig (pipeline/synthetic/rig.py) at 928x1600, 4 image levels at strides 8/16/32/64, 256 channels,
8 heads, 8 points. Query, value and the weights are random (the sampling offsets and attention weights get small
random weights so the points scatter as in training); which queries hit which camera comes from the real rig.

Each variant runs in a fresh Python process: build the inputs, note the memory, run the forward pass, note the
memory still held (what the layer keeps for its backward pass: with L layers, L times this is held at once) and the
peak so far, run the backward pass, note the peak. On the CPU the memory is the resident set size (RSS, the peak from
`resource.getrusage(RUSAGE_SELF).ru_maxrss`); on CUDA the caching allocator's allocated bytes. Memory columns are GiB
above what was held before the forward pass (inputs, weights, the process). The outputs and the input and weight
gradients of each variant are compared with the first variant's (max |difference|).

`--bev-cells N` runs a smaller BEV over the same extent (cell size 102.4 m / N), for a machine whose memory cannot hold
the unchunked layer: the per-camera query count K shrinks with N^2 and the K-proportional memory with it.
`--encoder` also runs the whole encoder (6 layers of TSA, SCA and FFN, with a previous BEV) forward and backward at
the encoder config's defaults, the training memory of BEVFormer's BEV stage at batch 1 without the image backbone.

Matching: `assign_queries` (focal class cost + L1 box cost, scipy's linear_sum_assignment) for 900 queries and 40 GT
boxes of 10 classes, as the head calls it once per decoder layer (6) and sample per training step.

    python benchmarks/bevformer_memory.py                       # every SCA variant at full size
    python benchmarks/bevformer_memory.py --bev-cells 100       # a quarter of the queries
    python benchmarks/bevformer_memory.py --device cuda --encoder
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

GIB = 1024 ** 3
STRIDES = (8, 16, 32, 64)
IMAGE_SIZE = (928, 1600)
CHANNELS = 256
VARIANTS = {  # name -> (query_chunk, recompute)
    "unchunked (before)": (0, False),
    "chunks of 2048": (2048, False),
    "chunks of 4096 + recompute": (4096, True),
    "chunks of 2048 + recompute (default)": (2048, True),
    "chunks of 1024 + recompute": (1024, True),
}


class MemoryMeter:
    """Bytes held now and at the peak: RSS on the CPU, the CUDA caching allocator's allocated bytes on a GPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def held(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS in /proc/self/status")

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)


def nuscenes_geometry(device: torch.device):
    """CameraGeometry of batch 1 on the real rig: 1600x900 intrinsics, the image padded at the bottom to 928."""
    from distillbev.pipeline.student.view_transformer import CameraGeometry
    from distillbev.pipeline.synthetic.rig import CAMERA_CHANNELS, RIG

    lidar_from_ego = np.linalg.inv(RIG["LIDAR_TOP"].ego_from_sensor)
    camera_to_lidar = np.stack([lidar_from_ego @ RIG[name].ego_from_sensor for name in CAMERA_CHANNELS])
    intrinsics = np.stack([RIG[name].intrinsics for name in CAMERA_CHANNELS])
    cameras = len(CAMERA_CHANNELS)
    return CameraGeometry(intrinsics=torch.tensor(intrinsics, dtype=torch.float32, device=device)[None],
                          camera_to_lidar=torch.tensor(camera_to_lidar, dtype=torch.float32, device=device)[None],
                          image_aug=torch.eye(3, device=device).expand(1, cameras, 3, 3),
                          bev_aug=torch.eye(4, device=device)[None])


def bev_range(bev_cells: int):
    from distillbev.pipeline.geometry.bev import BEVRange

    return BEVRange(x_min=-51.2, x_max=51.2, y_min=-51.2, y_max=51.2, resolution=102.4 / bev_cells, z_min=-5.0,
                    z_max=3.0)


def level_shapes() -> list[tuple[int, int]]:
    return [(IMAGE_SIZE[0] // stride, IMAGE_SIZE[1] // stride) for stride in STRIDES]


def measure(meter: MemoryMeter, forward, backward) -> dict:
    """Runs forward() then backward(output); figures in bytes above the memory held before, and seconds."""
    meter.synchronize()
    meter.reset()
    before = meter.held()
    start = time.perf_counter()
    output = forward()
    meter.synchronize()
    forward_s = time.perf_counter() - start
    kept, forward_peak = meter.held(), meter.peak()
    backward_s = 0.0
    if backward is not None:
        start = time.perf_counter()
        backward(output)
        meter.synchronize()
        backward_s = time.perf_counter() - start
    figures = {"forward_s": forward_s, "backward_s": backward_s, "kept": kept - before,
               "forward_peak": forward_peak - before, "peak": meter.peak() - before}
    return output, figures


def run_layer(spec: dict) -> dict:
    """One SCA layer forward (+ backward when training) in this process."""
    from distillbev.pipeline.student.bevformer.spatial_cross_attention import (SpatialCrossAttention,
                                                                               pillar_points, project_pillars)

    device, train, cells = torch.device(spec["device"]), spec["train"], spec["bev_cells"]
    torch.manual_seed(0)
    shapes = level_shapes()
    length = sum(height * width for height, width in shapes)
    reference = project_pillars(pillar_points(bev_range(cells), 4, device), nuscenes_geometry(device), IMAGE_SIZE)
    longest = int(reference.hits.any(dim=-1).sum(dim=-1).max())
    module = SpatialCrossAttention(CHANNELS, num_heads=8, num_levels=len(shapes), num_points=8,
                                   query_chunk=spec["chunk"], recompute=spec["recompute"]).to(device)
    with torch.no_grad():
        module.attention.sampling_offsets.weight.normal_(std=0.01)
        module.attention.attention_weights.weight.normal_(std=0.01)
    query = torch.randn(1, cells * cells, CHANNELS, device=device, requires_grad=train)
    value = torch.randn(1, 6, length, CHANNELS, device=device, requires_grad=train)
    cotangent = torch.randn(1, cells * cells, CHANNELS, device=device)

    def forward():
        with torch.set_grad_enabled(train):
            return module(query, value, reference, shapes)

    output, figures = measure(MemoryMeter(device), forward,
                              (lambda result: result.backward(cotangent)) if train else None)
    figures.update(longest=longest, queries=cells * cells)
    if spec["out"]:
        tensors = {"output": output.detach().cpu()}
        if train:
            tensors.update(query_grad=query.grad.cpu(), value_grad=value.grad.cpu(),
                           offsets_weight_grad=module.attention.sampling_offsets.weight.grad.cpu())
        torch.save(tensors, spec["out"])
    return figures


def run_encoder(spec: dict) -> dict:
    """BEVFormer's whole encoder at the default settings, forward + backward, with a previous BEV."""
    from distillbev.pipeline.student.bevformer.config import BEVFormerConfig
    from distillbev.pipeline.student.bevformer.encoder import BEVFormerEncoder

    device, cells = torch.device(spec["device"]), spec["bev_cells"]
    torch.manual_seed(0)
    config = BEVFormerConfig(embed_dims=CHANNELS, bev=bev_range(cells))
    encoder = BEVFormerEncoder(config, num_cameras=6).to(device).train()
    features = [torch.randn(1, 6, CHANNELS, height, width, device=device, requires_grad=True)
                for height, width in level_shapes()]
    previous = torch.randn(1, CHANNELS, cells, cells, device=device)
    motion = torch.eye(4, device=device)[None]
    geometry = nuscenes_geometry(device)
    _, figures = measure(MemoryMeter(device),
                         lambda: encoder(features, geometry, IMAGE_SIZE, previous, motion),
                         lambda result: result.square().mean().backward())
    figures.update(layers=config.encoder.num_layers, chunk=config.encoder.spatial_query_chunk,
                   recompute=config.encoder.spatial_recompute)
    return figures


def run_child(spec: dict) -> dict:
    return run_encoder(spec) if spec["kind"] == "encoder" else run_layer(spec)


def spawn(spec: dict) -> tuple[dict | None, str]:
    """Runs one measurement in a fresh process: (figures, '') or (None, why it failed)."""
    result = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if result.returncode != 0:
        last = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "killed, no message"
        return None, f"failed (exit {result.returncode}: {last})"
    return json.loads(result.stdout.strip().splitlines()[-1]), ""


def max_difference(first: Path, other: Path) -> str:
    a, b = torch.load(first), torch.load(other)
    return ", ".join(f"{name} {float((a[name] - b[name]).abs().max()):.1e}" for name in a)


def time_matching(repeats: int, threads: int) -> tuple[float, float]:
    """(ms per assign_queries call, ms of linear_sum_assignment alone) at 900 queries x 40 boxes on the CPU with
    `threads` intra-op threads."""
    from distillbev.pipeline.heads.detr.matching import assign_queries, hungarian_assignment

    default = torch.get_num_threads()
    torch.set_num_threads(threads)
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(900, 10, generator=generator)
    codes = torch.randn(900, 10, generator=generator)
    gt_labels = torch.randint(0, 10, (40,), generator=generator)
    gt_codes = torch.randn(40, 10, generator=generator)
    cost = torch.rand(900, 40, generator=generator)
    assign_queries(logits, codes, gt_labels, gt_codes, 2.0, 0.25, 0.25, 2.0)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        assign_queries(logits, codes, gt_labels, gt_codes, 2.0, 0.25, 0.25, 2.0)
    total = (time.perf_counter() - start) / repeats
    start = time.perf_counter()
    for _ in range(repeats):
        hungarian_assignment(cost)
    solver = (time.perf_counter() - start) / repeats
    torch.set_num_threads(default)
    return total * 1e3, solver * 1e3


def print_layer_table(rows: list, cells: int, device: str) -> None:
    first = next((figures for _, _, figures, _ in rows if figures), None)
    if first:
        memory = "RSS" if device == "cpu" else "CUDA allocated memory"
        print(f"One SCA layer on {device}, batch 1, {first['queries']} BEV queries ({cells}x{cells}), 6 cameras at "
              f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, levels at strides {'/'.join(map(str, STRIDES))}, {CHANNELS} "
              f"channels, 8 heads x 8 points x 4 z anchors; longest camera K = {first['longest']} queries. "
              f"Memory: {memory} in GiB above what was held before the forward pass.")
        print()
    print("| variant | pass | forward s | backward s | kept after forward GiB | forward peak GiB | peak GiB | "
          "max abs difference vs the first row |")
    print("|---|---|---|---|---|---|---|---|")
    for name, train, figures, note in rows:
        mode = "forward+backward" if train else "forward, no grad"
        if figures is None:
            print(f"| {name} | {mode} | {note} | | | | | |")
            continue
        backward = f"{figures['backward_s']:.2f}" if train else "-"
        print(f"| {name} | {mode} | {figures['forward_s']:.2f} | {backward} | {figures['kept'] / GIB:.2f} | "
              f"{figures['forward_peak'] / GIB:.2f} | {figures['peak'] / GIB:.2f} | {note} |")
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bev-cells", type=int, default=200, help="BEV cells per side (200: BEVFormer-base)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS),
                        help="which SCA variants to run (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--eval", action="store_true", help="also run each variant's forward pass without gradients")
    parser.add_argument("--encoder", action="store_true",
                        help="also run the whole encoder forward + backward at the config defaults")
    parser.add_argument("--matching-repeats", type=int, default=200)
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one measurement, print its JSON
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import machine_header

    print(machine_header())
    print()
    runs = [(name, True) for name in args.variants] + ([(name, False) for name in args.variants] if args.eval else [])
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        reference_file = None
        for name, train in runs:
            chunk, recompute = VARIANTS[name]
            out = Path(folder) / f"{len(rows)}.pt" if train else None
            figures, note = spawn({"kind": "layer", "chunk": chunk, "recompute": recompute, "train": train,
                                   "bev_cells": args.bev_cells, "device": args.device,
                                   "out": str(out) if out else None})
            if figures is not None and out is not None:
                if reference_file is None:
                    reference_file, note = out, "(reference)"
                else:
                    note = max_difference(reference_file, out)
            rows.append((name, train, figures, note))
    print_layer_table(rows, args.bev_cells, args.device)

    if args.encoder:
        figures, note = spawn({"kind": "encoder", "bev_cells": args.bev_cells, "device": args.device})
        print(f"The whole encoder on {args.device} ({args.bev_cells}x{args.bev_cells} BEV, the rest as above, a "
              f"previous BEV for TSA, batch 1, no image backbone), forward + backward at the encoder defaults:")
        print()
        print("| layers | SCA query chunk | recompute | forward s | backward s | kept after forward GiB | "
              "peak GiB |")
        print("|---|---|---|---|---|---|---|")
        if figures is None:
            print(f"| {note} | | | | | | |")
        else:
            print(f"| {figures['layers']} | {figures['chunk']} | {figures['recompute']} | {figures['forward_s']:.1f} | "
                  f"{figures['backward_s']:.1f} | {figures['kept'] / GIB:.2f} | {figures['peak'] / GIB:.2f} |")
        print()

    print("| Hungarian matching on the CPU, 900 queries x 40 boxes x 10 classes | intra-op threads | ms per call | "
          "ms per step (6 decoder layers, batch 1) |")
    print("|---|---|---|---|")
    for threads in sorted({1, torch.get_num_threads()}):
        total_ms, solver_ms = time_matching(args.matching_repeats, threads)
        print(f"| assign_queries (cost matrix + linear_sum_assignment) | {threads} | {total_ms:.3f} | "
              f"{6 * total_ms:.2f} |")
        print(f"| linear_sum_assignment alone | {threads} | {solver_ms:.3f} | {6 * solver_ms:.2f} |")


if __name__ == "__main__":
    main()
