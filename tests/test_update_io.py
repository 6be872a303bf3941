"""Reading updates from files without unpickling code."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from lightning_inversion.client import Client, Update
from lightning_inversion.update_io import UpdateFileError, load_update, save_update


def make_victim() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))


@pytest.fixture
def victim() -> nn.Sequential:
    return make_victim()


@pytest.fixture
def update(victim: nn.Sequential) -> Update:
    images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    return Client(protocol="fedavg", local_steps=2, local_lr=1e-2).update(
        victim, images, torch.tensor([3, 1])
    )


def assert_same(a: Update, b: Update) -> None:
    assert a.names == b.names
    assert len(a.tensors) == len(b.tensors)
    for x, y in zip(a.tensors, b.tensors, strict=True):
        assert torch.equal(x, y)
    assert a.kind == b.kind
    assert torch.equal(a.labels, b.labels)
    assert a.num_images == b.num_images


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_round_trip(tmp_path: Path, victim: nn.Module, update: Update, suffix: str) -> None:
    path = tmp_path / f"update{suffix}"
    save_update(update, path)
    for loaded in (load_update(path), load_update(path, victim=victim)):
        assert_same(loaded, update)
        assert loaded.kind == "delta"
        assert loaded.meta["local_steps"] == 2
    assert load_update(path, kind="delta").kind == "delta"
    with pytest.raises(UpdateFileError, match="records a 'delta' update, not the 'weights'"):
        load_update(path, kind="weights")  # the file's own description wins; a contradiction is refused


def test_list_of_tensors_pt(tmp_path: Path, victim: nn.Module, update: Update) -> None:
    path = tmp_path / "grads.pt"
    torch.save([t.clone() for t in update.tensors], path)
    loaded = load_update(path, victim=victim)
    assert loaded.names == [n for n, _ in victim.named_parameters()]
    assert loaded.kind == "gradient" and loaded.labels is None
    assert all(torch.equal(a, b) for a, b in zip(loaded.tensors, update.tensors, strict=True))
    assert len(load_update(path).tensors) == 4
    torch.save([t.clone() for t in update.tensors[:3]], path)
    with pytest.raises(UpdateFileError, match="3 tensors but the victim has 4"):
        load_update(path, victim=victim)


def test_plain_state_dict_in_any_order_with_prefix(tmp_path: Path, victim: nn.Module, update: Update) -> None:
    path = tmp_path / "grads.pth"
    torch.save(
        {f"module.{n}": t for n, t in reversed(list(zip(update.names, update.tensors, strict=True)))}, path
    )
    loaded = load_update(path, victim=victim, kind="delta")
    assert loaded.names == update.names and loaded.kind == "delta"
    assert all(torch.equal(a, b) for a, b in zip(loaded.tensors, update.tensors, strict=True))
    # the same from a foreign safetensors file (no metadata) with a "model." prefix
    path = tmp_path / "grads.safetensors"
    save_file(
        {f"model.{n}": t.contiguous() for n, t in zip(update.names, update.tensors, strict=True)}, str(path)
    )
    loaded = load_update(path, victim=victim)
    assert loaded.names == update.names and loaded.kind == "gradient"
    assert all(torch.equal(a, b) for a, b in zip(loaded.tensors, update.tensors, strict=True))


class Exploit:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, victim: nn.Module) -> None:
    # the payload is live: plain unpickling runs it
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(Exploit(probe)))
    assert probe.exists()

    marker = tmp_path / "pwned"
    for name, write in [
        ("torch.pt", lambda p: torch.save({"0.weight": Exploit(marker)}, p)),
        ("raw.pth", lambda p: p.write_bytes(pickle.dumps([Exploit(marker)], protocol=2))),
    ]:
        path = tmp_path / name
        write(path)
        with pytest.raises(UpdateFileError, match="refused"):
            load_update(path, victim=victim)
        assert not marker.exists()


def test_mismatched_shape_names_the_tensor(tmp_path: Path, victim: nn.Module, update: Update) -> None:
    tensors = dict(zip(update.names, update.tensors, strict=True))
    tensors["3.weight"] = torch.zeros(5, 100)
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(UpdateFileError, match=r"'3\.weight' \(index 2\) has shape \(5, 100\).*\(5, 144\)"):
        load_update(path, victim=victim)


def test_missing_and_extra_keys_are_named(tmp_path: Path, victim: nn.Module, update: Update) -> None:
    tensors = dict(zip(update.names, update.tensors, strict=True))
    path = tmp_path / "missing.pt"
    torch.save({k: v for k, v in tensors.items() if k != "3.bias"}, path)
    with pytest.raises(UpdateFileError, match=r"'3\.bias' \(index 3, shape \(5,\)\)"):
        load_update(path, victim=victim)
    torch.save({**tensors, "head.weight": torch.zeros(2)}, path)
    with pytest.raises(UpdateFileError, match="head.weight"):
        load_update(path, victim=victim)


def test_missing_file_and_bad_contents(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "update.pt"
    with pytest.raises(UpdateFileError, match="nowhere"):
        load_update(missing)
    path = tmp_path / "text.pt"
    torch.save({"a": "not a tensor"}, path)
    with pytest.raises(UpdateFileError, match="'a'.*not a tensor"):
        load_update(path)
    with pytest.raises(UpdateFileError, match="kind"):
        load_update(path, kind="gradients")


def test_the_public_entry_points_are_at_the_top_level():
    import lightning_inversion as li
    from lightning_inversion.analytic import recover_linear_input

    assert li.load_update is load_update and li.recover_linear_input is recover_linear_input
    assert {"load_update", "recover_linear_input"} <= set(li.__all__)


def bn_victim() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5)
    )


@pytest.fixture
def trained() -> tuple[nn.Sequential, Update]:
    victim = bn_victim()
    images = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    update = Client(protocol="fedavg", local_steps=1, local_lr=0.1, train_mode=True, send="weights").update(
        victim, images, torch.tensor([3, 1])
    )
    return victim, update


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".npz"])
def test_buffer_changes_round_trip_and_stay_apart_from_parameters(tmp_path, trained, suffix):
    victim, update = trained
    assert set(update.buffer_changes) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    assert update.buffers_moved and int(update.buffer_changes["1.num_batches_tracked"]) == 1
    path = tmp_path / f"update{suffix}"
    save_update(update, path)
    loaded = load_update(path, victim)
    assert loaded.names == update.names and loaded.kind == "weights"
    assert loaded.buffer_changes.keys() == update.buffer_changes.keys()
    for name, change in update.buffer_changes.items():
        assert torch.equal(loaded.buffer_changes[name], change)
    state = update.state_dict()
    state["names"] = [*state["names"][:-1], "1.running_mean"]  # a buffer posing as a parameter
    with pytest.raises(ValueError, match="both as parameters and as buffers"):
        Update.from_state_dict(state)


def test_a_flower_state_dict_list_with_buffers_by_position_and_by_name(tmp_path, trained):
    import numpy as np

    victim, update = trained
    state = victim.state_dict()
    new = dict(zip(update.names, update.tensors, strict=True))
    new |= {n: state[n] + c for n, c in update.buffer_changes.items()}
    arrays = [new[k].numpy() for k in state]  # what a Flower client sends: state_dict() order, new values
    np.savez(tmp_path / "positional.npz", *arrays)
    np.savez(tmp_path / "named.npz", **{f"module.{k}": a for k, a in zip(state, arrays, strict=True)})
    for name in ("positional.npz", "named.npz"):
        loaded = load_update(tmp_path / name, victim, default_kind="weights")
        assert loaded.names == update.names and loaded.kind == "weights"
        for a, b in zip(loaded.tensors, update.tensors, strict=True):
            torch.testing.assert_close(a, b)
        for n, change in update.buffer_changes.items():
            torch.testing.assert_close(loaded.buffer_changes[n], change)
    # without the victim the buffers are still told apart by name, never taken for parameters
    assert load_update(tmp_path / "named.npz", default_kind="delta").names == [
        f"module.{n}" for n in update.names
    ]
    # a count that is neither the parameters' nor the state_dict's is named
    np.savez(tmp_path / "short.npz", *arrays[:-1])
    with pytest.raises(
        UpdateFileError, match=r"8 tensors but the victim has 6 parameters \(or 9 state_dict entries"
    ):
        load_update(tmp_path / "short.npz", victim)


def test_numpy_object_arrays_are_refused_without_unpickling(tmp_path):
    import numpy as np

    ragged = np.empty(2, dtype=object)
    ragged[0], ragged[1] = np.zeros(3), np.zeros((2, 2))
    np.save(tmp_path / "update.npy", ragged, allow_pickle=True)
    with pytest.raises(UpdateFileError, match="needs pickle"):
        load_update(tmp_path / "update.npy")
    np.savez(tmp_path / "update.npz", a=ragged)
    with pytest.raises(UpdateFileError, match="needs pickle"):
        load_update(tmp_path / "update.npz")
