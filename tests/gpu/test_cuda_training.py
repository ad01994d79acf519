"""The training step's device pieces that no command test isolates, on a CUDA device:

- a DistributedDataParallel step through nccl at world size 1, wrapped as `train-student --sync-bn` wraps it under
  torchrun (`TrainableModules`, SyncBatchNorm, DDP with this device's id), equals the plain step: the same loss terms
  and the same gradients, two steps running (the reducer is reset between them);
- the bf16 autocast step (`precision: bf16`, what `auto` picks on a card of compute capability 8.0 or newer): the
  student's convolutions compute in bf16, the losses and the gradients come out float32 and finite, and the loss
  stays near the float32 step's.

The tiny BEVDet of the tiny world with a random tiny teacher run live (online targets), on two train key frames.
"""

from __future__ import annotations

import socket
from datetime import timedelta

import pytest
import torch
from cuda_helpers import cuda_devices, device_index, on_cuda, tiny_student_config

from distillbev.pipeline.data.collate import collate_samples
from distillbev.pipeline.data.dataset import NuScenesDetectionDataset
from distillbev.pipeline.distill.run import build_distill_loss
from distillbev.pipeline.distill.train import DistillationSetup, TrainableModules, training_step
from distillbev.pipeline.precision import resolve_precision
from distillbev.pipeline.student.build import build_student
from distillbev.pipeline.teacher.model import CenterPointTeacher

pytestmark = pytest.mark.cuda

GRADIENT_TOLERANCE = 1e-3  # relative L2 difference of all gradients: DDP at world size 1 changes nothing but the
# order of floating-point atomics in a few kernels (scatter-adds of the BEV pooling)
# bf16 keeps 8 significant bits. Measured on a CPU with native bf16 (three batches of two key frames of the tiny
# world): the total loss within 1.2 % of the float32 step's, single terms within 5.6 % (a small KD term). The dtypes
# are checked exactly; the values catch what breaks the arithmetic (an overflow, a term computed on garbage).
BF16_TOTAL_TOLERANCE = 0.03
BF16_TERM_TOLERANCE = 0.15


@pytest.fixture(scope="module", params=cuda_devices())
def device(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def batch_and_config(tiny_module, tiny_world):
    """(the tiny student config, a CPU batch of the first two train key frames in test mode)."""
    cfg = tiny_student_config(tiny_module, tiny_world.dataroot)
    dataset = NuScenesDetectionDataset(cfg.data, cfg.data.train_split, mode="test")
    return cfg, collate_samples([dataset.get(0), dataset.get(1)])


def tiny_setup(tiny_module, tiny_world, cfg, device: str, precision: str) -> DistillationSetup:
    """The tiny student (seed 0) with the DistillBEV loss and a random tiny teacher (seed 1) run live, on `device`."""
    torch.manual_seed(1)
    teacher = CenterPointTeacher(tiny_module.tiny_teacher_config(tiny_world.dataroot).model)
    teacher = teacher.to(device).eval().requires_grad_(False)
    layers = {pair.teacher for pair in cfg.distill.layers}
    teacher_layers = {name: {"channels": teacher.feature_channels[name], "shape": teacher.feature_shapes[name]}
                      for name in layers}
    torch.manual_seed(0)
    student = build_student(cfg.model).to(device).train()
    distill_loss = build_distill_loss(cfg, student, teacher_layers).to(device)
    return DistillationSetup(student=student, distill_loss=distill_loss, teacher=teacher,
                             layers=[(pair.student, pair.teacher) for pair in cfg.distill.layers], precision=precision)


def trainable(setup: DistillationSetup) -> list[tuple[str, torch.nn.Parameter]]:
    named = [(f"student.{n}", p) for n, p in setup.student.named_parameters()]
    named += [(f"distill.{n}", p) for n, p in setup.distill_loss.named_parameters()]
    return [(name, parameter) for name, parameter in named if parameter.requires_grad]


def relative_gradient_difference(found: DistillationSetup, expected: DistillationSetup) -> float:
    difference = sum(float((a.grad - b.grad).pow(2).sum()) for (_, a), (_, b) in zip(trainable(found),
                                                                                       trainable(expected)))
    scale = sum(float(b.grad.pow(2).sum()) for _, b in trainable(expected))
    assert scale > 0, "the step produced no gradient"
    return (difference / scale) ** 0.5


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_ddp_step_through_nccl_at_world_size_1_equals_the_plain_step(tiny_module, tiny_world, batch_and_config,
                                                                       device, monkeypatch):
    if not on_cuda(device):
        pytest.skip("nccl needs a CUDA device")
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    cfg, batch = batch_and_config
    batch = batch.to(device)
    index = device_index(device)
    previous = torch.cuda.current_device()
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    torch.cuda.set_device(index)  # as `init_from_env` does for a rank before it joins the group
    try:
        dist.init_process_group("nccl", init_method="env://", rank=0, world_size=1, timeout=timedelta(seconds=120))
        assert dist.get_backend() == "nccl" and dist.get_world_size() == 1
        plain = tiny_setup(tiny_module, tiny_world, cfg, device, "fp32")
        wrapped = tiny_setup(tiny_module, tiny_world, cfg, device, "fp32")
        modules = torch.nn.SyncBatchNorm.convert_sync_batchnorm(TrainableModules(wrapped, cfg.model.head.grid))
        assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in wrapped.student.modules())  # converted in place
        model = DistributedDataParallel(modules, device_ids=[index])
        optimizers = [torch.optim.SGD([p for _, p in trainable(setup)], lr=1e-2) for setup in (plain, wrapped)]
        for step in range(2):
            expected = training_step(plain, batch, None, cfg.model.head.grid)
            found = model(batch, None)
            assert found.keys() == expected.keys() and any(key.startswith("kd_") for key in found)
            for key, value in expected.items():
                through, alone = float(found[key].detach()), float(value.detach())
                assert abs(through - alone) <= 1e-4 * abs(alone) + 1e-8, (
                    f"step {step} {key}: {through!r} through DDP, {alone!r} plain")
            for optimizer, losses in zip(optimizers, (expected, found)):
                optimizer.zero_grad(set_to_none=True)
                sum(losses.values()).backward()
            assert relative_gradient_difference(wrapped, plain) < GRADIENT_TOLERANCE, f"step {step}"
            for optimizer in optimizers:
                optimizer.step()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        torch.cuda.set_device(previous)


def test_auto_precision_is_bf16_on_a_card_of_compute_capability_8_or_newer(device):
    if not on_cuda(device):
        pytest.skip("a CUDA device's compute capability")
    major, minor = torch.cuda.get_device_capability(device_index(device))
    assert resolve_precision("auto", device)[0] == ("bf16" if major >= 8 else "fp32"), f"capability {major}.{minor}"


def test_a_bf16_step_computes_in_bf16_and_stays_near_the_fp32_step(tiny_module, tiny_world, batch_and_config, device):
    from distillbev.pipeline.precision import native_bf16

    native, why = native_bf16(device)
    if not native:
        pytest.skip(why)
    cfg, batch = batch_and_config
    batch = batch.to(device)
    losses = {}
    for precision in ("fp32", "bf16"):
        setup = tiny_setup(tiny_module, tiny_world, cfg, device, precision)
        first_conv = next(m for m in setup.student.modules() if isinstance(m, torch.nn.Conv2d))
        seen = []
        first_conv.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
        losses[precision] = training_step(setup, batch, None, cfg.model.head.grid)
        assert seen == [torch.bfloat16 if precision == "bf16" else torch.float32]
        sum(losses[precision].values()).backward()
        for name, parameter in trainable(setup):
            assert parameter.grad is None or (parameter.grad.dtype == torch.float32
                                              and bool(torch.isfinite(parameter.grad).all())), name
    assert losses["bf16"].keys() == losses["fp32"].keys()
    for key, value in losses["bf16"].items():
        assert value.dtype == torch.float32 and bool(torch.isfinite(value)), key
        found, expected = float(value.detach()), float(losses["fp32"][key].detach())
        assert abs(found - expected) <= BF16_TERM_TOLERANCE * max(abs(expected), 1e-3), (
            f"{key}: {found!r} in bf16, {expected!r} in fp32")
    total = {precision: float(sum(terms.values()).detach()) for precision, terms in losses.items()}
    assert abs(total["bf16"] - total["fp32"]) <= BF16_TOTAL_TOLERANCE * total["fp32"], total
