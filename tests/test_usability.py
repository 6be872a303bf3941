"""What a new user meets first: the help, typos, the learning rate, own photos, the pictures, a quiet run."""

import re
from pathlib import Path

import pytest

from lightning_inversion.cli import main
from lightning_inversion.victims import list_victims

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs/demo.yaml")


def _exit(args, capsys) -> tuple[int | None, str, str]:
    """Exit code, stdout and stderr of a CLI call that ends in ``SystemExit``."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_help_is_short_and_lists_the_victims(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, text, _ = _exit(["fit", "--help"], capsys)
    assert code in (None, 0)
    assert 0 < len(text.splitlines()) < 300
    victim_help = " ".join(text.split("--model.victim VICTIM", 1)[1].split("--model.restarts", 1)[0].split())
    names = re.sub(r"- ", "-", victim_help)  # argparse wraps names at their hyphen
    assert all(name in names for name in list_victims())
    assert "class_path" in victim_help
    assert "torch.nn.modules" not in text and "known subclasses" not in text
    for option in ("--model.restarts", "--client.protocol", "--report.output_dir", "--trainer.max_steps"):
        assert option in text


def test_abbreviated_option_is_refused(capsys):
    code, _, err = _exit(["fit", "--config", DEMO, "--trainer.max_step", "2"], capsys)
    assert code == 2
    assert "did you mean --trainer.max_steps?" in err
    assert len(err.strip().splitlines()) == 1


def test_unknown_option_gets_the_nearest_name_in_one_line(capsys):
    code, _, err = _exit(["fit", "--config", DEMO, "--model.restart", "4"], capsys)
    assert code == 2
    assert "did you mean --model.restarts?" in err
    assert len(err.strip().splitlines()) == 1


def test_optimizer_lr_is_refused_for_model_lr(capsys):
    code, _, err = _exit(["fit", "--config", DEMO, "--model.optimizer.lr", "0.5"], capsys)
    assert code == 2
    assert "--model.lr" in err and len(err.strip().splitlines()) == 1


def test_the_learning_rate_is_model_lr_and_config_shows_one(tmp_path):
    cli = main(
        [
            "fit",
            "--config",
            DEMO,
            "--model.lr=0.5",
            "--model.optimizer=torch.optim.SGD",
            "--model.optimizer.momentum=0.25",
            "--trainer.max_steps=1",
            "--report.lpips=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    (optimizer,) = cli.trainer.optimizers
    group = optimizer.param_groups[0]
    assert group["initial_lr"] == 0.5 and group["momentum"] == 0.25
    config = (Path(cli.trainer.log_dir) / "config.yaml").read_text()
    assert len(re.findall(r"^\s*lr:", config, re.MULTILINE)) == 1
    assert re.search(r"^  lr: 0\.5$", config, re.MULTILINE)


@pytest.fixture
def three_photos(tmp_path) -> Path:
    """A flat folder of three photos shipped with scikit-image, as a user's own pictures."""
    from PIL import Image
    from skimage import data

    folder = tmp_path / "my_photos"
    folder.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.png")
    return folder


def test_readme_folder_example_attacks_every_image(three_photos, tmp_path, monkeypatch):
    monkeypatch.chdir(three_photos.parent)
    readme = (ROOT / "README.md").read_text()
    command = readme.split("python invert.py fit --data lightning_inversion.data.ImageFolderData", 1)[1]
    command = command.split("```", 1)[0].replace("\\\n", " ")
    args = ["fit", "--data", "lightning_inversion.data.ImageFolderData", *command.split()]
    cli = main(
        [*args, "--trainer.max_steps=2", "--report.lpips=false", f"--trainer.default_root_dir={tmp_path}"]
    )
    assert cli.model.dummy_images.shape == (1, 3, 3, 32, 32)  # (R, B, C, H, W): all three photos
    assert cli.model.labels_from == "batch"  # no labels in a flat folder: recovered from the update
    assert len(cli.model.reconstruction.labels) == 3


def test_class_folders_give_the_labels(three_photos, tmp_path):
    for i, photo in enumerate(sorted(three_photos.iterdir())):
        (three_photos / f"class_{i}").mkdir()
        photo.rename(three_photos / f"class_{i}" / photo.name)
    cli = main(
        [
            "fit",
            "--data=lightning_inversion.data.ImageFolderData",
            f"--data.root={three_photos}",
            "--data.image_size=16",
            "--model.victim=ConvNet-8",
            "--trainer.max_steps=1",
            "--report.lpips=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert cli.model.labels_from == "given"
    assert cli.model.target_labels.tolist() == [0, 1, 2]
