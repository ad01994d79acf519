"""The resume check of a trainval-sized store, as torchrun ranks meet it: before and after splitting it between ranks.

When `extract-teacher` reopens an interrupted store it reads every done marker and CRC-checks every chunk of the
sample-views marked done, while under torchrun the other ranks wait in a collective (NCCL's default timeout is
600 s). This measures that wait on a local disk and on the loopback S3 server (SeaweedFS on 127.0.0.1):

- before: the code of `--before-tree` (an older checkout): one process (rank 0) reads the markers one at a time and
  checks the whole store (`prepare_extraction`);
- after: this checkout: the markers read in batches, and the check split between `--ranks` ranks; the wait is rank
  0's `prepare_store` plus the slowest rank's share (`check_samples`; the shares are interleaved samples of equal
  size, so rank 0's share is measured and stands for each of them: on separate nodes they run side by side).

Scaling: trainval is 28,130 samples x 4 views = 112,520 sample-views of 15 chunks each (3 int8 layers with scales and
offsets, their attention, heatmap, occupancy, done marker). The store here has that layout and view count for a
fraction of the samples (`--samples`, `--s3-samples`) with tiny chunks (4 channels, 4 x 4 cells), so the number of
files or requests per sample-view is trainval's and the bytes are not: times are extrapolated linearly in
sample-views. The CRC pass over trainval's real bytes (0.4-0.7 TB) adds bytes / read bandwidth on top, divided
between the ranks after the change. A run killed at 90 % is emulated: the last 10 % of samples are marked not done.

    git worktree add BEFORE/distillbev <commit>   # the code before the change, importable from BEFORE
    python benchmarks/resume_check.py --before-tree BEFORE --dir SCRATCH
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import machine_header, write_random_cache  # noqa: E402
from s3_server import SeaweedS3  # noqa: E402

from distillbev.cache_schemas import v2  # noqa: E402
from distillbev.pipeline.cache.location import StoreLocation  # noqa: E402
from distillbev.pipeline.cache.manifest import LayerSpec  # noqa: E402
from distillbev.pipeline.cache.writer import set_done, set_status  # noqa: E402
from distillbev.pipeline.geometry.bev import BEVGrid  # noqa: E402

TRAINVAL_SAMPLE_VIEWS = 28_130 * 4
VIEWS = 4
GRID = BEVGrid(-3.2, 3.2, -3.2, 3.2, 0.4)  # 16 x 16 cells: tiny chunks, trainval's count of them
LAYERS = [LayerSpec(name, 4, (4, 4), 1.6, 4.0) for name in ("backbone1", "backbone2", "neck")]

# Run in a fresh interpreter on the code of one tree; prints the seconds of each step as JSON.
MEASURE = """
import json, sys, time
from distillbev.pipeline.cache import extract
from distillbev.pipeline.cache.location import StoreLocation
from distillbev.pipeline.cache.writer import prepare_store
try:
    from distillbev.pipeline.cache.state import read_done, read_manifest
except ImportError:  # the code before the change kept them in the writer
    from distillbev.pipeline.cache.writer import read_done, read_manifest

where, ranks = sys.argv[1], int(sys.argv[2])
location = StoreLocation.parse(where)
manifest = read_manifest(location)
group = location.open_group(mode="r")
tokens = [str(t) for t in group["sample_tokens"][...]]
seconds = {}
started = time.perf_counter()
read_done(location)
seconds["read_done"] = time.perf_counter() - started
started = time.perf_counter()
prepared = extract.prepare_extraction(location, manifest, tokens, {}, False, False, False)
seconds["one_process"] = time.perf_counter() - started
seconds["pending"] = len(prepared.pending) if hasattr(prepared, "pending") else None
if hasattr(extract, "check_samples"):
    started = time.perf_counter()
    state = prepare_store(location, manifest, tokens, {})
    seconds["rank0_prepare_store"] = time.perf_counter() - started
    started = time.perf_counter()
    extract.check_samples(location, manifest, state, range(0, len(tokens), ranks), False, False)
    seconds["rank_share"] = time.perf_counter() - started
print(json.dumps(seconds))
"""


def build(where: StoreLocation, samples: int) -> None:
    """A complete store of `samples` x 4 views, then the last 10 % of samples marked not done (a killed run)."""
    tokens = [f"sample-{i:06d}" for i in range(samples)]
    write_random_cache(where, LAYERS, GRID, (4, 4), tokens, views=VIEWS, dtype="int8")
    set_status(where, v2.STATUS_WRITING, manifest_generation=True)
    set_done(where, [(s, v) for s in range(int(samples * 0.9), samples) for v in range(VIEWS)], 0)


def measure(tree: Path | None, where: str, ranks: int, env: dict[str, str]) -> dict[str, float]:
    """The steps' seconds on the code of `tree` (a folder holding a `distillbev` checkout; None: this one)."""
    if tree is not None:
        env = {**env, "PYTHONPATH": str(tree)}
    found = subprocess.run([sys.executable, "-c", MEASURE, where, str(ranks)], env=env, check=True,
                           capture_output=True, text=True)
    return json.loads(found.stdout.strip().splitlines()[-1])


def rows(backend: str, samples: int, before: dict | None, after: dict, ranks: int) -> list[str]:
    scale = TRAINVAL_SAMPLE_VIEWS / (samples * VIEWS)
    out = []

    def row(what: str, seconds: float) -> None:
        out.append(f"| {backend} | {what} | {seconds:.2f} | {seconds * scale:,.0f} |")

    if before is not None:
        row("before: read the done markers (one at a time)", before["read_done"])
        row("before: rank 0 prepares + checks the whole store (the others wait)", before["one_process"])
    row("after: read the done markers (batched)", after["read_done"])
    row("after: one process prepares + checks the whole store", after["one_process"])
    row("after: rank 0 reopens the store (`prepare_store`)", after["rank0_prepare_store"])
    row(f"after: one rank's share of the check ({ranks} ranks)", after["rank_share"])
    row(f"after: the collective's wait ({ranks} ranks: reopen + slowest share)",
        after["rank0_prepare_store"] + after["rank_share"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1407, help="samples of the local store (trainval / 20)")
    parser.add_argument("--s3-samples", type=int, default=282, help="samples of the S3 store (trainval / 100)")
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--before-tree", type=Path, help="a folder holding an older `distillbev` checkout")
    parser.add_argument("--dir", type=Path, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="resume-check-", dir=args.dir))
    after_tree = None
    table = []
    local = StoreLocation.parse(scratch / "local.zarr")
    build(local, args.samples)
    before = measure(args.before_tree, str(local.path), args.ranks, dict(os.environ)) if args.before_tree else None
    after = measure(after_tree, str(local.path), args.ranks, dict(os.environ))
    table += rows("local disk", args.samples, before, after, args.ranks)
    with SeaweedS3(scratch / "s3", bucket="feats") as server:
        env = {**os.environ, **server.env()}
        os.environ.update(server.env())
        remote = StoreLocation.parse(server.url("resume.zarr"))
        build(remote, args.s3_samples)
        before = measure(args.before_tree, str(remote), args.ranks, env) if args.before_tree else None
        after = measure(after_tree, str(remote), args.ranks, env)
        table += rows("S3 (loopback)", args.s3_samples, before, after, args.ranks)
    print(machine_header())
    print(f"\nResume check of a store killed at 90 %; {VIEWS} views, 15 chunks per sample-view; local store "
          f"{args.samples} samples, S3 store {args.s3_samples} samples; trainval = {TRAINVAL_SAMPLE_VIEWS:,} "
          f"sample-views (linear in sample-views).\n")
    print("| store | step | seconds measured | seconds at trainval |")
    print("|---|---|---|---|")
    print("\n".join(table))


if __name__ == "__main__":
    main()
