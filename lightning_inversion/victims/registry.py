"""Name -> builder registry of victim architectures (timm-style).

A builder is registered under a name that may hold integer fields in braces, e.g. ``"ConvNet-{width}"``; the
fields are parsed from the requested name and passed to the builder as keyword arguments. ``variants`` are the
canonical names of such a family that :func:`list_victims` shows.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lightning_inversion.victims.weights import load_weights_into

Builder = Callable[..., nn.Module]
_FIELD = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class _Entry:
    template: str
    pattern: re.Pattern[str]
    builder: Builder
    variants: tuple[str, ...]
    pretrained: bool


_ENTRIES: list[_Entry] = []


def _compile(template: str) -> re.Pattern[str]:
    parts = _FIELD.split(template)  # literal, field, literal, field, ...
    regex = "".join(re.escape(p) if i % 2 == 0 else f"(?P<{p}>[0-9]+)" for i, p in enumerate(parts))
    return re.compile(regex)


def register_victim(
    name: str, *, variants: Iterable[str] = (), pretrained: bool = False
) -> Callable[[Builder], Builder]:
    """Record a builder under ``name``; use as a decorator (decorators may be stacked).

    Args:
        name: A fixed name (``"MLP"``) or a template with integer fields (``"ConvNet-{width}"``).
        variants: Canonical names of a template that :func:`list_victims` lists; a fixed name lists itself.
        pretrained: Whether the builder takes a ``pretrained`` keyword and can load published weights.

    Returns:
        A decorator that registers the builder ``fn(num_classes, image_shape, **fields)`` and returns it as is.
    """
    pattern = _compile(name)
    listed = tuple(variants) if _FIELD.search(name) else (name,)
    for variant in listed:
        if not pattern.fullmatch(variant):
            raise ValueError(f"variant {variant!r} does not match {name!r}")

    def decorator(builder: Builder) -> Builder:
        if any(entry.template == name for entry in _ENTRIES):
            raise ValueError(f"victim {name!r} is already registered")
        _ENTRIES.append(_Entry(name, pattern, builder, listed, pretrained))
        return builder

    return decorator


def list_victims() -> list[str]:
    """All canonical victim names, sorted (templates such as ``ConvNet-{width}`` accept more)."""
    return sorted({variant for entry in _ENTRIES for variant in entry.variants})


def _resolve(name: str) -> tuple[_Entry, dict[str, int]]:
    for entry in _ENTRIES:
        match = entry.pattern.fullmatch(name)
        if match:
            return entry, {key: int(value) for key, value in match.groupdict().items()}
    templates = ", ".join(entry.template for entry in _ENTRIES if _FIELD.search(entry.template))
    raise KeyError(
        f"Unknown victim {name!r}. Valid names: {', '.join(list_victims())}. Templates: {templates}."
    )


def build_victim(
    name: str,
    num_classes: int,
    image_shape: tuple[int, int, int],
    pretrained: bool = False,
    weights_path: str | Path | None = None,
) -> nn.Module:
    """Build a victim model that maps normalised images ``(B, C, H, W)`` to logits ``(B, num_classes)``.

    Args:
        name: A name from :func:`list_victims` or a registered template (``ResNet{depth}-{width}``, ...).
        num_classes: Number of output logits.
        image_shape: ``(C, H, W)`` of the inputs, e.g. ``(1, 28, 28)`` for MNIST.
        pretrained: Load the published weights (torchvision classifiers only).
        weights_path: A local ``.pt``/``.pth``/``.safetensors`` state dict loaded last, strictly.

    Raises:
        KeyError: ``name`` is unknown; the message lists the valid names.
        MissingWeightsError: Requested weights are not on this machine, or the weights file is bad.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if not any(entry.pattern.fullmatch(name) for entry in _ENTRIES) and _looks_like_class_path(name):
        if pretrained:
            raise ValueError(f"no published weights for {name!r}; pass weights_path instead")
        model = victim_from_class_path(name, num_classes)
        return model if weights_path is None else load_weights_into(model, weights_path, name)
    entry, fields = _resolve(name)
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    if len(image_shape) != 3:
        raise ValueError(f"image_shape must be (C, H, W), got {image_shape}")
    image_shape = (int(image_shape[0]), int(image_shape[1]), int(image_shape[2]))
    if entry.pretrained:
        fields["pretrained"] = pretrained
    elif pretrained:
        raise ValueError(f"no published weights for {name!r}; train it and pass weights_path instead")
    model = entry.builder(num_classes, image_shape, **fields)
    if weights_path is not None:
        load_weights_into(model, weights_path, name)
    return model


def _looks_like_class_path(name: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+", name))


def victim_from_class_path(class_path: str, num_classes: int) -> nn.Module:
    """An instance of the ``nn.Module`` class named by ``class_path`` (``mypkg.Net``), built with
    ``num_classes`` when its ``__init__`` takes that argument, else without arguments.

    Raises:
        KeyError: the class cannot be imported, or is not an ``nn.Module``.
    """
    import importlib
    import inspect

    module_name, _, class_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise KeyError(
            f"{class_path!r} is neither a registered victim nor an importable class ({type(error).__name__}: "
            f"{error}); registered names: {', '.join(list_victims()[:8])}, ... (see --help)"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise KeyError(f"{class_path!r} is not an nn.Module class")
    try:
        takes = "num_classes" in inspect.signature(cls).parameters
    except (TypeError, ValueError):
        takes = False
    return cls(num_classes=num_classes) if takes else cls()
