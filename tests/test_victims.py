"""Tests of the victim model zoo: every architecture builds for any classes/shape, trains, and loads weights."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision
from safetensors.torch import save_file
from torch import nn

from lightning_inversion.victims import (
    MissingWeightsError,
    build_victim,
    list_victims,
    register_victim,
    registry,
)

TORCHVISION = set(torchvision.models.list_models(module=torchvision.models))
# Large torchvision models are too slow for the default suite; resnet18 stands for them.
SMALL_VICTIMS = [name for name in list_victims() if name not in TORCHVISION or name == "resnet18"]
# The deep/wide CIFAR victims cost seconds per step at 32x32 on 2 CPU cores; the default suite runs them at the
# smallest size they accept (the slow test below runs them at 32x32).
SMOKE_SHAPES = {name: (3, 8, 8) for name in ("ResNet32-10", "ResNet44", "ResNet56", "ResNet110")}
SMOKE_SHAPES.update({name: (3, 9, 9) for name in ("ConvNet-64", "ConvNet-128")})
RESNET18_FILE = Path(torchvision.models.ResNet18_Weights.DEFAULT.url).name


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty ``$TORCH_HOME`` and a network that refuses every download; returns the checkpoints dir."""

    def refuse(url: str, *args: object, **kwargs: object) -> None:
        raise URLError("network is unreachable")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return tmp_path / "hub" / "checkpoints"


def test_list_victims_has_the_canonical_names() -> None:
    names = list_victims()
    assert names == sorted(names)
    expected = ["ResNet20", "ResNet20-4", "ResNet32", "ResNet32-10", "ResNet44", "ResNet56", "ResNet110"]
    expected += [f"ConvNet-{w}" for w in (8, 16, 32, 64, 128)] + ["LeNet-Zhu", "MLP"]
    expected += ["resnet18", "resnet34", "resnet50", "resnet152", "vgg11"]
    assert set(expected) <= set(names)


@pytest.mark.parametrize("name", SMALL_VICTIMS)
def test_victim_builds_at_cifar_shape(name: str) -> None:
    shape = (3, 64, 64) if name in TORCHVISION else (3, 32, 32)
    model = build_victim(name, num_classes=7, image_shape=shape)
    assert [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features == 7


@pytest.mark.parametrize("name", SMALL_VICTIMS)
def test_victim_forward_backward(name: str) -> None:
    """Every victim maps a batch to logits and back-propagates; the heaviest run at a small size here."""
    torch.manual_seed(0)
    shape = SMOKE_SHAPES.get(name, (3, 64, 64) if name in TORCHVISION else (3, 32, 32))
    model = build_victim(name, num_classes=7, image_shape=shape)
    logits = model(torch.randn(2, *shape))
    assert logits.shape == (2, 7)
    nn.functional.cross_entropy(logits, torch.tensor([0, 6])).backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SMOKE_SHAPES))
def test_heavy_victim_forward_backward_at_32(name: str) -> None:
    model = build_victim(name, num_classes=7, image_shape=(3, 32, 32))
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 7)
    logits.sum().backward()


@pytest.mark.parametrize("name", ["ResNet20", "ConvNet-16", "LeNet-Zhu", "MLP", "resnet18"])
def test_victim_on_mnist_shape(name: str) -> None:
    model = build_victim(name, num_classes=10, image_shape=(1, 28, 28))
    logits = model(torch.randn(2, 1, 28, 28))
    assert logits.shape == (2, 10)
    logits.sum().backward()


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(KeyError, match="ResNet20-4") as error:
        build_victim("NotAVictim", num_classes=7, image_shape=(3, 32, 32))
    assert "ConvNet-{width}" in str(error.value)


def test_templates_resolve_unlisted_names() -> None:
    model = build_victim("ResNet8-2", num_classes=3, image_shape=(3, 16, 16))
    assert [len(s) for s in (model.layer1, model.layer2, model.layer3)] == [1, 1, 1]
    assert model.fc.in_features == 128
    assert build_victim("ConvNet-4", num_classes=3, image_shape=(3, 32, 32)).fc.in_features == 16 * 9
    with pytest.raises(ValueError, match="6n"):
        build_victim("ResNet21", num_classes=3, image_shape=(3, 32, 32))


def test_resnet20_4_stages() -> None:
    model = build_victim("ResNet20-4", num_classes=7, image_shape=(3, 32, 32))
    stages = (model.layer1, model.layer2, model.layer3)
    assert [len(stage) for stage in stages] == [3, 3, 3]
    assert [stage[-1].conv2.out_channels for stage in stages] == [64, 128, 256]
    assert model.stem[0].stride == (1, 1) and not any(isinstance(m, nn.MaxPool2d) for m in model.modules())


def test_lenet_zhu_matches_dlg() -> None:
    model = build_victim("LeNet-Zhu", num_classes=7, image_shape=(3, 32, 32))
    assert model.fc.in_features == 768
    params = torch.cat([p.flatten() for p in model.parameters()])
    assert params.abs().max() <= 0.5 and params.std() > 0.2  # uniform in [-0.5, 0.5] has std 0.29


def test_convnet_shape_probe_leaves_batchnorm_untouched() -> None:
    model = build_victim("ConvNet-8", num_classes=7, image_shape=(1, 28, 28))
    assert model.fc.in_features == 32 * 3 * 3
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            assert module.num_batches_tracked == 0 and module.running_mean.eq(0).all()


def test_mlp_layers() -> None:
    linears = [m for m in build_victim("MLP", 7, (1, 28, 28)).modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (784, 1024),
        (1024, 1024),
        (1024, 1024),
        (1024, 7),
    ]
    assert all(m.bias is not None for m in linears)


def test_pretrained_missing_names_file_and_path(offline: Path) -> None:
    with pytest.raises(MissingWeightsError) as error:
        build_victim("resnet18", num_classes=1000, image_shape=(3, 64, 64), pretrained=True)
    message = str(error.value)
    assert RESNET18_FILE in message and torchvision.models.ResNet18_Weights.DEFAULT.url in message
    assert str(offline / RESNET18_FILE) in message
    assert error.value.__suppress_context__


def test_pretrained_only_for_torchvision() -> None:
    with pytest.raises(ValueError, match="weights_path"):
        build_victim("ResNet20", num_classes=10, image_shape=(3, 32, 32), pretrained=True)


def test_pretrained_loads_planted_checkpoint(offline: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(1)
    planted = torchvision.models.resnet18().state_dict()
    offline.mkdir(parents=True)
    torch.save(planted, offline / RESNET18_FILE)

    model = build_victim("resnet18", num_classes=1000, image_shape=(3, 64, 64), pretrained=True)
    assert torch.equal(model.layer3[1].conv2.weight, planted["layer3.1.conv2.weight"])
    assert torch.equal(model.fc.weight, planted["fc.weight"])

    with caplog.at_level(logging.WARNING):
        model = build_victim("resnet18", num_classes=7, image_shape=(1, 28, 28), pretrained=True)
    assert "freshly initialised" in caplog.text
    assert model.fc.weight.shape == (7, 512)
    assert torch.equal(model.layer3[1].conv2.weight, planted["layer3.1.conv2.weight"])
    # One grey channel sees the summed RGB kernels: same response as the grey image in RGB.
    assert torch.allclose(model.conv1.weight, planted["conv1.weight"].sum(1, keepdim=True))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_weights_path_round_trip(tmp_path: Path, suffix: str) -> None:
    trained = build_victim("ConvNet-8", num_classes=7, image_shape=(3, 32, 32))
    with torch.no_grad():
        trained.fc.weight.normal_()
    path = tmp_path / f"victim{suffix}"
    state = trained.state_dict()
    torch.save(state, path) if suffix == ".pt" else save_file(state, str(path))
    loaded = build_victim("ConvNet-8", num_classes=7, image_shape=(3, 32, 32), weights_path=str(path))
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_weights_path_missing(tmp_path: Path) -> None:
    path = tmp_path / "absent.pt"
    with pytest.raises(MissingWeightsError, match="absent.pt"):
        build_victim("MLP", num_classes=7, image_shape=(3, 32, 32), weights_path=path)


def test_register_victim_template(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_ENTRIES", list(registry._ENTRIES))

    @register_victim("Linear-{scale}", variants=["Linear-2"])
    def linear(num_classes: int, image_shape: tuple[int, int, int], scale: int) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(image_shape), scale * num_classes))

    assert "Linear-2" in list_victims()
    model = build_victim("Linear-5", num_classes=4, image_shape=(1, 2, 2))
    assert model(torch.zeros(3, 1, 2, 2)).shape == (3, 20)


def test_a_victim_given_by_class_path_gets_the_server_weights(tmp_path):
    """A string class path builds any nn.Module (with num_classes when it takes it); weights go into it, from a
    state dict or an .npz by position (a Flower round's global weights); a module instance takes them too."""
    import numpy as np

    from lightning_inversion.attack import GradientInversion
    from tests.helpers import TinyConvNet

    torch.manual_seed(3)
    server = TinyConvNet(num_classes=5, side=16)
    np.savez(tmp_path / "global.npz", *[v.numpy() for v in server.state_dict().values()])
    torch.save(server.state_dict(), tmp_path / "global.pt")
    for path in ("global.npz", "global.pt"):
        built = build_victim("tests.helpers.TinyConvNet", 5, (3, 16, 16), weights_path=tmp_path / path)
        assert isinstance(built, TinyConvNet) and built.fc.out_features == 5
        assert all(
            torch.equal(a, b) for a, b in zip(built.state_dict().values(), server.state_dict().values())
        )
    module = GradientInversion(
        TinyConvNet(num_classes=5, side=16),
        num_classes=5,
        image_shape=(3, 16, 16),
        victim_weights=str(tmp_path / "global.npz"),
    )
    assert torch.equal(module.victim.conv.weight, server.conv.weight)
    with pytest.raises(MissingWeightsError, match="do not fit"):
        build_victim("tests.helpers.TinyConvNet", 7, (3, 16, 16), weights_path=tmp_path / "global.pt")
    with pytest.raises(KeyError, match="neither a registered victim nor an importable class"):
        build_victim("tests.helpers.NoSuchNet", 5, (3, 16, 16))
