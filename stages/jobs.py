"""Training runs side by side: each step as its own `python -m distillbev.cli` process with cores/jobs threads.

Two student runs with one torch thread each finish sooner on two cores than the same runs one after the other with
two threads each: a student step does not scale to two threads (small convolutions, Python between them), and the
DataLoader worker of one run fills the other's idle time. `demo` and `ablate` run their student steps through here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import click
import yaml



@dataclass
class Step:
    name: str
    argv: list[str]
    done_marker: Path  # the step's last output: a file, or a cache store whose status must be complete

    def is_done(self) -> bool:
        if self.done_marker.suffix == ".zarr":
            return cache_is_complete(self.done_marker)
        return self.done_marker.exists()


def cache_is_complete(path: Path) -> bool:
    """True when `path` is a complete teacher cache of this schema (a partial one is resumed, an older one is
    extracted again by the step, which names it)."""
    from ..cache_schemas.v2 import SCHEMA_VERSION

    metadata = path / "zarr.json"
    if not metadata.exists():
        return False
    attributes = json.loads(metadata.read_text()).get("attributes", {})
    return attributes.get("status") == "complete" and attributes.get("schema_version") == SCHEMA_VERSION


def with_resume(argv: list[str]) -> list[str]:
    """A training command continues an interrupted run (its RUN/latest.pth) instead of starting over."""
    if argv[0] in ("train-teacher", "train-student") and "--out" in argv:
        if (Path(argv[argv.index("--out") + 1]) / "latest.pth").exists():
            return [*argv, "--resume"]
    return argv


def run_steps(steps: list[Step], seconds: dict[str, float]) -> None:
    """Run each step's command in-process, through the command line group of the command that called this one,
    unless its output is complete already; records seconds per step."""
    cli = click.get_current_context().find_root().command
    for index, step in enumerate(steps, 1):
        if step.is_done():
            click.echo(f"[{index}/{len(steps)}] {step.name}: done already ({step.done_marker}), reused")
            continue
        argv = with_resume(step.argv)
        click.echo(f"[{index}/{len(steps)}] {step.name}: distillbev {' '.join(argv)}")
        t0 = time.perf_counter()
        cli.main(args=argv, prog_name="distillbev", standalone_mode=False)
        seconds[step.name] = round(time.perf_counter() - t0, 1)
        if not step.is_done():
            raise RuntimeError(f"step {step.name!r} finished without writing {step.done_marker}")


def threads_per_job(jobs: int) -> int:
    """Torch threads of each of `jobs` concurrent runs: the cores split evenly, at least one."""
    return max(1, (os.cpu_count() or 1) // max(1, jobs))


def run_dir_of(step: Step) -> Path:
    return Path(step.argv[step.argv.index("--out") + 1])


def epoch_progress(run_dir: Path) -> str | None:
    """'epoch E/N' of a training run from its config.yaml and train_log.jsonl, None before its first step."""
    log_path, config_path = run_dir / "train_log.jsonl", run_dir / "config.yaml"
    if not log_path.exists() or not config_path.exists():
        return None
    try:
        with log_path.open("rb") as handle:
            handle.seek(max(0, log_path.stat().st_size - 4096))
            last = handle.read().decode(errors="replace").strip().splitlines()[-1]
        epoch = int(json.loads(last)["epoch"]) + 1
        epochs = int(yaml.safe_load(config_path.read_text())["train"]["epochs"])
    except (OSError, IndexError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None  # a line being written, or a log of another layout: report nothing this time
    return f"epoch {epoch}/{epochs}"


def run_parallel(steps: list[Step], jobs: int, seconds: dict[str, float], label: str = "runs",
                 poll_seconds: float = 30.0) -> None:
    """Run the unfinished steps, `jobs` at a time, each as a `python -m distillbev.cli` process with
    `threads_per_job(jobs)` torch threads, its output in <run dir>.log. Every `poll_seconds` one line reports each
    running step's epoch. A failed run is reported with its log's path, after the others have finished."""
    pending = [step for step in steps if not step.is_done()]
    for step in steps:
        if step.is_done():
            click.echo(f"{step.name}: done already ({step.done_marker}), reused")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads_per_job(jobs)))
    running: dict[str, Path] = {}
    lock = threading.Lock()

    def run(step: Step) -> tuple[Step, int, float, Path]:
        run_dir = run_dir_of(step)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        log_path = run_dir.with_suffix(".log")
        click.echo(f"{step.name}: distillbev {' '.join(step.argv)}  (log: {log_path}, "
                   f"{env['OMP_NUM_THREADS']} thread(s))")
        with lock:
            running[step.name] = run_dir
        t0 = time.perf_counter()
        with log_path.open("a") as log:
            code = subprocess.run([sys.executable, "-m", "distillbev.cli", *with_resume(step.argv)], stdout=log,
                                  stderr=subprocess.STDOUT, env=env).returncode
        with lock:
            running.pop(step.name, None)
        return step, code, time.perf_counter() - t0, log_path

    stop = threading.Event()

    def report() -> None:
        while not stop.wait(poll_seconds):
            with lock:
                states = [f"{name} {epoch_progress(run_dir) or 'starting'}" for name, run_dir in running.items()]
            if states:
                click.echo(f"  {label}: " + "; ".join(states))

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    failed = []
    try:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            for step, code, elapsed, log_path in pool.map(run, pending):
                seconds[step.name] = round(elapsed, 1)
                click.echo(f"{step.name}: {'finished' if code == 0 else f'FAILED (exit {code})'} in {elapsed:.0f} s")
                if code != 0 or not step.is_done():
                    failed.append(f"{step.name} (see {log_path})")
    finally:
        stop.set()
    if failed:
        raise click.ClickException(f"{label} failed: " + "; ".join(failed))
