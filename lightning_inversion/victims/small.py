"""Small victims of the gradient-inversion literature: ``ConvNet-{width}``, ``LeNet-Zhu`` (DLG) and ``MLP``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_inversion.victims.registry import register_victim


def _flat_size(features: nn.Module, image_shape: tuple[int, int, int]) -> int:
    """Number of features ``features`` gives for one image, from a dummy forward that leaves BN stats alone."""
    was_training = features.training
    features.eval()
    with torch.no_grad():
        size = features(torch.zeros(1, *image_shape)).numel()
    features.train(was_training)
    return size


def _conv_bn_relu(in_channels: int, out_channels: int) -> list[nn.Module]:
    return [nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU()]


class ConvNet(nn.Module):
    """The ConvNet of Geiping et al. 2020: 8 conv+BN+ReLU layers, two 3x3 max-pools, a linear classifier.

    Widths ``w, 2w, 2w, 4w, 4w, 4w``, max-pool 3, ``4w, 4w``, max-pool 3 (a 3x3 map at 32x32 input).

    Args:
        width: Base width ``w``.
        num_classes: Number of output logits.
        image_shape: ``(C, H, W)`` of the inputs (H, W >= 9).
    """

    def __init__(self, width: int, num_classes: int, image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"ConvNet width must be positive, got {width}")
        channels = [image_shape[0], width, 2 * width, 2 * width, 4 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(channels[:-1], channels[1:], strict=True):
            layers += _conv_bn_relu(c_in, c_out)
        layers += [
            nn.MaxPool2d(3),
            *_conv_bn_relu(4 * width, 4 * width),
            *_conv_bn_relu(4 * width, 4 * width),
        ]
        layers += [nn.MaxPool2d(3), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(_flat_size(self.features, image_shape), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))  # (B, num_classes)


class LeNetZhu(nn.Module):
    """The DLG network (Zhu et al. 2019): three 5x5 sigmoid convs of 12 channels, strides 2, 2, 1, then linear.

    All weights and biases are drawn uniformly from [-0.5, 0.5], as in DLG. At 32x32 the linear layer has 768
    inputs.

    Args:
        num_classes: Number of output logits.
        image_shape: ``(C, H, W)`` of the inputs.
    """

    def __init__(self, num_classes: int, image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(image_shape[0], 12, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=2, stride=1),
            nn.Sigmoid(),
            nn.Flatten(),
        )
        self.fc = nn.Linear(_flat_size(self.features, image_shape), num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.uniform_(module.weight, -0.5, 0.5)
                nn.init.uniform_(module.bias, -0.5, 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))  # (B, num_classes)


class MLP(nn.Module):
    """Flatten, three hidden ReLU layers of 1024 units, linear classifier; every layer has a bias.

    Args:
        num_classes: Number of output logits.
        image_shape: ``(C, H, W)`` of the inputs; the input layer has ``C * H * W`` units.
        hidden: Units per hidden layer.
    """

    def __init__(self, num_classes: int, image_shape: tuple[int, int, int], hidden: int = 1024) -> None:
        super().__init__()
        in_features = image_shape[0] * image_shape[1] * image_shape[2]
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)  # (B, num_classes)


@register_victim("ConvNet-{width}", variants=[f"ConvNet-{w}" for w in (8, 16, 32, 64, 128)])
def convnet(num_classes: int, image_shape: tuple[int, int, int], width: int) -> ConvNet:
    """Build ``ConvNet-{width}``."""
    return ConvNet(width, num_classes, image_shape)


@register_victim("LeNet-Zhu")
def lenet_zhu(num_classes: int, image_shape: tuple[int, int, int]) -> LeNetZhu:
    """Build the DLG LeNet."""
    return LeNetZhu(num_classes, image_shape)


@register_victim("MLP")
def mlp(num_classes: int, image_shape: tuple[int, int, int]) -> MLP:
    """Build the 3x1024 MLP."""
    return MLP(num_classes, image_shape)
