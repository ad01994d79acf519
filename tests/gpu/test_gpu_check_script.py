"""`scripts/gpu_check.sh` on a machine without a GPU (these tests run on the CPU, in CI): `--dry-run` collects the CUDA
tests, which all skip with their reason, and writes the table of benchmarks/gpu_steps.py at the small synthetic
shapes; without --dry-run the script refuses for want of a CUDA device. And the table's arithmetic, by hand."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
ROWS = ["teacher step", "extraction", "extraction",
        *[student for student in ("BEVDet (small)", "BEVDepth4D (small)", "BEVFormer (small)") for _ in range(3)]]


def run_script(*argv: str, timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, whatever the machine
    return subprocess.run(["bash", str(SCRIPT), *argv], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=REPO)


def table_rows(text: str) -> list[list[str]]:
    """The cells of the table's body rows (after the header and its |---| line)."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


@pytest.mark.slow
def test_dry_run_skips_every_cuda_test_and_writes_the_small_table(tmp_path):
    out = tmp_path / "dry.md"
    result = run_script("--dry-run", "--out", str(out), timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "no CUDA device" in result.stdout  # pytest's skip reasons (-rs)
    text = out.read_text()
    rows = table_rows(text)
    assert [row[0] for row in rows] == ROWS
    assert [row[3] for row in rows] == ["train", "extract", "extract", *["baseline", "cached", "online"] * 3]
    for row in rows:
        assert re.fullmatch(r"\d+\.\d{3} ± \d+\.\d{3}", row[4]), row  # every row ran: a step time
        assert float(row[8]) > 0, row  # and its peak memory
    assert "views/s" in rows[1][6] and rows[3][5] == "1.00x"  # the baseline's own ratio
    skipped = re.search(r"`pytest -m cuda tests/gpu`: (\d+) skipped", text)
    assert skipped and int(skipped.group(1)) >= 20, text[-500:]


def test_without_a_cuda_device_the_check_refuses_with_the_reason(tmp_path):
    result = run_script("--out", str(tmp_path / "gpu.md"), timeout=120)
    assert result.returncode == 2
    assert "no CUDA device is visible" in result.stderr and "--dry-run" in result.stderr
    assert not (tmp_path / "gpu.md").exists()


def test_an_unknown_argument_is_refused_with_the_usage():
    result = run_script("--dryrun", timeout=30)
    assert result.returncode == 2 and "unknown argument '--dryrun'" in result.stderr and "Usage:" in result.stderr


@pytest.fixture(scope="module")
def gpu_steps():
    """benchmarks/gpu_steps.py as a module (benchmarks/ on the path for its `common` import)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("benchmarks_gpu_steps", REPO / "benchmarks" / "gpu_steps.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up while it loads
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return module


def test_table_rates_ratios_and_missing_rows_by_hand(gpu_steps):
    Row = gpu_steps.Row
    rows = [Row("extraction", "t.yaml", 1, "extract", seconds=[0.25, 0.75], peak_gib=1.5),
            Row("S", "s.yaml", 8, "baseline", seconds=[1.0, 3.0], data_wait=[0.5, 0.5], peak_gib=10.0),
            Row("S", "s.yaml", 8, "cached", seconds=[5.0], data_wait=[1.0], peak_gib=12.25),
            Row("S", "s.yaml", 8, "online", peak_gib=70.0, note="out of memory: CUDA out of memory")]
    cells = table_rows("\n".join(gpu_steps.table(rows, "peak GiB")))
    # extraction: mean 0.5 s per view, sd of (0.25, 0.75) = 0.354, 1 / 0.5 = 2 views/s; no baseline of its own
    assert cells[0][4:9] == ["0.500 ± 0.354", "–", "2.00 views/s", "–", "1.50"]
    # baseline: mean 2 s, sd sqrt(2) = 1.414, 8 samples / 2 s = 4/s
    assert cells[1][4:9] == ["2.000 ± 1.414", "1.00x", "4.00", "0.500", "10.00"]
    assert cells[2][4:9] == ["5.000 ± 0.000", "2.50x", "1.60", "1.000", "12.25"]
    assert cells[3][4:10] == ["–", "–", "–", "–", "70.00", "out of memory: CUDA out of memory"]


def test_a_failing_row_is_reported_and_the_next_one_runs(gpu_steps):
    import torch

    clock = gpu_steps.DeviceClock(torch.device("cpu"))

    def broken(row):
        raise ValueError("shapes differ")

    def fine(row):
        row.seconds.append(0.1)

    failed = gpu_steps.run_row(gpu_steps.Row("A", "a.yaml", 1, "baseline"), clock, broken)
    passed = gpu_steps.run_row(gpu_steps.Row("A", "a.yaml", 1, "cached"), clock, fine)
    assert failed.failed and failed.note == "failed: ValueError: shapes differ" and not failed.seconds
    assert not passed.failed and passed.seconds == [0.1] and passed.peak_gib > 0
