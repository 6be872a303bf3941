"""Operations and CPU time of one attack step's math, with and without the speed changes that cut operations.

A GPU step of a mid-size victim is bound by kernel launches, and every aten operation is (at least) one launch.
This counts the aten operations of one step's math (the client's update for the dummy images, the matching cost
and TV, and the backward into the images; no Trainer) with torch.profiler, and times it on the CPU. Variants, as
in ``before_after.py``: ``as is``; ``autograd objective`` (the per-tensor dots and squares left to autograd);
``fused eval batch norm`` (the victim's eval-mode batch norm through PyTorch's fused op, not written out). A
small input (``--size 32``) on a big victim makes the CPU step dispatch-bound too, a stand-in for a launch-bound
GPU step.

Example::

    OMP_NUM_THREADS=1 python benchmarks/step_ops.py --victim resnet18 --size 32 --restarts 1 8
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import speed  # noqa: E402
from before_after import autograd_objective, fused_eval_batch_norm  # noqa: E402


def aten_operations(step) -> int:
    """The aten operations one call of ``step`` runs (nested ones included, as the dispatcher sees them)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--victim", default="resnet18")
    parser.add_argument(
        "--size", type=int, default=32, help="input side (the victim's default: see speed.py)"
    )
    parser.add_argument("--restarts", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant (median)")
    args = parser.parse_args(argv)
    speed.SETTINGS[args.victim] = (args.size, speed.SETTINGS.get(args.victim, (32, 10))[1])
    problem = speed.make_problem(args.victim, torch.device("cpu"))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, CPU time of the main thread\n")
    print("| victim | input | R | variant | aten operations per step | ms per step |")
    print("|---|---|---|---|---|---|")
    variants: dict[str, Callable[[], AbstractContextManager]] = {
        "autograd objective": autograd_objective,
        "fused eval batch norm": fused_eval_batch_norm,
        "as is": nullcontext,
    }
    for restarts in args.restarts:
        module = speed.make_module(problem, restarts)
        module.on_fit_start()

        def step(module=module) -> None:
            cost, tv = module.restart_costs(module.dummy_images, module.target_labels)
            (cost + speed.TV * tv).sum().backward(inputs=[module.dummy_images])

        for name, context in variants.items():
            with context():
                step()  # warm-up
                count = aten_operations(step)
                times = []
                for _ in range(args.repeats):
                    t0 = time.thread_time()
                    step()
                    times.append(time.thread_time() - t0)
            print(
                f"| {args.victim} | {args.size}×{args.size} | {restarts} | {name} | {count} | "
                f"{statistics.median(times) * 1e3:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
