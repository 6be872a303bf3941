"""The library face: reconstruct images from a gradient you computed yourself, with your own model."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from .attack import GradientInversion, Reconstruction
from .client import Client, Update
from .errors import InputError
from .notices import lightning_notices_silenced
from .objectives import MatchingObjective
from .report import InversionReport

# Layers whose output depends on the mode (training or eval): the client's update does too.
_MODE_DEPENDENT = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)


def _model_mode(model: nn.Module) -> bool | None:
    """Whether the model's batch-norm and dropout layers are in training mode; ``None`` when it has none.

    Raises:
        InputError: some are in training mode and some in eval mode.
    """
    modes = {m.training for m in model.modules() if isinstance(m, _MODE_DEPENDENT)}
    if len(modes) > 1:
        raise InputError(
            "the model's batch-norm/dropout layers are partly in training and partly in eval mode, and the update "
            "depends on it: call model.train() or model.eval() as the client did"
        )
    return modes.pop() if modes else None


def _client_for(model: nn.Module, client: Client | None) -> Client:
    """The client's protocol: the given one, or FedSGD; its mode is the model's (batch norm and dropout)."""
    mode = _model_mode(model)
    if client is None:
        return Client(train_mode=bool(mode))
    if mode is not None and client.train_mode != mode:
        raise InputError(
            f"Client(train_mode={client.train_mode}) contradicts the model, whose batch-norm/dropout layers are in "
            f"{'training' if mode else 'eval'} mode: put the model in the client's mode (model.train() or "
            "model.eval()) or pass a client that agrees"
        )
    return client


def _num_classes(model: nn.Module, image_shape: Sequence[int]) -> int:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            logits = model(torch.zeros(1, *image_shape, device=device))
    except RuntimeError as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InputError(
            f"the model cannot take images of shape {tuple(image_shape)} (image_shape): {reason}"
        ) from None
    finally:
        for m, mode in modes:
            m.training = mode
    return int(logits.shape[-1])


def _as_labels(labels) -> Tensor:
    """Labels as a long tensor; fractional values are refused, not truncated."""
    labels = torch.as_tensor(labels)
    if labels.is_floating_point() and not bool((labels == labels.round()).all()):
        raise InputError(f"labels must be whole class indices, got {labels.tolist()}")
    if labels.is_complex() or labels.dtype == torch.bool:
        raise InputError(f"labels must be class indices, got a tensor of {labels.dtype}")
    return labels.long()


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
    objective: str | MatchingObjective = "sim",
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
            (its ``requires_grad`` flags and mode are restored). Its mode is the client's: batch norm (and
            dropout) in training mode means the gradient was computed in training mode.
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
        objective, tv, signed, boxed, lr, seed: as in :class:`~lightning_inversion.attack.GradientInversion`.
        client: the client's protocol (FedSGD by default; pass ``Client(protocol="fedavg", ...)`` for updates).
            Its ``train_mode`` must agree with the model's mode. What an :class:`Update` records about how it was
            made (kind, number of clients, FedAvg settings) fills the options left at their defaults; a
            contradiction is refused (:meth:`Client.matching`). New weights (kind ``weights``) are matched as
            their change from the model's weights, the global weights the server sent.
        ground_truth: the true images in [0, 1], to measure the result (``result.metrics``); never used by the
            attack.
        trainer_kwargs: passed on to the Lightning ``Trainer`` (e.g. ``accelerator``, ``devices``,
            ``precision``); by default a quiet single-device Trainer.
        **options: any other :class:`~lightning_inversion.attack.GradientInversion` argument (``objective``,
            ``priors``, ``init``, ``optimizer``, ``lr_decay``, ``median_filter_every``, ``label_strategy``,
            ``restart_selection``, ...).

    Returns:
        a :class:`~lightning_inversion.attack.Reconstruction`: ``images`` ``(B, C, H, W)`` in [0, 1], ``labels``,
        ``restarts``, the per-restart ``scores``, ``chosen_restart``, ``steps``, ``seconds``; ``metrics`` when
        ``ground_truth`` was given.

    Raises:
        InputError: an argument that cannot work (a model without parameters, a gradient entry that is not a
            tensor, NaN or an all-zero gradient, labels that are not class indices, contradicting modes or client
            options, ``max_steps`` 0 without a closed-form recovery, ...); the message says which and why.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"model must be an nn.Module, got {type(model).__name__}")
    if not list(model.parameters()):
        raise InputError(
            f"the model {type(model).__name__} has no parameters: there is no gradient to invert"
        )
    image_shape = tuple(int(s) for s in image_shape)
    channels = image_shape[0]
    mean = tuple(mean) if mean is not None else (0.0,) * channels
    std = tuple(std) if std is not None else (1.0,) * channels
    client = _client_for(model, client)
    if labels is not None:
        labels = _as_labels(labels)
    if isinstance(target_gradient, Update):
        update = target_gradient
        if labels is not None:
            update = dataclasses.replace(update, labels=labels)
        client = client.matching(update)
        if update.kind == "weights":  # the server knows the weights it sent (the model's): match the change
            from .update_io import as_change

            update = as_change(update, model)
            client = Client(**{**client.options(), "send": "delta"})
    else:
        if isinstance(target_gradient, Tensor) or not isinstance(target_gradient, Sequence):
            raise InputError(
                "target_gradient must be a list of tensors, one per model parameter (what torch.autograd.grad "
                f"returns), or an Update; got {type(target_gradient).__name__}"
            )
        names = [n for n, _ in model.named_parameters()]
        for i, g in enumerate(target_gradient):
            if not isinstance(g, Tensor):
                name = names[i] if i < len(names) else i
                raise InputError(
                    f"target_gradient[{i}] ({name}) is {type(g).__name__}, not a tensor: give every parameter's "
                    "gradient (zeros for a parameter the loss does not reach)"
                )
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
            objective=objective,
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
