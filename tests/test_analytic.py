"""Closed-form recovery of a biased linear layer's input from real client updates."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from lightning_inversion.analytic import find_linear_layers, recover_inputs, recover_linear_input
from lightning_inversion.client import Client, Update


def make_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 64), nn.ReLU(), nn.Linear(64, 10))


def make_cnn(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(4),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


def make_images(batch: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(100 + seed))


@pytest.mark.parametrize("seed", range(3))
def test_mlp_recovers_the_image_exactly(seed: int) -> None:
    victim = make_mlp(seed)
    image = make_images(1, seed)
    update = Client().update(victim, image, torch.tensor([seed + 2]))
    recovered, is_mixture = recover_inputs(victim, update)
    assert recovered.shape == (3 * 16 * 16,)
    assert not is_mixture
    assert (recovered - image.flatten()).abs().max() < 1e-4


def test_mlp_fedavg_delta_one_step_and_first_layer_many_steps() -> None:
    victim, image = make_mlp(1), make_images(1, 1)
    for steps in (1, 4):  # the first layer's input (the image) never changes across local steps
        update = Client(protocol="fedavg", local_steps=steps, local_lr=1e-2).update(
            victim, image, torch.tensor([3])
        )
        recovered, _ = recover_inputs(victim, update)
        assert (recovered - image.flatten()).abs().max() < 1e-4


def test_cnn_recovers_penultimate_features_exactly() -> None:
    victim = make_cnn(0)
    image = make_images(1, 3)
    seen: list[torch.Tensor] = []
    handle = victim[-1].register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    with torch.no_grad():
        victim.eval()(image)
    handle.remove()
    features = seen[0][0]  # (128,)
    update = Client().update(victim, image, torch.tensor([4]))
    recovered, is_mixture = recover_inputs(victim, update)
    assert not is_mixture
    assert recovered.shape == features.shape
    assert (recovered - features).abs().max() < 1e-4
    # the same layer named explicitly
    named, _ = recover_inputs(victim, update, layer="4")
    assert torch.equal(named, recovered)


def test_find_linear_layers_indices() -> None:
    victim = make_mlp()
    params = list(victim.parameters())
    layers = find_linear_layers(victim)
    assert [name for name, _, _ in layers] == ["1", "3"]
    for name, wi, bi in layers:
        module = victim.get_submodule(name)
        assert params[wi] is module.weight and params[bi] is module.bias
    unbiased = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 2))
    assert find_linear_layers(unbiased) == [("1", 1, 2)]


def test_batch_is_a_mixture_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    victim = make_mlp(0)
    images = make_images(2, 5)
    update = Client().update(victim, images, torch.tensor([1, 8]))
    with caplog.at_level(logging.WARNING, logger="lightning_inversion.analytic"):
        recovered, is_mixture = recover_inputs(victim, update)
    assert is_mixture
    assert any("mixture" in record.getMessage() for record in caplog.records)
    # not one of the images
    for image in images:
        assert (recovered - image.flatten()).abs().max() > 1e-2


def test_least_squares_formula_and_ignored_rows() -> None:
    x = torch.randn(6, dtype=torch.float64)
    b = torch.tensor([0.5, -2.0, 0.0, 1e-12, 3.0], dtype=torch.float64)
    w = b[:, None] * x[None]
    w[3] += 1.0  # a row whose tiny bias gradient is below rtol: must be ignored
    assert torch.allclose(recover_linear_input(w, b), x, atol=1e-12)


def test_zero_bias_and_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="zero"):
        recover_linear_input(torch.randn(10, 4), torch.zeros(10))
    with pytest.raises(ValueError, match="shape"):
        recover_linear_input(torch.randn(10, 4), torch.randn(9))
    with pytest.raises(ValueError, match="2-D"):
        recover_linear_input(torch.randn(10, 4, 2), torch.randn(10))


def test_weights_kind_and_unknown_layer_raise() -> None:
    victim = make_mlp()
    update = Client(protocol="fedavg", local_steps=1, send="weights").update(
        victim, make_images(1), torch.tensor([0])
    )
    with pytest.raises(ValueError, match="θ_K − θ_0"):
        recover_inputs(victim, update)
    grad = Client().update(victim, make_images(1), torch.tensor([0]))
    with pytest.raises(ValueError, match="no biased nn.Linear named"):
        recover_inputs(victim, grad, layer="0")
    zero = Update([torch.zeros_like(t) for t in grad.tensors], grad.names)
    with pytest.raises(ValueError, match="zero"):
        recover_inputs(victim, zero)
