"""Evaluation over many targets: one row per target, a summary that agrees with the rows, a grid, the config."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torchvision.utils import save_image

from lightning_inversion import evaluation as evaluation_module
from lightning_inversion.cli import main as invert
from lightning_inversion.data import ImageFolderData, PhotoData
from lightning_inversion.data.photos import center_square, load_photo
from lightning_inversion.errors import InputError
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


# --- the CLI over the data's clients (invert.py fit and evaluate.py) --------------------------------------------
SMALL = [
    "--data.init_args.image_size=16",
    "--model.victim=ConvNet-8",
    "--model.tv=1e-4",
    "--trainer.max_steps=2",
    "--trainer.enable_progress_bar=false",
    "--trainer.logger=false",
    "--report.lpips=false",
]


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    """Runs every test in its own folder: a run without a logger writes config.yaml into the working one."""
    monkeypatch.chdir(tmp_path)


def test_invert_attacks_every_client_in_fits_and_writes_the_table_after_each(tmp_path, monkeypatch):
    """``invert.py fit`` over a folder of 4 images, each its own client, 2 targets per fit, one image unreadable:
    each target's folder, and the table on disk after each fit with the targets done so far."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, name in enumerate(["astronaut", "chelsea", None, "coffee"]):
        if name is None:
            (photos / f"{i}.png").write_bytes(b"not an image")  # the third target cannot be read
        else:
            save_image(center_square(load_photo(name), 16), photos / f"{i}.png")
    written, write = [], evaluation_module.write_evaluation
    monkeypatch.setattr(
        evaluation_module,
        "write_evaluation",
        lambda folder, evaluation, description="": written.append(
            ([r["index"] for r in read_rows(folder)] if (folder / "evaluation.csv").is_file() else None,
             [r["index"] for r in evaluation.rows], list(evaluation.notes))
        ) or write(folder, evaluation, description),
    )  # fmt: skip
    out = tmp_path / "out"
    cli = invert(
        [
            "fit",
            *SMALL,
            "--data=lightning_inversion.data.ImageFolderData",
            f"--data.init_args.root={photos}",
            "--data.init_args.labels=[0, 1, 2, 3]",
            "--data.init_args.num_classes=4",
            "--data.init_args.image_size=16",
            "--data.init_args.images_per_client=1",
            "--targets_per_fit=2",
            "--trainer.enable_checkpointing=false",
            f"--report.output_dir={out}",
        ]
    )
    # After the first fit: targets 0 and 1, and a note that two are still to run; then all four (none before).
    assert [(before, rows) for before, rows, _ in written] == [(None, [0, 1]), (["0", "1"], [0, 1, 2, 3])]
    assert "2 of 4 targets still to run when this was written" in written[0][2]
    assert not any("still to run" in note for note in written[1][2])
    rows = read_rows(out)
    assert [r["index"] for r in rows] == ["0", "1", "2", "3"]
    assert rows[2]["psnr"] == "" and "cannot read image" in rows[2]["error"]
    for i in (0, 1, 3):
        metrics = json.loads((out / f"target_{i}" / "metrics.json").read_text())
        assert metrics["threat_model"]["labels"] == "given" and metrics["target"]["name"] == str(i)
        assert float(rows[i]["psnr"]) == pytest.approx(metrics["psnr"], rel=1e-5)
        assert metrics["labels"] == [i] and (out / f"target_{i}" / "reconstruction.png").is_file()
    assert not (out / "target_2").exists() and not (out / "progress.png").exists()
    assert cli.evaluation_result.images.shape == (3, 3, 16, 16)
    with Image.open(out / "evaluation.png") as png:  # three targets: one band of three columns
        assert 3 * 128 <= png.size[0] < 4 * 160


def test_clients_of_several_images_and_one_target_as_before(tmp_path):
    """4 photos dealt to clients of 2: two targets named by their images; one client (images_per_client unset)
    writes the outputs of one attack, as always, and no table."""
    pairs = tmp_path / "pairs"
    cli = invert(
        ["fit", "--config", str(CONFIG), *SMALL, "--data.init_args.target_indices=[0, 1, 2, 3]"]
        + [
            "--data.init_args.images_per_client=2",
            f"--report.output_dir={pairs}",
            "--report.monitor_every_n_steps=1",
        ]
        + [f"--trainer.default_root_dir={tmp_path / 'logs_pairs'}"]
    )
    rows = read_rows(pairs)
    assert [r["index"] for r in rows] == ["0+1", "2+3"] and [r["label"] for r in rows] == ["0+1", "2+3"]
    metrics = json.loads((pairs / "target_2+3" / "metrics.json").read_text())
    assert metrics["threat_model"]["num_images"] == 2 and len(metrics["per_image"]["psnr"]) == 2
    assert torch.load(pairs / "target_0+1" / "reconstruction.pt", weights_only=True)["images"].shape[0] == 2
    # The live PSNR (each target's best restart, matched to its own images) at the last step is the table's mean.
    report = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "InversionReport")
    assert report.history["psnr_step"] == [1, 2]
    assert report.history["psnr"][-1] == pytest.approx(cli.evaluation_result.summary["psnr"][0], rel=1e-4)

    one = tmp_path / "one"
    cli = invert(
        ["fit", "--config", str(CONFIG), *SMALL, "--data.init_args.target_indices=[0, 1]"]
        + ["--data.init_args.images_per_client=null", f"--report.output_dir={one}"]
        + [f"--trainer.default_root_dir={tmp_path / 'logs_one'}"]
    )
    assert cli.evaluation_result is None and cli.model.num_images == 2
    assert {p.name for p in one.iterdir()} == {
        "metrics.json",
        "progress.png",
        "reconstruction.png",
        "reconstruction.pt",
    }


def test_evaluate_attacks_each_image_on_its_own_with_the_victim_checkpoint(tmp_path, monkeypatch):
    """``evaluate.py`` is ``invert.py fit`` with each image its own client: the checkpoint's victim computes every
    client's update and is the victim every fit's attack inverts."""
    from lightning_inversion.attack import GradientInversion
    from lightning_inversion.client import Client
    from lightning_inversion.victims import build_victim

    data = PhotoData(image_size=16)
    torch.manual_seed(123)
    trained = build_victim("ConvNet-8", data.num_classes, tuple(data.image_shape))
    path = tmp_path / "victim.ckpt"
    hparams = {"victim": "ConvNet-8", "num_classes": data.num_classes, "image_shape": list(data.image_shape)}
    hparams.update(mean=list(data.mean), std=list(data.std))
    torch.save(
        {
            "state_dict": {f"victim.{k}": v for k, v in trained.state_dict().items()},
            "hyper_parameters": hparams,
        },
        path,
    )
    clients, attacks = [], []
    update, init = Client.update, GradientInversion.set_targets
    monkeypatch.setattr(
        Client, "update", lambda self, victim, *a: clients.append(victim) or update(self, victim, *a)
    )
    monkeypatch.setattr(
        GradientInversion, "set_targets", lambda self, u: attacks.append(self.victim) or init(self, u)
    )
    evaluation = main(
        [
            *SMALL,
            "--data.init_args.target_indices=[0, 3, 5]",
            "--targets_per_fit=2",
            "--model.victim=ConvNet-16",
        ]
        + [f"--model.victim_checkpoint={path}", f"--report.output_dir={tmp_path / 'out'}"]
    )
    assert [r["index"] for r in evaluation.rows] == [0, 3, 5]
    assert len(clients) == 3 and len(attacks) == 2  # three clients, two fits
    assert all(victim is clients[0] for victim in clients + attacks)
    for name, value in trained.state_dict().items():
        assert torch.equal(clients[0].state_dict()[name], value), name
    assert f"victim checkpoint {path}" in (tmp_path / "out" / "evaluation.md").read_text()


def test_a_stopped_run_keeps_the_targets_of_its_finished_fits(tmp_path):
    """SIGTERM in the second of two fits: the table holds the first fit's targets (and says two are still to run),
    the second fit's targets have their outputs so far, marked interrupted; exit status 143."""
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        invert(
            ["fit", "--config", str(CONFIG), *SMALL, "--data.init_args.target_indices=[0, 1, 2, 3]"]
            + ["--targets_per_fit=2", "--trainer.enable_checkpointing=false", f"--report.output_dir={out}"]
            + ["--trainer.callbacks+=tests.helpers.StopInFit"]
        )
    assert stopped.value.code == 143
    assert [r["index"] for r in read_rows(out)] == ["0", "1"]
    assert "Note: 2 of 4 targets still to run when this was written" in (out / "evaluation.md").read_text()
    done, cut = (json.loads((out / f"target_{i}" / "metrics.json").read_text()) for i in (1, 2))
    assert done["interrupted"] is False and done["attack"]["steps"] == 2
    assert cut["interrupted"] is True and cut["interrupted_at_step"] == 1 and cut["attack"]["steps"] == 1


def test_the_grid_shows_the_first_targets_and_says_so(tmp_path, monkeypatch):
    """evaluation.png shows the first GRID_TARGETS targets (64; here 2 of 3), not a wall of thousands."""
    from lightning_inversion.evaluation import Evaluation, write_evaluation

    monkeypatch.setattr(evaluation_module, "GRID_TARGETS", 2)
    rows = [{**dict.fromkeys(COLUMNS), "index": i, "psnr": 10.0, "ssim": 0.1} for i in range(3)]
    summary = dict.fromkeys(["psnr", "ssim", "lpips", "label_accuracy", "seconds"], (1.0, 0.0))
    write_evaluation(tmp_path, Evaluation(rows, summary, torch.rand(3, 3, 8, 8), torch.rand(3, 3, 8, 8)))
    assert (
        "Note: evaluation.png shows the first 2 of the 3 targets" in (tmp_path / "evaluation.md").read_text()
    )
    with Image.open(tmp_path / "evaluation.png") as png:  # two columns (about 140 pixels each)
        assert 2 * 128 <= png.size[0] < 3 * 160
    assert len(torch.load(tmp_path / "evaluation.pt", weights_only=True)["images"]) == 3


def test_images_per_client_deals_the_chosen_images_out_and_must_divide_them():
    data = PhotoData(image_size=16, target_indices=[7, 1, 3, 5], images_per_client=2)
    assert data.batch_images == 2 and data.num_targets == 2 and data.target_clients() == [[7, 1], [3, 5]]
    images, labels = data.client_batch([3, 5])
    assert images.shape == (2, 3, 16, 16) and labels.tolist() == [3, 5]
    assert PhotoData(num_images=3).num_targets == 1 and PhotoData(num_images=3).batch_images == 3  # as before
    with pytest.raises(InputError, match="images_per_client 3 does not divide the 4 chosen images"):
        assert PhotoData(target_indices=[7, 1, 3, 5], images_per_client=3).num_targets


def test_a_run_over_several_targets_is_not_continued_from_a_checkpoint(tmp_path, capsys):
    with pytest.raises(InputError):
        invert(
            ["fit", "--config", str(CONFIG), *SMALL, f"--report.output_dir={tmp_path}", "--ckpt_path=last"]
        )
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: --ckpt_path continues an attack on one target, not a run over 8 targets")


@pytest.mark.slow
def test_targets_split_over_two_cpu_processes_give_the_table_of_one(tmp_path):
    """4 targets, their (target, restart) slots split over 2 gloo processes (ddp_spawn, 2 targets per fit), give
    the table of one process with all 4 in one fit; the same through torchrun and Lightning's DDP, and over 2
    "nodes" of one process each as SLURM's ``srun`` starts them (Lightning's SLURM environment, ``num_nodes 2``)."""
    common = [*SMALL, "--data.init_args.target_indices=[0, 1, 2, 3]", "--model.restarts=2"]
    common += ["--trainer.max_steps=3", "--trainer.accelerator=cpu"]
    one = invert(["fit", "--config", str(CONFIG), *common, f"--report.output_dir={tmp_path / 'one'}"])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    runs = {
        "spawn": [sys.executable, str(ROOT / "invert.py"), "fit", "--trainer.strategy=ddp_spawn"],
        "torchrun": [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29517",
        ]
        + [str(ROOT / "invert.py"), "fit", "--trainer.strategy=ddp"],
    }
    runs["slurm"] = [sys.executable, str(ROOT / "invert.py"), "fit", "--trainer.strategy=ddp"]
    for name, command in runs.items():
        devices = (
            ["--trainer.num_nodes=2", "--trainer.devices=1"] if name == "slurm" else ["--trainer.devices=2"]
        )
        command = [*command, "--config", str(CONFIG), *common, *devices, "--targets_per_fit=2"]
        command += [f"--report.output_dir={tmp_path / name}", f"--trainer.default_root_dir={tmp_path / name}"]
        # srun starts one task per node with these variables (here both "nodes" are this machine).
        slurm = dict(SLURM_NTASKS="2", SLURM_NNODES="2", SLURM_NTASKS_PER_NODE="1", SLURM_LOCALID="0",
                     SLURM_JOB_NAME="audit", MASTER_ADDR="127.0.0.1", MASTER_PORT="29519")  # fmt: skip
        tasks = [{**slurm, "SLURM_PROCID": str(r), "SLURM_NODEID": str(r)} for r in range(2)]
        logs = [(tmp_path / f"{name}_{r}.log").open("w") for r in range(2 if name == "slurm" else 1)]
        processes = [
            subprocess.Popen(command, cwd=tmp_path, env={**env, **task}, stdout=log, stderr=subprocess.STDOUT)
            for task, log in zip(tasks if name == "slurm" else [{}], logs, strict=True)
        ]  # each writes to a file: two pipes read one after the other could fill and block
        for process, log in zip(processes, logs, strict=True):
            code = process.wait(timeout=900)
            log.close()
            assert code == 0, Path(log.name).read_text()[-3000:]
        if (
            name == "slurm"
        ):  # Lightning took the ranks from SLURM's variables: the second task was rank 1 of 2
            assert "GLOBAL_RANK: 1, MEMBER: 2/2" in Path(logs[1].name).read_text()
        rows = read_rows(tmp_path / name)
        assert [r["index"] for r in rows] == ["0", "1", "2", "3"], name
        # Each process runs the victim on its slots at once, which rounds differently from all of them at once
        # (see the README): a few pixels may differ after the first sign steps, not the outcome.
        for a, b in zip(one.evaluation_result.rows, rows, strict=True):
            assert a["psnr"] == pytest.approx(float(b["psnr"]), abs=0.05), name
            assert str(a["chosen_restart"]) == b["chosen_restart"], name
        images = torch.load(tmp_path / name / "evaluation.pt", weights_only=True)["images"]
        assert (one.evaluation_result.images - images).abs().mean() < 1e-3, name
