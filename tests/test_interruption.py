"""Work that survives: a run stopped by SIGINT or SIGTERM keeps a checkpoint and its outputs and resumes to the
images of an uninterrupted run; a folder the run cannot write to is refused before the first step."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_inversion.cli import main
from lightning_inversion.report import OutputFolderError

ROOT = Path(__file__).resolve().parents[1]
SIGNALS = (signal.SIGINT, signal.SIGTERM)
STEPS = 40
ARGS = [
    "fit",
    "--config",
    "configs/demo.yaml",
    "--data.init_args.image_size=16",
    "--model.victim=ConvNet-8",
    "--report.lpips=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    f"--trainer.max_steps={STEPS}",
]
# A checkpoint every 2 steps tells the test that the run is stepping; 0.1 s a step leaves it steps to go.
PACED = json.dumps(
    [
        {"class_path": "ModelCheckpoint", "init_args": {"every_n_train_steps": 2, "save_last": True}},
        {"class_path": "tests.helpers.Pace", "init_args": {"seconds": 0.1}},
    ]
)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The outputs of the uninterrupted run."""
    cli = main([*ARGS, f"--trainer.default_root_dir={tmp_path_factory.mktemp('straight')}"])
    return Path(cli.trainer.log_dir)


def signal_when_stepping(runs: dict[int, tuple[Path, list[str]]]) -> dict[int, tuple[int, str]]:
    """Run ``invert.py`` once per signal, all at once, each in its root folder with its extra arguments, and
    send each its signal as soon as its first checkpoint exists. Returns the exit code and log per signal."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    processes = {}
    try:
        for signum, (root, extra) in runs.items():
            cmd = [sys.executable, "invert.py", *ARGS, f"--trainer.default_root_dir={root}", *extra]
            cmd.append(f"--trainer.callbacks={PACED}")
            with open(root / "run.log", "w") as log:
                processes[signum] = subprocess.Popen(
                    cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
                )
        waiting, deadline = set(runs), time.monotonic() + 300
        while waiting:
            for signum in list(waiting):
                root, process = runs[signum][0], processes[signum]
                if list(root.glob("lightning_logs/*/checkpoints/*.ckpt")):
                    process.send_signal(signum)
                    waiting.remove(signum)
                else:
                    assert process.poll() is None, (root / "run.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "a run did not reach its first checkpoint"
            time.sleep(0.05)
        codes = {signum: process.wait(timeout=300) for signum, process in processes.items()}
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return {signum: (codes[signum], (root / "run.log").read_text()) for signum, (root, _) in runs.items()}


@pytest.fixture(scope="module")
def signalled(tmp_path_factory) -> dict[int, tuple[Path, int, str]]:
    """Per signal: the root folder, exit code and log of a run that got it once it was stepping."""
    roots = {signum: tmp_path_factory.mktemp(signal.Signals(signum).name) for signum in SIGNALS}
    results = signal_when_stepping({signum: (root, []) for signum, root in roots.items()})
    return {signum: (roots[signum], *results[signum]) for signum in SIGNALS}


@pytest.mark.parametrize("signum", SIGNALS, ids=["SIGINT", "SIGTERM"])
@pytest.mark.filterwarnings(
    "ignore:Be aware that when using `ckpt_path`"
)  # resumed without the pacing callbacks
def test_a_signal_keeps_a_checkpoint_and_the_outputs_and_the_run_resumes_to_the_same_images(
    signum, signalled, straight
):
    tmp_path, returncode, log = signalled[signum]
    assert returncode == 128 + signum, log[-3000:]  # 130, 143
    folder = tmp_path / "lightning_logs" / "version_0"
    metrics = json.loads((folder / "metrics.json").read_text())
    step = metrics["interrupted_at_step"]
    assert metrics["interrupted"] is True and 2 <= step < STEPS and metrics["max_steps"] == STEPS
    assert metrics["attack"]["steps"] == step and "psnr" in metrics
    assert (folder / "reconstruction.png").is_file() and (folder / "progress.png").is_file()
    saved = torch.load(folder / "reconstruction.pt", weights_only=True)
    assert saved["images"].shape == (1, 3, 16, 16) and saved["stats"]["steps"] == step
    last = folder / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == step and metrics["checkpoints"] == [
        str(last)
    ]

    resumed = main([*ARGS, f"--trainer.default_root_dir={tmp_path}", "--ckpt_path=last"])
    assert Path(resumed.trainer.ckpt_path) == folder / "checkpoints" / "last.ckpt"
    assert resumed.trainer.global_step == STEPS
    out = Path(resumed.trainer.log_dir)
    assert json.loads((out / "metrics.json").read_text())["interrupted"] is False
    images = torch.load(out / "reconstruction.pt", weights_only=True)["images"]
    assert torch.equal(images, torch.load(straight / "reconstruction.pt", weights_only=True)["images"])


@pytest.mark.slow
def test_sigterm_stops_every_ddp_process_with_one_checkpoint(tmp_path):
    """Under DDP rank 0 passes the signal on: both processes stop at the same step, rank 0 writes."""
    ddp = ["--model.restarts=4", "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
    returncode, log = signal_when_stepping({signal.SIGTERM: (tmp_path, ddp)})[signal.SIGTERM]
    assert returncode == 143, log[-3000:]
    folder = tmp_path / "lightning_logs" / "version_0"
    assert [p.name for p in (tmp_path / "lightning_logs").iterdir()] == ["version_0"]
    metrics = json.loads((folder / "metrics.json").read_text())
    step = metrics["interrupted_at_step"]
    assert metrics["interrupted"] is True and metrics["attack"]["restart_steps"] == [step] * 4
    assert torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == step


@pytest.mark.parametrize("option", ["--report.output_dir", "--trainer.default_root_dir"])
def test_an_unwritable_folder_is_refused_before_the_first_step(option, tmp_path, capsys):
    """Tests run as root, which ignores permission bits: the folder's parent is a regular file.

    From Python the error is raised after its one line; ``invert.py`` turns it into exit status 2, as every
    user error (test_cli.py runs that path in a subprocess).
    """
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    folders = {"--trainer.default_root_dir": tmp_path / "run", option: blocker / "out"}
    with pytest.raises(OutputFolderError):
        main([*ARGS, *(f"{key}={value}" for key, value in folders.items())])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == f"error: cannot write to {blocker / 'out'} ({option}): Not a directory"
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("metrics.json"))  # no step ran
