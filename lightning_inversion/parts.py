"""Plain descriptions of the attack's parts (objective, priors, label strategy, ...), for checkpoints to compare.

A part is a small class chosen in YAML by ``class_path``; its description is that class path and its plain
options, so a checkpoint records which parts ran without naming code that reading it would import.
"""

from __future__ import annotations

import functools


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
