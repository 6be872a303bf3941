"""Closed-form recovery of the input of a biased linear layer from its gradient.

For ``y = W x + b`` and a single input, ``∂L/∂b_i = ∂L/∂y_i`` and ``∂L/∂W_{i,:} = (∂L/∂y_i)·xᵀ``, so every row
with a non-zero bias gradient holds a scaled copy of ``x`` (Phong, Aono, Hayashi, Wang, Moriai, "Privacy-Preserving
Deep Learning via Additively Homomorphic Encryption", 2017; used as a baseline by Geiping et al., "Inverting
Gradients — How easy is it to break privacy in federated learning?", NeurIPS 2020, §4). It gives the image itself
for an MLP and the penultimate features for a CNN, exactly and without optimisation. For the mean gradient of a
batch the same ratio gives a mixture of the inputs, not one of them. Nothing here imports Lightning.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor, nn

from lightning_inversion.client import Update

log = logging.getLogger(__name__)


def recover_linear_input(weight_grad: Tensor, bias_grad: Tensor, rtol: float = 1e-6) -> Tensor:
    """The input ``x`` of a linear layer ``y = W x + b`` from the gradients of its weight and bias.

    Least squares over every usable row: ``x = Σ_i b_i W_i / Σ_i b_i²`` (``b_i``, ``W_i`` the gradients), which
    minimises ``Σ_i ‖W_i − b_i x‖²``. Rows with ``|b_i| ≤ rtol · max|b|`` are ignored.

    Args:
        weight_grad: ``(K, D)`` gradient of the weight (a FedAvg delta of one step works too: the ratio is the
            same).
        bias_grad: ``(K,)`` gradient of the bias.
        rtol: relative threshold below which a row's bias gradient counts as zero.

    Returns:
        The recovered input ``(D,)``, in the dtype of ``weight_grad``.

    Raises:
        ValueError: if the shapes do not match a linear layer or every bias gradient is zero.
    """
    if weight_grad.ndim != 2:
        raise ValueError(
            f"weight_grad must be a linear layer's 2-D (K, D) gradient, got shape {tuple(weight_grad.shape)}"
        )
    if bias_grad.shape != weight_grad.shape[:1]:
        raise ValueError(
            f"bias_grad must have shape ({weight_grad.shape[0]},) to match weight_grad "
            f"{tuple(weight_grad.shape)}, got {tuple(bias_grad.shape)}"
        )
    w = weight_grad.detach().double()  # (K, D)
    b = bias_grad.detach().double()  # (K,)
    scale = b.abs().max() if b.numel() else b.new_zeros(())
    if not bool(scale > 0):
        raise ValueError(
            "every bias gradient is zero: the layer's input cannot be recovered (no row carries a copy of it)"
        )
    b = torch.where(b.abs() > rtol * scale, b, torch.zeros_like(b))
    x = (b @ w) / (b @ b)  # (D,)
    return x.to(weight_grad.dtype)


def find_linear_layers(victim: nn.Module) -> list[tuple[str, int, int]]:
    """The biased ``nn.Linear`` layers of ``victim``, in module order.

    Returns:
        ``(module name, index of its weight, index of its bias)``, indices into ``list(victim.parameters())``.
    """
    index = {id(p): i for i, p in enumerate(victim.parameters())}
    return [
        (name, index[id(module.weight)], index[id(module.bias)])
        for name, module in victim.named_modules()
        if isinstance(module, nn.Linear) and module.bias is not None
    ]


def last_layer(victim: nn.Module, num_classes: int) -> tuple[int, int | None]:
    """The classifier layer of ``victim``: the last ``(num_classes, D)`` parameter, and its bias if one follows.

    Returns:
        ``(index of its weight, index of its bias or None)``, indices into ``list(victim.parameters())``.

    Raises:
        ValueError: no parameter has ``num_classes`` rows and two or more axes.
    """
    shapes = [tuple(p.shape) for p in victim.parameters()]
    for i in range(len(shapes) - 1, -1, -1):
        if len(shapes[i]) == 2 and shapes[i][0] == num_classes:
            has_bias = i + 1 < len(shapes) and shapes[i + 1] == (num_classes,)
            return i, i + 1 if has_bias else None
    raise ValueError(f"no {num_classes}-row linear layer found in the update for label recovery")


def last_layer_update(victim: nn.Module, update: Update, num_classes: int) -> tuple[Tensor, Tensor | None]:
    """The classifier layer's entries of ``update`` (weight, and bias if any), as a change for ``weights``.

    A ``weights`` update (``θ_K``) gives the change ``θ_K − θ_0`` against the victim's parameters.
    """
    weight_index, bias_index = last_layer(victim, num_classes)
    tensors = update.tensors
    if update.kind == "weights":
        params = list(victim.parameters())
        tensors = {
            i: tensors[i] - params[i].to(tensors[i]) for i in (weight_index, bias_index) if i is not None
        }
    return tensors[weight_index], None if bias_index is None else tensors[bias_index]


def recover_inputs(victim: nn.Module, update: Update, layer: str | None = None) -> tuple[Tensor, bool]:
    """The input of a biased linear layer of ``victim``, recovered from the client's ``update``.

    Args:
        victim: the victim model (only its structure is used).
        update: the update the server received, one tensor per ``victim.parameters()`` entry. A FedAvg ``delta``
            works for one local step; with more steps it is exact for a first layer (its input, the image, never
            changes) and approximate deeper. Kind ``weights`` (``θ_K``) is refused: pass ``θ_K − θ_0``.
        layer: the module name of the linear layer; the first biased ``nn.Linear`` if ``None``.

    Returns:
        ``(input, is_mixture)``: the layer's input ``(D,)``, and whether it is a mixture of several inputs
        (more than one image, or an aggregate of several clients), in which case a warning is logged.

    Raises:
        ValueError: no such layer, an update that does not fit the victim, or a ``weights`` update.
    """
    if update.kind == "weights":
        raise ValueError(
            "an update of kind 'weights' holds the new weights θ_K, which carry no gradient: pass the change "
            "θ_K − θ_0 as an update of kind 'delta'"
        )
    layers = find_linear_layers(victim)
    if not layers:
        raise ValueError(f"{type(victim).__name__} has no nn.Linear layer with a bias")
    if layer is None:
        name, wi, bi = layers[0]
    else:
        found = [entry for entry in layers if entry[0] == layer]
        if not found:
            raise ValueError(
                f"no biased nn.Linear named {layer!r}; the victim has {[n for n, _, _ in layers]}"
            )
        name, wi, bi = found[0]
    num_params = len(list(victim.parameters()))
    if len(update.tensors) != num_params:
        raise ValueError(f"the update has {len(update.tensors)} tensors, the victim {num_params} parameters")
    inputs = recover_linear_input(update.tensors[wi], update.tensors[bi])
    is_mixture = (update.num_images or 1) > 1 or update.num_clients > 1
    if is_mixture:
        log.warning(
            "the update of layer %r comes from %s images and %s clients: the recovered input is a mixture of "
            "their inputs, not one of them",
            name,
            update.num_images,
            update.num_clients,
        )
    return inputs, is_mixture


def analytic_start(victim: nn.Module, update: Update, image_shape: tuple[int, ...]) -> tuple[Tensor, bool]:
    """The closed-form input of the victim's first biased linear layer, and whether it is the image itself.

    It is the image when that layer reads the image (an MLP) and the update comes from one image of one client;
    otherwise the layer's input features (or a mixture of them), and a warning says so.

    Raises:
        ValueError: the victim has no biased ``nn.Linear`` layer, or the update cannot be used.
    """
    layers = find_linear_layers(victim)
    if not layers:
        raise ValueError("init 'analytic' needs a victim with a biased nn.Linear layer")
    name = layers[0][0]
    features, is_mixture = recover_inputs(victim, update, name)
    exact = features.numel() == math.prod(image_shape) and not is_mixture
    if not exact:
        log.warning(
            "closed-form recovery gives the %d inputs of layer %r%s, not the image: the images are optimised",
            features.numel(),
            name,
            " (a mixture of the batch's inputs)" if is_mixture else "",
        )
    return features, exact
