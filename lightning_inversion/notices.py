"""What the attack tells Lightning's Trainer: the remarks of Lightning that do not apply to it, and the precisions
it refuses. Nothing here imports Lightning."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from .errors import InputError

# Trainer precisions that would hold the dummy images and the objective in half precision.
TRUE_HALF_PRECISIONS = ("16-true", "bf16-true")


# Lightning's remarks that do not apply here, each with the reason; silenced while the attack (and the CLI) runs.
LIGHTNING_NOTICES = {
    r"Found \d+ module\(s\) in eval mode": "the victim runs in the client's mode (eval by default) on purpose",
    r"You're resuming from a checkpoint that ended before the epoch ended": "the step ticks hold no state: "
    "a resumed attack ends with the same images as an uninterrupted one",
    r"The number of training batches .* is smaller than the logging interval": "the attack logs its last step",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated": "Lightning's own use of a torch API",
    r"Starting from v1.9.0, `tensorboardX` has been removed": "the CSV logger is used without TensorBoard",
    r"The dirpath has changed from": "a resumed run writes into a folder of its own; the attack monitors nothing",
}


@contextmanager
def lightning_notices_silenced() -> Iterator[None]:
    """Run a Trainer without :data:`LIGHTNING_NOTICES`; every other warning still shows."""
    with warnings.catch_warnings():
        for message in LIGHTNING_NOTICES:
            warnings.filterwarnings("ignore", message=message)
        yield


def check_precision(precision: str) -> None:
    """Refuse a Trainer precision that holds the attack itself in half precision.

    Raises:
        InputError: for ``bf16-true`` and ``16-true``.
    """
    if str(precision) in TRUE_HALF_PRECISIONS:
        raise InputError(
            f"precision {precision!r} holds the dummy images and the matching objective in half precision: the "
            "cosine loss rounds to zero and the images stop improving. Use 'bf16-mixed' or '16-mixed' (the "
            "victim's passes in half precision, the images and the objective in fp32) or '32-true'."
        )
