"""How the demo's setting was chosen: quality and speed of candidate settings of ``configs/demo.yaml``.

Every candidate is ``python invert.py fit --config configs/demo.yaml`` (the cat photo, one restart, the paper's
attack: cosine + TV, signed Adam, box) with the reference's options (an untrained ConvNet-64, 32×32 image, TV 1e-5,
lr 0.1 with step decay, 300 steps: the demo's earlier setting) and some of them overridden. Each one runs as a
subprocess, twice:

- quality: the full run; PSNR and SSIM from its ``metrics.json``. They do not depend on the machine's load, so this
  part may run beside other jobs (and with ``OMP_NUM_THREADS=1``, the default here).
- speed: the CPU seconds per step (user + system time of the subprocess, the difference of a run of
  ``--time-steps`` 25 and one of 5 steps, so start-up cancels), against the same of the reference setting (the
  demo's earlier one, ConvNet-64, 300 steps, whose attack took 102 s on the idle 2-core machine). CPU time
  depends little on other jobs, unlike wall time. The ratio predicts the candidate's idle time:
  ``ratio × steps × 102 s / 300``. A candidate that differs from the reference only in TV, learning rate, decay
  or steps computes the same steps: its ratio is 1 and it is not timed. Measured with one thread
  (``OMP_NUM_THREADS=1``): a small victim gains less from the demo's two threads than ConvNet-64 does, so its
  prediction is an underestimate of up to the reference's two-thread speed-up.

The predicted times are predictions: confirm the chosen one with ``python invert.py fit --config configs/demo.yaml``
on an idle machine.

Examples::

    OMP_NUM_THREADS=1 nice python benchmarks/demo.py                       # every candidate
    OMP_NUM_THREADS=1 nice python benchmarks/demo.py --only reference LeNet-Zhu
    OMP_NUM_THREADS=1 nice python benchmarks/demo.py --no-speed            # quality only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The reference: the demo's earlier setting, timed on the idle 2-core machine (BENCHMARKS.md, "The demo").
REFERENCE_IDLE_SECONDS, REFERENCE_STEPS = 102.0, 300

# name: what the candidate changes in the reference's options (_options).
CANDIDATES: dict[str, dict[str, str]] = {
    "reference": {},
    "lr 0.2, 180 steps": {"--model.lr": "0.2", "--trainer.max_steps": "180"},
    "lr 0.3, 180 steps": {"--model.lr": "0.3", "--trainer.max_steps": "180"},
    "last 10 tensors": {"--model.layers": "last", "--model.layers_k": "10"},
    "LeNet-Zhu": {"--model.victim": "LeNet-Zhu"},
    "LeNet-Zhu, 1000 steps": {"--model.victim": "LeNet-Zhu", "--trainer.max_steps": "1000"},
    "ResNet20": {"--model.victim": "ResNet20"},
    "MLP": {"--model.victim": "MLP"},
    "24×24 image": {"--data.init_args.image_size": "24"},
    "28×28 image, 230 steps": {"--data.init_args.image_size": "28", "--trainer.max_steps": "230"},
    "28×28 image, 180 steps (the demo)": {"--data.init_args.image_size": "28", "--trainer.max_steps": "180"},
}


def _options(overrides: dict[str, str]) -> dict[str, str]:
    base = {
        "--data.init_args.image_size": "32",
        "--model.victim": "ConvNet-64",
        "--model.tv": "1e-5",
        "--model.lr": "0.1",
        "--model.lr_decay": "true",
        "--trainer.max_steps": "300",
    }
    return base | overrides


def run(overrides: dict[str, str], out: Path, steps: int | None = None) -> dict:
    """One run of the demo with ``overrides`` (and ``steps`` steps if given); returns its metrics.json."""
    options = _options(overrides)
    if steps is not None:
        options["--trainer.max_steps"] = str(steps)
    command = [sys.executable, "invert.py", "fit", "--config", "configs/demo.yaml"]
    for key, value in options.items():
        command += [key, value]
    command += [
        "--trainer.default_root_dir",
        str(out),
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.enable_progress_bar",
        "false",
    ]
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    return json.loads(next(out.rglob("metrics.json")).read_text())


def cpu_seconds_per_step(overrides: dict[str, str], out: Path, short: int, long: int) -> float:
    """CPU seconds (user + system, the subprocess's) per step: the difference of a long and a short run.

    The process's CPU time, unlike the wall time, hardly depends on other jobs on the machine, and the difference
    cancels the start-up (imports, the victim, the target update).
    """
    spent = []
    for i, steps in enumerate((short, long)):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        run(overrides, out / str(i), steps)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        spent.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return (spent[1] - spent[0]) / (long - short)


# Options that do not change what one step computes: candidates differing from the reference only in these cost
# as much per step as it does, and are not timed.
PER_STEP_NEUTRAL = ("--model.tv", "--model.lr", "--model.lr_decay", "--trainer.max_steps", "--model.seed")


def same_step(overrides: dict[str, str]) -> bool:
    """Whether a step of the candidate computes what a step of the reference does (at other values)."""
    return all(key in PER_STEP_NEUTRAL for key in overrides)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument(
        "--time-steps", type=int, nargs=2, default=(5, 25), help="steps of the short and the long timed run"
    )
    parser.add_argument("--no-speed", action="store_true", help="quality only")
    parser.add_argument("--no-quality", action="store_true", help="speed only")
    parser.add_argument("--output", default="outputs/demo_sweep", help="where the quality runs' outputs go")
    args = parser.parse_args()
    output = ROOT / args.output
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '(unset)')}", flush=True)
    reference_per_step = REFERENCE_IDLE_SECONDS / REFERENCE_STEPS
    rows = []
    reference = None  # CPU seconds per step of the reference setting
    for name in args.only:
        overrides = CANDIDATES[name]
        options = _options(overrides)
        steps = int(options["--trainer.max_steps"])
        psnr = ssim = float("nan")
        folder = output / name.replace(" ", "_").replace(",", "")
        if not args.no_quality:
            started = time.perf_counter()
            if folder.exists():
                subprocess.run(["rm", "-rf", str(folder)], check=True)
            metrics = run(overrides, folder)
            psnr, ssim = metrics["psnr"], metrics["ssim"]
            print(
                f"{name}: PSNR {psnr:.2f} dB, SSIM {ssim:.3f} ({time.perf_counter() - started:.0f} s wall)",
                flush=True,
            )
        ratio = float("nan")
        if not args.no_speed:
            ratio = 1.0 if same_step(overrides) else None
            if ratio is None:
                with tempfile.TemporaryDirectory() as tmp:
                    if reference is None:
                        reference = cpu_seconds_per_step({}, Path(tmp) / "reference", *args.time_steps)
                        print(f"  reference: {reference:.3f} CPU s/step", flush=True)
                    mine = cpu_seconds_per_step(overrides, Path(tmp) / "candidate", *args.time_steps)
                print(f"  {name}: {mine:.3f} CPU s/step", flush=True)
                ratio = mine / reference
        predicted = ratio * steps * reference_per_step
        rows.append((name, options, psnr, ssim, ratio, predicted))
    print(
        "\n| candidate | victim | TV | lr | decay | steps | PSNR | SSIM | s/step ÷ reference | predicted idle s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, options, psnr, ssim, ratio, predicted in rows:
        print(
            f"| {name} | {options['--model.victim']} | {options['--data.init_args.image_size']} | "
            f"{options['--model.tv']} | {options['--model.lr']} | "
            f"{options['--model.lr_decay']} | {options['--trainer.max_steps']} | {psnr:.2f} dB | {ssim:.3f} | "
            f"{ratio:.2f} | {predicted:.0f} |"
        )


if __name__ == "__main__":
    main()
