"""What the Trainer promises the attack: several processes, mixed precision, checkpoint/resume, live view, determinism."""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

import lightning_inversion as li
from lightning_inversion.attack import GradientInversion
from lightning_inversion.cli import main
from lightning_inversion.data import MissingDataError, PhotoData
from lightning_inversion.objectives import decay_milestones
from tests.test_attack import MEAN, STD, THRESHOLD_DB, make_attack, run_api

ROOT = Path(__file__).resolve().parents[1]
# A small attack through the real CLI: the cat photo at 16×16, an untrained ConvNet-8, no LPIPS weights needed.
SMALL = [
    "--data.init_args.image_size=16",
    "--data.init_args.target_indices=[1]",
    "--model.victim=ConvNet-8",
    "--model.tv=1e-4",
    "--report.lpips=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def quiet_trainer(max_steps: int, **kwargs) -> pl.Trainer:
    kwargs = {"logger": False, "enable_checkpointing": False, **kwargs}
    return pl.Trainer(max_steps=max_steps, enable_progress_bar=False, enable_model_summary=False, **kwargs)


# --- several processes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("strategy", ["ddp", pytest.param("ddp_spawn", marks=pytest.mark.slow)])
def test_two_cpu_processes_equal_one(strategy, tmp_path):
    """4 restarts split over 2 gloo processes (2 each) give the images, scores and choice of one process over the
    first steps (later, rounding moves them apart: see attack.py)."""
    args = [*SMALL, "--model.restarts=4", "--trainer.max_steps=5", "--trainer.accelerator=cpu"]
    # Lightning's DDP launcher re-runs the script for rank 1, so the run goes through invert.py in a subprocess.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    two = tmp_path / "two"
    cmd = [sys.executable, "invert.py", "fit", *args, "--trainer.devices=2", f"--trainer.strategy={strategy}"]
    cmd += [f"--trainer.default_root_dir={two}", f"--report.output_dir={two / 'out'}"]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    one = main(["fit", *args, "--trainer.devices=1", f"--trainer.default_root_dir={tmp_path / 'one'}"])

    single = one.model.reconstruction
    parallel = torch.load(two / "out" / "reconstruction.pt", weights_only=True)
    assert parallel["restarts"].shape == (4, 1, 3, 16, 16)
    assert torch.allclose(parallel["restarts"], single.restarts, atol=1e-6)
    # Restarts stayed independent: no two are alike (plain DDP would have averaged them into one).
    assert all(not torch.allclose(parallel["restarts"][0], parallel["restarts"][r]) for r in range(1, 4))
    assert parallel["stats"]["scores"] == pytest.approx(single.scores, rel=1e-2, abs=1e-6)
    assert parallel["stats"]["chosen_restart"] == single.chosen_restart
    assert parallel["stats"]["restart_steps"] == [5, 5, 5, 5]
    # Only rank 0 wrote: one logger version, one set of outputs, and the checkpoint at the end of the run.
    assert [p.name for p in (two / "lightning_logs").iterdir()] == ["version_0"]
    assert {"reconstruction.png", "progress.png", "metrics.json"} <= {p.name for p in (two / "out").iterdir()}
    checkpoint = torch.load(two / "lightning_logs/version_0/checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 5


# --- mixed precision ------------------------------------------------------------------------------------------
class PrecisionProbe(pl.Callback):
    """Records the dtype of the victim's activations and of the image gradient the sign step sees."""

    def __init__(self, layer: torch.nn.Module) -> None:
        self.activations: set[torch.dtype] = set()
        self.gradients: set[torch.dtype] = set()
        layer.register_forward_hook(lambda module, args, out: self.activations.add(out.dtype))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.gradients.add(pl_module.dummy_images.grad.dtype)


def test_bf16_mixed_reconstructs_with_fp32_images(tiny_victim, cat16):
    probe = PrecisionProbe(tiny_victim.conv)
    result = run_api(tiny_victim, cat16, trainer_kwargs={"precision": "bf16-mixed", "callbacks": [probe]})
    assert torch.bfloat16 in probe.activations  # the victim's passes ran in bf16 ...
    assert probe.gradients == {torch.float32}  # ... the images, their gradient and the objective in fp32
    assert result.metrics["psnr"] > THRESHOLD_DB


@pytest.mark.parametrize("precision", ["bf16-true", "16-true"])
def test_true_half_precision_is_refused(precision, tiny_victim, cat16):
    attack = make_attack(tiny_victim, cat16, restarts=1)
    with pytest.raises(ValueError, match="cosine loss rounds to zero"):
        quiet_trainer(2, precision=precision).fit(attack)


# --- checkpoint and resume ------------------------------------------------------------------------------------
class StopAt(pl.Callback):
    """Interrupts a run after ``step`` optimisation steps, as a crash or a time limit would."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")  # other callbacks on purpose
def test_a_resumed_run_equals_a_straight_run_bitwise(tmp_path, tiny_victim, cat16):
    steps, k = (
        12,
        4,
    )  # the lr drops at 4 (3/8 of 12), 8 and 10 (rounded): the resumed part crosses two of them
    options = dict(restarts=2, tv=1e-4, median_filter_every=5)
    straight = make_attack(tiny_victim, cat16, **options)
    quiet_trainer(steps).fit(straight)

    interrupted = make_attack(tiny_victim, cat16, **options)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=k, save_last=True)
    quiet_trainer(steps, enable_checkpointing=True, callbacks=[saver, StopAt(k)]).fit(interrupted)
    assert interrupted.global_step == k
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)  # no pickled code in it
    assert checkpoint["global_step"] == k and "target_update" in checkpoint

    # A fresh module without set_target: the checkpoint brings the update (no private data needed).
    resumed = GradientInversion(
        tiny_victim, num_classes=10, image_shape=(3, 16, 16), mean=MEAN, std=STD, **options
    )
    trainer = quiet_trainer(steps)
    trainer.fit(resumed, ckpt_path=tmp_path / "last.ckpt")
    assert resumed.global_step == steps and resumed.restart_steps.tolist() == [steps, steps]
    assert torch.equal(resumed.dummy_images, straight.dummy_images)
    assert torch.equal(resumed.reconstruction.images, straight.reconstruction.images)
    assert sorted(trainer.lr_scheduler_configs[0].scheduler.milestones) == decay_milestones(steps)

    # A longer resumed run keeps the checkpoint's learning-rate schedule, and says so.
    longer = GradientInversion(
        tiny_victim, num_classes=10, image_shape=(3, 16, 16), mean=MEAN, std=STD, **options
    )
    trainer = quiet_trainer(steps + 2)
    with pytest.warns(UserWarning, match="milestones stay those of 12 steps"):
        trainer.fit(longer, ckpt_path=tmp_path / "last.ckpt")
    assert sorted(trainer.lr_scheduler_configs[0].scheduler.milestones) == decay_milestones(steps)
    assert longer.global_step == steps + 2


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")  # other callbacks on purpose
@pytest.mark.filterwarnings("ignore:resuming .* without the private data")  # what this test does
def test_the_cli_resumes_without_the_private_data(tmp_path, monkeypatch):
    every3 = '[{"class_path": "ModelCheckpoint", "init_args": {"every_n_train_steps": 3, "save_top_k": -1}}]'
    args = ["fit", *SMALL, "--trainer.max_steps=6", f"--trainer.default_root_dir={tmp_path}"]
    straight = main([*args, f"--trainer.callbacks={every3}"])
    step3 = Path(straight.trainer.log_dir) / "checkpoints" / "epoch=0-step=3.ckpt"
    assert step3.is_file()

    def missing(self):
        raise MissingDataError("the private photos are gone")

    monkeypatch.setattr(PhotoData, "attack_targets", missing)
    resumed = main([*args, f"--ckpt_path={step3}"])
    assert resumed.trainer.global_step == 6
    assert torch.equal(resumed.model.dummy_images, straight.model.dummy_images)
    metrics = json.loads((Path(resumed.trainer.log_dir) / "metrics.json").read_text())
    assert metrics["attack"]["steps"] == 6 and "psnr" not in metrics  # no ground truth without the data
    report = next(cb for cb in resumed.trainer.callbacks if type(cb).__name__ == "InversionReport")
    assert report.history["step"] == [1, 2, 3, 4, 5, 6]  # the history of steps 1-3 came with the checkpoint

    # "last" finds the newest last.ckpt of an earlier logger version (Lightning alone looks in the new one).
    again = main([*args, "--ckpt_path=last"])
    assert Path(again.trainer.ckpt_path) == Path(resumed.trainer.log_dir) / "checkpoints" / "last.ckpt"
    assert torch.equal(again.model.dummy_images, straight.model.dummy_images)


# --- live view ------------------------------------------------------------------------------------------------
LIVE = [*SMALL, "--trainer.max_steps=6", "--trainer.log_every_n_steps=1"]
LIVE += ["--report.monitor_every_n_steps=2", "--report.snapshot_every_n_steps=3"]
SCALARS = {
    "train/matching_cost",
    "train/gradient_cosine",
    "train/loss",
    "train/psnr",
    "train/ssim",
    "train/lr",
}


def test_live_view_with_the_default_logger(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cli = main(["fit", *LIVE, f"--trainer.default_root_dir={tmp_path}"])
    folder = Path(cli.trainer.log_dir)
    events = EventAccumulator(str(folder), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert SCALARS <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Images("reconstruction")] == [3, 6]
    cosine = {e.step: e.value for e in events.Scalars("train/gradient_cosine")}
    cost = {e.step: e.value for e in events.Scalars("train/matching_cost")}
    assert all(cosine[s] == pytest.approx(1 - cost[s], abs=1e-6) for s in cost)
    assert {"reconstruction.png", "progress.png", "metrics.json"} <= {p.name for p in folder.iterdir()}
    assert (folder / "checkpoints" / "last.ckpt").is_file()  # the default checkpoint callback
    report = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "InversionReport")
    assert report.history["step"] == [1, 2, 3, 4, 5, 6]
    assert report.history["psnr_step"] == [2, 4, 6] and all(math.isfinite(p) for p in report.history["psnr"])


def test_live_view_with_a_csv_logger(tmp_path):
    csv_logger = [
        "--trainer.logger=pytorch_lightning.loggers.CSVLogger",
        f"--trainer.logger.save_dir={tmp_path}",
    ]
    cli = main(["fit", *LIVE, *csv_logger])
    folder = Path(cli.trainer.log_dir)
    with open(folder / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert SCALARS | {"step"} <= set(rows[0])
    assert sorted(p.name for p in (folder / "snapshots").iterdir()) == ["step_000003.png", "step_000006.png"]
    assert (folder / "progress.png").stat().st_size > 0 and (folder / "reconstruction.png").is_file()


def test_no_logger_still_runs_with_the_default_callbacks(tmp_path):
    """Smoke test: the default checkpoint and learning-rate callbacks give way to logger/checkpointing off."""
    off = [
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        f"--trainer.default_root_dir={tmp_path}",
    ]
    cli = main(["fit", *SMALL, "--trainer.max_steps=2", *off])
    assert cli.model.reconstruction.steps == 2


# --- determinism ----------------------------------------------------------------------------------------------
def test_same_seed_and_config_give_the_same_images(tiny_victim, cat16):
    runs = []
    for _ in range(2):
        attack = make_attack(tiny_victim, cat16, restarts=3, seed=7, tv=1e-4, label_strategy="dlg")
        quiet_trainer(8).fit(attack)
        runs.append(attack)
    assert torch.equal(runs[0].dummy_images, runs[1].dummy_images)
    assert torch.equal(runs[0].dummy_labels, runs[1].dummy_labels)
    assert runs[0].reconstruction.scores == runs[1].reconstruction.scores


@pytest.mark.parametrize("train_mode", [False, True])
def test_bf16_mixed_with_several_restarts_and_batchnorm(cat16, train_mode):
    # Eval mode: batch norm written out as an affine map, restarts under vmap. Training mode: the fused op, which
    # vmap rejects in CPU bf16, so restarts run one after another.
    victim = li.build_victim("ResNet20", 10, (3, 16, 16)).train(train_mode)  # the client's mode
    result = run_api(
        victim,
        cat16,
        steps=3,
        restarts=2,
        client=li.Client(train_mode=train_mode),
        trainer_kwargs={"precision": "bf16-mixed"},
    )
    assert result.restart_steps == [3, 3]
    assert all(math.isfinite(s) for s in result.scores)
    assert not torch.equal(result.restarts[0], result.restarts[1])
