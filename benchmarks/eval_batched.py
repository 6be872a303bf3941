"""The evaluation over several targets as batched fits against one fit per target and against separate runs.

Three ways to attack the same targets with the same config (``configs/eval_photos.yaml`` by default), each timed
by wall clock, start-up included:

- ``batched``: ``evaluate.py --targets_per_fit N``: one fit with a target axis of N (all targets by default);
- ``one fit per target``: ``evaluate.py --targets_per_fit 1``;
- ``separate runs``: one ``invert.py fit`` process per target (``--data.init_args.target_indices [i]``).

Reported: wall seconds, the ratios to the separate runs, and the mean PSNR of each (from ``evaluation.csv`` and
each run's ``metrics.json``).

Example::

    OMP_NUM_THREADS=1 python benchmarks/eval_batched.py
    OMP_NUM_THREADS=1 python benchmarks/eval_batched.py --victim LeNet-Zhu
    python benchmarks/eval_batched.py --skip-one-fit-per-target     # every core, as a user runs it
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, *command], cwd=ROOT, check=True, capture_output=True, env=os.environ.copy()
    )
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/eval_photos.yaml")
    parser.add_argument("--targets", type=int, nargs="+", default=list(range(8)), help="target indices")
    parser.add_argument("--victim", default=None, help="overrides the config's victim")
    parser.add_argument("--steps", type=int, default=None, help="overrides the config's max_steps")
    parser.add_argument(
        "--skip-one-fit-per-target",
        action="store_true",
        help="time only the batched fit and the separate runs",
    )
    args = parser.parse_args(argv)
    common = [
        "--config",
        args.config,
        f"--data.init_args.target_indices={args.targets}",
        "--report.lpips=false",
    ]
    if args.victim:
        common.append(f"--model.victim={args.victim}")
    if args.steps:
        common.append(f"--trainer.max_steps={args.steps}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        ways = [("batched", len(args.targets)), ("one fit per target", 1)]
        for name, per_fit in ways[:1] if args.skip_one_fit_per_target else ways:
            out = Path(tmp) / name.replace(" ", "_")
            wall = run(["evaluate.py", *common, f"--targets_per_fit={per_fit}", f"--report.output_dir={out}"])
            with open(out / "evaluation.csv", newline="") as file:
                psnr = [float(r["psnr"]) for r in csv.DictReader(file)]
            rows.append((name, wall, statistics.mean(psnr)))
        wall, psnr = 0.0, []
        for i in args.targets:
            out = Path(tmp) / f"separate_{i}"
            single = [a for a in common if not a.startswith("--data.init_args.target_indices")]
            single = [a for a in single if a != "--report.lpips=false"]
            wall += run(
                ["invert.py", "fit", *single, f"--data.init_args.target_indices=[{i}]", "--report.lpips=false",
                 f"--report.output_dir={out}", f"--trainer.default_root_dir={out}", "--trainer.enable_checkpointing=false",
                 "--trainer.enable_progress_bar=false"]
            )  # fmt: skip
            psnr.append(json.loads((out / "metrics.json").read_text())["psnr"])
        rows.append(("separate runs", wall, statistics.mean(psnr)))
    separate = rows[-1][1]
    threads = os.environ.get("OMP_NUM_THREADS", f"unset: {os.cpu_count()} cores")
    print(f"targets {args.targets}, config {args.config}, victim {args.victim or 'from the config'}, "
          f"OMP_NUM_THREADS {threads}\n")  # fmt: skip
    print("| way | wall s | ÷ separate runs | mean PSNR (dB) |")
    print("|---|---|---|---|")
    for name, wall, psnr in rows:
        print(f"| {name} | {wall:.1f} | {wall / separate:.2f}× | {psnr:.2f} |")


if __name__ == "__main__":
    main()
