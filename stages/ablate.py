"""`distillbev ablate`: the paper's component and layer ablations on the synthetic dataset.

It reuses the demo's dataroot, teacher and cache (running those steps first if needed) and trains one distilled
student per ablation row with config overrides, so every row has the same data, teacher, schedule and seed. With
`--seeds N` every row (the baseline included) is trained N times, with train.seed 0..N-1, and reported as
mean ± sample standard deviation, so a difference between rows can be told from run-to-run noise.

The BEVFormer student distils one layer pair without the FP region (DistillBEV's BEVFormer recipe): its component
table stops at +scaling (its full recipe) and it has no layer table (BEVFORMER_COMPONENT_ROWS). Its teacher is the
demo's BEVFormer teacher (CenterPoint with a DETR decoder, teacher_detr.yaml), whose decoder every distilled row
inherits.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from .demo import RECIPES, STUDENTS, apply_recipe, plan, pretrained_backbone_override, set_args, student_label
from .jobs import Step, run_parallel, run_steps

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


# The BEVFormer recipe (configs/synthetic/student_bevformer.yaml) has no FP region: "+scaling" is its full method,
# the demo's distilled run. Paper numbers: the same poster rows (BEVDet4D-R50); no BEVFormer ablation was published.
BEVFORMER_COMPONENT_ROWS = [
    ("baseline", None, 32.8, 45.9),
    ("plain imitation", ["distill.region_decomposition=false", "distill.adaptive_scaling=false", *NO_ATTENTION],
     32.9, 45.6),
    ("+FG/BG", ["distill.adaptive_scaling=false", *NO_ATTENTION], 33.4, 46.3),
    ("+attention", ["distill.adaptive_scaling=false"], 34.6, 46.5),
    ("+scaling", [], 36.8, 48.4),
]


def ablation_rows(student: str, names: tuple[str, ...] | None = None) -> tuple[list[tuple], list[tuple]]:
    """(component rows, layer rows) of a student: the BEVFormer recipe has one pair and no FP region. With `names`
    (--rows) only those rows; a table left with nothing but its baseline row is dropped."""
    components, layers = (BEVFORMER_COMPONENT_ROWS, []) if student == "bevformer" else (COMPONENT_ROWS, LAYER_ROWS)
    if names is None:
        return components, layers
    known = list(dict.fromkeys(row[0] for row in components + layers))
    unknown = [name for name in names if name not in known]
    if unknown:
        raise click.BadParameter(f"unknown row(s) {', '.join(map(repr, unknown))} for the {student} student; "
                                 f"expected a comma-separated list of: {', '.join(known)}", param_hint="--rows")
    components = [row for row in components if row[0] in names]
    layers = [row for row in layers if row[0] in names]
    return components, layers if any(row[1] is not None for row in layers) else []


def parse_rows(value: str | None) -> tuple[str, ...] | None:
    """--rows "baseline,plain imitation,+FG/BG,+FP" -> the row names (None: every row)."""
    if value is None:
        return None
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    if not names:
        raise click.BadParameter("expected at least one row name", param_hint="--rows")
    return names


def run_name(overrides: list[str] | None) -> str:
    """A stable directory name per distinct override set (rows shared by both tables train once)."""
    if overrides is None:
        return "baseline"
    import hashlib

    return "distilled_" + hashlib.md5("\n".join(sorted(overrides)).encode()).hexdigest()[:10]


def mean_and_sd(runs: list[dict]) -> tuple[dict, dict]:
    """Per metric, the mean over the runs and the sample standard deviation (0 for a single run)."""
    import statistics

    keys = runs[0].keys()
    mean = {k: statistics.fmean(r[k] for r in runs) for k in keys}
    sd = {k: statistics.stdev([r[k] for r in runs]) if len(runs) > 1 else 0.0 for k in keys}
    return mean, sd


def ablation_table(title: str, rows: list[tuple], results: dict[str, list[dict]]) -> str:
    """One markdown table; cells are mean ± sd (x100) when a row has several seeds."""
    lines = [f"### {title}", "",
             "| row | paper mAP | paper NDS | ours mAP | ours NDS | ours mATE | ours mAOE | ours mAVE |",
             "|---|---|---|---|---|---|---|---|"]
    for name, overrides, paper_map, paper_nds in rows:
        runs = results[run_name(overrides)]
        mean, sd = mean_and_sd(runs)
        cells = [f"{100 * mean[k]:.1f}" + (f" ± {100 * sd[k]:.1f}" if len(runs) > 1 else "")
                 for k in ("mAP", "NDS", "mATE", "mAOE", "mAVE")]
        lines.append(f"| {name} | {paper_map:.1f} | {paper_nds:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


@click.command("ablate")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output directory; point it at a demo directory to reuse its dataroot, teacher and cache.")
@click.option("--student", type=click.Choice(STUDENTS), default="bevdet", show_default=True,
              help="Camera student (configs/synthetic/student_<name>.yaml).")
@click.option("--views", type=int, default=None,
              help="Cached BEV-augmented views per sample (default: the world's recipe, as `demo`).")
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda or cuda:N, passed to every computing step (one process: torchrun is for the single "
                   "commands).")
@click.option("--world", type=click.Choice(["1", "2"]), default="2", show_default=True,
              help="Synthetic world of the demo directory (2: the street world, configs/street/; 1: configs/synthetic/"
                   "). Its recipe (demo.RECIPES) sets what the options leave unset, as in `demo`.")
@click.option("--jobs", type=int, default=1, show_default=True,
              help="Student runs trained at once, each as its own process with cores/jobs threads.")
@click.option("--seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train every row this many times (train.seed 0..N-1) and report mean ± sd.")
@click.option("--rows", "rows", default=None, metavar="NAMES",
              help="Only these rows, comma-separated, e.g. \"baseline,plain imitation,+FG/BG,+FP\" "
                   "(default: every row of both tables).")
@click.option("--pretrain-backbone/--no-pretrain-backbone", default=None,
              help="Start every row from the demo's pretrained image backbone (OUT/backbone, made first if missing: "
                   "`demo --pretrain-backbone`; default: the world's recipe, on in world 2).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override every student run's config.")
def command(out: Path, student: str, views: int | None, device: str, world: str, jobs: int, seeds: int,
            rows: str | None, pretrain_backbone: bool | None, overrides: tuple[str, ...]) -> None:
    """Component ablation (plain -> +FG/BG -> +attention -> +scaling -> +FP) and layer ablation (H, +B2, +B1,
    +B0), each row a distilled student from the same cache; writes ablations.md / ablations.json beside the
    paper's numbers."""
    from ..pipeline.distributed import check_device
    from ..pipeline.eval import summary_metrics

    check_device(device)  # every student run gets it: a wrong one fails before the first
    row_names = parse_rows(rows)
    component_rows, layer_rows = ablation_rows(student, row_names)  # before any work: a typo fails at once
    out.mkdir(parents=True, exist_ok=True)
    recipe_pretrain = RECIPES[int(world)].pretrain_backbone
    views, scenes, pretrain_backbone, overrides, teacher_overrides = apply_recipe(
        int(world), views, None, pretrain_backbone, overrides, ())
    steps, paths = plan(out, student, views, scenes, None, device, overrides, teacher_overrides, world=int(world),
                        pretrain_backbone=pretrain_backbone)
    *inputs, baseline_step, distilled_step = steps  # dataroot, [backbone,] teacher, cache; the demo's two students
    seconds: dict[str, float] = {}
    run_steps(inputs, seconds)  # point --out at a demo made with the same --set
    student_config = baseline_step.argv[baseline_step.argv.index("--config") + 1]
    pretrained = (pretrained_backbone_override(paths["backbone"]),) if pretrain_backbone else ()
    runs: dict[str, list[str] | None] = {}
    for _, row_overrides, _, _ in component_rows + layer_rows:
        runs[run_name(row_overrides)] = row_overrides
    # seed 0 of the baseline and of the full method are the demo's own two student runs (same command and config)
    demo_runs = {("baseline", 0): baseline_step, (run_name([]), 0): distilled_step}
    ablation_steps: dict[tuple[str, int], Step] = {}
    for seed in range(seeds):
        for name, row_overrides in runs.items():
            if (name, seed) in demo_runs:
                ablation_steps[(name, seed)] = demo_runs[(name, seed)]
                continue
            suffix = "" if seed == 0 else f"_seed{seed}"
            run_dir = out / "ablations" / f"{student}_{name}{suffix}"
            seed_sets = [] if seed == 0 else ["--set", f"train.seed={seed}"]
            argv = ["train-student", "--config", student_config, "--dataroot", paths["dataroot"], "--out",
                    str(run_dir), "--device", device, *set_args((*pretrained, *overrides)), *seed_sets]
            if row_overrides is None:
                argv.append("--baseline")
            else:
                argv += ["--cache", paths["cache"], "--teacher-checkpoint", paths["teacher_checkpoint"],
                         *set_args(row_overrides)]
            ablation_steps[(name, seed)] = Step(f"ablation {name}{suffix}", argv,
                                                run_dir / "eval" / "metrics_summary.json")
    run_parallel(list(ablation_steps.values()), jobs, seconds)
    results = {name: [summary_metrics(json.loads(ablation_steps[(name, seed)].done_marker.read_text()))
                      for seed in range(seeds)] for name in runs}
    label = student_label(student)
    text = "\n\n".join([
        f"Ablations of {label} distilled from the CenterPoint-pillar teacher"
        + (" with a DETR decoder (its decoder inherited in every distilled row)" if student == "bevformer" else "")
        + " on the synthetic dataset "
        f"(`distillbev ablate --out {out} --student {student}" + (f" --world {world}" if world != "2" else "")
        + ("" if pretrain_backbone == recipe_pretrain else
           " --pretrain-backbone" if pretrain_backbone else " --no-pretrain-backbone") + f" --seeds {seeds}"
        + (f" --rows \"{','.join(row_names)}\"" if row_names else "") + "`); "
        + (f"each of our cells is the mean ± sample sd of {seeds} runs (train.seed 0..{seeds - 1}); " if seeds > 1
           else "each of our rows is one run; ") + "paper numbers: BEVDet4D-R50 on nuScenes val.",
        *([ablation_table("Components", component_rows, results)] if component_rows else []),
        *([ablation_table("Layers", layer_rows, results)] if layer_rows else []),
    ])
    (out / "ablations.md").write_text(text + "\n")

    def report_rows(rows: list[tuple]) -> list[dict]:
        out_rows = []
        for n, o, pm, pn in rows:
            mean, sd = mean_and_sd(results[run_name(o)])
            out_rows.append({"row": n, "overrides": o, "paper": {"mAP": pm, "NDS": pn}, "ours": mean, "sd": sd,
                             "runs": results[run_name(o)]})
        return out_rows

    (out / "ablations.json").write_text(json.dumps({
        "seeds": seeds, "components": report_rows(component_rows), "layers": report_rows(layer_rows),
        "seconds": seconds,
    }, indent=2))
    click.echo(text)
    click.echo(f"written: {out / 'ablations.md'}, {out / 'ablations.json'}")
