"""Our CenterPoint-pillar teacher against mmdet3d 1.4.0's own CenterPoint, built from mmdet3d's shipped config.

Both networks get the same random weights (mmdet3d's init, then random BN affine parameters and running
statistics, and random biases), run in eval mode on the same synthetic point clouds, and must agree on every
SECOND stage, the SECONDFPN output and every head output (max abs difference <= 1e-4). Checkpoints written by
either side load strictly into the other.

mmdet3d's config uses HARD voxelization (PillarFeatureNet after mmcv's Voxelization: at most 20 points per
pillar, at most 40000 pillars at test time) and its PFN layer runs on zero-padded pillars, so an under-full
pillar also takes the max with the feature of an all-zero row. The clouds are built pillar by pillar to control
exactly what the two networks see:
  - "full" cloud: every occupied pillar holds exactly 20 points. Nothing is padded, nothing overflows, and
    ~150 pillars are far below the 40000 limit, so hard and dynamic pillars see the same points; our dynamic
    teacher (max_points_per_pillar = 0) must match mmdet3d on it.
  - "partial" cloud: 1..20 points per pillar (no overflow): our teacher configured like mmdet3d
    (configs/nuscenes/teacher_pillar02.yaml: 20 points, 40000 pillars, padding emulated) must match.
  - "overflow" cloud: up to 30 points per pillar: mmcv keeps the first 20 points of a pillar in input order,
    which our hard-voxelization mode reproduces.
Points sit at least 2 cm inside their pillar's edges, so both floor() computations put them in the same pillar.

Runs only where mmdet3d and mmcv's compiled ops import (the .venv-mmdet3d of `make venv-mmdet3d`):
    .venv-mmdet3d/bin/python -m pytest -m mmdet3d tests/teacher -q
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

mmdet3d = pytest.importorskip(
    "mmdet3d", reason="mmdet3d is not installed; build the optional venv with `make venv-mmdet3d`")
pytest.importorskip("mmcv._ext", reason="mmcv was installed without its compiled ops (mmcv-lite); "
                                        "mmdet3d models need them: rebuild with `make venv-mmdet3d`")

from mmengine.config import Config  # noqa: E402
from mmengine.runner import load_checkpoint  # noqa: E402
from mmengine.runner.checkpoint import save_checkpoint  # noqa: E402
from mmdet3d.registry import MODELS  # noqa: E402
from mmdet3d.utils import register_all_modules  # noqa: E402

from distillbev.pipeline.config import load_config  # noqa: E402
from distillbev.pipeline.teacher.checkpoint import load_teacher_checkpoint, save_teacher_checkpoint  # noqa: E402
from distillbev.pipeline.teacher.config import TeacherExperimentConfig  # noqa: E402
from distillbev.pipeline.teacher.model import CenterPointTeacher  # noqa: E402

pytestmark = [pytest.mark.mmdet3d, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
TEACHER_CONFIG = ROOT / "configs" / "nuscenes" / "teacher_pillar02.yaml"
MMDET3D_CONFIG = "centerpoint/centerpoint_pillar02_second_secfpn_head-circlenms_8xb4-cyclic-20e_nus-3d.py"
TOLERANCE = 1e-4
HEAD_BRANCHES = ("reg", "height", "dim", "rot", "vel", "heatmap")

# Canvas of the shipped config: 512 x 512 pillars of 0.2 m over [-51.2, 51.2) m, z in [-5, 3) m.
RANGE_MIN = (-51.2, -51.2)
PILLAR = 0.2
NUM_CELLS = 512
EDGE_MARGIN = 0.02  # metres kept free at each pillar edge


def build_mmdet3d_centerpoint() -> torch.nn.Module:
    """mmdet3d's CenterPoint from its shipped config, as mmdet3d's training would build it (train_cfg kept)."""
    register_all_modules()
    config_path = Path(mmdet3d.__file__).parent / ".mim" / "configs" / MMDET3D_CONFIG
    return MODELS.build(Config.fromfile(str(config_path)).model)


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Random BN affine parameters and running statistics, and random biases, so that no layer is an identity."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                channels = module.num_features
                module.weight.copy_(torch.empty(channels).uniform_(0.5, 1.5, generator=generator))
                module.bias.copy_(torch.randn(channels, generator=generator) * 0.1)
                module.running_mean.copy_(torch.randn(channels, generator=generator) * 0.1)
                module.running_var.copy_(torch.empty(channels).uniform_(0.5, 2.0, generator=generator))
                module.num_batches_tracked.fill_(int(torch.randint(1, 1000, (1,), generator=generator)))
            elif isinstance(module, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) and module.bias is not None:
                module.bias.add_(torch.randn(module.bias.shape, generator=generator) * 0.1)


def make_cloud(seed: int, points_per_pillar: list[int]) -> torch.Tensor:
    """(P, 5) points x, y, z, intensity, time lag, grouped by pillar, each pillar at a distinct random cell.

    Point order is shuffled: hard voxelization keeps a pillar's points in input order, and pillars interleave.
    """
    rng = np.random.default_rng(seed)
    cells = rng.choice(NUM_CELLS * NUM_CELLS, size=len(points_per_pillar), replace=False)
    rows = []
    for cell, count in zip(cells, points_per_pillar):
        iy, ix = divmod(int(cell), NUM_CELLS)
        offset = rng.uniform(EDGE_MARGIN, PILLAR - EDGE_MARGIN, size=(count, 2))
        x = RANGE_MIN[0] + ix * PILLAR + offset[:, 0]
        y = RANGE_MIN[1] + iy * PILLAR + offset[:, 1]
        z = rng.uniform(-4.8, 2.8, size=count)
        intensity = rng.uniform(0.0, 1.0, size=count)
        time_lag = rng.choice([0.0, 0.05, 0.1, 0.45], size=count)
        rows.append(np.stack([x, y, z, intensity, time_lag], axis=1))
    cloud = np.concatenate(rows)[rng.permutation(sum(points_per_pillar))]
    return torch.from_numpy(cloud.astype(np.float32))


@pytest.fixture(scope="module")
def clouds() -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(7)
    return {
        "full": make_cloud(1, [20] * 150),  # 3000 points, no padding, no overflow
        "partial": make_cloud(2, rng.integers(1, 21, size=300).tolist()),  # ~3150 points, padded, no overflow
        "overflow": make_cloud(3, rng.integers(15, 31, size=120).tolist()),  # ~2700 points, some pillars > 20
    }


@pytest.fixture(scope="module")
def reference_model() -> torch.nn.Module:
    model = build_mmdet3d_centerpoint()
    model.init_weights()
    randomise(model, seed=0)
    return model.eval()


@pytest.fixture(scope="module")
def reference_state_path(reference_model, tmp_path_factory) -> Path:
    """mmdet3d's random state_dict saved as a bare state_dict with torch.save."""
    path = tmp_path_factory.mktemp("mmdet3d") / "mmdet3d_state_dict.pth"
    torch.save(reference_model.state_dict(), path)
    return path


def teacher_config(max_points_per_pillar: int | None = None):
    overrides = [] if max_points_per_pillar is None else [f"model.max_points_per_pillar={max_points_per_pillar}"]
    return load_config(TeacherExperimentConfig, TEACHER_CONFIG, overrides).model


def our_teacher(state_path: Path, max_points_per_pillar: int | None = None) -> CenterPointTeacher:
    model = CenterPointTeacher(teacher_config(max_points_per_pillar))
    load_teacher_checkpoint(model, state_path, strict=True)
    return model.eval()


def run_reference(model: torch.nn.Module, clouds: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """mmdet3d's test path up to the head: data_preprocessor.voxelize -> extract_pts_feat -> pts_bbox_head.

    Returns "backbone{i}", "neck" and "{branch}.task{t}" / "heatmap" (tasks concatenated) tensors.
    """
    captured: dict[str, list[torch.Tensor]] = {}
    hook = model.pts_backbone.register_forward_hook(lambda module, args, output: captured.update(stages=output))
    try:
        with torch.no_grad():
            voxel_dict = model.data_preprocessor.voxelize(clouds, [])
            neck = model.extract_pts_feat(voxel_dict, points=clouds, img_feats=None,
                                          batch_input_metas=[{} for _ in clouds])
            assert len(neck) == 1, "the pillar config's SECONDFPN returns one map"
            head = model.pts_bbox_head(neck)  # tuple over tasks of [dict] (one feature level)
    finally:
        hook.remove()
    outputs = {f"backbone{i}": stage for i, stage in enumerate(captured["stages"])}
    outputs["neck"] = neck[0]
    for task, (levels,) in enumerate(head):
        for branch in HEAD_BRANCHES:
            outputs[f"{branch}.task{task}"] = levels[branch]
    outputs["heatmap"] = torch.cat([levels[0]["heatmap"] for levels in head], dim=1)
    outputs["num_pillars"] = torch.tensor(voxel_dict["voxels"].shape[0])
    return outputs


def run_ours(model: CenterPointTeacher, clouds: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        result = model(clouds)
    outputs = dict(result.features)
    for task, branches in enumerate(result.head):
        for branch in HEAD_BRANCHES:
            outputs[f"{branch}.task{task}"] = branches[branch]
    outputs["heatmap"] = result.heatmap
    outputs["num_pillars"] = result.occupancy.sum()
    return outputs


def assert_outputs_match(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert set(ours) == set(reference), sorted(set(ours) ^ set(reference))
    assert int(ours["num_pillars"]) == int(reference["num_pillars"]), "both must see the same pillars"
    differences = {}
    for name, expected in reference.items():
        if name == "num_pillars":
            continue
        found = ours[name]
        assert found.shape == expected.shape, f"{name}: ours {tuple(found.shape)} vs mmdet3d {tuple(expected.shape)}"
        differences[name] = float((found - expected).abs().max())
    worst = max(differences, key=differences.get)
    assert differences[worst] <= TOLERANCE, (
        f"max abs difference {differences[worst]:.3g} at {worst!r} (> {TOLERANCE}); all: "
        + ", ".join(f"{k}={v:.2g}" for k, v in sorted(differences.items())))
    # The comparison means something only if the outputs vary across the map and between samples.
    assert float(reference["heatmap"].std()) > 1e-2
    assert float(reference["neck"].abs().max()) > 1e-1


@pytest.fixture(scope="module")
def reference_outputs(reference_model, clouds) -> dict[str, dict[str, torch.Tensor]]:
    return {
        "full": run_reference(reference_model, [clouds["full"]]),
        "full+partial": run_reference(reference_model, [clouds["full"], clouds["partial"]]),
        "overflow": run_reference(reference_model, [clouds["overflow"]]),
    }


def test_clouds_are_what_the_comparison_needs(clouds, reference_outputs):
    # voxelization saw every occupied pillar: 150 in "full", 150 + 300 in the batch of two, none dropped
    assert int(reference_outputs["full"]["num_pillars"]) == 150
    assert int(reference_outputs["full+partial"]["num_pillars"]) == 450
    assert len(clouds["full"]) == 3000 and 300 <= len(clouds["partial"]) <= 6000


def test_hard_pillars_match_mmdet3d_batch_of_one(reference_state_path, reference_outputs, clouds):
    ours = run_ours(our_teacher(reference_state_path), [clouds["full"]])
    assert_outputs_match(ours, reference_outputs["full"])


def test_hard_pillars_match_mmdet3d_batch_of_two_with_padded_pillars(reference_state_path, reference_outputs, clouds):
    ours = run_ours(our_teacher(reference_state_path), [clouds["full"], clouds["partial"]])
    assert_outputs_match(ours, reference_outputs["full+partial"])
    # each sample of the batch is computed on its own: sample 0 equals the batch-of-one result
    single = reference_outputs["full"]
    assert torch.allclose(reference_outputs["full+partial"]["heatmap"][:1], single["heatmap"], atol=TOLERANCE)


def test_hard_pillars_keep_the_first_20_points_like_mmcv(reference_state_path, reference_outputs, clouds):
    ours = run_ours(our_teacher(reference_state_path), [clouds["overflow"]])
    assert_outputs_match(ours, reference_outputs["overflow"])


def test_dynamic_pillars_match_mmdet3d_on_full_pillars(reference_state_path, reference_outputs, clouds):
    # with exactly 20 points in every pillar there is no padding row and no dropped point, so the dynamic net
    # computes what mmdet3d's hard voxelization computes
    ours = run_ours(our_teacher(reference_state_path, max_points_per_pillar=0), [clouds["full"]])
    assert_outputs_match(ours, reference_outputs["full"])


def test_padding_matters_for_dynamic_pillars(reference_state_path, reference_outputs, clouds):
    # the emulated padding is not a no-op: the dynamic net differs from mmdet3d on under-full pillars
    ours = run_ours(our_teacher(reference_state_path, max_points_per_pillar=0), [clouds["full"], clouds["partial"]])
    assert float((ours["neck"] - reference_outputs["full+partial"]["neck"]).abs().max()) > TOLERANCE


def test_mmdet3d_state_dict_loads_strictly_into_ours(reference_model, reference_state_path, tmp_path):
    expected = reference_model.state_dict()
    # a bare torch.save'd state_dict and an mmengine checkpoint ({"meta", "state_dict"}, as the model zoo ships)
    mmengine_path = tmp_path / "mmengine_checkpoint.pth"
    save_checkpoint({"meta": {"mmdet3d_version": mmdet3d.__version__}, "state_dict": expected}, str(mmengine_path))
    for path in (reference_state_path, mmengine_path):
        model = CenterPointTeacher(teacher_config())
        report = load_teacher_checkpoint(model, path, strict=True)
        assert report.num_loaded == len(expected) and not report.missing and not report.unexpected
        loaded = model.state_dict()
        assert set(loaded) == set(expected)  # same keys; the order differs (mmdet3d's PFNLayer defines norm first)
        for key, value in expected.items():
            assert torch.equal(loaded[key], value), key


def test_our_checkpoint_loads_strictly_into_mmdet3d(tmp_path):
    config = teacher_config()
    torch.manual_seed(1)
    ours = CenterPointTeacher(config)
    randomise(ours, seed=1)
    path = save_teacher_checkpoint(ours, tmp_path / "teacher.pth", config, {"epoch": 3})
    expected = ours.state_dict()

    reference = build_mmdet3d_centerpoint()
    payload = torch.load(path, map_location="cpu", weights_only=True)
    reference.load_state_dict(payload["state_dict"], strict=True)
    for key, value in reference.state_dict().items():
        assert torch.equal(value, expected[key]), key

    reference = build_mmdet3d_centerpoint()
    checkpoint = load_checkpoint(reference, str(path), map_location="cpu", strict=True)
    assert checkpoint["meta"] == {"epoch": 3}
    for key, value in reference.state_dict().items():
        assert torch.equal(value, expected[key]), key
