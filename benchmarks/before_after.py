"""Seconds per module step with each speed change undone, against the code as it is, measured in one run.

Variants, timed through a real ``pl.Trainer.fit`` (``speed.time_module``) and interleaved round by round so the
load of a shared machine falls on all of them alike. Each undoes one change:

- ``func.grad``: the client's FedSGD update through ``torch.func.grad`` for one restart too (now: plain
  ``torch.autograd.grad`` outside ``vmap``, which gives the same tensors without functorch's per-operation
  wrapping);
- ``log every step``: the four ``self.log`` calls of ``GradientInversion.training_step`` on every step (now: on
  the Trainer's logging steps and the last one; ``self.log`` costs about a millisecond a call);
- ``autograd objective``: the cosine per tensor, its dots and squares differentiated by autograd, as the first implementation did
  (now: on a CPU per tensor through ``objectives.dots_and_squares``, whose backward is one product and one
  ``addcmul`` per tensor; on a GPU over one concatenated vector, ``GradientMatching._flat_cosine_cost``);
- ``fused eval batch norm``: the victim's eval-mode batch norm through PyTorch's fused op (now:
  ``client.EvalBatchNormAsAffine`` writes it out as ``x · s + c``, whose double backward is a few operations);
- ``as is``: the code as it is;
- ``plain``: the plain PyTorch loop of ``speed.py``, for the ratio.

Example::

    OMP_NUM_THREADS=1 python benchmarks/before_after.py --victims LeNet-Zhu ConvNet-16 ResNet20-4 --repeats 3
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from unittest import mock

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import speed  # noqa: E402

from lightning_inversion import client, objectives  # noqa: E402
from lightning_inversion.attack import GradientInversion  # noqa: E402


@contextmanager
def func_grad() -> Iterator[None]:
    """The client as it was: ``torch.func.grad`` for one restart too."""
    with mock.patch.object(client, "_plain_autograd_applies", lambda *args: False):
        yield


@contextmanager
def log_every_step() -> Iterator[None]:
    """``self.log`` on every step, as it was."""
    with mock.patch.object(GradientInversion, "_logs_this_step", lambda self: True):
        yield


def _autograd_dots_and_squares(dummy: Sequence[Tensor], target: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    dots = torch.stack([(g * t).reshape(g.shape[0], -1).sum(1) for g, t in zip(dummy, target, strict=True)])
    squares = torch.stack([(g * g).reshape(g.shape[0], -1).sum(1) for g in dummy])
    return dots, squares


def _per_tensor_cost(self: objectives.GradientMatching, dummy: Sequence[Tensor]) -> Tensor:
    return objectives.matching_cost(dummy, self.targets, self.weights, "sim", self.target_sq_norms)


@contextmanager
def autograd_objective() -> Iterator[None]:
    """The cosine per tensor, its dots and squares left to autograd, as they were."""
    with (
        mock.patch.object(objectives, "dots_and_squares", _autograd_dots_and_squares),
        mock.patch.object(objectives.GradientMatching, "_flat_cosine_cost", _per_tensor_cost),
    ):
        yield


@contextmanager
def fused_eval_batch_norm() -> Iterator[None]:
    """Eval-mode batch norm through the fused op, as it was."""
    with mock.patch.object(client, "_has_batchnorm", lambda victim: False):
        yield


@contextmanager
def as_is() -> Iterator[None]:
    """The code as it is."""
    yield


VARIANTS: dict[str, Callable[[], AbstractContextManager[None]]] = {
    "func.grad": func_grad,
    "log every step": log_every_step,
    "autograd objective": autograd_objective,
    "fused eval batch norm": fused_eval_batch_norm,
    "as is": as_is,
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
    undone = [n for n in VARIANTS if n != "as is"]
    print(
        "| victim | R | "
        + " | ".join(f"{n} s/step" for n in names)
        + " | "
        + " | ".join(f"{n} ÷ as is" for n in undone)
        + " | as is ÷ plain |"
    )
    print("|---|---|" + "---|" * (len(names) + len(undone) + 1))
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
            gains = " | ".join(f"{med[n] / med['as is']:.2f}×" for n in undone)
            print(
                f"| {name} | {restarts} | {cells} | {gains} | {med['as is'] / med['plain']:.2f}× |",
                flush=True,
            )


if __name__ == "__main__":
    main()
