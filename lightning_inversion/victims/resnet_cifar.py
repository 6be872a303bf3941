"""CIFAR-style ResNets (He et al. 2016, Sec. 4.2) as used by Geiping et al. 2020: ``ResNet{depth}-{width}``.

A 3x3 stride-1 stem, no max-pool, three stages of BasicBlocks with widths ``(w, 2w, 4w)`` and strides 1, 2, 2,
``n`` blocks per stage where ``depth = 6n + 2``, global average pooling and a linear classifier. The base width
is ``16 * width``: ``ResNet20-4`` has stages of 64, 128 and 256 channels.
"""

from __future__ import annotations

from torch import Tensor, nn

from lightning_inversion.victims.registry import register_victim


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        # Not in-place: the attack differentiates through the victim twice (create_graph=True).
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR-style ResNet; works at any input size >= 8x8.

    Args:
        depth: ``6n + 2`` (20, 32, 44, 56, 110, ...).
        width: Width multiplier of the base width 16.
        num_classes: Number of output logits.
        in_channels: Image channels.
    """

    def __init__(self, depth: int, width: int, num_classes: int, in_channels: int) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1 (20, 32, 44, ...), got {depth}")
        if width < 1:
            raise ValueError(f"width multiplier must be positive, got {width}")
        blocks = (depth - 2) // 6
        widths = (16 * width, 32 * width, 64 * width)
        self.stem = nn.Sequential(_conv3x3(in_channels, widths[0]), nn.BatchNorm2d(widths[0]), nn.ReLU())
        self.layer1 = self._stage(widths[0], widths[0], blocks, stride=1)
        self.layer2 = self._stage(widths[0], widths[1], blocks, stride=2)
        self.layer3 = self._stage(widths[1], widths[2], blocks, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    @staticmethod
    def _stage(in_channels: int, out_channels: int, blocks: int, stride: int) -> nn.Sequential:
        layers = [BasicBlock(in_channels, out_channels, stride)]
        layers += [BasicBlock(out_channels, out_channels) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(self.pool(x).flatten(1))  # (B, num_classes)


@register_victim("ResNet{depth}", variants=[f"ResNet{d}" for d in (20, 32, 44, 56, 110)])
@register_victim("ResNet{depth}-{width}", variants=("ResNet20-4", "ResNet32-10"))
def cifar_resnet(
    num_classes: int, image_shape: tuple[int, int, int], depth: int, width: int = 1
) -> CifarResNet:
    """Build ``ResNet{depth}`` (base width 16) or ``ResNet{depth}-{width}`` (base width 16 * width)."""
    return CifarResNet(depth, width, num_classes, in_channels=image_shape[0])
