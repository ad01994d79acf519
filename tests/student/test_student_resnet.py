"""The image backbone's state_dict matches torchvision's resnet18 / resnet50 key lists and shapes.

torchvision is not installed here, so the expected lists are written down below (weights of every conv and BN;
each BN also has bias, running_mean, running_var, num_batches_tracked). The classifier `fc` is not part of the
backbone. Independent checks: torchvision's published parameter counts 11,689,512 (resnet18) and 25,557,032
(resnet50) minus their fc layers (513,000 and 2,049,000).
"""

import pytest
import torch

from distillbev.pipeline.errors import CheckpointError
from distillbev.pipeline.student.resnet import ResNet, load_torchvision_checkpoint

RESNET18_WEIGHTS = """
conv1.weight 64,3,7,7
bn1.weight 64
layer1.0.conv1.weight 64,64,3,3
layer1.0.bn1.weight 64
layer1.0.conv2.weight 64,64,3,3
layer1.0.bn2.weight 64
layer1.1.conv1.weight 64,64,3,3
layer1.1.bn1.weight 64
layer1.1.conv2.weight 64,64,3,3
layer1.1.bn2.weight 64
layer2.0.conv1.weight 128,64,3,3
layer2.0.bn1.weight 128
layer2.0.conv2.weight 128,128,3,3
layer2.0.bn2.weight 128
layer2.0.downsample.0.weight 128,64,1,1
layer2.0.downsample.1.weight 128
layer2.1.conv1.weight 128,128,3,3
layer2.1.bn1.weight 128
layer2.1.conv2.weight 128,128,3,3
layer2.1.bn2.weight 128
layer3.0.conv1.weight 256,128,3,3
layer3.0.bn1.weight 256
layer3.0.conv2.weight 256,256,3,3
layer3.0.bn2.weight 256
layer3.0.downsample.0.weight 256,128,1,1
layer3.0.downsample.1.weight 256
layer3.1.conv1.weight 256,256,3,3
layer3.1.bn1.weight 256
layer3.1.conv2.weight 256,256,3,3
layer3.1.bn2.weight 256
layer4.0.conv1.weight 512,256,3,3
layer4.0.bn1.weight 512
layer4.0.conv2.weight 512,512,3,3
layer4.0.bn2.weight 512
layer4.0.downsample.0.weight 512,256,1,1
layer4.0.downsample.1.weight 512
layer4.1.conv1.weight 512,512,3,3
layer4.1.bn1.weight 512
layer4.1.conv2.weight 512,512,3,3
layer4.1.bn2.weight 512
"""

RESNET50_WEIGHTS = """
conv1.weight 64,3,7,7
bn1.weight 64
layer1.0.conv1.weight 64,64,1,1
layer1.0.bn1.weight 64
layer1.0.conv2.weight 64,64,3,3
layer1.0.bn2.weight 64
layer1.0.conv3.weight 256,64,1,1
layer1.0.bn3.weight 256
layer1.0.downsample.0.weight 256,64,1,1
layer1.0.downsample.1.weight 256
layer1.1.conv1.weight 64,256,1,1
layer1.1.bn1.weight 64
layer1.1.conv2.weight 64,64,3,3
layer1.1.bn2.weight 64
layer1.1.conv3.weight 256,64,1,1
layer1.1.bn3.weight 256
layer1.2.conv1.weight 64,256,1,1
layer1.2.bn1.weight 64
layer1.2.conv2.weight 64,64,3,3
layer1.2.bn2.weight 64
layer1.2.conv3.weight 256,64,1,1
layer1.2.bn3.weight 256
layer2.0.conv1.weight 128,256,1,1
layer2.0.bn1.weight 128
layer2.0.conv2.weight 128,128,3,3
layer2.0.bn2.weight 128
layer2.0.conv3.weight 512,128,1,1
layer2.0.bn3.weight 512
layer2.0.downsample.0.weight 512,256,1,1
layer2.0.downsample.1.weight 512
layer2.1.conv1.weight 128,512,1,1
layer2.1.bn1.weight 128
layer2.1.conv2.weight 128,128,3,3
layer2.1.bn2.weight 128
layer2.1.conv3.weight 512,128,1,1
layer2.1.bn3.weight 512
layer2.2.conv1.weight 128,512,1,1
layer2.2.bn1.weight 128
layer2.2.conv2.weight 128,128,3,3
layer2.2.bn2.weight 128
layer2.2.conv3.weight 512,128,1,1
layer2.2.bn3.weight 512
layer2.3.conv1.weight 128,512,1,1
layer2.3.bn1.weight 128
layer2.3.conv2.weight 128,128,3,3
layer2.3.bn2.weight 128
layer2.3.conv3.weight 512,128,1,1
layer2.3.bn3.weight 512
layer3.0.conv1.weight 256,512,1,1
layer3.0.bn1.weight 256
layer3.0.conv2.weight 256,256,3,3
layer3.0.bn2.weight 256
layer3.0.conv3.weight 1024,256,1,1
layer3.0.bn3.weight 1024
layer3.0.downsample.0.weight 1024,512,1,1
layer3.0.downsample.1.weight 1024
layer3.1.conv1.weight 256,1024,1,1
layer3.1.bn1.weight 256
layer3.1.conv2.weight 256,256,3,3
layer3.1.bn2.weight 256
layer3.1.conv3.weight 1024,256,1,1
layer3.1.bn3.weight 1024
layer3.2.conv1.weight 256,1024,1,1
layer3.2.bn1.weight 256
layer3.2.conv2.weight 256,256,3,3
layer3.2.bn2.weight 256
layer3.2.conv3.weight 1024,256,1,1
layer3.2.bn3.weight 1024
layer3.3.conv1.weight 256,1024,1,1
layer3.3.bn1.weight 256
layer3.3.conv2.weight 256,256,3,3
layer3.3.bn2.weight 256
layer3.3.conv3.weight 1024,256,1,1
layer3.3.bn3.weight 1024
layer3.4.conv1.weight 256,1024,1,1
layer3.4.bn1.weight 256
layer3.4.conv2.weight 256,256,3,3
layer3.4.bn2.weight 256
layer3.4.conv3.weight 1024,256,1,1
layer3.4.bn3.weight 1024
layer3.5.conv1.weight 256,1024,1,1
layer3.5.bn1.weight 256
layer3.5.conv2.weight 256,256,3,3
layer3.5.bn2.weight 256
layer3.5.conv3.weight 1024,256,1,1
layer3.5.bn3.weight 1024
layer4.0.conv1.weight 512,1024,1,1
layer4.0.bn1.weight 512
layer4.0.conv2.weight 512,512,3,3
layer4.0.bn2.weight 512
layer4.0.conv3.weight 2048,512,1,1
layer4.0.bn3.weight 2048
layer4.0.downsample.0.weight 2048,1024,1,1
layer4.0.downsample.1.weight 2048
layer4.1.conv1.weight 512,2048,1,1
layer4.1.bn1.weight 512
layer4.1.conv2.weight 512,512,3,3
layer4.1.bn2.weight 512
layer4.1.conv3.weight 2048,512,1,1
layer4.1.bn3.weight 2048
layer4.2.conv1.weight 512,2048,1,1
layer4.2.bn1.weight 512
layer4.2.conv2.weight 512,512,3,3
layer4.2.bn2.weight 512
layer4.2.conv3.weight 2048,512,1,1
layer4.2.bn3.weight 2048
"""

BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def expected_state(listing: str) -> dict[str, tuple[int, ...]]:
    expected = {}
    for line in listing.strip().splitlines():
        key, shape = line.split()
        dims = tuple(int(v) for v in shape.split(","))
        module = key.rsplit(".", 1)[0]
        is_bn = module.split(".")[-1].startswith("bn") or module.endswith("downsample.1")
        if is_bn:
            for suffix in BN_SUFFIXES:
                expected[f"{module}.{suffix}"] = () if suffix == "num_batches_tracked" else dims
        else:
            expected[key] = dims
    return expected


@pytest.mark.parametrize("depth, listing, num_keys, num_parameters", [
    (18, RESNET18_WEIGHTS, 120, 11_689_512 - 513_000),
    (50, RESNET50_WEIGHTS, 318, 25_557_032 - 2_049_000),
])
def test_state_dict_matches_torchvision(depth, listing, num_keys, num_parameters):
    model = ResNet(depth)
    state = model.state_dict()
    expected = expected_state(listing)
    assert len(expected) == num_keys
    assert list(state) == list(expected)  # same keys in the same order
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    assert sum(p.numel() for p in model.parameters()) == num_parameters


def test_torchvision_checkpoint_loads_and_mismatch_is_reported(tmp_path):
    source = ResNet(18)
    checkpoint = {k: torch.randn_like(v.float()).to(v.dtype) if v.dtype.is_floating_point else v
                  for k, v in source.state_dict().items()}
    checkpoint["fc.weight"] = torch.zeros(1000, 512)  # a torchvision file still has its classifier
    checkpoint["fc.bias"] = torch.zeros(1000)
    path = tmp_path / "resnet18.pth"
    torch.save(checkpoint, path)
    model = ResNet(18)
    load_torchvision_checkpoint(model, path)
    assert torch.equal(model.layer3[1].conv2.weight, checkpoint["layer3.1.conv2.weight"])

    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_torchvision_checkpoint(ResNet(18, width_multiplier=0.25), path)
    with pytest.raises(CheckpointError, match="not found"):
        load_torchvision_checkpoint(model, tmp_path / "missing.pth")


def test_width_multiplier_shrinks_stages():
    model = ResNet(18, width_multiplier=0.25)
    assert model.out_channels == (64, 128)
    stride16, stride32 = model(torch.zeros(1, 3, 64, 96))
    assert stride16.shape == (1, 64, 4, 6) and stride32.shape == (1, 128, 2, 3)
