"""Operations and CPU time of one attack step's math, with and without the speed changes that cut operations.

A GPU step of a mid-size victim is bound by kernel launches, and every aten operation is (at least) one launch.
This counts the aten operations of one step's math (the client's update for the dummy images, the matching cost
and TV, and the backward into the images; no Trainer) with torch.profiler, and times it on the CPU. Variants, as
in ``before_after.py``: ``as is``; ``autograd objective`` (the cosine per tensor, left to autograd);
``flat objective`` on a CPU / ``per-tensor objective`` on a GPU (the form of the cosine the device does not use by
default, see ``GradientMatching(flat=...)``);
``fused eval batch norm`` (the victim's eval-mode batch norm through PyTorch's fused op, not written out). A
small input (``--size 32``) on a big victim makes the CPU step dispatch-bound too, a stand-in for a launch-bound
GPU step.

Examples::

    OMP_NUM_THREADS=1 python benchmarks/step_ops.py --victim resnet18 --size 32 --restarts 1 8
    python benchmarks/step_ops.py --device cuda --victim resnet18 --size 224 --restarts 1 8 --repeats 20

On a GPU the time is wall time with ``torch.cuda.synchronize`` after each step; µs per operation then tells
whether a step is bound by launches (about constant across victims and restarts) or by arithmetic.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import speed  # noqa: E402
from before_after import autograd_objective, fused_eval_batch_norm  # noqa: E402

from lightning_inversion.objectives import GradientMatching  # noqa: E402


def aten_operations(step) -> int:
    """The aten operations one call of ``step`` runs (nested ones included, as the dispatcher sees them)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for e in prof.events() if e.name.startswith("aten::"))


@contextmanager
def objective_form(module, flat: bool) -> Iterator[None]:
    """The module's cosine over one concatenated vector (``flat``) or per tensor, whatever the device."""
    current = module.matching
    module.matching = GradientMatching(module.update.tensors, flat=flat)
    try:
        yield
    finally:
        module.matching = current


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--victim", default="resnet18")
    parser.add_argument(
        "--size", type=int, default=32, help="input side (the victim's default: see speed.py)"
    )
    parser.add_argument("--restarts", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant (median)")
    parser.add_argument(
        "--device", default="cpu", help="cpu (main-thread CPU time) or cuda (synchronised wall time)"
    )
    args = parser.parse_args(argv)
    speed.SETTINGS[args.victim] = (args.size, speed.SETTINGS.get(args.victim, (32, 10))[1])
    device = torch.device(args.device)
    problem = speed.make_problem(args.victim, device)
    on_gpu = device.type == "cuda"
    clock = time.perf_counter if on_gpu else time.thread_time
    what = (
        "wall time, synchronised"
        if on_gpu
        else f"CPU time of the main thread, {torch.get_num_threads()} threads"
    )
    print(f"torch {torch.__version__}, device {device}, {what}\n")
    print("| victim | input | R | variant | aten operations per step | ms per step | µs per operation |")
    print("|---|---|---|---|---|---|---|")
    for restarts in args.restarts:
        module = speed.make_module(problem, restarts)
        module.prepare()
        flat = not module.matching.flat  # the other form of the cosine than this device's default
        variants: dict[str, Callable[[], AbstractContextManager]] = {
            "autograd objective": autograd_objective,
            "fused eval batch norm": fused_eval_batch_norm,
            f"{'flat' if flat else 'per-tensor'} objective": lambda m=module, f=flat: objective_form(m, f),
            "as is": nullcontext,
        }

        def step(module=module) -> None:
            cost, tv = module.restart_costs(module.dummy_images, module.target_labels)
            (cost + speed.TV * tv).sum().backward(inputs=[module.dummy_images])

        for name, context in variants.items():
            with context():
                step()  # warm-up
                count = aten_operations(step)
                times = []
                for _ in range(args.repeats):
                    speed._sync(device)
                    t0 = clock()
                    step()
                    speed._sync(device)
                    times.append(clock() - t0)
            ms = statistics.median(times) * 1e3
            print(
                f"| {args.victim} | {args.size}×{args.size} | {restarts} | {name} | {count} | {ms:.1f} | "
                f"{ms * 1e3 / count:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
