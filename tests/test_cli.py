"""The command line: every shipped config parses, the demo runs in-process, errors are messages."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_inversion.classifier import VictimClassifier
from lightning_inversion.cli import main
from lightning_inversion.metrics import flat_psnr, match_to_truth, psnr

ROOT = Path(__file__).resolve().parents[1]
# The configs of invert.py and train_victim.py; audit.py's (audit_*.yaml) are parsed in test_audit.py.
CONFIGS = sorted(c for c in (ROOT / "configs").glob("*.yaml") if not c.name.startswith("audit_"))


def test_there_are_configs():
    assert {"demo.yaml", "cifar10.yaml", "imagenet.yaml"} <= {c.name for c in CONFIGS}


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses(config, capsys):
    model_class = VictimClassifier if config.name.startswith("victim_") else None
    args = ["fit", "--config", str(config), "--print_config"]
    with pytest.raises(SystemExit) as exit_info:
        main(args) if model_class is None else main(args, model_class=model_class)
    assert exit_info.value.code in (None, 0)
    printed = capsys.readouterr().out
    assert "trainer:" in printed and "model:" in printed


def test_demo_runs_through_the_real_cli(tmp_path):
    cli = main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/demo.yaml"),
            "--trainer.max_steps=3",
            f"--trainer.default_root_dir={tmp_path}",
            "--report.lpips=false",
        ]
    )
    folder = Path(cli.trainer.log_dir)
    assert {"reconstruction.png", "reconstruction.pt", "metrics.json", "config.yaml"} <= {
        p.name for p in folder.iterdir()
    }
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["attack"]["steps"] == 3
    assumed = metrics["threat_model"]  # what the attacker assumed, beside the numbers
    assert assumed["batchnorm_statistics"] == "none" and assumed["client_mode"] == "eval"
    assert assumed["num_images"] == 1 and assumed["labels"] in ("given", "recovered (idlg)")
    assert 0 < metrics["psnr"] < 60 and "ssim" in metrics and "feature_mse" in metrics
    assert metrics["label_accuracy"] == 1.0
    saved = torch.load(folder / "reconstruction.pt", weights_only=True)
    assert saved["images"].shape == (1, 3, 28, 28)  # the demo: the cat at 28×28
    assert 0 <= saved["images"].min() and saved["images"].max() <= 1


def test_overrides_reach_the_module(tmp_path):
    cli = main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/demo.yaml"),
            "--model.restarts=2",
            "--model.objective=l2",
            "--model.victim=LeNet-Zhu",
            "--data.init_args.target_indices=[0, 1]",
            "--trainer.max_steps=2",
            "--report.lpips=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert cli.model.dummy_images.shape == (2, 2, 3, 28, 28)
    assert cli.model.objective.cost == "l2" and cli.model.num_classes == 8
    # Two restarts: how far the other one is from the chosen one, which needs no ground truth.
    attack = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())["attack"]
    result = cli.model.reconstruction
    other = result.restarts[1 - result.chosen_restart]
    expected = psnr(other[match_to_truth(other, result.images)], result.images).mean().item()
    assert attack["restart_agreement_psnr"] == pytest.approx(expected, abs=1e-4)
    assert attack["restart_agreement_flat_psnr"] == pytest.approx(
        flat_psnr(result.images).mean().item(), abs=1e-4
    )


def test_a_typo_fails_at_parse_time(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--model.objective=cosine", "--print_config"])
    assert exit_info.value.code != 0
    assert "simlocal" in capsys.readouterr().err


def test_help_runs_in_a_subprocess():
    out = subprocess.run(
        [sys.executable, "invert.py", "fit", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "--model.restarts" in out.stdout and "--client.protocol" in out.stdout


def test_missing_dataset_is_a_message_not_a_traceback(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "invert.py",
            "fit",
            "--config",
            "configs/cifar10.yaml",
            f"--data.init_args.root={tmp_path}",
            "--trainer.max_steps=1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2
    assert "CIFAR" in out.stderr and str(tmp_path) in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_pretrained_weights_are_a_message_not_a_traceback(tmp_path):
    out = subprocess.run(
        [sys.executable, "invert.py", "fit", "--config", "configs/imagenet.yaml", "--trainer.max_steps=1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "TORCH_HOME": str(tmp_path)},
    )
    assert out.returncode == 2
    assert "resnet18" in out.stderr and "hub/checkpoints" in out.stderr
    assert "Traceback" not in out.stderr


def test_lbfgs_reports_optimizer_steps_not_closure_evaluations(tmp_path):
    """L-BFGS evaluates its closure up to 20 times a step: ``steps`` counts the optimiser's steps."""
    cli = main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/dlg.yaml"),
            "--data.init_args.target_indices=[1]",
            "--trainer.max_steps=3",
            "--report.lpips=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    result = cli.model.reconstruction
    assert result.steps == 3 and result.restart_steps == [3]
    metrics = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    assert metrics["attack"]["steps"] == 3
