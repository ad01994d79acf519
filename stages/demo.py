"""`distillbev demo`: the whole pipeline on the embedded synthetic dataset, with a results table and figures.

Each step runs the equivalent `distillbev` command: the data, teacher and cache steps in-process with every core,
the baseline and distilled students side by side as two processes (stages/jobs.py); a finished step is reused, so
a rerun continues where it stopped. `--world 2` (the default) runs the street world at its recipe (RECIPES),
`--world 1` the quick main job; `--student`, `--teachers centerpoint,mvp` and `--pretrain-backbone` extend a main
job in the same OUT. What each option does: docs/commands.md; the tables it makes: docs/results.md.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import click

from .jobs import Step, run_parallel, run_steps

log = logging.getLogger(__name__)

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"
CONFIG_DIRS = {1: CONFIG_ROOT / "synthetic", 2: CONFIG_ROOT / "street"}  # per synthetic world: its +-32 / +-51.2 m configs
STUDENTS = ("bevdet", "bevdepth", "bevdet4d", "bevdepth4d", "bevformer")  # configs/synthetic/student_<name>.yaml
TEACHERS = {"centerpoint": ("CenterPoint", "L"), "mvp": ("MVP", "L+C")}  # --teachers: table name and modality
# the teacher rows of the table: name, modality, run folder (BEVFormer's teacher: CenterPoint with a DETR decoder)
TEACHER_RUNS = (("CenterPoint", "L", "teacher"), ("CenterPoint+DETR", "L", "teacher_detr"),
                ("MVP", "L+C", "teacher_mvp"))
# `--pretrain-backbone`: the backbone pretraining flips and rescales the train images (BEVDet's image augmentation)
# whatever the student's own data section says; measured on world 2 in docs/synthetic.md
PRETRAIN_AUGMENTATION = ("data.image_flip=true", "data.resize_lim=[-0.06,0.11]")


@dataclass(frozen=True)
class MainJobRecipe:
    """The size and schedules a world's main job runs at unless the command line says otherwise: the dataroot's
    scenes (None: the generator's default), the cached views per sample, whether the students start from a
    backbone pretrained on the train images, and the --set / --teacher-set put before the user's (which win)."""

    scenes: int | None
    views: int
    pretrain_backbone: bool
    student_sets: tuple[str, ...] = ()
    teacher_sets: tuple[str, ...] = ()


# World 2 (the default): its camera students learn only from a larger dataroot, a pretrained backbone and a longer
# schedule than world 1's (docs/synthetic.md, "The camera students on world 2"); about 75 min on 2 idle cores.
# World 1: the small, quick main job (about 13 min), whose world gives the class and depth away.
RECIPES = {
    1: MainJobRecipe(scenes=None, views=4, pretrain_backbone=False),
    2: MainJobRecipe(scenes=150, views=1, pretrain_backbone=True,
                     student_sets=("pretrain.epochs=10", "train.epochs=6", "train.lr_steps=[5]"),
                     teacher_sets=("train.epochs=2",)),
}


def apply_recipe(world: int, views: int | None, scenes: int | None, pretrain_backbone: bool | None,
                 overrides: tuple[str, ...], teacher_overrides: tuple[str, ...]
                 ) -> tuple[int, int | None, bool, tuple[str, ...], tuple[str, ...]]:
    """The world's recipe filled in where the command line left an option unset: (views, scenes,
    pretrain_backbone, student overrides, teacher overrides); the user's --set come after the recipe's."""
    recipe = RECIPES[world]
    return (recipe.views if views is None else views, recipe.scenes if scenes is None else scenes,
            recipe.pretrain_backbone if pretrain_backbone is None else pretrain_backbone,
            (*recipe.student_sets, *overrides), (*recipe.teacher_sets, *teacher_overrides))


def set_args(items) -> list[str]:
    """KEY=VALUE overrides as the argv of a `distillbev` command: ["--set", item, ...]."""
    return [arg for item in items for arg in ("--set", item)]


def teacher_label(teacher: str | None, student: str) -> str | None:
    """The table's name of the teacher a `student` row was distilled from (None: the baseline)."""
    if teacher is None:
        return None
    return "CenterPoint+DETR" if teacher == "centerpoint" and student == "bevformer" else TEACHERS[teacher][0]


def pretrained_backbone_override(backbone: Path | str) -> str:
    """The --set that starts a student from the backbone `pretrain-backbone` wrote (the demo's and ablate's rows)."""
    return f"model.backbone.pretrained={backbone}"


def plan(out: Path, student: str, views: int, scenes: int | None, samples_per_scene: int | None,
         device: str, overrides: tuple[str, ...], teacher_overrides: tuple[str, ...] = (),
         world: int = 1, teachers: tuple[str, ...] = ("centerpoint",),
         pretrain_backbone: bool = False) -> tuple[list[Step], dict]:
    """The demo's steps and the paths they produce: the CenterPoint main job's five steps, then with "mvp" in
    `teachers` the virtual points, the MVP teacher, its cache and the MVP-distilled student.

    With `pretrain_backbone` a `pretrain-backbone` step follows make-synthetic (OUT/backbone, the train split's
    images flipped and rescaled: PRETRAIN_AUGMENTATION, then the user's --set) and every student starts from it.
    """
    dataroot = out / "data"
    teacher_run = out / "teacher"
    cache = out / "cache" / "teacher_synth_train.zarr"
    teacher_config = str(CONFIG_DIRS[world] / "teacher.yaml")
    student_config = str(CONFIG_DIRS[world] / f"student_{student}.yaml")
    students = {"baseline": out / "students" / f"{student}_baseline",
                "distilled": out / "students" / f"{student}_distilled"}
    synth = ["make-synthetic", "--out", str(dataroot), "--world", str(world), *(["--masks"] if "mvp" in teachers else [])]
    if scenes is not None:
        synth += ["--scenes", str(scenes)]
    if samples_per_scene is not None:
        synth += ["--samples-per-scene", str(samples_per_scene)]
    # per-epoch evaluation and attention snapshots feed the figures; the user's --set come after them and win
    sets = set_args((*FIGURE_SETTINGS, *overrides))
    teacher_sets = set_args(teacher_overrides)
    pretrain, backbone = [], out / "backbone" / "backbone.pth"
    if pretrain_backbone:  # the students start from it (set before the user's --set, which win)
        pretrain = [Step("pretrain-backbone",
                         ["pretrain-backbone", "--config", student_config, "--dataroot", str(dataroot), "--out",
                          str(backbone.parent), "--device", device, *set_args((*PRETRAIN_AUGMENTATION, *overrides))],
                         backbone)]
        sets = ["--set", pretrained_backbone_override(backbone), *sets]

    def teacher_steps(label: str, config: str, run: Path, store: Path, distilled: Path,
                      layers: str = "backbone0,backbone1,backbone2,neck") -> list[Step]:  # B0: layer ablation
        """train-teacher, extract-teacher (the teacher `layers`) and the student distilled from that cache; a
        `label` ("MVP") names the teacher in the step names."""
        checkpoint = str(run / "latest.pth")
        suffix = f" ({label})" if label else ""
        return [
            Step(f"train-teacher{suffix}", ["train-teacher", "--config", config, "--dataroot", str(dataroot), "--out",
                                            str(run), "--device", device, *teacher_sets],
                 run / "eval" / "metrics_summary.json"),
            Step(f"extract-teacher{suffix}", ["extract-teacher", "--config", config, "--dataroot", str(dataroot),
                                              "--checkpoint", checkpoint, "--cache", str(store), "--split",
                                              "synth_train", "--views", str(views), "--device", device,
                                              "--layers", layers, *teacher_sets],
                 store),
            Step(f"train-student (distilled{f', {label}' if label else ''})",
                 ["train-student", "--config", student_config, "--dataroot", str(dataroot), "--cache", str(store),
                  "--teacher-checkpoint", checkpoint, "--out", str(distilled), "--device", device, *sets],
                 distilled / "eval" / "metrics_summary.json"),
        ]

    if student == "bevformer":
        # BEVFormer's teacher is the CenterPoint teacher with a DETR decoder, whose decoder the student inherits and
        # whose bev_embed it imitates (teacher_detr.yaml, docs/method.md "BEVFormer student")
        teacher_config = str(CONFIG_DIRS[world] / "teacher_detr.yaml")
        teacher_run, cache = out / "teacher_detr", out / "cache" / "teacher_detr_synth_train.zarr"
        train, extract, distill = teacher_steps("DETR", teacher_config, teacher_run, cache, students["distilled"],
                                                layers="bev_embed")
    else:
        train, extract, distill = teacher_steps("", teacher_config, teacher_run, cache, students["distilled"])
    baseline = Step("train-student (baseline)",
                    ["train-student", "--config", student_config, "--dataroot", str(dataroot), "--out",
                     str(students["baseline"]), "--baseline", "--device", device, *sets],
                    students["baseline"] / "eval" / "metrics_summary.json")
    steps = [Step("make-synthetic", synth, dataroot / "synthetic_summary.json"), *pretrain, train, extract, baseline,
             distill]
    paths = {"dataroot": str(dataroot), "teacher_checkpoint": str(teacher_run / "latest.pth"),
             "cache": str(cache), "students": {k: str(v) for k, v in students.items()}}
    if pretrain:
        paths["backbone"] = str(backbone)
    if "mvp" in teachers:
        from ..pipeline.mvp.run import SUMMARY_NAME

        mvp_run, mvp_cache = out / "teacher_mvp", out / "cache" / "teacher_mvp_synth_train.zarr"
        mvp_student = out / "students" / f"{student}_distilled_mvp"
        steps.append(Step("make-virtual-points", ["make-virtual-points", "--dataroot", str(dataroot), "--version",
                                                  "v1.0-synthetic", "--workers", str(min(2, os.cpu_count() or 1))],
                          dataroot / SUMMARY_NAME))
        steps += teacher_steps("MVP", str(CONFIG_DIRS[world] / "teacher_mvp.yaml"), mvp_run, mvp_cache, mvp_student)
        paths |= {"mvp_teacher_checkpoint": str(mvp_run / "latest.pth"), "mvp_cache": str(mvp_cache)}
        paths["students"]["distilled_mvp"] = str(mvp_student)
    return steps, paths


def parse_teachers(value: str) -> tuple[str, ...]:
    """--teachers "centerpoint[,mvp]" -> the teacher names (the main job's CenterPoint always among them)."""
    names = tuple(name.strip() for name in value.split(",") if name.strip())
    unknown = [name for name in names if name not in TEACHERS]
    if unknown or "centerpoint" not in names:
        raise click.BadParameter(f"{value!r}: expected centerpoint or centerpoint,mvp", param_hint="--teachers")
    return names


def check_masks(dataroot: Path) -> None:
    """The MVP steps of a demo that extends a main job need its dataroot's instance masks."""
    if (dataroot / "synthetic_summary.json").exists() and not (dataroot / "masks").is_dir():
        raise click.UsageError(f"{dataroot} has no instance masks (masks/), which the MVP teacher's virtual points "
                               f"are lifted from; regenerate it with `distillbev make-synthetic --out {dataroot} "
                               f"--world 1 --masks` (a world-1 main job: the same files plus masks/, so the finished "
                               f"steps stay valid) or use a new --out")


METRIC_KEYS = ("mAP", "NDS", "mATE", "mASE", "mAOE", "mAVE", "mAAE")
FIGURE_SETTINGS = ("train.eval_every=2", "train.attention_snapshots=true")  # the student runs' figure inputs


def result_row(summary_path: Path, teacher: str | None, student: str, teacher_mode: str, student_mode: str) -> dict:
    from ..pipeline.eval import summary_metrics

    metrics = summary_metrics(json.loads(summary_path.read_text()))
    return {"teacher": teacher, "teacher_mode": teacher_mode, "student": student, "student_mode": student_mode,
            **{k: metrics[k] for k in METRIC_KEYS}}


def markdown_table(rows: list[dict]) -> str:
    """The paper's table layout: Teacher, Mode, Student, Mode, mAP, NDS, errors (x100 like the paper)."""
    lines = ["| Teacher | Mode | Student | Mode | mAP↑ | NDS↑ | mATE↓ | mASE↓ | mAOE↓ | mAVE↓ | mAAE↓ |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        values = " | ".join(f"{100 * row[k]:.1f}" for k in METRIC_KEYS)
        lines.append(f"| {row['teacher'] or '-'} | {row['teacher_mode']} | {row['student']} | "
                     f"{row['student_mode']} | {values} |")
    return "\n".join(lines)


def bar_chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["student"] if r["teacher"] is None or r["student_mode"] == "L" else f"{r['student']}\n← {r['teacher']}"
              for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [100 * r["mAP"] for r in rows], width=0.4, label="mAP")
    ax.bar([i + 0.2 for i in x], [100 * r["NDS"] for r in rows], width=0.4, label="NDS")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("score (x100)")
    ax.set_title("distillbev demo on the synthetic nuScenes-format dataset")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@click.command("demo")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Output directory (reused on rerun: finished steps are skipped).")
@click.option("--student", type=click.Choice(STUDENTS), default="bevdet", show_default=True,
              help="Camera student (configs/synthetic/student_<name>.yaml).")
@click.option("--views", type=int, default=None,
              help="Cached BEV-augmented views per sample (default: the world's recipe, 1 in world 2, 4 in "
                   "world 1).")
@click.option("--scenes", type=int, default=None,
              help="Synthetic scenes (default: the world's recipe, 150 in world 2, the generator's 10 in world 1).")
@click.option("--samples-per-scene", type=int, default=None, help="Key frames per synthetic scene.")
@click.option("--device", default="cpu", show_default=True,
              help="cpu, cuda or cuda:N, passed to every computing step (one process: torchrun is for the single "
                   "commands).")
@click.option("--world", type=click.Choice(["1", "2"]), default="2", show_default=True,
              help="Synthetic world: 2, the street world (configs/street/, +-51.2 m; docs/synthetic.md), or 1, the "
                   "quick one that gives class and depth away (configs/synthetic/, +-32 m). Each has its recipe "
                   "(RECIPES): the options below left unset take the world's values.")
@click.option("--jobs", type=click.IntRange(1, 2), default=min(2, os.cpu_count() or 1), show_default="2 with 2+ cores",
              help="Student runs trained at once (baseline and distilled), each its own process with cores/jobs "
                   "threads; 1 trains them one after the other in this process.")
@click.option("--teachers", "teacher_names", default="centerpoint", show_default=True,
              help="centerpoint, or centerpoint,mvp to add the LiDAR-camera MVP teacher and its student.")
@click.option("--pretrain-backbone/--no-pretrain-backbone", default=None,
              help="Pretrain the students' image backbone on the train split's images first (`pretrain-backbone`, "
                   "OUT/backbone; its schedule from --set pretrain.*) and start both students from it (default: "
                   "the world's recipe, on in world 2, off in world 1).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override the student config.")
@click.option("--teacher-set", "teacher_overrides", multiple=True, metavar="KEY=VALUE",
              help="Override the teacher config (both teachers).")
def command(out: Path, student: str, views: int | None, scenes: int | None, samples_per_scene: int | None,
            device: str, world: str, jobs: int, teacher_names: str, pretrain_backbone: bool | None,
            overrides: tuple[str, ...], teacher_overrides: tuple[str, ...]) -> None:
    """Run make-synthetic -> train-teacher -> extract-teacher -> train-student (baseline and distilled) ->
    evaluate on the embedded synthetic dataset, and write the results table (markdown, JSON, PNG) and the figures
    of the two students (figures/: training curves, attention maps, qualitative boxes)."""
    from ..pipeline.distributed import check_device
    from ..pipeline.report.figures import draw_figures

    check_device(device)  # every computing step gets it: a wrong one fails before the first
    world = int(world)
    views, scenes, pretrain_backbone, overrides, teacher_overrides = apply_recipe(
        world, views, scenes, pretrain_backbone, overrides, teacher_overrides)
    teachers = parse_teachers(teacher_names)
    if "mvp" in teachers:
        check_masks(out / "data")
    out.mkdir(parents=True, exist_ok=True)
    steps, paths = plan(out, student, views, scenes, samples_per_scene, device, overrides, teacher_overrides, world,
                        teachers, pretrain_backbone)
    summary_path = out / "demo_summary.json"
    previous = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    commands = {tuple(["distillbev", *s.argv]) for s in steps}
    # seconds of this plan's steps recorded by an earlier run (matched by command: two students' steps share names)
    seconds = {s["name"]: s["seconds"] for s in previous.get("steps", []) if tuple(s["command"]) in commands}
    started = time.perf_counter()
    student_steps = [step for step in steps if step.name.startswith("train-student")]
    run_steps([step for step in steps if step not in student_steps], seconds)  # data, teachers, caches: all cores
    if jobs > 1:  # the students side by side, cores split between them
        run_parallel(student_steps, jobs, seconds, label="students")
    else:
        run_steps(student_steps, seconds)
    rows = [result_row(out / folder / "eval" / "metrics_summary.json", None, label, "-", mode)
            for label, mode, folder in TEACHER_RUNS if (out / folder / "eval" / "metrics_summary.json").exists()]
    for name in STUDENTS:  # every student with a baseline and a distilled run finished in OUT, this one included
        runs = {None: out / "students" / f"{name}_baseline", "centerpoint": out / "students" / f"{name}_distilled",
                "mvp": out / "students" / f"{name}_distilled_mvp"}
        markers = {teacher: run / "eval" / "metrics_summary.json" for teacher, run in runs.items()}
        if markers[None].exists() and markers["centerpoint"].exists():
            rows += [result_row(markers[teacher], teacher_label(teacher, name), student_label(name),
                                TEACHERS[teacher][1] if teacher else "-", "C")
                     for teacher, marker in markers.items() if marker.exists()]
    table = markdown_table(rows)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    bar_chart(rows, out / "results.png")
    student_runs = [Path(paths["students"][run]) for run in ("baseline", "distilled")]  # CenterPoint's cache
    figures_dir = out / "figures" if student == "bevdet" else out / f"figures_{student}"
    figures = draw_figures(student_runs, figures_dir, cache=Path(paths["cache"]))
    this_run = {("distillbev", *s.argv): {"name": s.name, "command": ["distillbev", *s.argv],
                                          "seconds": seconds.get(s.name)} for s in steps}
    # the earlier steps in their order, this plan's in place of the same commands, its new ones at the end
    # (a reused step whose command changed, e.g. make-synthetic given --masks, keeps its earlier entry only)
    merged = [this_run.pop(tuple(s["command"]), s) for s in previous.get("steps", [])]
    merged += [step for step in this_run.values()
               if step["seconds"] is not None or step["name"] not in {s["name"] for s in merged}]
    figures_entry = {"command": ["distillbev", "figures", "--out", str(figures_dir), "--cache", paths["cache"],
                                 *map(str, student_runs)],
                     "paths": {k: str(v) for k, v in figures.paths.items()},
                     "attention_similarity": {run: {str(epoch): None if r != r else r for epoch, r in by_epoch.items()}
                                              for run, by_epoch in figures.similarity.items()},  # NaN -> null
                     "missing": figures.notes}
    summary = {
        "steps": merged,
        "paths": paths,
        "figures": figures_entry,
        "figures_by_student": previous.get("figures_by_student", {}) | {student: figures_entry},
        "results": [{"teacher": r["teacher"], "student": r["student"], **{k: r[k] for k in METRIC_KEYS}}
                    for r in rows],
        "total_seconds_this_run": round(time.perf_counter() - started, 1),
    }
    summary_path.write_text(json.dumps(summary, indent=2))
    click.echo(table)
    click.echo(f"written: {out / 'results.md'}, {out / 'results.json'}, {out / 'results.png'}, {summary_path}, "
               + ", ".join(str(path) for path in figures.paths.values()))


def student_label(variant: str) -> str:
    return {"bevdet": "BEVDet", "bevdepth": "BEVDepth", "bevdet4d": "BEVDet4D", "bevdepth4d": "BEVDepth4D",
            "bevformer": "BEVFormer"}[variant]
