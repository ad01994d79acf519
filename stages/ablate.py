"""`distillbev ablate`: the paper's component and layer ablations on the synthetic dataset.

It reuses the demo's dataroot, teacher and cache (running those steps first if needed) and trains one distilled
student per ablation row with config overrides, so every row has the same data, teacher, schedule and seed.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from .demo import Step, plan, run_steps, student_label, with_resume

# Layer pairs as config literals (student feature, teacher feature, adapter, FP region).
B0 = "{student: backbone0, teacher: backbone0, adapter: upsample_3layer, use_false_positive: false}"
B1 = "{student: backbone1, teacher: backbone1, adapter: upsample_3layer, use_false_positive: false}"
B2 = "{student: backbone2, teacher: backbone2, adapter: upsample_3layer, use_false_positive: false}"
H = "{student: neck, teacher: neck, adapter: conv1x1, use_false_positive: true}"

NO_ATTENTION = ["distill.attention=false", "distill.spatial_l1=false"]  # one switch in the reference code

# (row name, overrides, paper mAP, paper NDS) -- poster tables, BEVDet4D-R50 on nuScenes val.
COMPONENT_ROWS = [
    ("baseline", None, 32.8, 45.9),
    ("plain imitation", ["distill.region_decomposition=false", "distill.adaptive_scaling=false",
                         "distill.false_positive=false", *NO_ATTENTION], 32.9, 45.6),
    ("+FG/BG", ["distill.adaptive_scaling=false", "distill.false_positive=false", *NO_ATTENTION], 33.4, 46.3),
    ("+attention", ["distill.adaptive_scaling=false", "distill.false_positive=false"], 34.6, 46.5),
    ("+scaling", ["distill.false_positive=false"], 36.8, 48.4),
    ("+FP", [], 37.8, 49.0),
]
LAYER_ROWS = [
    ("baseline", None, 32.8, 45.9),
    ("H", [f"distill.layers=[{H}]", "distill.false_positive=false"], 34.9, 46.2),
    ("B2 + H", [f"distill.layers=[{B2}, {H}]", "distill.false_positive=false"], 36.1, 47.3),
    ("B1 + B2 + H", ["distill.false_positive=false"], 36.8, 48.4),
    ("B0 + B1 + B2 + H", [f"distill.layers=[{B0}, {B1}, {B2}, {H}]", "distill.false_positive=false"], 34.4, 46.6),
]


def run_name(overrides: list[str] | None) -> str:
    """A stable directory name per distinct override set (rows shared by both tables train once)."""
    if overrides is None:
        return "baseline"
    import hashlib

    return "distilled_" + hashlib.md5("\n".join(sorted(overrides)).encode()).hexdigest()[:10]


def run_parallel(steps: list[Step], jobs: int, seconds: dict[str, float]) -> None:
    """Run the unfinished steps, `jobs` at a time, each as a `python -m distillbev.cli` process whose output goes
    to <run dir>.log; a failed run is reported with its log's path."""
    import os
    import subprocess
    import sys
    import time
    from concurrent.futures import ThreadPoolExecutor

    pending = [step for step in steps if not step.is_done()]
    for step in steps:
        if step.is_done():
            click.echo(f"{step.name}: done already ({step.done_marker}), reused")
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // max(1, jobs))))

    def run(step: Step) -> tuple[Step, int, float, Path]:
        run_dir = Path(step.argv[step.argv.index("--out") + 1])
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        log_path = run_dir.with_suffix(".log")
        click.echo(f"{step.name}: distillbev {' '.join(step.argv)}  (log: {log_path})")
        t0 = time.perf_counter()
        with log_path.open("a") as log:
            code = subprocess.run([sys.executable, "-m", "distillbev.cli", *with_resume(step.argv)], stdout=log,
                                  stderr=subprocess.STDOUT, env=env).returncode
        return step, code, time.perf_counter() - t0, log_path

    failed = []
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for step, code, elapsed, log_path in pool.map(run, pending):
            seconds[step.name] = round(elapsed, 1)
            click.echo(f"{step.name}: {'finished' if code == 0 else f'FAILED (exit {code})'} in {elapsed:.0f} s")
            if code != 0 or not step.is_done():
                failed.append(f"{step.name} (see {log_path})")
    if failed:
        raise click.ClickException("ablation runs failed: " + "; ".join(failed))


def ablation_table(title: str, rows: list[tuple], results: dict[str, dict]) -> str:
    lines = [f"### {title}", "",
             "| row | paper mAP | paper NDS | ours mAP | ours NDS | ours mATE | ours mAOE | ours mAVE |",
             "|---|---|---|---|---|---|---|---|"]
    for name, overrides, paper_map, paper_nds in rows:
        metrics = results[run_name(overrides)]
        lines.append(f"| {name} | {paper_map:.1f} | {paper_nds:.1f} | {100 * metrics['mAP']:.1f} | "
                     f"{100 * metrics['NDS']:.1f} | {100 * metrics['mATE']:.1f} | {100 * metrics['mAOE']:.1f} | "
                     f"{100 * metrics['mAVE']:.1f} |")
    return "\n".join(lines)


@click.command("ablate")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output directory; point it at a demo directory to reuse its dataroot, teacher and cache.")
@click.option("--student", type=click.Choice(["bevdet", "bevdepth", "bevdet4d", "bevdepth4d"]), default="bevdet",
              show_default=True, help="Camera student variant.")
@click.option("--views", type=int, default=4, show_default=True, help="Cached BEV-augmented views per sample.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--jobs", type=int, default=1, show_default=True,
              help="Student runs trained at once, each as its own process with cores/jobs threads.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override every student run's config.")
def command(out: Path, student: str, views: int, device: str, jobs: int, overrides: tuple[str, ...]) -> None:
    """Component ablation (plain -> +FG/BG -> +attention -> +scaling -> +FP) and layer ablation (H, +B2, +B1,
    +B0), each row a distilled student from the same cache; writes ablations.md / ablations.json beside the
    paper's numbers."""
    from ..pipeline.eval import summary_metrics

    out.mkdir(parents=True, exist_ok=True)
    steps, paths = plan(out, student, views, None, None, device, overrides)
    seconds: dict[str, float] = {}
    run_steps(steps[:3], seconds)  # dataroot, teacher, cache (point --out at a demo made with the same --set)
    student_config = steps[3].argv[steps[3].argv.index("--config") + 1]
    runs: dict[str, list[str] | None] = {}
    for _, row_overrides, _, _ in COMPONENT_ROWS + LAYER_ROWS:
        runs[run_name(row_overrides)] = row_overrides
    # the baseline and the full method are the demo's own two student runs (same command, config and seed)
    demo_runs = {"baseline": steps[3], run_name([]): steps[4]}
    ablation_steps = []
    for name, row_overrides in runs.items():
        if name in demo_runs:
            ablation_steps.append(demo_runs[name])
            continue
        run_dir = out / "ablations" / f"{student}_{name}"
        argv = ["train-student", "--config", student_config, "--dataroot", paths["dataroot"], "--out", str(run_dir),
                "--device", device, *[a for item in overrides for a in ("--set", item)],
                "--cache", paths["cache"], "--teacher-checkpoint", paths["teacher_checkpoint"],
                *[a for item in row_overrides for a in ("--set", item)]]
        ablation_steps.append(Step(f"ablation {name}", argv, run_dir / "eval" / "metrics_summary.json"))
    run_parallel(ablation_steps, jobs, seconds)
    results = {name: summary_metrics(json.loads(step.done_marker.read_text()))
               for name, step in zip(runs, ablation_steps)}
    label = student_label(student)
    text = "\n\n".join([
        f"Ablations of {label} distilled from the CenterPoint-pillar teacher on the synthetic dataset "
        f"(`distillbev ablate --out {out} --student {student}`); paper numbers: BEVDet4D-R50 on nuScenes val.",
        ablation_table("Components", COMPONENT_ROWS, results),
        ablation_table("Layers", LAYER_ROWS, results),
    ])
    (out / "ablations.md").write_text(text + "\n")
    (out / "ablations.json").write_text(json.dumps({
        "components": [{"row": n, "overrides": o, "paper": {"mAP": pm, "NDS": pn}, "ours": results[run_name(o)]}
                       for n, o, pm, pn in COMPONENT_ROWS],
        "layers": [{"row": n, "overrides": o, "paper": {"mAP": pm, "NDS": pn}, "ours": results[run_name(o)]}
                   for n, o, pm, pn in LAYER_ROWS],
        "seconds": seconds,
    }, indent=2))
    click.echo(text)
    click.echo(f"written: {out / 'ablations.md'}, {out / 'ablations.json'}")
