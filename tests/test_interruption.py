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


def signal_when_stepping(root: Path, signum: int) -> tuple[int, str]:
    """Run ``invert.py`` in a subprocess, send ``signum`` once its first checkpoint exists; exit code and log."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "invert.py",
        *ARGS,
        f"--trainer.default_root_dir={root}",
        f"--trainer.callbacks={PACED}",
    ]
    log = root / "run.log"
    root.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 240
            while not list(root.glob("lightning_logs/*/checkpoints/*.ckpt")):
                assert process.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "the run did not reach its first checkpoint"
                time.sleep(0.05)
            process.send_signal(signum)
            returncode = process.wait(timeout=240)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    return returncode, log.read_text()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_keeps_a_checkpoint_and_the_outputs_and_the_run_resumes_to_the_same_images(
    signum, tmp_path, straight
):
    returncode, log = signal_when_stepping(tmp_path, signum)
    assert returncode == 128 + signum, log[-3000:]  # 130, 143
    folder = tmp_path / "lightning_logs" / "version_0"
    metrics = json.loads((folder / "metrics.json").read_text())
    step = metrics["interrupted_at_step"]
    assert metrics["interrupted"] is True and 2 <= step < STEPS and metrics["max_steps"] == STEPS
    assert metrics["attack"]["steps"] == step and "psnr" in metrics
    assert (folder / "reconstruction.png").is_file() and (folder / "progress.png").is_file()
    saved = torch.load(folder / "reconstruction.pt", weights_only=True)
    assert saved["images"].shape == (1, 3, 16, 16) and saved["stats"]["steps"] == step
    checkpoint = torch.load(folder / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == step and metrics["checkpoints"] == [
        str(folder / "checkpoints/last.ckpt")
    ]

    resumed = main([*ARGS, f"--trainer.default_root_dir={tmp_path}", "--ckpt_path=last"])
    assert Path(resumed.trainer.ckpt_path) == folder / "checkpoints" / "last.ckpt"
    assert resumed.trainer.global_step == STEPS
    out = Path(resumed.trainer.log_dir)
    assert json.loads((out / "metrics.json").read_text())["interrupted"] is False
    images = torch.load(out / "reconstruction.pt", weights_only=True)["images"]
    assert torch.equal(images, torch.load(straight / "reconstruction.pt", weights_only=True)["images"])


@pytest.mark.parametrize("option", ["--report.output_dir", "--trainer.default_root_dir"])
def test_an_unwritable_folder_is_refused_before_the_first_step(option, tmp_path, capsys):
    """Tests run as root, which ignores permission bits: the folder's parent is a regular file.

    From Python the error is raised after its one line; ``invert.py`` exits with 2 there (see test_cli.py).
    """
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    folders = {"--trainer.default_root_dir": tmp_path / "run", option: blocker / "out"}
    with pytest.raises(OutputFolderError):
        main([*ARGS, *(f"{key}={value}" for key, value in folders.items())])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == f"error: cannot write to {blocker / 'out'} ({option}): Not a directory"
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("metrics.json"))  # no step ran
