"""Seconds per step and peak memory of the attack: the Lightning module against a plain PyTorch loop.

Both sides do the same math (Geiping et al. 2020): the victim's gradient for the dummy image with
``create_graph=True``, one global cosine against the target gradient plus total variation, signed Adam with the
step decay, and the box clamp. The plain loop is what the reference code does: ``torch.autograd.grad`` over the
victim's parameters, and R restarts one after another. The module runs through a real ``pl.Trainer.fit``; a
callback records the wall time of every step (the interval between consecutive ``on_train_batch_end``, so data
fetching, logging and the scheduler are included). Reported: the median over the timed steps after warm-up, the
whole ``fit`` divided by its steps, and the ratios measured in the same run.

Peak memory: the peak of tensor memory allocated during the run above what was allocated at its start. On a GPU
``torch.cuda.max_memory_allocated`` over the timed run; on the CPU torch.profiler's memory events during a separate
short run (``--memory-steps``), since profiling slows the steps it records.

Examples::

    OMP_NUM_THREADS=1 python benchmarks/speed.py                                  # the full CPU table
    OMP_NUM_THREADS=1 python benchmarks/speed.py --victims ConvNet-16 --restarts 1 --steps 20
    python benchmarks/speed.py --device cuda --steps 100 --warmup 20
    OMP_NUM_THREADS=1 python benchmarks/speed.py --victims ConvNet-64 --restarts 1 --profile
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_inversion.attack import GradientInversion  # noqa: E402
from lightning_inversion.client import Client, Update  # noqa: E402
from lightning_inversion.data.photos import center_square, load_photo  # noqa: E402
from lightning_inversion.images import IMAGENET_MEAN, IMAGENET_STD, box_bounds, normalize  # noqa: E402
from lightning_inversion.objectives import decay_milestones  # noqa: E402
from lightning_inversion.priors import total_variation  # noqa: E402
from lightning_inversion.victims import build_victim  # noqa: E402

log = logging.getLogger("speed")

# Input side and number of classes of each benchmarked victim.
SETTINGS = {"ConvNet-64": (32, 10), "ResNet20-4": (32, 10), "resnet18": (224, 1000)}
TV = 1e-2
# The clock of every measurement: wall time by default; ``--clock cpu`` uses the main thread's CPU time, which a
# busy shared machine disturbs less (with one intra-op thread all the work runs on the main thread on a CPU).
CLOCK: Callable[[], float] = time.perf_counter


@dataclass
class Timing:
    """One measured run: seconds per step (median of the timed steps), whole-run seconds per step, memory."""

    per_step: float
    overall: float
    peak_mib: float | None


@dataclass
class Problem:
    """A victim and the update it leaked for one photo."""

    name: str
    victim: nn.Module
    update: Update
    image_shape: tuple[int, int, int]
    num_classes: int
    label: Tensor


def make_problem(name: str, device: torch.device) -> Problem:
    """The victim (seeded random init) and the gradient of scikit-image's cat photo at the victim's size."""
    size, classes = SETTINGS.get(name, (32, 10))
    torch.manual_seed(0)
    victim = build_victim(name, classes, (3, size, size)).eval().to(device)
    pixels = center_square(load_photo("chelsea"), size)[None].to(device)
    label = torch.tensor([3], device=device)
    update = Client().update(victim, normalize(pixels, IMAGENET_MEAN, IMAGENET_STD), label)
    return Problem(name, victim, update, (3, size, size), classes, label)


# --- memory ---------------------------------------------------------------------------------------------------
def _profiled_peak(prof: torch.profiler.profile) -> int:
    """Peak of the tensor memory allocated during a CPU profile, above what was allocated at its start (bytes).

    Every allocation and free is attributed once, to the operator that made it (``self_cpu_memory_usage``, or a
    free outside any operator), in the order the operators started.
    """
    changes = [
        (e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage
    ]
    current = peak = 0
    for _, change in sorted(changes):
        current += change
        peak = max(peak, current)
    return peak


class PeakMemory:
    """Peak tensor memory of a block above what was allocated at its start, in MiB.

    On a GPU: ``torch.cuda.max_memory_allocated`` minus the allocation at the start. On the CPU: torch.profiler's
    memory events (``profile_memory=True``), which slow the block down, so a timed run passes ``measure=False``
    and memory is measured in a separate short run.
    """

    def __init__(self, device: torch.device, measure: bool = True) -> None:
        self.device = device
        self.measure = measure
        self.peak_mib: float | None = None
        self._profiler: torch.profiler.profile | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.measure:
            activities = [torch.profiler.ProfilerActivity.CPU]
            self._profiler = torch.profiler.profile(activities=activities, profile_memory=True)
            self._profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif self._profiler is not None:
            self._profiler.__exit__(*exc)
            self.peak_mib = _profiled_peak(self._profiler) / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the plain loop ---------------------------------------------------------------------------------------------
class PlainLoop:
    """The reference code's attack step, written directly: restarts one after another, each its own optimiser.

    Args:
        problem: the victim and the target update.
        restarts: R; each restart r starts from ``randn`` seeded with r, as the module does.
        total_steps: the run's length (places the learning-rate decay).
        bf16: run the victim under ``torch.autocast(bfloat16)`` (what Lightning's ``bf16-mixed`` does).
    """

    def __init__(self, problem: Problem, restarts: int, total_steps: int, bf16: bool) -> None:
        self.victim = copy.deepcopy(problem.victim).requires_grad_(True)
        self.params = list(self.victim.parameters())
        self.device = self.params[0].device
        self.label, self.bf16 = problem.label, bf16
        self.target = [t.float() for t in problem.update.tensors]
        self.target_norm = torch.stack([t.pow(2).sum() for t in self.target]).sum().sqrt()
        self.low, self.high = box_bounds(IMAGENET_MEAN, IMAGENET_STD, self.target[0])
        self.images, self.optimizers, self.schedulers = [], [], []
        for r in range(restarts):
            gen = torch.Generator().manual_seed(r)
            x = torch.randn(1, *problem.image_shape, generator=gen).to(self.device).requires_grad_(True)
            optimizer = torch.optim.Adam([x], lr=0.1)
            milestones = decay_milestones(total_steps)
            self.images.append(x)
            self.optimizers.append(optimizer)
            self.schedulers.append(torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1))

    def cost(self, x: Tensor) -> Tensor:
        """1 − one global cosine between the dummy and the target gradient, in fp32."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            loss = F.cross_entropy(self.victim(x), self.label)
            grads = torch.autograd.grad(loss, self.params, create_graph=True)
        dot = sum((g.float() * t).sum() for g, t in zip(grads, self.target, strict=True))
        norm = sum(g.float().pow(2).sum() for g in grads).sqrt()
        return 1 - dot / (norm * self.target_norm)

    def step(self) -> None:
        """One step of every restart."""
        for x, optimizer, scheduler in zip(self.images, self.optimizers, self.schedulers, strict=True):
            optimizer.zero_grad(set_to_none=True)
            loss = self.cost(x) + TV * total_variation(x.float())
            (x.grad,) = torch.autograd.grad(loss, [x])
            x.grad.sign_()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                x.copy_(torch.maximum(torch.minimum(x, self.high), self.low))


def time_plain(problem: Problem, restarts: int, steps: int, warmup: int, precision: str) -> Timing:
    loop = PlainLoop(problem, restarts, warmup + steps, precision == "bf16-mixed")
    device = loop.device
    times = []
    with PeakMemory(device, measure=False) as memory:
        started = CLOCK()
        for _ in range(warmup + steps):
            t0 = CLOCK()
            loop.step()
            _sync(device)
            times.append(CLOCK() - t0)
        overall = (CLOCK() - started) / (warmup + steps)
    return Timing(statistics.median(times[warmup:]), overall, memory.peak_mib)


def memory_plain(problem: Problem, restarts: int, steps: int, precision: str) -> float | None:
    """Peak memory of a few plain steps (a separate run: the memory profiler would perturb the timed one)."""
    loop = PlainLoop(problem, restarts, steps, precision == "bf16-mixed")
    with PeakMemory(loop.device) as memory:
        for _ in range(steps):
            loop.step()
    return memory.peak_mib


# --- the module -------------------------------------------------------------------------------------------------
class StepTimer(pl.Callback):
    """Wall time of every optimisation step: the interval between consecutive ends of a training batch."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.start = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        _sync(pl_module.device)
        self.start = CLOCK()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync(pl_module.device)
        self.ends.append(CLOCK())

    def intervals(self) -> list[float]:
        marks = [self.start, *self.ends]
        return [b - a for a, b in zip(marks[:-1], marks[1:], strict=True)]


def make_module(problem: Problem, restarts: int) -> GradientInversion:
    module = GradientInversion(
        problem.victim,
        num_classes=problem.num_classes,
        image_shape=problem.image_shape,
        restarts=restarts,
        tv=TV,
    )
    module.set_target(problem.update)
    return module


def module_trainer(
    steps: int, precision: str, device: torch.device, callbacks: list[pl.Callback]
) -> pl.Trainer:
    return pl.Trainer(
        max_steps=steps,
        accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )


def time_module(problem: Problem, restarts: int, steps: int, warmup: int, precision: str) -> Timing:
    module = make_module(problem, restarts)
    device = next(problem.victim.parameters()).device
    timer = StepTimer()
    trainer = module_trainer(warmup + steps, precision, device, [timer])
    with PeakMemory(device, measure=False) as memory:
        started = CLOCK()
        trainer.fit(module)
        _sync(device)
        overall = (CLOCK() - started) / (warmup + steps)
    return Timing(statistics.median(timer.intervals()[warmup:]), overall, memory.peak_mib)


def memory_module(problem: Problem, restarts: int, steps: int, precision: str) -> float | None:
    """Peak memory of a few module steps through the Trainer (a separate run)."""
    module = make_module(problem, restarts)
    device = next(problem.victim.parameters()).device
    trainer = module_trainer(steps, precision, device, [])
    with PeakMemory(device) as memory:
        trainer.fit(module)
    return memory.peak_mib


def cost_agreement(problem: Problem) -> float:
    """|module cost − plain cost| at the same initial image: both sides compute the same objective."""
    module = make_module(problem, 1)
    module.prepare()
    images = module.dummy_images.detach().to(problem.label.device)
    module_cost = float(module.restart_costs(images, module.target_labels.to(images.device))[0][0])
    plain = PlainLoop(problem, 1, 1, bf16=False)
    return abs(module_cost - float(plain.cost(images[0])))


def repeat(times: int, measure: Callable[..., Timing], *args) -> Timing:
    """The median of ``times`` runs of ``measure`` (per step and overall; memory of the first)."""
    runs = [measure(*args) for _ in range(max(1, times))]
    return Timing(
        statistics.median(r.per_step for r in runs),
        statistics.median(r.overall for r in runs),
        runs[0].peak_mib,
    )


# --- profiling --------------------------------------------------------------------------------------------------
class ProfileSteps(pl.Callback):
    """Profile the module's steps after ``warmup`` with torch.profiler."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.profiler = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU]
            + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 == self.warmup:
            self.profiler.__enter__()

    def on_train_end(self, trainer, pl_module) -> None:
        self.profiler.__exit__(None, None, None)


def profile(problem: Problem, restarts: int, steps: int, warmup: int, precision: str, rows: int) -> None:
    """Print the top operators (self CPU time) of the plain loop and of the module, over the same steps."""
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    loop = PlainLoop(problem, restarts, warmup + steps, precision == "bf16-mixed")
    for _ in range(warmup):
        loop.step()
    with torch.profiler.profile() as prof:
        for _ in range(steps):
            loop.step()
    print(f"\n### Plain loop, {problem.name}, R={restarts}, {precision}, {steps} steps\n")
    print(prof.key_averages().table(sort_by=sort, row_limit=rows))
    callback = ProfileSteps(warmup)
    device = next(problem.victim.parameters()).device
    module_trainer(warmup + steps, precision, device, [callback]).fit(make_module(problem, restarts))
    print(f"\n### Module through pl.Trainer, {problem.name}, R={restarts}, {precision}, {steps} steps\n")
    print(callback.profiler.key_averages().table(sort_by=sort, row_limit=rows))


# --- the table --------------------------------------------------------------------------------------------------
def set_clock(kind: str) -> None:
    """Measure with wall time (``wall``) or the main thread's CPU time (``cpu``)."""
    global CLOCK
    CLOCK = time.thread_time if kind == "cpu" else time.perf_counter


def default_steps(name: str, device: torch.device) -> tuple[int, int]:
    """(timed steps, warm-up steps): few for ResNet-18 at 224×224 on a CPU, where one step takes seconds."""
    if device.type == "cuda":
        return 50, 10
    return (3, 1) if SETTINGS.get(name, (32, 10))[0] >= 128 else (10, 3)


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def run(args: argparse.Namespace) -> str:
    device = torch.device(args.device)
    lines = [
        f"| victim | input | R | precision | plain s/step | module s/step | module ÷ plain | module fit s/step "
        f"| plain peak {args.memory_label} | module peak {args.memory_label} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    batched = []
    notes = []
    for name in args.victims:
        problem = make_problem(name, device)
        steps, warmup = default_steps(name, device)
        steps, warmup = args.steps or steps, args.warmup if args.warmup is not None else warmup
        notes.append(
            f"{name}: |module cost − plain cost| at the initial image = {cost_agreement(problem):.2e}"
        )
        for precision in args.precision:
            measured: dict[int, tuple[Timing, Timing]] = {}
            for restarts in args.restarts:
                side = problem.image_shape[-1]
                plain = repeat(args.repeats, time_plain, problem, restarts, steps, warmup, precision)
                if device.type != "cuda" and args.memory_steps:
                    plain.peak_mib = memory_plain(problem, restarts, args.memory_steps, precision)
                try:
                    module = repeat(args.repeats, time_module, problem, restarts, steps, warmup, precision)
                    if device.type != "cuda" and args.memory_steps:
                        module.peak_mib = memory_module(problem, restarts, args.memory_steps, precision)
                except RuntimeError as error:  # e.g. vmap's BatchNorm rule rejects bf16 on the CPU
                    message = str(error).splitlines()[0]
                    lines.append(
                        f"| {name} | {side}×{side} | {restarts} | {precision} | {plain.per_step:.4f} | "
                        f"fails | | | {_fmt(plain.peak_mib, '.1f')} | |"
                    )
                    notes.append(f"{name}, R={restarts}, {precision}: the module fails: {message}")
                    log.info(lines[-1])
                    continue
                measured[restarts] = (plain, module)
                lines.append(
                    f"| {name} | {side}×{side} | {restarts} | {precision} | {plain.per_step:.4f} | "
                    f"{module.per_step:.4f} | {module.per_step / plain.per_step:.2f}× | {module.overall:.4f} | "
                    f"{_fmt(plain.peak_mib, '.1f')} | {_fmt(module.peak_mib, '.1f')} |"
                )
                log.info(lines[-1])
            single = measured.get(1)
            for restarts, (plain, module) in measured.items():
                if restarts > 1:
                    of_single = module.per_step / (restarts * single[1].per_step) if single else None
                    batched.append(
                        f"| {name} | {precision} | {restarts} | {module.per_step / plain.per_step:.2f}× | "
                        f"{_fmt(of_single, '.2f')}{'×' if of_single else ''} |"
                    )
    out = "\n".join(lines)
    if batched:
        out += (
            "\n\n| victim | precision | R | batched module ÷ R looped plain steps | ÷ R module single steps |\n"
            "|---|---|---|---|---|\n" + "\n".join(batched)
        )
    return out + "\n\n" + "\n".join(f"- {note}" for note in notes)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--victims", nargs="+", default=list(SETTINGS), help="victim names (registry)")
    parser.add_argument("--restarts", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--precision", nargs="+", default=["32", "bf16-mixed"], help="Lightning precisions")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: by victim and device)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: by victim)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--memory-steps", type=int, default=2, help="CPU: steps of the separate memory run (0: skip it)"
    )
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall", help="wall time or main-thread CPU time"
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side per cell (median)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler tables instead")
    parser.add_argument("--rows", type=int, default=15, help="rows of each profiler table")
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.device.startswith("cuda"):
        parser.error("--clock cpu measures the CPU only: use wall time on a GPU")
    set_clock(args.clock)
    args.memory_label = "MiB"
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    print(
        f"torch {torch.__version__}, pytorch_lightning {pl.__version__}, device {args.device}, "
        f"threads {torch.get_num_threads()}, clock {args.clock}\n"
    )
    if args.profile:
        device = torch.device(args.device)
        for name in args.victims:
            problem = make_problem(name, device)
            steps, warmup = default_steps(name, device)
            for precision in args.precision:
                for restarts in args.restarts:
                    profile(
                        problem, restarts, args.steps or steps, args.warmup or warmup, precision, args.rows
                    )
        return
    print(run(args))


if __name__ == "__main__":
    main()
