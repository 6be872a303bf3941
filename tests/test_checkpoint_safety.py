"""Checkpoints never run code, never silently change what runs, and survive damage and failed writes."""

import errno
import functools
import http.server
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from lightning_inversion.checkpoints import checkpoint_checksum
from lightning_inversion.classifier import VictimClassifier
from lightning_inversion.cli import main
from lightning_inversion.client import Update
from lightning_inversion.data import MissingDataError, PhotoData
from lightning_inversion.update_io import save_update
from tests.test_trainer_features import SMALL

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"with open({str(self.marker)!r}, 'w') as f: f.write('payload ran')",)


@pytest.fixture(scope="module")
def attack_run(tmp_path_factory):
    """A 2-step attack of the cat photo through the real CLI; its ``last.ckpt`` is the checkpoint to resume."""
    root = tmp_path_factory.mktemp("attack")
    cli = main(["fit", *SMALL, "--trainer.max_steps=2", f"--trainer.default_root_dir={root}"])
    checkpoint = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    return cli, checkpoint


def run_script(monkeypatch, capsys, argv: list[str], model_class=None) -> tuple[object, list[str]]:
    """Run the CLI as ``python invert.py ARGV`` would: its exit code (or the exception that escaped), its stderr."""
    monkeypatch.setattr(sys, "argv", ["invert.py", *argv])
    try:
        main() if model_class is None else main(model_class=model_class)
        code = 0
    except SystemExit as exited:
        code = exited.code
    except Exception as error:  # noqa: BLE001 - what escapes is what a user would see as a traceback
        code = error
    return code, capsys.readouterr().err.strip().splitlines()


def assert_refused(code: int, err: list[str], *words: str) -> None:
    """Exit 2 with one ``error:`` line that contains ``words``, and no traceback."""
    assert code == 2, err
    assert not any("Traceback" in line for line in err), err
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1, err
    assert all(word in errors[0] for word in words), errors[0]


def crafted_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint with a code payload; the payload is live when the file is unpickled normally."""
    torch.save({"state_dict": {}, "global_step": 0, "payload": Payload(marker)}, path)
    torch.load(path, weights_only=False)
    assert marker.read_text() == "payload ran"  # live
    marker.unlink()
    return path


@pytest.fixture
def served(tmp_path, monkeypatch):
    """An HTTP server on the loopback interface serving ``tmp_path``; yields its base URL."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # a download cache of the test's own

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=tmp_path))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


# --- code execution -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["path", "file_url", "http_url"])
def test_a_crafted_checkpoint_never_runs_its_payload(where, tmp_path, served, monkeypatch, capsys):
    marker = tmp_path / "marker"
    path = crafted_checkpoint(tmp_path / "crafted.ckpt", marker)
    ckpt_path = {"path": str(path), "file_url": f"file://{path}", "http_url": f"{served}/crafted.ckpt"}[where]
    argv = ["fit", *SMALL, "--trainer.max_steps=2", f"--trainer.default_root_dir={tmp_path}"]
    code, err = run_script(monkeypatch, capsys, [*argv, f"--ckpt_path={ckpt_path}"])
    assert not marker.exists()
    assert_refused(code, err, ckpt_path, "references exec")


def test_train_victim_never_runs_a_remote_checkpoints_payload(tmp_path, served, monkeypatch, capsys):
    marker = tmp_path / "marker"
    crafted_checkpoint(tmp_path / "crafted.ckpt", marker)
    argv = ["fit", "--config", str(ROOT / "configs" / "victim_demo.yaml"), "--trainer.logger=false"]
    argv += [f"--trainer.default_root_dir={tmp_path}", "--trainer.callbacks=[]", "--trainer.max_epochs=1"]
    argv += [f"--ckpt_path={served}/crafted.ckpt"]
    code, err = run_script(monkeypatch, capsys, argv, model_class=VictimClassifier)
    assert not marker.exists()
    assert_refused(code, err, "crafted.ckpt", "references exec")


def test_a_checkpoint_cannot_make_the_cli_import_a_module(attack_run, tmp_path, monkeypatch, capsys):
    """A hyper-parameter naming a module (``optimizer: planted.make``) is refused; the module is never imported."""
    marker = tmp_path / "marker"
    (tmp_path / "planted.py").write_text(
        f"with open({str(marker)!r}, 'w') as f: f.write('imported')\ndef make(params, lr): raise SystemExit\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    checkpoint = torch.load(attack_run[1], weights_only=True)
    checkpoint.pop("checksum", None)  # a crafted file need not carry one
    checkpoint["hyper_parameters"]["optimizer"] = "planted.make"
    torch.save(checkpoint, tmp_path / "planted.ckpt")
    argv = ["fit", *SMALL, "--trainer.max_steps=3", f"--trainer.default_root_dir={tmp_path}"]
    code, err = run_script(monkeypatch, capsys, [*argv, f"--ckpt_path={tmp_path / 'planted.ckpt'}"])
    assert "planted" not in sys.modules and not marker.exists()
    assert_refused(code, err, "planted.ckpt", "optimizer")


def test_a_checkpoint_of_the_attack_resumes_from_a_url(attack_run, tmp_path, served):
    """Reading only with weights_only=True still resumes a real checkpoint over HTTP (read once, then handed over)."""
    shutil.copy(attack_run[1], tmp_path / "last.ckpt")
    argv = ["fit", *SMALL, "--trainer.max_steps=3", f"--trainer.default_root_dir={tmp_path / 'run'}"]
    resumed = main([*argv, f"--ckpt_path={served}/last.ckpt"])
    assert resumed.trainer.global_step == 3 and resumed.model.restart_steps.tolist() == [3]


# --- silent wrong results -------------------------------------------------------------------------------------
def test_options_that_contradict_the_checkpoint_are_refused(attack_run, tmp_path, monkeypatch, capsys):
    ckpt = attack_run[1]
    argv = [
        "fit",
        *SMALL,
        "--trainer.max_steps=3",
        f"--trainer.default_root_dir={tmp_path}",
        f"--ckpt_path={ckpt}",
    ]
    for option, value in [("victim", "ConvNet-16"), ("tv", "0.5"), ("restarts", "2")]:
        code, err = run_script(monkeypatch, capsys, [*argv, f"--model.{option}={value}"])
        assert_refused(code, err, str(ckpt), f"--model.{option} {value}")

    # A part given as a class is compared with the checkpoint's record of its parts.
    code, err = run_script(monkeypatch, capsys, [*argv, "--model.objective=L2"])
    assert_refused(code, err, str(ckpt), "objective")
    # So are the client's defenses (the attacker simulates them): a defense the checkpoint did not attack.
    prune = "--client.defenses=[{class_path: Prune, init_args: {keep_percent: 10}}]"
    code, err = run_script(monkeypatch, capsys, [*argv, prune])
    assert_refused(code, err, str(ckpt), "defenses")

    # Left out, an option continues with the checkpoint's value, and config.yaml records that value.
    without_tv = [a for a in argv if not a.startswith("--model.tv")]
    resumed = main([*without_tv, "--model.restarts=1"])  # given, and the same as the checkpoint's: fine
    assert resumed.model.tv == 1e-4 and resumed.trainer.global_step == 3
    recorded = yaml.safe_load((Path(resumed.trainer.log_dir) / "config.yaml").read_text())
    assert recorded["model"]["tv"] == 1e-4 and recorded["ckpt_path"] == str(ckpt)


def test_an_update_file_must_be_the_update_the_checkpoint_attacks(attack_run, tmp_path, monkeypatch, capsys):
    ckpt = attack_run[1]
    stored = Update.from_state_dict(torch.load(ckpt, weights_only=True)["target_update"])
    save_update(stored, tmp_path / "same.safetensors")
    other = Update(
        [t * 2 for t in stored.tensors], stored.names, stored.kind, stored.labels, stored.num_images
    )
    save_update(other, tmp_path / "other.safetensors")
    argv = [
        "fit",
        *SMALL,
        "--trainer.max_steps=3",
        f"--trainer.default_root_dir={tmp_path}",
        f"--ckpt_path={ckpt}",
    ]

    code, err = run_script(monkeypatch, capsys, [*argv, f"--update={tmp_path / 'other.safetensors'}"])
    assert_refused(code, err, "other.safetensors", str(ckpt))

    resumed = main([*argv, f"--update={tmp_path / 'same.safetensors'}"])
    assert resumed.trainer.global_step == 3


def place(checkpoint: Path, root: Path, name: str = "last.ckpt", version: int = 0) -> Path:
    """Copy a checkpoint into ``root`` where a run with the default logger would have written it."""
    folder = root / "lightning_logs" / f"version_{version}" / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(checkpoint, folder / name))


def test_last_continues_only_a_checkpoint_of_the_same_run(attack_run, tmp_path, monkeypatch, capsys):
    found = place(attack_run[1], tmp_path)
    argv = [
        "fit",
        *SMALL,
        "--trainer.max_steps=3",
        f"--trainer.default_root_dir={tmp_path}",
        "--ckpt_path=last",
    ]
    # Another target (another private image) and another configuration: nothing to continue, the file is listed.
    code, err = run_script(monkeypatch, capsys, [*argv, "--data.init_args.target_indices=[0]"])
    assert_refused(code, err, str(found), "another target update")
    code, err = run_script(monkeypatch, capsys, [*argv, "--model.seed=5"])
    assert_refused(code, err, str(found), "seed")


def test_last_without_the_private_data_needs_one_target(attack_run, tmp_path, monkeypatch, capsys):
    """Without the data (and without --update) the target is unknown: the matching checkpoints must agree on it."""

    def missing(self):
        raise MissingDataError("the private photos are gone")

    monkeypatch.setattr(PhotoData, "attack_targets", missing)
    place(attack_run[1], tmp_path)
    argv = [
        "fit",
        *SMALL,
        "--trainer.max_steps=3",
        f"--trainer.default_root_dir={tmp_path}",
        "--ckpt_path=last",
    ]
    with pytest.warns(UserWarning, match="its target update is not checked"):
        resumed = main(argv)
    assert resumed.trainer.global_step == 3

    other = torch.load(attack_run[1], weights_only=True)  # the same configuration attacking another update
    other["target_update"]["tensors"] = [t * 2 for t in other["target_update"]["tensors"]]
    other["checksum"] = checkpoint_checksum(other)
    torch.save(other, place(attack_run[1], tmp_path, version=5))
    code, err = run_script(monkeypatch, capsys, argv)
    assert_refused(code, err, "attack different updates", "--ckpt_path PATH")


def flip_a_byte_of(tensor: torch.Tensor, path: Path) -> None:
    """Flip one byte inside ``tensor``'s bytes in the file ``path`` (as damage on disk would)."""
    data = bytearray(path.read_bytes())
    at = data.find(tensor.contiguous().numpy().tobytes())
    assert at >= 0
    data[at + 5] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupted_checkpoint_is_refused(attack_run, tmp_path, monkeypatch, capsys):
    damaged = Path(shutil.copy(attack_run[1], tmp_path / "damaged.ckpt"))
    checkpoint = torch.load(damaged, weights_only=True)
    flip_a_byte_of(checkpoint["state_dict"]["dummy_images"], damaged)
    assert not torch.equal(
        torch.load(damaged, weights_only=True)["state_dict"]["dummy_images"],
        checkpoint["state_dict"]["dummy_images"],
    )  # it loads, and differs
    argv = ["fit", *SMALL, "--trainer.max_steps=3", f"--trainer.default_root_dir={tmp_path}"]
    code, err = run_script(monkeypatch, capsys, [*argv, f"--ckpt_path={damaged}"])
    assert_refused(code, err, str(damaged), "corrupt")

    damaged.write_bytes(attack_run[1].read_bytes()[:5000])  # truncated
    code, err = run_script(monkeypatch, capsys, [*argv, f"--ckpt_path={damaged}"])
    assert_refused(code, err, str(damaged))


# --- lost work ------------------------------------------------------------------------------------------------
def test_last_falls_back_to_the_newest_readable_checkpoint(attack_run, tmp_path):
    step2 = place(attack_run[1], tmp_path, "epoch=0-step=2.ckpt")
    last = place(attack_run[1], tmp_path)
    last.write_bytes(last.read_bytes()[:5000])  # cut short while being written
    os.utime(last, (step2.stat().st_mtime + 1,) * 2)
    argv = [
        "fit",
        *SMALL,
        "--trainer.max_steps=3",
        f"--trainer.default_root_dir={tmp_path}",
        "--ckpt_path=last",
    ]
    with pytest.warns(UserWarning, match="resuming from the newest readable checkpoint"):
        resumed = main(argv)
    assert Path(resumed.trainer.ckpt_path) == step2 and resumed.trainer.global_step == 3
    recorded = yaml.safe_load((Path(resumed.trainer.log_dir) / "config.yaml").read_text())
    assert recorded["ckpt_path"] == str(step2)  # what ran, not "last"


def test_a_failed_write_leaves_the_previous_checkpoint_intact(attack_run, tmp_path, monkeypatch):
    """The disk of the checkpoint folder fills up while ``last.ckpt`` is rewritten (the temporary folder is on
    another device): the write fails, and the previous ``last.ckpt`` still loads."""
    cli, ckpt = attack_run
    last = place(ckpt, tmp_path)
    before = last.read_bytes()

    def half_then_full(write):
        def wrapped(data: bytes, f) -> None:
            write(data[: len(data) // 2], f)
            raise OSError(errno.ENOSPC, "No space left on device")

        return wrapped

    rename = os.rename

    def cross_device_rename(src, dst, *args, **kwargs):
        if os.path.dirname(os.path.abspath(src)) != os.path.dirname(os.path.abspath(dst)):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        return rename(src, dst, *args, **kwargs)

    def copyfile(src, dst, *args, **kwargs):
        with open(src, "rb") as f, open(dst, "wb") as g:
            half_then_full(lambda d, out: out.write(d))(f.read(), g)

    save = torch.save

    def full_disk_save(obj, f, *args, **kwargs):
        if not isinstance(f, io.BytesIO):  # a file on the full disk
            buffer = io.BytesIO()
            save(obj, buffer, *args, **kwargs)
            half_then_full(
                lambda d, out: out.write(d) if hasattr(out, "write") else Path(out).write_bytes(d)
            )(buffer.getvalue(), f)
        else:
            save(obj, f, *args, **kwargs)

    monkeypatch.setattr(os, "rename", cross_device_rename)
    monkeypatch.setattr(shutil, "copyfile", copyfile)
    monkeypatch.setattr(torch, "save", full_disk_save)
    with pytest.raises(OSError):
        cli.trainer.save_checkpoint(last)
    monkeypatch.undo()
    assert last.read_bytes() == before
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]  # no temporary file left behind


def test_bad_files_end_with_one_line_naming_them(attack_run, tmp_path, monkeypatch, capsys):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(attack_run[1].read_bytes()[:3000])
    argv = ["fit", *SMALL, "--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path}"]
    for option in ("ckpt_path", "model.victim_weights", "model.victim_checkpoint"):
        code, err = run_script(monkeypatch, capsys, [*argv, f"--{option}={truncated}"])
        assert_refused(code, err, str(truncated))


@pytest.mark.slow
def test_a_run_killed_while_checkpointing_resumes_bitwise(tmp_path):
    """SIGKILL at any moment, checkpoint writes included: ``--ckpt_path last`` ends with the straight run's images."""
    every = '[{"class_path": "ModelCheckpoint", "init_args": {"every_n_train_steps": 20, "save_last": true}}]'
    args = [*SMALL, "--trainer.max_steps=600", f"--trainer.callbacks={every}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    killed = tmp_path / "killed"
    cmd = [sys.executable, "invert.py", "fit", *args, f"--trainer.default_root_dir={killed}"]
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.01)
    time.sleep(0.3)  # somewhere in the following steps and checkpoint writes
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert last.exists()

    resumed = main(["fit", *args, f"--trainer.default_root_dir={killed}", "--ckpt_path=last"])
    assert 0 < torch.load(resumed.trainer.ckpt_path, weights_only=True)["global_step"] < 600
    straight = main(["fit", *args, f"--trainer.default_root_dir={tmp_path / 'straight'}"])
    assert torch.equal(resumed.model.dummy_images, straight.model.dummy_images)
