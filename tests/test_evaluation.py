"""Evaluation over many targets: one row per target, a summary that agrees with the rows, a grid, the config."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torchvision.utils import save_image

from lightning_inversion.data import ImageFolderData, PhotoData
from lightning_inversion.data.photos import center_square, load_photo
from lightning_inversion.evaluation import COLUMNS, evaluate_targets, main
from lightning_inversion.report import OutputFolderError
from tests.helpers import TinyConvNet

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
    # What the attacker assumed, per row and once above the summary.
    assert all(r["labels"] == "recovered (idlg)" and r["batchnorm_statistics"] == "none" for r in rows)
    assert all(r["client_mode"] == "eval" and r["num_images"] == "1" for r in rows)
    assert "Threat model: labels recovered (idlg), batchnorm_statistics none, num_images 1" in markdown

    # Three targets in one band: ground truths (16×16, drawn at about 140 pixels) above their reconstructions.
    with Image.open(tmp_path / "evaluation.png") as png:
        width, height = png.size
    assert 3 * 128 <= width < 4 * 160 and 2 * 128 <= height < 3 * 160
    assert evaluation.images.shape == evaluation.truth.shape == (3, 3, 16, 16)


class RowsWritten(pl.Callback):
    """Before each target's attack, the rows ``evaluation.csv`` already holds."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.seen = folder, []

    def on_fit_start(self, trainer, pl_module) -> None:
        done = (self.folder / "evaluation.csv").is_file()
        self.seen.append([r["index"] for r in read_rows(self.folder)] if done else [])


def test_an_unreadable_target_is_skipped_and_the_others_are_kept_as_they_finish(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, name in enumerate(["astronaut", "chelsea", None, "coffee"]):
        if name is None:
            (photos / f"{i}.png").write_bytes(b"not an image")  # the third target cannot be read
        else:
            save_image(center_square(load_photo(name), 16), photos / f"{i}.png")
    out = tmp_path / "out"
    written = RowsWritten(out)
    evaluation = evaluate_targets(
        ImageFolderData(root=str(photos), image_size=16, labels=[0, 1, 2, 3], num_classes=4),
        TinyConvNet(num_classes=4).eval(),
        targets=[0, 1, 2, 3],
        attack_options={"tv": 1e-4},
        trainer_kwargs={"max_steps": 2, "callbacks": [written]},
        output_dir=out,
        lpips=False,
        targets_per_fit=2,
    )
    assert written.seen == [[], ["0", "1"]]  # each fit's results were on disk before the next fit ran
    rows = read_rows(out)
    assert [r["index"] for r in rows] == ["0", "1", "2", "3"]
    assert all(float(rows[i]["psnr"]) > 0 and rows[i]["error"] == "" for i in (0, 1, 3))
    assert rows[2]["psnr"] == "" and "cannot read image" in rows[2]["error"] and "2.png" in rows[2]["error"]
    assert evaluation.images.shape == evaluation.truth.shape == (3, 3, 16, 16)
    mean = sum(float(rows[i]["psnr"]) for i in (0, 1, 3)) / 3
    assert evaluation.summary["psnr"][0] == pytest.approx(mean, rel=1e-5)
    markdown = (out / "evaluation.md").read_text()
    assert markdown.startswith("# Evaluation over 3 targets (1 skipped, see the notes)")
    assert (
        "Note: target 2 was skipped, its image could not be read: InputError: cannot read image" in markdown
    )
    assert "still to run" not in markdown  # the final table, not a partial one


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


def test_an_unwritable_output_folder_is_refused_before_the_first_target(tmp_path, capsys):
    blocker = tmp_path / "a_file"  # tests run as root, which ignores permission bits: the parent is a file
    blocker.write_text("")
    with pytest.raises(OutputFolderError):
        main(["--config", str(CONFIG), "--trainer.max_steps=2", f"--report.output_dir={blocker / 'out'}"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error == f"error: cannot write to {blocker / 'out'} (--report.output_dir): Not a directory"


def test_a_victim_checkpoint_is_the_victim_of_the_clients_and_of_the_attack(tmp_path, monkeypatch):
    """The update is computed by the checkpoint's victim, the one the attack inverts (not one built by name)."""
    from lightning_inversion.attack import GradientInversion
    from lightning_inversion.client import Client
    from lightning_inversion.victims import build_victim

    data = PhotoData(image_size=16)
    torch.manual_seed(123)
    trained = build_victim("ConvNet-8", data.num_classes, tuple(data.image_shape))
    path = tmp_path / "victim.ckpt"
    hparams = {
        "victim": "ConvNet-8",
        "num_classes": data.num_classes,
        "image_shape": list(data.image_shape),
        "mean": list(data.mean),
        "std": list(data.std),
    }
    state = {f"victim.{k}": v for k, v in trained.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": hparams}, path)
    clients, attacks = [], []
    update, init = Client.update, GradientInversion.set_targets
    monkeypatch.setattr(
        Client, "update", lambda self, victim, *a: clients.append(victim) or update(self, victim, *a)
    )
    monkeypatch.setattr(
        GradientInversion, "set_targets", lambda self, u: attacks.append(self.victim) or init(self, u)
    )
    evaluate_targets(
        data,
        "ConvNet-8",
        targets=[0],
        attack_options={"victim_checkpoint": str(path), "tv": 1e-4},
        trainer_kwargs={"max_steps": 1},
        lpips=False,
    )
    assert len(clients) == len(attacks) == 1 and clients[0] is attacks[0]
    for name, value in trained.state_dict().items():
        assert torch.equal(clients[0].state_dict()[name], value), name


@pytest.mark.slow
def test_targets_split_over_two_cpu_processes_give_the_table_of_one(tmp_path):
    """4 targets in one fit, their (target, restart) slots split over 2 gloo processes (ddp_spawn), give the table
    of one process over the first steps."""
    data, victim = PhotoData(image_size=16), TinyConvNet(num_classes=8).eval()
    tables = []
    for devices in (1, 2):
        spread = {"strategy": "ddp_spawn", "accelerator": "cpu"} if devices == 2 else {}
        evaluation = evaluate_targets(
            data,
            victim,
            targets=[0, 1, 2, 3],
            attack_options={"restarts": 2, "tv": 1e-4, "label_strategy": "idlg"},
            trainer_kwargs={"max_steps": 3, "devices": devices, **spread},
            output_dir=tmp_path / str(devices),
            lpips=False,
            targets_per_fit=4,
        )
        tables.append(evaluation)
    one, two = tables
    assert [r["index"] for r in two.rows] == [0, 1, 2, 3]
    # Each process runs the victim on its half of the slots at once, which rounds differently from all of them
    # at once (see attack.py): a few pixels differ after the first sign steps, not the outcome.
    for a, b in zip(one.rows, two.rows, strict=True):
        assert a["psnr"] == pytest.approx(b["psnr"], abs=0.05) and a["chosen_restart"] == b["chosen_restart"]
    assert (one.images - two.images).abs().mean() < 1e-3
