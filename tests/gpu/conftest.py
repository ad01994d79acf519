"""The CUDA tests' hook and shared fixtures: every test marked `cuda` needs a CUDA device and is skipped, with the
reason, where none is visible, so a CPU run collects them and reports each skip. `scripts/gpu_check.sh` runs them on a
GPU machine (`pytest -m cuda tests/gpu`). The device spellings, the override that runs their bodies on the CPU and
the memory check are in cuda_helpers.py.

The tiny world they share: a world-1 synthetic dataroot of 2 scenes x 3 key frames (3 train, 3 val), the tests'
tiny CenterPoint teacher and quarter-width BEVDet (tests/distill/test_distill_equivalence.py: +-16 m, 40x40 head,
64x192 images), written as YAML for the commands.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from cuda_helpers import requires_cuda, tiny_student_config
from module_loader import load_tests_module


def pytest_collection_modifyitems(config, items):
    """Every test marked `cuda` skips with the reason where no CUDA device is visible."""
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(requires_cuda)


@pytest.fixture(scope="session")
def tiny_module():
    """tests/distill/test_distill_equivalence.py: the tiny teacher and student configs and their world's sizes."""
    return load_tests_module("distill/test_distill_equivalence.py")


@dataclasses.dataclass
class TinyWorld:
    dataroot: Path
    teacher_yaml: Path  # the tiny teacher's experiment config
    student_yaml: Path  # the tiny BEVDet, batch 1, 1 epoch, one DataLoader worker
    folder: Path
    version: str = "v1.0-synthetic"
    val_split: str = "synth_val"


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory, tiny_module) -> TinyWorld:
    from distillbev.pipeline.config import dump_config
    from distillbev.pipeline.synthetic.generate import SyntheticConfig, generate_dataset

    folder = tmp_path_factory.mktemp("cuda_world")
    dataroot = folder / "synthetic"
    generate_dataset(dataroot, SyntheticConfig.boxes(num_scenes=2, samples_per_scene=3, val_scenes=1,
                                                     sweeps_per_key_frame=tiny_module.NUM_SWEEPS, objects_per_scene=16,
                                                     visibility_range=20.0, lidar_azimuth_steps=512), progress=False)
    teacher = tiny_module.tiny_teacher_config(dataroot)
    teacher.train = dataclasses.replace(teacher.train, epochs=1, batch_size=1, num_workers=0, log_every=1)
    dump_config(teacher, folder / "teacher.yaml")
    dump_config(tiny_student_config(tiny_module, dataroot), folder / "student.yaml")
    return TinyWorld(dataroot, folder / "teacher.yaml", folder / "student.yaml", folder)
