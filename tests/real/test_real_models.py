"""The real key frame through the models at full size, on the CPU, randomly initialised:

- the CenterPoint-pillar teacher of configs/nuscenes/teacher_pillar02.yaml on the loader's cloud (the key frame and
  9 padded copies, 248,174 points in range), once, inside an extraction of the key frame into a cache store with
  stage one's library entry (`extract_teacher_cache`, wired as `distillbev extract-teacher` wires it, the split index
  and its fingerprint from the info file), then the store's verification;
- one distilled step of the BEVDet student of configs/nuscenes/student_bevdet.yaml (ResNet-50, six 256x704 images)
  on the key frame with the targets read from that store.

The teacher forward takes about 10 s and the student step about 15 s on two cores.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from real_keyframe import DATAROOT, SPLIT, VERSION

from distillbev.cache_schemas.v2 import DEFAULT_INT8_ERROR
from distillbev.pipeline.cache.extract import extract_teacher_cache
from distillbev.pipeline.heads.center_head import clip_sigmoid
from distillbev.pipeline.cache.inspect.verify import verify_cache
from distillbev.pipeline.cache.manifest import LayerSpec, ViewConfig, build_manifest
from distillbev.pipeline.cache.reader import TeacherCache
from distillbev.pipeline.config import load_config, to_dict
from distillbev.pipeline.data.dataset import NuScenesDetectionDataset
from distillbev.pipeline.data.preflight import index_fingerprint, point_loading_settings
from distillbev.pipeline.teacher.checkpoint import checkpoint_sha256, save_teacher_checkpoint
from distillbev.pipeline.teacher.config import TeacherExperimentConfig
from distillbev.pipeline.teacher.model import CenterPointTeacher

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TEACHER_CONFIG = REPO / "configs" / "nuscenes" / "teacher_pillar02.yaml"
STUDENT_CONFIG = REPO / "configs" / "nuscenes" / "student_bevdet.yaml"
LAYERS = ("backbone1", "backbone2", "neck")  # extract-teacher's default --layers
IN_RANGE_POINTS = 248_174


def on_the_key_frame(data):
    """A config's data section pointed at the vendored key frame."""
    return dataclasses.replace(data, dataroot=str(DATAROOT), version=VERSION, train_split=SPLIT, val_split=SPLIT)


@pytest.fixture(scope="module")
def extraction(tmp_path_factory, lidar_index) -> SimpleNamespace:
    """A random full-size teacher saved as a checkpoint, and a one-view int8 store of the key frame extracted with it
    (the teacher's outputs are recorded as the extraction computes them)."""
    folder = tmp_path_factory.mktemp("real_extraction")
    config = load_config(TeacherExperimentConfig, TEACHER_CONFIG)
    data = dataclasses.replace(on_the_key_frame(config.data), load_images=False)
    dataset = NuScenesDetectionDataset(data, SPLIT, "test", index=lidar_index)
    torch.manual_seed(0)
    model = CenterPointTeacher(config.model).eval()
    checkpoint = save_teacher_checkpoint(model, folder / "teacher.pth", config=config.model)
    canvas = config.model.canvas_grid
    shapes, channels = model.feature_shapes, model.feature_channels
    specs = [LayerSpec(name, channels[name], shapes[name], (canvas.x_max - canvas.x_min) / shapes[name][1],
                       canvas.num_x / shapes[name][1]) for name in LAYERS]
    manifest = build_manifest(
        teacher_config=to_dict(config.model), checkpoint_path=str(checkpoint),
        checkpoint_sha256=checkpoint_sha256(checkpoint), grid=canvas, layers=specs,
        heatmap_shape=config.model.head_grid.shape, occupancy_shape=canvas.shape, dtype="int8",
        views=ViewConfig(count=1, seed=0, rotation_range=tuple(data.bev_rotation_lim),
                         scale_range=tuple(data.bev_scale_lim), flip_x_prob=data.bev_flip_x_prob,
                         flip_y_prob=data.bev_flip_y_prob),
        sample_tokens=list(dataset.sample_tokens), int8_error=DEFAULT_INT8_ERROR,
        dataset={"dataroot": str(DATAROOT), "version": VERSION, "split": SPLIT, "num_sweeps": data.num_sweeps,
                 "fingerprint": index_fingerprint(lidar_index, data.num_sweeps),
                 "point_loading": point_loading_settings(data)},
        extraction={"command": "", "batch_size": 1, "workers": 1, "device": "cpu", "ranks": 1,
                    "threads": torch.get_num_threads()})
    inputs, outputs = [], []

    def run_teacher(points_list: list[torch.Tensor]):
        with torch.no_grad():
            result = model(points_list)
        inputs.extend(points_list)
        outputs.append(result)
        return result

    def load_points(index: int, bev_aug):
        sample = dataset.get(index, bev_aug=bev_aug, with_images=False)
        return sample.sample_token, sample.points

    cache_path = folder / "cache.zarr"
    report = extract_teacher_cache(cache_path, manifest=manifest, sample_tokens=list(dataset.sample_tokens),
                                   head_state={k: v.numpy() for k, v in model.head_state().items()},
                                   run_teacher=run_teacher, load_points=load_points, progress=False)
    return SimpleNamespace(config=config, model=model, report=report, cache_path=cache_path, inputs=inputs,
                           outputs=outputs, checkpoint=checkpoint)


def test_the_teacher_runs_on_the_real_cloud(extraction):
    (points,) = extraction.inputs
    (outputs,) = extraction.outputs
    assert points.shape == (IN_RANGE_POINTS, 5)
    expected = {"backbone0": (1, 64, 256, 256), "backbone1": (1, 128, 128, 128), "backbone2": (1, 256, 64, 64),
                "neck": (1, 384, 128, 128)}
    assert {name: tuple(value.shape) for name, value in outputs.features.items()} == expected
    assert tuple(outputs.heatmap.shape) == (1, 10, 128, 128)
    assert len(outputs.head) == 6  # CenterPoint's task groups
    for tensor in [*outputs.features.values(), outputs.heatmap, *(v for task in outputs.head for v in task.values())]:
        assert torch.isfinite(tensor).all()
    # occupancy: the 0.2 m pillars of the 512 x 512 canvas that hold a point, laid out [Y, X]
    cells = np.floor((points[:, :2].double().numpy() + 51.2) / 0.2).astype(np.int64)  # (P, 2) column, row
    occupied = np.zeros((512, 512), dtype=bool)
    occupied[cells[:, 1], cells[:, 0]] = True
    assert tuple(outputs.occupancy.shape) == (1, 512, 512)
    assert (outputs.occupancy[0].numpy() == occupied).all()


def test_the_key_frame_extracts_into_a_store_that_verifies(extraction):
    report = extraction.report
    assert (report.state, report.total, report.written, report.skipped) == ("created", 1, 1, 0)
    verified = verify_cache(extraction.cache_path, workers=1, progress=False)
    assert verified.ok, verified.describe()
    cache = TeacherCache.open(extraction.cache_path)
    stored = cache.read(0, 0)
    (outputs,) = extraction.outputs
    for name in LAYERS:
        value = outputs.features[name][0].float()
        error = (torch.as_tensor(stored.features[name]).float() - value).pow(2).mean().sqrt()
        assert float(error) <= 1.5 * DEFAULT_INT8_ERROR * float(value.pow(2).mean().sqrt()), name
    assert torch.allclose(torch.as_tensor(stored.heatmap).float(), clip_sigmoid(outputs.heatmap)[0], atol=1e-3)


def test_one_distilled_student_step_on_the_key_frame(extraction, camera_index):
    from distillbev.pipeline.distill.config import StudentExperimentConfig
    from distillbev.pipeline.distill.run import build_distill_loss
    from distillbev.pipeline.distill.targets import TargetsItem, collate_with_targets
    from distillbev.pipeline.distill.train import DistillationSetup, training_step
    from distillbev.pipeline.student.build import build_student

    config = load_config(StudentExperimentConfig, STUDENT_CONFIG)
    config.data = on_the_key_frame(config.data)
    cache = TeacherCache.open(extraction.cache_path)
    torch.manual_seed(0)
    student = build_student(config.model).train()
    distill_loss = build_distill_loss(config, student, cache.manifest["layers"])
    dataset = NuScenesDetectionDataset(config.data, SPLIT, "test", index=camera_index)
    sample = dataset.get(0, bev_aug=cache.bev_aug(0, 0))  # the cached view (view 0: the identity)
    assert sample.cameras.images.shape == (6, 3, 256, 704)
    cached = cache.read(0, 0)
    batch, targets = collate_with_targets([(sample, TargetsItem(cached.features, cached.heatmap, cached.attention))])
    layers = [(pair.student, pair.teacher) for pair in config.distill.layers]
    setup = DistillationSetup(student=student, distill_loss=distill_loss, teacher=None, layers=layers)
    losses = training_step(setup, batch, targets, config.model.head.grid)
    assert all(torch.isfinite(value) for value in losses.values())
    distill_terms = [name for name in losses if name.startswith("kd_")]
    assert distill_terms and sum(float(losses[name].detach()) for name in distill_terms) > 0
    sum(losses.values()).backward()
    backbone = [p.grad for name, p in student.named_parameters() if name.startswith("backbone.")]
    assert backbone and all(g is not None and torch.isfinite(g).all() for g in backbone)
    assert sum(float(g.abs().sum()) for g in backbone) > 0
