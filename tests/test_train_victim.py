"""Victim training through the real ``train_victim.py`` CLI, in-process on the offline photos, and its checkpoint."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from lightning_inversion.attack import TargetMismatchError
from lightning_inversion.classifier import VictimClassifier
from lightning_inversion.cli import InversionCLI, main
from lightning_inversion.data import PhotoData
from lightning_inversion.images import IMAGENET_MEAN, IMAGENET_STD
from lightning_inversion.victims import MissingWeightsError, load_victim_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "victim_demo.yaml"
VICTIM_CONFIGS = sorted((ROOT / "configs").glob("victim_*.yaml"))
# A short version of the demo: 3 epochs of 1024 crops (48 SGD steps), about 20 s on one busy CPU core.
SHORT_RUN = [
    "--trainer.max_epochs=3",
    "--model.milestones=[2]",
    "--data.init_args.train_size=1024",
    "--data.init_args.val_size=256",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.logger=false",
]


@pytest.fixture(autouse=True, scope="module")
def script_argv():
    """The CLI runs from Python with explicit args: hide pytest's own command line from LightningCLI."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["train_victim.py"])
        yield


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on 2 cores shared with other work, two spinning threads are many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> InversionCLI:
    """The demo victim after a short ``fit`` run of the real CLI."""
    root = tmp_path_factory.mktemp("victim")
    return main(
        [
            "fit",
            "--config",
            str(DEMO),
            *SHORT_RUN,
            f"--trainer.default_root_dir={root}",
            "--trainer.callbacks=[{class_path: pytorch_lightning.callbacks.ModelCheckpoint, init_args: "
            f"{{dirpath: {root}/checkpoints, monitor: val/acc, mode: max, filename: best, save_last: true}}}}]",
        ],
        model_class=VictimClassifier,
    )


def _held_out_accuracy(victim: torch.nn.Module, data: PhotoData) -> float:
    correct = total = 0
    with torch.no_grad():
        for images, labels in DataLoader(data.val_set(), batch_size=128):
            correct += int((victim(images).argmax(1) == labels).sum())
            total += len(labels)
    return correct / total


def test_fit_uses_the_recipe_and_writes_checkpoints(trained: InversionCLI) -> None:
    model, trainer = trained.model, trained.trainer
    assert isinstance(model, VictimClassifier) and model.hparams.victim == "ConvNet-8"
    assert trainer.current_epoch == 3
    (optimizer,) = trainer.optimizers
    assert isinstance(optimizer, torch.optim.SGD)  # ours, not LightningCLI's automatic optimiser
    group = optimizer.param_groups[0]
    assert group["nesterov"] and group["momentum"] == 0.9 and group["weight_decay"] == 5e-4
    assert group["lr"] == pytest.approx(0.02 * 0.1)  # after the milestone at epoch 2
    callback = trainer.checkpoint_callback
    assert Path(callback.best_model_path).name == "best.ckpt"
    assert Path(callback.last_model_path).name == "last.ckpt"
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(trainer.callback_metrics)


def test_trained_victim_beats_chance_on_held_out_crops(trained: InversionCLI) -> None:
    victim, meta = load_victim_checkpoint(trained.trainer.checkpoint_callback.last_model_path)
    # Fresh crops of the right quarter of each photo: pixels neither training nor checkpoint selection saw.
    held_out = PhotoData(val_size=512, seed=100)
    accuracy = _held_out_accuracy(victim, held_out)
    # Over seeds 0-7 the short run scored 0.54-0.81 here; chance is 0.125.
    assert accuracy > 0.4, f"held-out accuracy {accuracy:.3f}"
    assert float(trained.trainer.callback_metrics["val/acc"]) > 0.4


def test_checkpoint_rebuilds_the_trained_victim(trained: InversionCLI) -> None:
    victim, meta = load_victim_checkpoint(trained.trainer.checkpoint_callback.last_model_path)
    assert meta == {
        "victim": "ConvNet-8",
        "num_classes": 8,
        "image_shape": (3, 32, 32),
        "mean": IMAGENET_MEAN,
        "std": IMAGENET_STD,
    }
    assert not victim.training
    images, _ = next(iter(DataLoader(trained.datamodule.val_set(), batch_size=16)))
    trained_victim = trained.model.victim.eval()
    with torch.no_grad():
        torch.testing.assert_close(victim(images), trained_victim(images))
    best, _ = load_victim_checkpoint(trained.trainer.checkpoint_callback.best_model_path)
    assert type(best) is type(victim)


@pytest.mark.filterwarnings("ignore:The dirpath has changed")  # a new run dir for the test run
def test_test_subcommand_reports_accuracy(trained: InversionCLI, tmp_path: Path) -> None:
    ckpt = trained.trainer.checkpoint_callback.last_model_path
    cli = main(
        [
            "test",
            "--config",
            str(DEMO),
            *SHORT_RUN,
            f"--trainer.default_root_dir={tmp_path}",
            f"--ckpt_path={ckpt}",
        ],
        model_class=VictimClassifier,
    )
    assert 0.0 <= float(cli.trainer.callback_metrics["test/acc"]) <= 1.0


@pytest.mark.parametrize("kind", ["missing", "text", "bare_state_dict", "pickled_module"])
def test_not_a_victim_checkpoint_is_a_missing_weights_error(kind: str, tmp_path: Path) -> None:
    path = tmp_path / f"{kind}.ckpt"
    if kind == "text":
        path.write_text("not a checkpoint")
    elif kind == "bare_state_dict":
        torch.save(torch.nn.Linear(2, 2).state_dict(), path)
    elif kind == "pickled_module":  # weights_only refuses to unpickle classes
        torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(MissingWeightsError, match=str(path)):
        load_victim_checkpoint(str(path))


@pytest.mark.parametrize("config", VICTIM_CONFIGS, ids=lambda p: p.name)
def test_victim_config_parses(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"], model_class=VictimClassifier)
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model:" in printed and "victim:" in printed and "ModelCheckpoint" in printed


def test_victim_configs_exist() -> None:
    assert {p.name for p in VICTIM_CONFIGS} >= {"victim_cifar10.yaml", "victim_demo.yaml"}


def test_smoke_train_victim_help() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "train_victim.py", "--help"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "fit" in result.stdout and "validate" in result.stdout and "test" in result.stdout


def test_the_attack_runs_on_the_trained_victim(trained: InversionCLI, tmp_path: Path) -> None:
    checkpoint = trained.trainer.checkpoint_callback.last_model_path
    attack = main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "attack_trained_demo.yaml"),
            f"--model.victim_checkpoint={checkpoint}",
            "--trainer.max_steps=3",
            "--report.lpips=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(attack.model.victim(images), trained.model.victim.eval()(images))
    assert attack.model.reconstruction.steps == 3
    # A checkpoint trained on other data is refused with a message naming the difference.
    with pytest.raises(TargetMismatchError, match="num_classes"):
        main(
            [
                "fit",
                f"--model.victim_checkpoint={checkpoint}",
                "--data=lightning_inversion.data.ImageFolderData",
                f"--data.files=[{ROOT / 'README.md'}]",
                "--data.num_classes=3",
                "--trainer.max_steps=1",
                f"--trainer.default_root_dir={tmp_path}",
            ]
        )
