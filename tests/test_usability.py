"""What a new user meets first: the help, typos, the learning rate, own photos, the pictures, a quiet run."""

import re
from pathlib import Path

import pytest
import torch

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


def test_typos_in_a_config_a_data_option_and_the_subcommand_get_the_nearest_name(capsys, tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("model:\n  restart: 4\n")
    cases = [
        (["fit", "--config", str(config)], "did you mean --model.restarts?"),
        (["fit", "--data.init_args.roots=x"], "did you mean --data.root?"),
        (["fti"], "did you mean fit?"),
    ]
    for args, hint in cases:
        code, _, err = _exit([*args, "--print_config"] if args != ["fti"] else args, capsys)
        assert code == 2 and hint in err and len(err.strip().splitlines()) == 1, err


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


def test_reconstruction_png_has_titled_rows_and_legible_size(tmp_path, cat16):
    from PIL import Image

    from lightning_inversion.report import save_comparison

    truth = torch.cat([cat16, cat16.flip(-1)])  # (2, 3, 16, 16)
    images = (truth + 0.1 * torch.randn_like(truth)).clamp(0, 1)
    restarts = torch.stack([images, truth.flip(0)])  # (R=2, B=2, ...)
    titles = save_comparison(tmp_path / "r.png", images, truth, restarts, [0.1, 0.2], chosen=0)
    assert titles == [
        "ground truth",
        "reconstruction",
        "restart 0 (chosen)\nscore 0.1",
        "restart 1\nscore 0.2",
    ]
    with Image.open(tmp_path / "r.png") as png:
        width, height = png.size
    assert width >= 2 * 128 and height >= 4 * 128  # each 16×16 image drawn at about 140 pixels


def test_report_pictures_through_the_cli(tmp_path):
    from PIL import Image

    out = tmp_path / "out"
    main(
        [
            "fit",
            "--config",
            DEMO,
            "--trainer.max_steps=3",
            "--report.lpips=false",
            f"--report.output_dir={out}",
            "--report.show_restarts=true",
            "--model.restarts=2",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    with Image.open(out / "reconstruction.png") as png:
        assert png.size[0] >= 128 and png.size[1] >= 4 * 128  # truth, reconstruction, two restarts
    assert (out / "progress.png").is_file()


def test_no_progress_plot_without_optimisation(tmp_path):
    out = tmp_path / "out"
    main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/analytic.yaml"),
            "--report.lpips=false",
            f"--report.output_dir={out}",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    assert (out / "reconstruction.png").is_file() and not (out / "progress.png").exists()


def test_progress_steps_are_optimiser_steps_with_lbfgs(tmp_path):
    cli = main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/dlg.yaml"),
            "--trainer.max_steps=4",
            "--report.monitor_every_n_steps=2",
            "--report.lpips=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    report = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "InversionReport")
    assert report.history["step"] == [1, 2, 3, 4]
    assert max(report.history["psnr_step"]) == 4  # not the 80 objective evaluations of L-BFGS


def test_a_run_is_quiet(tmp_path, caplog, monkeypatch):
    import logging
    import warnings

    from pytorch_lightning.trainer.connectors.logger_connector import logger_connector

    # As where TensorBoard is not installed: Lightning's note about the CSV logger is not shown either.
    monkeypatch.setattr(logger_connector, "_TENSORBOARD_AVAILABLE", False)
    monkeypatch.setattr(logger_connector, "_TENSORBOARDX_AVAILABLE", False)
    caplog.set_level(logging.INFO)
    every_2_steps = (
        "--trainer.callbacks=[{class_path: pytorch_lightning.callbacks.ModelCheckpoint, "
        "init_args: {every_n_train_steps: 2, save_top_k: -1}}]"
    )
    run = [
        "fit",
        "--config",
        DEMO,
        "--trainer.max_steps=4",
        "--trainer.enable_progress_bar=false",
        every_2_steps,
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cli = main([*run, f"--trainer.default_root_dir={tmp_path}"])
        # Resuming mid-way: Lightning's "results may be unreliable" does not apply, the resume is exact.
        (step_2,) = Path(cli.trainer.log_dir).glob("checkpoints/*step=2.ckpt")
        main([*run, f"--ckpt_path={step_2}", f"--trainer.default_root_dir={tmp_path}"])
    ours = [w for w in caught if not _lightning_cli_internal(w)]
    assert [str(w.message) for w in ours] == []
    text = caplog.text
    assert "Tip" not in text and "Trainable params" not in text and "Downloading" not in text


def _lightning_cli_internal(w) -> bool:
    """LightningCLI's own calls of deprecated jsonargparse functions (not ours to change), and pytest's argv."""
    return w.filename.endswith("pytorch_lightning/cli.py") and (
        issubclass(w.category, DeprecationWarning) or "args parameter" in str(w.message)
    )


def test_lpips_names_the_file_it_needs_and_downloads_nothing(tmp_path, monkeypatch, caplog):
    from lightning_inversion import metrics

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(metrics.LPIPSMetric, "_warned", False)

    def no_download(*args, **kwargs):
        raise AssertionError("LPIPS tried to download its weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    metric = metrics.LPIPSMetric()
    metrics.LPIPSMetric()  # said once
    assert not metric.available
    assert (
        "alexnet-owt-7be5be79.pth" in metric.reason and str(tmp_path / "hub" / "checkpoints") in metric.reason
    )
    assert len([r for r in caplog.records if "LPIPS" in r.getMessage()]) == 1
    assert "\n" not in metric.reason


def test_train_victim_says_where_its_checkpoint_went():
    from types import SimpleNamespace

    from lightning_inversion.cli import checkpoint_message

    callback = SimpleNamespace(
        last_model_path="outputs/v/checkpoints/last.ckpt",
        best_model_path="outputs/v/checkpoints/best.ckpt",
        monitor="val/acc",
    )
    message = checkpoint_message(SimpleNamespace(checkpoint_callback=callback))
    assert "Victim checkpoint: outputs/v/checkpoints/last.ckpt" in message
    assert "best by val/acc: outputs/v/checkpoints/best.ckpt" in message
    assert "--model.victim_checkpoint outputs/v/checkpoints/last.ckpt" in message
    assert checkpoint_message(SimpleNamespace(checkpoint_callback=None)) is None


def test_readme_trained_victim_flow_uses_the_path_the_config_writes():
    import yaml

    readme = (ROOT / "README.md").read_text()
    flow = readme.split("## Trained victims", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    train, attack = [line.split("#")[0].split() for line in flow.strip().splitlines()]
    config = yaml.safe_load((ROOT / train[train.index("--config") + 1]).read_text())
    (checkpoint,) = config["trainer"]["callbacks"]
    written = Path(checkpoint["init_args"]["dirpath"]) / "last.ckpt"
    assert checkpoint["init_args"]["save_last"] is True
    assert Path(attack[attack.index("--model.victim_checkpoint") + 1]) == written
