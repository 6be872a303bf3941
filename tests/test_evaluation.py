"""Evaluation over many targets: one row per target, a summary that agrees with the rows, a grid, the config."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lightning_inversion.data import PhotoData
from lightning_inversion.evaluation import COLUMNS, evaluate_targets, main
from tests.conftest import TinyConvNet

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "eval_photos.yaml"


def read_rows(folder: Path) -> list[dict[str, str]]:
    with open(folder / "evaluation.csv", newline="") as file:
        reader = csv.DictReader(file)
        assert tuple(reader.fieldnames) == COLUMNS
        return list(reader)


def test_one_row_per_target_and_a_summary_that_agrees(tmp_path):
    victim = TinyConvNet(num_classes=8).eval()
    data = PhotoData(image_size=16)
    evaluation = evaluate_targets(
        data,
        victim,
        targets=[0, 1, 3],
        attack_options={"restarts": 2, "tv": 1e-4, "label_strategy": "idlg"},
        trainer_kwargs={"max_steps": 3},
        output_dir=tmp_path,
        lpips=False,
    )
    assert all(p.requires_grad for p in victim.parameters()) and not victim.training  # left as it was
    rows = read_rows(tmp_path)
    assert [int(r["index"]) for r in rows] == [0, 1, 3]
    assert [int(r["label"]) for r in rows] == [0, 1, 3]  # each photo is its own class
    assert all(float(r["label_accuracy"]) == 1.0 for r in rows)  # iDLG recovers every label
    assert all(r["lpips"] == "" for r in rows) and all(r["chosen_restart"] in ("0", "1") for r in rows)
    assert all(0 < float(r["psnr"]) < 30 and float(r["seconds"]) > 0 for r in rows)

    mean_psnr = sum(float(r["psnr"]) for r in rows) / len(rows)
    assert evaluation.summary["psnr"][0] == pytest.approx(mean_psnr, rel=1e-5)
    markdown = (tmp_path / "evaluation.md").read_text()
    assert f"| PSNR (dB) | {mean_psnr:.2f} ± " in markdown and "| LPIPS | n/a |" in markdown

    # Three targets in one band: ground truths (16×16, drawn at about 140 pixels) above their reconstructions.
    with Image.open(tmp_path / "evaluation.png") as png:
        width, height = png.size
    assert 3 * 128 <= width < 4 * 160 and 2 * 128 <= height < 3 * 160
    assert evaluation.images.shape == evaluation.truth.shape == (3, 3, 16, 16)


def test_the_shipped_config_parses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(CONFIG), "--print_config"])
    assert exit_info.value.code in (None, 0)
    printed = capsys.readouterr().out
    assert "target_indices:" in printed and "max_steps: 500" in printed and "victim: ConvNet-16" in printed


def test_the_command_line_runs_the_config_with_overrides(tmp_path):
    evaluation = main(
        [
            "--config",
            str(CONFIG),
            "--data.init_args.image_size=16",
            "--data.init_args.target_indices=[2, 5]",
            "--model.victim=ConvNet-8",
            "--model.restarts=2",
            "--model.optimizer=torch.optim.SGD",
            "--trainer.max_steps=2",
            "--report.lpips=false",
            f"--report.output_dir={tmp_path}",
        ]
    )
    assert [int(r["index"]) for r in read_rows(tmp_path)] == [2, 5]
    assert {p.name for p in tmp_path.iterdir()} >= {"evaluation.csv", "evaluation.md", "evaluation.png"}
    assert "victim ConvNet-8" in (tmp_path / "evaluation.md").read_text()
    assert "optimizer SGD" in (tmp_path / "evaluation.md").read_text()
    assert evaluation.images.shape == (2, 3, 16, 16)


def test_smoke_help_in_a_subprocess():
    out = subprocess.run([sys.executable, "evaluate.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--model.restarts" in out.stdout and "--trainer.max_steps" in out.stdout
