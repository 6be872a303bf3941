"""Seconds per module step before and after the speed changes, and with a suggested one, measured in one run.

Variants, timed through a real ``pl.Trainer.fit`` (``speed.time_module``) and interleaved round by round so the
load of a shared machine falls on all of them alike:

- ``before``: the client's FedSGD update through ``torch.func.grad`` for every restart count, as it was;
- ``after``: the code as it is: one restart (no ``vmap``) through ``torch.autograd.grad``, which gives the same
  tensors and skips functorch's per-operation wrapping;
- ``after, no self.log``: as ``after`` with ``LightningModule.log`` a no-op, i.e. what skipping the per-step
  ``self.log`` calls in ``GradientInversion.training_step`` would save when no logger or progress bar reads them
  (a change to ``attack.py``, suggested, not made);
- ``plain``: the plain PyTorch loop of ``speed.py``, for the ratio.

Example::

    OMP_NUM_THREADS=1 python benchmarks/before_after.py --victims LeNet-Zhu ConvNet-16 ResNet20-4 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import speed  # noqa: E402

from lightning_inversion import client  # noqa: E402
from lightning_inversion.attack import GradientInversion  # noqa: E402


@contextmanager
def before() -> Iterator[None]:
    """The client as it was: ``torch.func.grad`` for one restart too."""
    with mock.patch.object(client, "_plain_autograd_applies", lambda *args: False):
        yield


@contextmanager
def no_log() -> Iterator[None]:
    """The suggested ``attack.py`` change, simulated: no per-step ``self.log``."""
    with mock.patch.object(GradientInversion, "log", lambda self, *args, **kwargs: None):
        yield


@contextmanager
def as_is() -> Iterator[None]:
    """The code as it is."""
    yield


VARIANTS: dict[str, Callable[[], AbstractContextManager[None]]] = {
    "before": before,
    "after": as_is,
    "after, no self.log": no_log,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--victims", nargs="+", default=["LeNet-Zhu", "ConvNet-16", "ResNet20-4"])
    parser.add_argument("--restarts", nargs="+", type=int, default=[1])
    parser.add_argument("--precision", default="32")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds over all variants; the median is reported"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall", help="wall time or main-thread CPU time"
    )
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.device.startswith("cuda"):
        parser.error("--clock cpu measures the CPU only: use wall time on a GPU")
    speed.set_clock(args.clock)
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    device = torch.device(args.device)
    print(
        f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, clock {args.clock}\n"
    )
    names = ["plain", *VARIANTS]
    print(
        "| victim | R | " + " | ".join(f"{n} s/step" for n in names) + " | before ÷ plain | after ÷ plain |"
    )
    print("|---|---|" + "---|" * (len(names) + 2))
    for name in args.victims:
        problem = speed.make_problem(name, device)
        for restarts in args.restarts:
            times: dict[str, list[float]] = {n: [] for n in names}
            for _ in range(args.repeats):
                plain = speed.time_plain(problem, restarts, args.steps, args.warmup, args.precision)
                times["plain"].append(plain.per_step)
                for variant, context in VARIANTS.items():
                    with context():
                        timing = speed.time_module(problem, restarts, args.steps, args.warmup, args.precision)
                    times[variant].append(timing.per_step)
            med = {n: statistics.median(t) for n, t in times.items()}
            cells = " | ".join(f"{med[n]:.4f}" for n in names)
            print(
                f"| {name} | {restarts} | {cells} | {med['before'] / med['plain']:.2f}× | "
                f"{med['after'] / med['plain']:.2f}× |",
                flush=True,
            )


if __name__ == "__main__":
    main()
