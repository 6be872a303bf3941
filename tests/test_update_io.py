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
