"""The attack's parts (objective, priors, label strategy, ...) by short name, its options checked, and plain
descriptions of the parts for checkpoints to compare.

A part is a small class chosen in YAML by ``class_path``; its description is that class path and its plain
options, so a checkpoint records which parts ran without naming code that reading it would import. Nothing here
imports Lightning.
"""

from __future__ import annotations

import functools
import math

from .errors import InputError


def part(value, short_names: dict[str, type]):
    """A part given as an object, or by its short name (a class with its defaults)."""
    return short_names[value]() if isinstance(value, str) else value


def whole(value) -> bool:
    """Whether ``value`` is a whole number (an ``int``, not a ``bool``)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_whole(name: str, value, low: int) -> None:
    """Refuse ``value`` unless it is a whole number ``>= low``, naming the option ``name``."""
    if not whole(value) or value < low:
        raise InputError(f"{name} must be a whole number >= {low}, got {value!r}")


def check_number(name: str, value, positive: bool) -> None:
    """Refuse ``value`` unless it is a finite number ``>= 0`` (``> 0`` if ``positive``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise InputError(f"{name} must be a finite number {'>' if positive else '>='} 0, got {value!r}")


def check_options(
    restarts, num_images, num_classes, median_filter_every, lr, tv, image_shape, mean, std
) -> None:
    """Refuse the attack's options that the parser's types do not (when the attack is built from Python).

    Raises:
        InputError: naming the option.
    """
    for name, value, low in [("restarts", restarts, 1), ("num_images", num_images, 1)]:
        check_whole(name, value, low)
    check_whole("num_classes", num_classes, 1)
    check_whole("median_filter_every", median_filter_every, 0)
    check_number("lr", lr, positive=True)
    check_number("tv", tv, positive=False)
    if len(image_shape) != 3 or not all(whole(s) and s >= 1 for s in image_shape):
        raise InputError(f"image_shape must be three whole numbers >= 1 (C, H, W), got {image_shape}")
    if len(mean) != image_shape[0] or len(std) != image_shape[0]:
        raise InputError(f"mean {mean} and std {std} must have one value per channel of {image_shape}")
    if not all(math.isfinite(s) and s > 0 for s in std):
        raise InputError(f"std must be finite and > 0 in every channel, got {std}")


def _plain(value) -> bool:
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, bool | int | float | str)


def describe(part: object) -> dict:
    """``{"class_path": ..., "init_args": {...}}`` of a part: its class and its plain attributes, sorted; a list
    of parts (the client's defenses) is described part by part."""
    cls = type(part)
    options = {}
    for k, v in sorted(vars(part).items()):
        if _plain(v):
            options[k] = v
        elif isinstance(v, list | tuple) and all(hasattr(item, "__dict__") for item in v):
            options[k] = [describe(item) for item in v]
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": options}


def describe_factory(factory) -> str:
    """A stable description of an optimiser factory: its qualified name and any bound arguments."""
    if isinstance(factory, functools.partial):
        bound = [describe_factory(a) if callable(a) else repr(a) for a in factory.args]
        bound += [f"{k}={v!r}" for k, v in sorted(factory.keywords.items())]
        return f"{describe_factory(factory.func)}({', '.join(bound)})"
    target = factory if callable(factory) and hasattr(factory, "__qualname__") else type(factory)
    return f"{getattr(target, '__module__', '')}.{target.__qualname__}"
