"""The demo's time on a 2-core CPU, idle and with one core kept busy by another process, per thread setting.

With PyTorch's default threads (one per core) and another busy process on the machine, OpenMP's threads spin at
every barrier waiting for the one that lost its core, and a run can take many times its idle time. This runs
``python invert.py fit --config configs/demo.yaml`` (fewer steps with ``--steps``) as a subprocess under each
thread setting, once on the idle machine and once beside a busy process (a Python loop pinned to nothing, as a
second user's job would be), and reports the attack's own seconds (``metrics.json``) and the wall time.

Settings:
    spinning       ``OMP_WAIT_POLICY=`` (empty: libgomp's default, which the scripts leave alone when the variable
                   is set): one thread per core, whose waits spin for a while before they sleep
    passive        no OpenMP variables: the scripts' default, ``OMP_WAIT_POLICY=PASSIVE``, the same threads
                   sleeping at once when they wait
    1 thread       ``OMP_NUM_THREADS=1``

Run it on an otherwise idle machine::

    python benchmarks/threads.py                      # the demo as shipped
    python benchmarks/threads.py --steps 300          # shorter
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SETTINGS: dict[str, dict[str, str]] = {
    "spinning": {"OMP_WAIT_POLICY": ""},
    "passive": {},
    "1 thread": {"OMP_NUM_THREADS": "1"},
}
OPENMP_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def run_demo(steps: int | None, env_extra: dict[str, str], out: Path) -> tuple[float, float, dict]:
    """Run the demo once; returns (attack seconds, wall seconds, metrics.json)."""
    env = {k: v for k, v in os.environ.items() if k not in OPENMP_VARIABLES}
    env.update(env_extra)
    command = [
        sys.executable,
        "invert.py",
        "fit",
        "--config",
        "configs/demo.yaml",
        "--trainer.default_root_dir",
        str(out),
        "--trainer.enable_checkpointing",
        "false",
        "--trainer.enable_progress_bar",
        "false",
    ]
    if steps is not None:
        command += ["--trainer.max_steps", str(steps)]
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    metrics = json.loads(next(out.rglob("metrics.json")).read_text())
    return float(metrics["attack"]["seconds"]), wall, metrics


def busy_process() -> subprocess.Popen:
    """Another user's job: one core kept busy by a Python loop."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=None, help="optimisation steps (default: the demo's)")
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(args.settings):
            for busy in (False, True):
                other = busy_process() if busy else None
                try:
                    seconds, wall, mean = run_demo(args.steps, SETTINGS[name], Path(tmp) / f"{i}-{busy}")
                finally:
                    if other is not None:
                        other.kill()
                        other.wait()
                rows.append((name, busy, seconds, wall, mean))
                print(
                    f"{name:14s} {'one core busy' if busy else 'idle':14s} attack {seconds:7.1f} s   wall {wall:7.1f} s"
                    f"   PSNR {mean.get('psnr', float('nan')):.2f} dB  SSIM {mean.get('ssim', float('nan')):.3f}",
                    flush=True,
                )
    print("\n| threads | idle: attack s | one core busy: attack s | busy ÷ idle |")
    print("|---|---|---|---|")
    for name in args.settings:
        idle = next(r for r in rows if r[0] == name and not r[1])
        busy = next(r for r in rows if r[0] == name and r[1])
        print(f"| {name} | {idle[2]:.1f} | {busy[2]:.1f} | {busy[2] / idle[2]:.2f} |")


if __name__ == "__main__":
    main()
