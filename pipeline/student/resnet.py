"""ResNet image backbone in plain torch with torchvision's state_dict key names.

Keys follow torchvision exactly (`conv1`, `bn1`, `layer1..layer4` of BasicBlock/Bottleneck with
`conv1/bn1/conv2/bn2(/conv3/bn3)/downsample.0/.1`), without the classifier `fc`, so an ImageNet checkpoint written
by torchvision loads strictly once its `fc.*` entries are dropped. A width multiplier shrinks every stage for tiny CPU
configs (such a network can of course not load ImageNet weights).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError

logger = logging.getLogger(__name__)

# Blocks per stage, as torchvision's resnet18/34/50/101.
STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        # The stride sits on the 3x3 conv (torchvision's "ResNet v1.5").
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet-18/34/50/101 trunk returning the stride-16 (layer3) and stride-32 (layer4) features."""

    def __init__(self, depth: int = 50, width_multiplier: float = 1.0):
        super().__init__()
        if depth not in STAGE_BLOCKS:
            raise ValueError(f"ResNet depth {depth} is not one of {sorted(STAGE_BLOCKS)}")
        block = BasicBlock if depth in (18, 34) else Bottleneck
        widths = [max(8, int(round(64 * width_multiplier * 2**i))) for i in range(4)]
        stem = widths[0]
        self.conv1 = nn.Conv2d(3, stem, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_channels = stem
        stages = []
        for index, (planes, blocks) in enumerate(zip(widths, STAGE_BLOCKS[depth])):
            stride = 1 if index == 0 else 2
            downsample = None
            if stride != 1 or in_channels != planes * block.expansion:
                downsample = nn.Sequential(
                    nn.Conv2d(in_channels, planes * block.expansion, 1, stride, bias=False),
                    nn.BatchNorm2d(planes * block.expansion),
                )
            layers = [block(in_channels, planes, stride, downsample)]
            in_channels = planes * block.expansion
            layers += [block(in_channels, planes) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        # (layer3, layer4) channels, the inputs of the image neck.
        self.out_channels = (widths[2] * block.expansion, widths[3] * block.expansion)
        # (layer2, layer3, layer4) channels, the inputs of an FPN (`forward_pyramid`).
        self.pyramid_channels = (widths[1] * block.expansion, *self.out_channels)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B*N, 3, H, W) -> (layer3 (B*N, C3, H/16, W/16), layer4 (B*N, C4, H/32, W/32))."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer2(self.layer1(x))
        stride16 = self.layer3(x)
        stride32 = self.layer4(stride16)
        return stride16, stride32

    def forward_pyramid(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """images (B*N, 3, H, W) -> (layer2 (B*N, C2, H/8, W/8), layer3 (.., H/16, W/16), layer4 (.., H/32, W/32))."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        stride8 = self.layer2(self.layer1(x))
        stride16 = self.layer3(stride8)
        return stride8, stride16, self.layer4(stride16)


def load_torchvision_checkpoint(model: ResNet, path: str | Path) -> None:
    """Load a torchvision ImageNet ResNet state_dict strictly (the classifier `fc.*` is dropped, nothing else).

    Raises CheckpointError naming the file and the first missing / unexpected / mis-shaped keys.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: image backbone checkpoint not found; set backbone.pretrained to an "
                              f"existing torchvision ResNet .pth file or to null")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {key.removeprefix("module."): value for key, value in state.items() if not key.startswith("fc.")}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    mis_shaped = [f"{key} {tuple(state[key].shape)} vs model {tuple(own[key].shape)}"
                  for key in sorted(set(own) & set(state)) if state[key].shape != own[key].shape]
    if missing or unexpected or mis_shaped:
        raise CheckpointError(
            f"{path}: does not fit the ResNet backbone: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}), {len(mis_shaped)} shape mismatches "
            f"(e.g. {mis_shaped[:3]}); use a torchvision checkpoint of the configured depth at width_multiplier 1.0")
    model.load_state_dict(state, strict=True)
    logger.info("loaded image backbone weights from %s (%d tensors)", path, len(state))
