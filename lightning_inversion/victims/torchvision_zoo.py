"""torchvision classifiers as victims, by their lower-case torchvision name (``resnet18``, ``vgg11``, ...).

Any number of classes and input channels: a first convolution for ``C != 3`` channels replaces the RGB one.
With ``pretrained=True`` the DEFAULT ImageNet weights come from torch.hub's cache
(``$TORCH_HOME/hub/checkpoints``), downloaded there on a connected machine.
"""

from __future__ import annotations

import logging
import math
from functools import partial

import torch
import torchvision
from torch import Tensor, nn

from lightning_inversion.victims.registry import register_victim
from lightning_inversion.victims.weights import load_pretrained_state_dict

log = logging.getLogger(__name__)

# Models with auxiliary heads would return a tuple while training; the victim must return logits only.
_EXTRA_KWARGS: dict[str, dict[str, bool]] = {
    "googlenet": {"aux_logits": False, "init_weights": True},
    "inception_v3": {"aux_logits": False, "init_weights": True},
}
_AUX_PREFIXES = ("aux1.", "aux2.", "AuxLogits.")


def _first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module
    raise ValueError(f"{type(model).__name__} has no Conv2d to adapt to the input channels")


def _adapt_input_conv(weight: Tensor, in_channels: int) -> Tensor:
    """RGB kernels ``(O, 3, k, k)`` -> ``(O, C, k, k)`` with the same response to a grey image (timm's recipe)."""
    if in_channels == 1:
        return weight.sum(1, keepdim=True)
    repeats = math.ceil(in_channels / 3)
    return weight.repeat(1, repeats, 1, 1)[:, :in_channels] * (3 / in_channels)


def _replace_first_conv(model: nn.Module, in_channels: int) -> str:
    """Swap the first (RGB) convolution for one taking ``in_channels``; return its parameter name."""
    name, old = _first_conv(model)
    new = nn.Conv2d(
        in_channels,
        old.out_channels,
        kernel_size=old.kernel_size,  # type: ignore[arg-type]
        stride=old.stride,  # type: ignore[arg-type]
        padding=old.padding,  # type: ignore[arg-type]
        dilation=old.dilation,  # type: ignore[arg-type]
        groups=old.groups,
        bias=old.bias is not None,
        padding_mode=old.padding_mode,
    )
    with torch.no_grad():
        # Reuse the architecture's own random init, cycling over the RGB kernels.
        new.weight.copy_(old.weight[:, torch.arange(in_channels) % old.in_channels])
        if old.bias is not None:
            new.bias.copy_(old.bias)
    parent_name, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(parent_name), attribute, new)
    return f"{name}.weight"


def _load_pretrained(model: nn.Module, name: str, num_classes: int, first_conv: str | None) -> None:
    weights = torchvision.models.get_model_weights(name).DEFAULT
    state = {k: v for k, v in load_pretrained_state_dict(weights).items() if not k.startswith(_AUX_PREFIXES)}
    own = model.state_dict()
    if first_conv is not None:
        state[first_conv] = _adapt_input_conv(state[first_conv], own[first_conv].shape[1])
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    num_categories = len(weights.meta["categories"])
    for key in mismatched:
        if own[key].shape[0] != num_classes or state[key].shape[0] != num_categories:
            raise RuntimeError(f"pretrained {name}: unexpected shape of {key}: {state[key].shape}")
        del state[key]
    if mismatched:
        log.warning(
            "%s: pretrained on %d classes; the classifier (%s) is freshly initialised for %d classes",
            name,
            num_categories,
            ", ".join(mismatched),
            num_classes,
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    if set(missing) != set(mismatched) or unexpected:
        raise RuntimeError(f"pretrained {name}: missing keys {missing}, unexpected keys {unexpected}")


def torchvision_victim(
    name: str, num_classes: int, image_shape: tuple[int, int, int], pretrained: bool = False
) -> nn.Module:
    """Build the torchvision classifier ``name`` for ``num_classes`` and ``image_shape[0]`` input channels.

    Args:
        name: A torchvision classification model name (``resnet18``, ...).
        num_classes: Number of output logits; with ``pretrained``, a classifier of another size than the
            published one is freshly initialised.
        image_shape: ``(C, H, W)`` of the inputs.
        pretrained: Load the DEFAULT published weights.

    Raises:
        MissingWeightsError: ``pretrained`` and the weights are neither cached nor downloadable.
    """
    kwargs = dict(_EXTRA_KWARGS.get(name, {}))
    if name in _EXTRA_KWARGS:
        # torchvision's published weights for these expect their own input transform; keep that behaviour.
        kwargs["transform_input"] = pretrained and image_shape[0] == 3
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    first_conv = _replace_first_conv(model, image_shape[0]) if image_shape[0] != 3 else None
    if pretrained:
        _load_pretrained(model, name, num_classes, first_conv)
    return model


for _name in torchvision.models.list_models(module=torchvision.models):
    register_victim(_name, pretrained=True)(partial(torchvision_victim, _name))
