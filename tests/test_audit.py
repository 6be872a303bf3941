"""The privacy audit: a sweep from the command line writes every output; the page is self-contained."""

import csv
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

import lightning_inversion.auditing as auditing
from lightning_inversion.auditing import NO_DEFENSE, main, weakest_stopping
from lightning_inversion.data import PhotoData
from lightning_inversion.errors import InputError
from lightning_inversion.images import denormalize
from lightning_inversion.metrics import flat_psnr, psnr

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/audit_demo.yaml"

# 2 strengths x 2 targets of DP-SGD, and secure aggregation of 2 clients, on 16x16 photos: a few seconds.
SMALL = [
    "--config",
    str(CONFIG),
    "--data.init_args.image_size=16",
    "--data.init_args.train_size=64",
    "--data.init_args.val_size=32",
    "--model.victim=ConvNet-4",
    "--trainer.max_steps=2",
    "--report.lpips=false",
    "--audit.sweeps=[{defense: {class_path: DPSGD, init_args: {max_grad_norm: 1.0, seed: 0}}, strengths: [0.01, 1.0]}]",
    "--audit.num_clients=[2]",
    "--audit.training={epochs: 1, batch_size: 32}",
]


def read_rows(folder: Path) -> list[dict]:
    with open(folder / "audit.csv", newline="") as file:
        return list(csv.DictReader(file))


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources, self.references, self.tags = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name == "src":
                self.sources.append(value)
            elif name in ("href", "action", "data", "poster", "srcset"):
                self.references.append(value)


def test_a_sweep_of_2_strengths_x_2_targets_from_the_cli_writes_every_output(tmp_path):
    rows = main([*SMALL, f"--report.output_dir={tmp_path}"])
    written = read_rows(tmp_path)
    assert [(r["defense"], r["strength"]) for r in written] == [
        (NO_DEFENSE, ""),
        ("DPSGD", "0.01"),
        ("DPSGD", "1"),
        ("SecureAggregation", "2"),
    ]
    assert all(r["targets"] == "2" and float(r["psnr_mean"]) > 0 and r["victim_accuracy"] for r in written)
    assert len(rows) == 4 and rows[1]["epsilon"] > rows[2]["epsilon"] > 0  # more noise, smaller ε
    assert rows[2]["victim_epsilon"] > 0 and rows[0]["epsilon"] is None
    # secure aggregation's average of equal clients is the batch gradient: the undefended victim's accuracy
    assert rows[3]["victim_accuracy"] == rows[0]["victim_accuracy"]
    names = {p.name for p in tmp_path.iterdir()}
    assert names >= {"audit.csv", "audit.md", "audit.png", "audit.html", "grid_DPSGD.png"}
    assert "grid_SecureAggregation.png" in names
    markdown = (tmp_path / "audit.md").read_text()
    assert "## The weakest strength that stops the attack (mean PSNR < 12 dB)" in markdown
    assert "still to run" not in markdown
    data = PhotoData(image_size=16)
    images = torch.stack([torch.as_tensor(data.target_set()[i][0]) for i in (1, 3)])
    floors = flat_psnr(denormalize(images, data.mean, data.std).clamp(0, 1))
    assert f"scores {floors[0]:.1f}, {floors[1]:.1f} dB" in markdown  # each target's flat-colour floor

    page = _Page()
    text = (tmp_path / "audit.html").read_text()
    page.feed(text)
    page.close()
    assert page.tags.count("img") == 1 + 3  # the plot and the grids of DPSGD, secure aggregation and none
    assert all(src.startswith("data:image/png;base64,") for src in page.sources)
    assert page.references == [] and "http" not in text.replace("http-equiv", "")
    assert "<table>" in text and "DPSGD" in text


def test_results_are_written_as_each_setting_finishes(tmp_path, monkeypatch):
    trained = []

    def train_then_stop(*args, **kwargs):
        if trained:
            raise KeyboardInterrupt
        trained.append(1)
        return {"accuracy": 0.5, "epsilon": None, "seconds": 0.0}

    monkeypatch.setattr(auditing, "train_victim", train_then_stop)
    with pytest.raises(SystemExit) as exit_info:
        main([*SMALL, f"--report.output_dir={tmp_path}"])
    assert exit_info.value.code == 128 + 15
    assert [r["defense"] for r in read_rows(tmp_path)] == [NO_DEFENSE]
    assert "3 of 4 settings still to run" in (tmp_path / "audit.md").read_text()
    assert (tmp_path / "audit.html").exists() and (tmp_path / "audit.png").exists()


@pytest.mark.parametrize(
    ("sweep", "message"),
    [
        ("{defense: GaussianNoise, strengths: [0.1, -1]}", "scale must be a finite number >= 0, got -1.0"),
        ("{defense: Prune, strengths: [10, 0]}", "keep_percent must be a finite number > 0 and <= 100"),
        ("{defense: Prune, strengths: []}", "lists no strengths"),
    ],
)
def test_bad_strengths_are_refused_before_anything_runs(sweep, message, tmp_path, capsys):
    with pytest.raises(InputError, match=message):
        main([*SMALL, f"--audit.sweeps=[{sweep}]", f"--report.output_dir={tmp_path}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the sweep of ")
    assert not (tmp_path / "audit.csv").exists()


def test_bad_defense_options_in_the_config_exit_2_with_one_line(capsys):
    sweep = "[{defense: {class_path: DPSGD, init_args: {max_grad_norm: -1}}, strengths: [1]}]"
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(CONFIG), f"--audit.sweeps={sweep}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: --audit.sweeps.defense.max_grad_norm must be a number > 0, got -1"]


@pytest.mark.slow
def test_smoke_help_in_a_subprocess():
    out = subprocess.run([sys.executable, "audit.py", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--audit.sweeps" in out.stdout and "--audit.training" in out.stdout


def test_the_shipped_config_parses(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(CONFIG), "--print_config"])
    assert exit_info.value.code in (None, 0)
    printed = capsys.readouterr().out
    assert "lightning_inversion.defenses.DPSGD" in printed and "num_clients:" in printed


def test_the_weakest_stopping_strength_reads_each_defenses_direction():
    def row(defense, strength, psnr, stronger):
        return {"defense": defense, "strength": strength, "psnr_mean": psnr, "stronger": stronger}

    rows = [
        row(NO_DEFENSE, None, 20.0, "higher"),
        row("GaussianNoise", 1e-4, 18.0, "higher"),
        row("GaussianNoise", 1e-3, 11.0, "higher"),
        row("GaussianNoise", 1e-2, 8.0, "higher"),
        row("Prune", 50, 15.0, "lower"),
        row("Prune", 10, 11.5, "lower"),
        row("Prune", 1, 9.0, "lower"),
        row("ClipUpdate", 1.0, 19.0, "lower"),
    ]
    found = weakest_stopping(rows, 12.0)
    assert found["GaussianNoise"]["strength"] == 1e-3
    assert found["Prune"]["strength"] == 10
    assert found["ClipUpdate"] is None


def test_the_targets_of_a_setting_are_attacked_in_one_fit_each_on_its_own(tmp_path, monkeypatch):
    """Both targets go through the target axis of one fit, and each result is its own target's reconstruction."""
    fits, results = [], []
    real_fit, real_attack = auditing.pl.Trainer.fit, auditing.attack_targets

    def fit(self, module):
        fits.append(module.targets)
        return real_fit(self, module)

    def attack(*args, **kwargs):
        results.extend(real_attack(*args, **kwargs))
        return results

    monkeypatch.setattr(auditing.pl.Trainer, "fit", fit)
    monkeypatch.setattr(auditing, "attack_targets", attack)
    main([
        "--config", str(CONFIG), "--data.init_args.image_size=8", "--model.victim=MLP", "--model.tv=0",
        "--trainer.max_steps=40", "--report.lpips=false", "--audit.sweeps=[]", "--audit.num_clients=[]",
        "--audit.training=null", f"--report.output_dir={tmp_path}",
    ])  # fmt: skip
    assert fits == [2] and len(results) == 2
    cat, rocket = results
    assert psnr(cat["image"][None], cat["truth"][None]) > psnr(cat["image"][None], rocket["truth"][None]) + 3
    assert (
        psnr(rocket["image"][None], rocket["truth"][None])
        > psnr(rocket["image"][None], cat["truth"][None]) + 3
    )
