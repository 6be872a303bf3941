"""The private batch's BatchNorm statistics, solved from the running statistics a client sends.

A client that trains in training mode (Flower's ``net.train()``) updates every BatchNorm layer's running
statistics with its batch's own: with momentum ``m`` (PyTorch's default 0.1),

    running_mean ← (1 − m) · running_mean + m · mean(x)
    running_var  ← (1 − m) · running_var  + m · var_unbiased(x),   var_unbiased = var · n / (n − 1)

where ``x`` is the layer's input over the batch and spatial axes, ``n = B · H · W`` values per channel. The server
knows the running statistics it sent (the global model's buffers) and receives the new ones, so it solves for
``mean(x)`` and the biased ``var(x)`` of the private batch at every BatchNorm layer: exactly for one local step
(FedSGD, or FedAvg with K = 1). After K steps the running statistics hold a weighted average of the K batches'
statistics; taking those as constant gives their average (``(1 − (1 − m)^K)`` in place of ``m``), close when the
weights move little and the batch is the same at every step. ``momentum=None`` (a cumulative average) is solved
with the step counter ``num_batches_tracked``.

These are the statistics that the BatchNorm prior of Yin et al., "See through Gradients: Image Batch Recovery via
GradInversion" (CVPR 2021), matches, there taken from the model's training set; here they are the client's own.
Nothing here imports Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .client import Update
from .errors import InputError
from .priors import StatisticsSource


def batchnorm_layers(victim: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The victim's BatchNorm layers that keep running statistics, by name in ``victim.named_modules()``."""
    return {
        name: m
        for name, m in victim.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.track_running_stats
        and m.running_mean is not None
    }


def values_per_channel(victim: nn.Module, image_shape: Sequence[int], batch_size: int) -> dict[str, int]:
    """``n``: how many values each BatchNorm layer averages per channel for a batch of ``batch_size`` images of
    ``image_shape`` (the batch times the spatial size of the layer's input)."""
    layers = batchnorm_layers(victim)
    sizes: dict[str, int] = {}
    hooks = [
        m.register_forward_pre_hook(
            lambda m, args, name=name: sizes.__setitem__(name, args[0][0].numel() // args[0].shape[1])
        )
        for name, m in layers.items()
    ]
    modes = [(m, m.training) for m in victim.modules()]
    victim.eval()
    try:
        with torch.no_grad():
            param = next(victim.parameters())
            victim(torch.zeros(1, *image_shape, device=param.device, dtype=param.dtype))
    finally:
        for hook in hooks:
            hook.remove()
        for m, mode in modes:
            m.training = mode
    return {name: batch_size * size for name, size in sizes.items()}


def solve_batch_statistics(
    old_mean: Tensor,
    old_var: Tensor,
    mean_change: Tensor,
    var_change: Tensor,
    n: int,
    momentum: float | None = 0.1,
    steps: int = 1,
    batches_before: int = 0,
) -> tuple[Tensor, Tensor]:
    """The batch's per-channel mean and biased variance from one BatchNorm layer's running statistics.

    Args:
        old_mean, old_var: the running statistics before local training (the global model's), ``(C,)``.
        mean_change, var_change: how local training changed them (new − old), ``(C,)``.
        n: the values per channel in one step's batch (batch size × spatial size of the layer's input).
        momentum: the layer's momentum; ``None``: the cumulative average over ``batches_before + steps``.
        steps: the local steps K (batches) the running statistics moved by.
        batches_before: ``num_batches_tracked`` before local training (used with ``momentum=None`` only).

    Returns:
        ``(mean, var)``, each ``(C,)``, ``var`` biased (divided by n): exact for one step, the average over the
        steps' batches for several.
    """
    if momentum is None:  # running ← running + (x − running) / count
        factor = steps / (batches_before + steps)
    else:
        factor = 1.0 - (1.0 - momentum) ** steps
    mean = old_mean + mean_change / factor
    unbiased = old_var + var_change / factor
    return mean, unbiased * ((n - 1) / n) if n > 1 else unbiased


class RecoveredStatistics(StatisticsSource):
    """The client's own BatchNorm statistics, solved from the buffers it sent (see the module docstring).

    Needs an update whose :attr:`~lightning_inversion.client.Update.buffer_changes` hold the moved running
    statistics and the victim holding the global weights and buffers the server sent. The number of local steps
    comes from the change of ``num_batches_tracked`` (else the update's recorded ``local_steps`` for FedAvg, else
    one), the batch per step from the recorded ``local_batch_size`` (else all ``num_images``).

    Args:
        image_shape: ``(C, H, W)`` of the client's images; ``None``: the update's recorded ``image_shape``.
    """

    def __init__(self, image_shape: tuple[int, int, int] | None = None) -> None:
        self.image_shape = None if image_shape is None else tuple(int(s) for s in image_shape)

    def statistics(self, victim: nn.Module, update: Update) -> dict[str, tuple[Tensor, Tensor]]:
        """Per BatchNorm layer of the victim, the private batch's ``(mean, var)`` (biased), each ``(C,)``.

        Raises:
            InputError: the update carries no moved running statistics, or its number of images or image shape
                is unknown.
        """
        changes = update.buffer_changes
        layers = {
            name: m
            for name, m in batchnorm_layers(victim).items()
            if f"{name}.running_mean" in changes and f"{name}.running_var" in changes
        }
        if not layers or not update.buffers_moved:
            raise InputError(
                "recovered BatchNorm statistics need an update whose BatchNorm running statistics moved (a client "
                "that trained in train mode and sent its buffers); this one carries none"
            )
        image_shape = self.image_shape or update.meta.get("image_shape")
        if image_shape is None or update.num_images is None:
            raise InputError(
                "recovered BatchNorm statistics need the number of images and their shape (C, H, W) of the update"
            )
        meta = update.meta
        batch = meta.get("local_batch_size") if meta.get("protocol") == "fedavg" else None
        batch = min(int(batch or update.num_images), update.num_images)
        sizes = values_per_channel(victim, image_shape, batch)
        out = {}
        for name, m in layers.items():
            counter = changes.get(f"{name}.num_batches_tracked")
            if counter is not None:
                steps = int(counter.reshape(-1)[0])
            elif meta.get("protocol") == "fedavg" and isinstance(meta.get("local_steps"), int):
                steps = meta["local_steps"]
            else:
                steps = 1
            if steps < 1:
                raise InputError(f"BatchNorm layer {name!r}: num_batches_tracked moved by {steps} steps")
            before = 0 if m.num_batches_tracked is None else int(m.num_batches_tracked)
            mean, var = solve_batch_statistics(
                m.running_mean.detach().float(),
                m.running_var.detach().float(),
                changes[f"{name}.running_mean"].to(m.running_mean.device).float().reshape(-1),
                changes[f"{name}.running_var"].to(m.running_mean.device).float().reshape(-1),
                sizes[name],
                m.momentum,
                steps,
                before,
            )
            out[name] = (mean, var.clamp_min(0))
        return out
