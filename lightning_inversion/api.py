"""The library face: reconstruct images from a gradient you computed yourself, with your own model."""

from __future__ import annotations

from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from .attack import GradientInversion, Reconstruction, lightning_notices_silenced
from .client import Client, Update
from .report import InversionReport


def _num_classes(model: nn.Module, image_shape: Sequence[int]) -> int:
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(torch.zeros(1, *image_shape, device=device))
    model.train(was_training)
    return int(logits.shape[-1])


def reconstruct(
    model: nn.Module,
    target_gradient: Sequence[Tensor] | Update,
    labels: Tensor | None = None,
    *,
    image_shape: Sequence[int] = (3, 32, 32),
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    num_images: int = 1,
    restarts: int = 1,
    max_steps: int = 4800,
    cost: str = "sim",
    tv: float = 1e-2,
    signed: bool = True,
    boxed: bool = True,
    lr: float = 0.1,
    seed: int = 0,
    client: Client | None = None,
    ground_truth: Tensor | None = None,
    trainer_kwargs: dict | None = None,
    **options,
) -> Reconstruction:
    """Reconstruct the images behind a gradient (or FedAvg update) of ``model``.

    Args:
        model: any ``nn.Module`` classifier taking ``(B, *image_shape)`` normalised images; it is left as it was
            (its ``requires_grad`` flags and mode are restored).
        target_gradient: the gradient of the mean cross-entropy over the batch, one tensor per parameter in
            ``model.parameters()`` order (what ``torch.autograd.grad(loss, model.parameters())`` returns), or an
            :class:`~lightning_inversion.client.Update` (for FedAvg updates).
        labels: the batch's labels ``(B,)`` if known; ``None`` recovers them (iDLG for one image, label counts for
            a batch) unless ``label_strategy`` is given in ``options``.
        image_shape: ``(C, H, W)`` of one image.
        mean, std: the normalisation the model expects; ``None`` means images in [0, 1] as they are.
        num_images: B, the number of images behind the gradient.
        restarts: independent trials optimised together; the best is chosen without ground truth.
        max_steps: optimisation steps.
        cost, tv, signed, boxed, lr, seed: as in :class:`~lightning_inversion.attack.GradientInversion`.
        client: the client's protocol (FedSGD by default; pass ``Client(protocol="fedavg", ...)`` for updates).
        ground_truth: the true images in [0, 1], to measure the result (``result.metrics``); never used by the
            attack.
        trainer_kwargs: passed on to the Lightning ``Trainer`` (e.g. ``accelerator``, ``devices``,
            ``precision``); by default a quiet single-device Trainer.
        **options: any other :class:`~lightning_inversion.attack.GradientInversion` argument (``layers``,
            ``layer_weights``, ``init``, ``optimizer``, ``lr_decay``, ``median_filter_every``, ``label_strategy``,
            ``restart_selection``, ...).

    Returns:
        a :class:`~lightning_inversion.attack.Reconstruction`: ``images`` ``(B, C, H, W)`` in [0, 1], ``labels``,
        ``restarts`` and ``stats`` (per-restart scores, chosen restart, steps, seconds); ``metrics`` when
        ``ground_truth`` was given.
    """
    image_shape = tuple(int(s) for s in image_shape)
    channels = image_shape[0]
    mean = tuple(mean) if mean is not None else (0.0,) * channels
    std = tuple(std) if std is not None else (1.0,) * channels
    client = client or Client()
    if isinstance(target_gradient, Update):
        update = target_gradient
        if labels is not None:
            update.labels = labels
    else:
        names = [n for n, _ in model.named_parameters()]
        update = Update([g.detach() for g in target_gradient], names, client.kind, labels, num_images)
    if "label_strategy" not in options:
        options["label_strategy"] = (
            "given" if update.labels is not None else ("idlg" if num_images == 1 else "batch")
        )

    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    try:
        module = GradientInversion(
            model,
            num_classes=options.pop("num_classes", None) or _num_classes(model, image_shape),
            image_shape=image_shape,
            mean=mean,
            std=std,
            num_images=num_images,
            restarts=restarts,
            cost=cost,
            tv=tv,
            signed=signed,
            boxed=boxed,
            lr=lr,
            seed=seed,
            client=client,
            **options,
        )
        module.set_target(update)
        report = InversionReport(monitor_every_n_steps=0, lpips=True)
        if ground_truth is not None:
            report.set_ground_truth(ground_truth, None if labels is None else labels)
        settings = dict(
            max_steps=max_steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            devices=1,
        )
        settings.update(trainer_kwargs or {})
        settings["callbacks"] = [*settings.get("callbacks", []), report]
        with lightning_notices_silenced():
            trainer = pl.Trainer(**settings)
            trainer.fit(module)
        result = module.reconstruction
        result.metrics = report.metrics if ground_truth is not None else None
        return result
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
