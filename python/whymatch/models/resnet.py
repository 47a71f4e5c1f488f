"""A plain ResNet-50 (He et al. 2016), written from scratch, randomly initialized.

No weights are downloaded or read: this network exists to time explainers with
a model of realistic cost (about 4.1 GMAC per 224 x 224 image), not to produce
meaningful embeddings. The layout is torchvision's ``resnet50`` (the stride
sits on the 3x3 convolution of each bottleneck, "ResNet v1.5").
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet50"]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions (the first strided), each with batch norm, plus a shortcut (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != width:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, width, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(width))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride) -> 1x1 convolutions, each with batch norm, plus a shortcut."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int = 1) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(out_ch))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet: stem (7x7/2 conv, 3x3/2 max pool), four stages, global average pool.

    Args:
        layers: blocks per stage, (3, 4, 6, 3) for ResNet-50, (2, 2, 2, 2) for ResNet-18.
        num_classes: size of the final linear layer (ignored when ``embedding``).
        embedding: return the pooled feature (B, 512 * 4) instead of class logits.
        in_channels: channels of the input images.
        block: Bottleneck (ResNet-50) or BasicBlock (ResNet-18).
    """

    def __init__(self, layers: tuple[int, int, int, int] = (3, 4, 6, 3), num_classes: int = 1000, *,
                 embedding: bool = False, in_channels: int = 3, block: type = Bottleneck) -> None:
        super().__init__()
        self.embedding = bool(embedding)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64),
            nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1))
        stages, in_ch = [], 64
        for i, (width, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            stage = []
            for b in range(blocks):
                stage.append(block(in_ch, width, stride if b == 0 else 1))
                in_ch = width * block.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = in_ch
        self.fc = None if self.embedding else nn.Linear(in_ch, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, H, W) images -> (B, feature_dim) embeddings (2048 for ResNet-50), or (B, num_classes) logits."""
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.pool(x), 1)
        return x if self.fc is None else self.fc(x)


def resnet50(num_classes: int = 1000, *, embedding: bool = False, in_channels: int = 3) -> ResNet:
    """A randomly initialized ResNet-50; ``embedding=True`` returns the (B, 2048) pooled feature."""
    return ResNet((3, 4, 6, 3), num_classes, embedding=embedding, in_channels=in_channels)


def resnet18(num_classes: int = 1000, *, embedding: bool = False, in_channels: int = 3) -> ResNet:
    """A randomly initialized ResNet-18; ``embedding=True`` returns the (B, 512) pooled feature."""
    return ResNet((2, 2, 2, 2), num_classes, embedding=embedding, in_channels=in_channels, block=BasicBlock)
