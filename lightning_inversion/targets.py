"""The attack's victim and target update, checked against each other before anything is optimised.

:func:`attack_victim` builds the victim the server shares (by name, from a file of weights, or from a checkpoint of
``train_victim.py``) and refuses one that cannot classify the data's images; :func:`check_target` refuses an
update that does not fit the victim and the client's protocol; :func:`check_targets` checks each of an attack's
target updates and recovers their labels. Nothing here imports Lightning.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .client import Client, Update, update_problem
from .errors import InputError
from .labels import LabelStrategy


class TargetMismatchError(InputError):
    """The update does not fit the victim (a tensor's count, name or shape, or the protocol)."""


def attack_victim(
    victim: str | nn.Module,
    num_classes: int,
    image_shape: tuple[int, int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    pretrained: bool = False,
    victim_weights: str | None = None,
    victim_checkpoint: str | None = None,
) -> nn.Module:
    """The victim, built and checked, its parameters frozen (see ``GradientInversion`` for the arguments).

    Raises:
        InputError: an unknown name, a victim that cannot take the images or gives no ``num_classes`` logits, or a
            checkpoint trained on other data.
    """
    if victim_checkpoint is not None:
        victim = _victim_from_checkpoint(victim_checkpoint, num_classes, image_shape, mean, std)
    elif isinstance(victim, str):
        from .victims import MissingWeightsError, build_victim

        try:
            victim = build_victim(
                victim, num_classes, tuple(image_shape), pretrained=pretrained, weights_path=victim_weights
            )
        except KeyError as error:  # an unknown name: the message lists the valid ones
            raise InputError(f"victim: {error.args[0]}") from None
        except MissingWeightsError:  # its message names the file, and it is not about the image shape
            raise
        except RuntimeError as error:  # e.g. images too small for the victim's pooling layers
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise InputError(
                f"the victim {victim} cannot be built for images of shape {tuple(image_shape)} (image_size, "
                f"image_shape): {reason}"
            ) from None
    elif victim_weights is not None:  # any nn.Module (a class path in YAML): the server's weights go in
        from .victims.weights import load_weights_into

        load_weights_into(victim, victim_weights)
    _check_victim(victim, num_classes, tuple(image_shape))
    return victim.requires_grad_(False)


def _victim_from_checkpoint(path: str, num_classes: int, image_shape, mean, std) -> nn.Module:
    from .victims import load_victim_checkpoint

    victim, meta = load_victim_checkpoint(path)
    expected = {
        "num_classes": num_classes,
        "image_shape": tuple(image_shape),
        "mean": tuple(mean),
        "std": tuple(std),
    }
    found = {k: tuple(meta[k]) if isinstance(meta[k], list | tuple) else meta[k] for k in expected}
    differ = [k for k in expected if not _same(found[k], expected[k])]
    if differ:
        details = ", ".join(f"{k}: checkpoint {found[k]} vs data {expected[k]}" for k in differ)
        raise TargetMismatchError(
            f"the victim checkpoint {path} was trained on other data than the attack's ({details}): choose "
            "the data the victim was trained on"
        )
    return victim


def _same(a, b) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-6) for x, y in zip(a, b, strict=True))
    return a == b


def _check_victim(victim: nn.Module, num_classes: int, image_shape: tuple[int, int, int]) -> None:
    """Refuse a victim without parameters, or one that cannot classify images of ``image_shape`` into
    ``num_classes`` classes, before anything is computed with it (one forward pass of a zero image)."""
    params = list(victim.parameters())
    if not params:
        raise InputError(
            f"the victim {type(victim).__name__} has no parameters: there is no update to invert"
        )
    modes = [(m, m.training) for m in victim.modules()]
    victim.eval()  # batch norm in training mode refuses a batch of one
    try:
        with torch.no_grad():
            logits = victim(torch.zeros(1, *image_shape, device=params[0].device, dtype=params[0].dtype))
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(
            f"the victim {type(victim).__name__} cannot take images of shape {image_shape} (image_size, "
            f"image_shape): {reason}"
        ) from None
    finally:
        for m, mode in modes:
            m.training = mode
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[-1] != num_classes:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise InputError(
            f"the victim {type(victim).__name__} gives outputs of shape {shape} for one image, not (1, "
            f"{num_classes}) logits for num_classes={num_classes}"
        )


def check_target(
    update: Update, victim: nn.Module, client: Client, num_images: int, num_classes: int
) -> None:
    """Refuse an update the attack cannot invert with this victim and client.

    Raises:
        TargetMismatchError: a tensor count or shape that is not the victim's, another protocol than the client's,
            another number of images, NaN or no information, or labels out of range.
    """
    params = list(victim.named_parameters())
    if len(update.tensors) != len(params):
        raise TargetMismatchError(
            f"the update has {len(update.tensors)} tensors but the victim has {len(params)} parameters"
        )
    for i, ((name, p), t) in enumerate(zip(params, update.tensors, strict=True)):
        if t.shape != p.shape:
            raise TargetMismatchError(
                f"update tensor {i} ({name}) has shape {tuple(t.shape)}, the victim expects {tuple(p.shape)}"
            )
    if update.kind != client.kind:
        raise TargetMismatchError(
            f"the update is a {update.kind!r} but the client protocol {client.protocol!r} sends "
            f"{client.kind!r}: set the client's protocol/send options to match the update"
        )
    try:  # what the update records about its client (FedAvg settings, clients, mode) must be this client's
        client.matching(update, adopt=False)
    except InputError as error:
        raise TargetMismatchError(str(error)) from None
    if update.num_images is not None and update.num_images != num_images:
        raise TargetMismatchError(
            f"the update comes from {update.num_images} images but the attack reconstructs {num_images}"
        )
    client.split(num_images)
    problem = update_problem(update, victim)
    if problem is not None:
        raise TargetMismatchError(f"the update cannot be attacked: {problem}")
    if update.labels is not None and bool((update.labels >= num_classes).any()):
        raise TargetMismatchError(
            f"labels {update.labels.tolist()} are out of range for the victim's {num_classes} classes"
        )


def check_targets(
    updates: list[Update],
    targets: int,
    victim: nn.Module,
    client: Client,
    label_strategy: LabelStrategy,
    num_images: int,
    num_classes: int,
) -> list[Tensor | None]:
    """Check the ``targets`` updates of an attack (:func:`check_target`) and recover each one's labels.

    Returns:
        each target's labels ``(B,)`` as its label strategy (``auto`` resolved against it) gives them, or
        ``None`` where the strategy gives none (soft labels, optimised with the images).

    Raises:
        TargetMismatchError: another number of updates than ``targets``, an update that does not fit, or one whose
            labels cannot be recovered.
    """
    if len(updates) != targets:
        raise TargetMismatchError(f"{len(updates)} target updates for an attack on targets={targets}")
    labels = []
    for update in updates:
        check_target(update, victim, client, num_images, num_classes)
        strategy = label_strategy.resolve(update, num_images)
        try:
            labels.append(strategy.labels(update, victim, num_images, num_classes))
        except ValueError as error:
            raise TargetMismatchError(f"label_strategy {strategy.name!r}: {error}") from None
    return labels
