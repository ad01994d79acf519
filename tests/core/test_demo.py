"""The main job and the ablations end to end at a tiny size: every step runs, the summaries have the documented
form, reruns reuse finished steps."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from distillbev.cli import cli

pytestmark = pytest.mark.slow

SIZES = ["--scenes", "2", "--samples-per-scene", "4", "--views", "2",
        "--teacher-set", "train.epochs=1", "--teacher-set", "train.batch_size=2",
        "--set", "train.epochs=1", "--set", "train.num_workers=0"]
TINY = ["--world", "1", *SIZES]  # world 1's recipe at a tiny size


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), *TINY], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return out


def test_demo_runs_every_step_and_writes_the_summary(demo_dir):
    summary = json.loads((demo_dir / "demo_summary.json").read_text())
    names = [step["name"] for step in summary["steps"]]
    assert names == ["make-synthetic", "train-teacher", "extract-teacher", "train-student (baseline)",
                     "train-student (distilled)"]
    for step in summary["steps"]:
        assert step["command"][0] == "distillbev" and step["seconds"] > 0
    assert set(summary["paths"]) == {"dataroot", "teacher_checkpoint", "cache", "students"}
    rows = summary["results"]
    assert [r["teacher"] for r in rows] == [None, None, "CenterPoint"]
    for row in rows:
        assert set(row) >= {"teacher", "student", "mAP", "NDS", "mATE", "mASE", "mAOE", "mAVE", "mAAE"}
        assert 0.0 <= row["mAP"] <= 1.0 and 0.0 <= row["NDS"] <= 1.0
    table = (demo_dir / "results.md").read_text()
    assert table.startswith("| Teacher | Mode | Student | Mode | mAP↑ | NDS↑")
    assert (demo_dir / "results.png").stat().st_size > 1000
    distilled_log = demo_dir / "students" / "bevdet_distilled" / "train_log.jsonl"
    first = json.loads(distilled_log.read_text().splitlines()[0])
    assert any(key.startswith("kd_neck_") for key in first)  # the distilled run really distils
    # the figures of its own runs: per-epoch curves, attention snapshots, qualitative boxes
    figures = summary["figures"]
    for name in ("curves.png", "attention.png", "qualitative.png"):
        path = demo_dir / "figures" / name
        assert path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    assert json.dumps(figures)  # recorded in the summary
    for run in ("bevdet_baseline", "bevdet_distilled"):
        history = (demo_dir / "students" / run / "eval_history.jsonl").read_text().splitlines()
        assert [json.loads(line)["epoch"] for line in history] == [1]  # 1 epoch: the final evaluation only


def test_demo_rerun_reuses_every_step(demo_dir):
    again = CliRunner().invoke(cli, ["demo", "--out", str(demo_dir), *TINY], catch_exceptions=False)
    assert again.exit_code == 0 and again.output.count("reused") == 5


def test_ablate_trains_each_distinct_row_once_and_writes_both_tables(demo_dir):
    result = CliRunner().invoke(cli, ["ablate", "--out", str(demo_dir), "--world", "1", "--views", "2", "--jobs", "2",
                                      "--set", "train.epochs=1", "--set", "train.num_workers=0"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((demo_dir / "ablations.json").read_text())
    assert [r["row"] for r in report["components"]] == ["baseline", "plain imitation", "+FG/BG", "+attention",
                                                        "+scaling", "+FP"]
    assert [r["row"] for r in report["layers"]] == ["baseline", "H", "B2 + H", "B1 + B2 + H", "B0 + B1 + B2 + H"]
    # shared rows are the same run: the layer table's B1+B2+H is the component table's +scaling
    assert report["layers"][3]["ours"] == report["components"][4]["ours"]
    assert len(list((demo_dir / "ablations").glob("*/eval/metrics_summary.json"))) == 7
    plain_log = next((demo_dir / "ablations").glob("*/train_log.jsonl"))
    assert plain_log.exists()
    text = (demo_dir / "ablations.md").read_text()
    assert "### Components" in text and "### Layers" in text and "| +FP | 37.8 | 49.0 |" in text


def test_ablate_seeds_repeats_every_row_and_reports_mean_and_sd(demo_dir):
    import statistics

    result = CliRunner().invoke(cli, ["ablate", "--out", str(demo_dir), "--world", "1", "--views", "2", "--jobs", "2",
                                      "--seeds", "2",
                                      "--set", "train.epochs=1", "--set", "train.num_workers=0"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((demo_dir / "ablations.json").read_text())
    assert report["seeds"] == 2
    # seed 1 of every distinct run, the baseline and the full method included: 7 + 2 runs on top of seed 0's
    assert len(list((demo_dir / "ablations").glob("*_seed1/eval/metrics_summary.json"))) == 9
    for row in report["components"] + report["layers"]:
        assert len(row["runs"]) == 2
        values = [run["mAP"] for run in row["runs"]]
        assert row["ours"]["mAP"] == statistics.fmean(values) and row["sd"]["mAP"] == statistics.stdev(values)
    assert " ± " in (demo_dir / "ablations.md").read_text()


def test_ablate_rows_trains_and_reports_only_the_named_rows(demo_dir):
    result = CliRunner().invoke(cli, ["ablate", "--out", str(demo_dir), "--world", "1", "--views", "2", "--jobs", "2",
                                      "--rows", "baseline, plain imitation,+FP",
                                      "--set", "train.epochs=1", "--set", "train.num_workers=0"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((demo_dir / "ablations.json").read_text())
    assert [r["row"] for r in report["components"]] == ["baseline", "plain imitation", "+FP"]
    assert report["layers"] == []  # the layer table would hold its baseline row alone
    text = (demo_dir / "ablations.md").read_text()
    assert "### Components" in text and "### Layers" not in text and "+FG/BG" not in text
    assert '--rows "baseline,plain imitation,+FP"' in text


@pytest.mark.parametrize("command", ["demo", "ablate"])
def test_the_default_main_job_is_world_2_at_its_recipe(tmp_path, monkeypatch, command):
    """`distillbev demo` (and `ablate` on its folder) plans exactly the documented world-2 command; an option given
    on the command line wins over the recipe, and world 1 keeps its quick main job."""
    from distillbev.stages import ablate, demo

    planned = []

    def fake_plan(out, student, views, scenes, samples_per_scene, device, overrides, teacher_overrides=(), world=1,
                  teachers=("centerpoint",), pretrain_backbone=False):
        planned.append((views, scenes, world, pretrain_backbone, tuple(overrides), tuple(teacher_overrides)))
        raise click.Abort()

    monkeypatch.setattr(demo if command == "demo" else ablate, "plan", fake_plan)
    documented = ["--world", "2", "--scenes", "150", "--views", "1", "--pretrain-backbone", "--set",
                  "pretrain.epochs=10", "--set", "train.epochs=6", "--set", "train.lr_steps=[5]", "--teacher-set",
                  "train.epochs=2"]
    if command == "ablate":  # ablate has no --scenes / --teacher-set: it always takes the recipe's
        documented = [arg for arg in documented[4:] if arg != "--teacher-set" and arg != "train.epochs=2"]
    for argv in ([], documented, ["--world", "1"],
                 ["--views", "4", "--no-pretrain-backbone", "--set", "train.epochs=3"]):
        CliRunner().invoke(cli, [command, "--out", str(tmp_path / "out"), *argv])
    default, explicit, world1, mine = planned
    recipe_sets = ("pretrain.epochs=10", "train.epochs=6", "train.lr_steps=[5]")
    assert default == (1, 150, 2, True, recipe_sets, ("train.epochs=2",))
    if command == "demo":
        assert explicit == (1, 150, 2, True, recipe_sets * 2, ("train.epochs=2",) * 2)  # the same values, twice
    else:
        assert explicit[:4] == default[:4] and explicit[4] == recipe_sets * 2
    assert world1 == (4, None, 1, False, (), ())
    assert mine == (4, 150, 2, False, (*recipe_sets, "train.epochs=3"), ("train.epochs=2",))


def test_ablation_rows_selects_by_name_and_names_the_valid_rows_on_a_typo():
    import click

    from distillbev.stages.ablate import ablation_rows, parse_rows

    components, layers = ablation_rows("bevdet", parse_rows("H,+FG/BG"))
    assert [row[0] for row in components] == ["+FG/BG"] and [row[0] for row in layers] == ["H"]
    components, layers = ablation_rows("bevdet", parse_rows("baseline"))
    assert [row[0] for row in components] == ["baseline"] and layers == []
    assert ablation_rows("bevdet", None) == ablation_rows("bevdet")
    with pytest.raises(click.BadParameter, match="unknown row.*'[+]FG'.*expected a comma-separated list of: baseline, "
                                                  "plain imitation, [+]FG/BG"):
        ablation_rows("bevdet", parse_rows("+FG,+FP"))
    with pytest.raises(click.BadParameter, match="'B2 [+] H' for the bevformer student"):
        ablation_rows("bevformer", parse_rows("B2 + H"))
    with pytest.raises(click.BadParameter, match="at least one row"):
        parse_rows(" , ")


def test_mean_and_sd_by_hand():
    from distillbev.stages.ablate import mean_and_sd

    mean, sd = mean_and_sd([{"mAP": 0.1, "NDS": 0.2}, {"mAP": 0.3, "NDS": 0.2}, {"mAP": 0.2, "NDS": 0.5}])
    assert abs(mean["mAP"] - 0.2) < 1e-15 and abs(sd["mAP"] - 0.1) < 1e-15  # sample sd: sqrt((0.01 + 0.01) / 2)
    assert abs(mean["NDS"] - 0.3) < 1e-15 and abs(sd["NDS"] - (0.03 ** 0.5)) < 1e-15  # sqrt((.01+.01+.04) / 2)
    assert mean_and_sd([{"mAP": 0.4}])[1] == {"mAP": 0.0}


def test_teachers_option_and_the_masks_an_mvp_extension_needs(tmp_path):
    import click

    from distillbev.stages.demo import check_masks, parse_teachers

    assert parse_teachers("centerpoint") == ("centerpoint",)
    assert parse_teachers("centerpoint, mvp") == ("centerpoint", "mvp")
    with pytest.raises(click.BadParameter, match="expected centerpoint or centerpoint,mvp"):
        parse_teachers("mvp")
    check_masks(tmp_path / "data")  # nothing generated yet: the demo's make-synthetic writes the masks
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "synthetic_summary.json").write_text("{}")
    with pytest.raises(click.UsageError, match="has no instance masks"):
        check_masks(tmp_path / "data")  # a main job's dataroot made without --masks
    (tmp_path / "data" / "masks").mkdir()
    check_masks(tmp_path / "data")


def test_demo_with_the_mvp_teacher_adds_its_teacher_cache_and_student(tmp_path):
    """World 2 at a tiny size with --teachers centerpoint,mvp: the MVP steps run after the main job's and the
    table holds both teachers and the student distilled from each."""
    from distillbev.pipeline.cache.reader import TeacherCache

    out = tmp_path / "demo"
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), "--world", "2", "--teachers", "centerpoint,mvp",
                                      "--no-pretrain-backbone", *SIZES], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "demo_summary.json").read_text())
    assert [step["name"] for step in summary["steps"]] == [
        "make-synthetic", "train-teacher", "extract-teacher", "train-student (baseline)", "train-student (distilled)",
        "make-virtual-points", "train-teacher (MVP)", "extract-teacher (MVP)", "train-student (distilled, MVP)"]
    rows = json.loads((out / "results.json").read_text())
    assert [(r["teacher"], r["teacher_mode"], r["student"], r["student_mode"]) for r in rows] == [
        (None, "-", "CenterPoint", "L"), (None, "-", "MVP", "L+C"), (None, "-", "BEVDet", "C"),
        ("CenterPoint", "L", "BEVDet", "C"), ("MVP", "L+C", "BEVDet", "C")]
    manifest = TeacherCache.open(out / "cache" / "teacher_mvp_synth_train.zarr").manifest
    assert manifest["dataset"]["point_loading"]["point_features"] == "mvp"
    assert manifest["teacher"]["config"]["point_features"] == 17
    distilled = (out / "students" / "bevdet_distilled_mvp" / "train_log.jsonl").read_text().splitlines()
    assert any(key.startswith("kd_neck_") for key in json.loads(distilled[0]))
    assert "| MVP | L+C | BEVDet | C |" in (out / "results.md").read_text()


def test_demo_bevformer_adds_the_decoder_teacher_its_cache_and_the_bevformer_rows(demo_dir):
    """`--student bevformer` on a main job's OUT: the dataroot is reused, the CenterPoint teacher with a DETR decoder
    and its bev_embed cache are added, and the table gains that teacher and the BEVFormer rows."""
    from distillbev.pipeline.cache.reader import TeacherCache

    result = CliRunner().invoke(cli, ["demo", "--out", str(demo_dir), "--student", "bevformer", *TINY],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.count("reused") == 1  # make-synthetic
    summary = json.loads((demo_dir / "demo_summary.json").read_text())
    assert [step["name"] for step in summary["steps"]][-4:] == [
        "train-teacher (DETR)", "extract-teacher (DETR)", "train-student (baseline)", "train-student (distilled, DETR)"]
    assert (demo_dir / "teacher_detr" / "eval" / "decoder" / "metrics_summary.json").is_file()
    assert list(TeacherCache.open(demo_dir / "cache" / "teacher_detr_synth_train.zarr").manifest["layers"]) == [
        "bev_embed"]
    first = json.loads((demo_dir / "students" / "bevformer_distilled" / "train_log.jsonl").read_text().splitlines()[0])
    assert {"kd_neck_bev_embed_fg", "kd_neck_bev_embed_bg"} <= set(first)
    rows = [(r["teacher"], r["student"]) for r in json.loads((demo_dir / "results.json").read_text())]
    assert (None, "CenterPoint+DETR") in rows and ("CenterPoint+DETR", "BEVFormer") in rows
    assert (None, "BEVFormer") in rows and ("CenterPoint", "BEVDet") in rows  # the main job's rows stay


def test_demo_pretrain_backbone_adds_the_step_and_both_students_start_from_it(demo_dir, tmp_path):
    """`--pretrain-backbone`: a pretrain-backbone step after make-synthetic, on flipped and rescaled images, whose
    backbone.pth both students load; the dataroot, teacher and cache of a main job are reused, and so is the
    backbone by `ablate --pretrain-backbone`, whose rows start from it too."""
    import shutil

    import torch
    import yaml

    from distillbev.stages.ablate import run_name

    out = tmp_path / "pretrained"
    for folder in ("data", "teacher", "cache"):
        shutil.copytree(demo_dir / folder, out / folder, symlinks=True)
    result = CliRunner().invoke(cli, ["demo", "--out", str(out), "--pretrain-backbone", *TINY,
                                      "--set", "pretrain.epochs=1", "--set", "pretrain.num_workers=0"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.count("reused") == 3  # make-synthetic, train-teacher, extract-teacher
    summary = json.loads((out / "demo_summary.json").read_text())
    assert [step["name"] for step in summary["steps"]][:2] == ["make-synthetic", "pretrain-backbone"]
    backbone = out / "backbone" / "backbone.pth"
    assert summary["paths"]["backbone"] == str(backbone)
    pretrain_config = yaml.safe_load((out / "backbone" / "config.yaml").read_text())
    assert pretrain_config["data"]["image_flip"] is True and pretrain_config["data"]["resize_lim"] == [-0.06, 0.11]
    assert pretrain_config["pretrain"]["epochs"] == 1
    weights = torch.load(backbone, weights_only=True)
    for mode in ("baseline", "distilled"):
        run = out / "students" / f"bevdet_{mode}"
        config = yaml.safe_load((run / "config.yaml").read_text())
        assert config["model"]["backbone"]["pretrained"] == str(backbone)
        assert config["data"]["image_flip"] is False  # the students' own augmentation is untouched
        assert (run / "eval" / "metrics_summary.json").is_file()
        # two steps in warm-up (lr <= 1e-3 x 0.04) leave the pretrained first conv nearly where it was; a random
        # init would differ by its whole size
        state = torch.load(run / "latest.pth", weights_only=False, map_location="cpu")["state_dict"]
        moved = (state["backbone.conv1.weight"] - weights["conv1.weight"]).abs().max()
        assert moved < 0.01 * weights["conv1.weight"].abs().max(), moved

    result = CliRunner().invoke(cli, ["ablate", "--out", str(out), "--world", "1", "--pretrain-backbone",
                                      "--views", "2", "--rows",
                                      "+FG/BG", "--set", "train.epochs=1", "--set", "train.num_workers=0",
                                      "--set", "pretrain.epochs=1", "--set", "pretrain.num_workers=0"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert result.output.count("reused") == 4 and "pretrain-backbone: done already" in result.output
    (row,) = json.loads((out / "ablations.json").read_text())["components"]
    assert row["row"] == "+FG/BG" and len(row["runs"]) == 1
    run = out / "ablations" / f"bevdet_{run_name(row['overrides'])}"
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["model"]["backbone"]["pretrained"] == str(backbone)
    assert config["distill"]["attention"] is False and config["distill"]["region_decomposition"] is True
    assert "--pretrain-backbone --seeds 1" in (out / "ablations.md").read_text()
