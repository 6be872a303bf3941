"""The client and BatchNorm: eval mode written out as an affine map (same values and derivatives, fewer ops);
training mode (batch statistics) under torch.func, for FedAvg and batched restarts."""

import copy
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lightning_inversion import client as client_module
from lightning_inversion.attack import GradientInversion
from lightning_inversion.client import Client, EvalBatchNormAsAffine, affine_batch_norm
from lightning_inversion.victims import build_victim


def _with_running_stats(module: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters far from the defaults, so a wrong formula shows."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            if m.affine:
                with torch.no_grad():
                    m.weight.copy_(torch.randn(m.num_features, generator=gen))
                    m.bias.copy_(torch.randn(m.num_features, generator=gen))
    return module


@pytest.mark.parametrize(
    ("norm", "shape"),
    [
        (nn.BatchNorm1d(5), (4, 5)),
        (nn.BatchNorm1d(5), (4, 5, 7)),
        (nn.BatchNorm2d(5), (2, 5, 3, 3)),
        (nn.BatchNorm2d(5, affine=False), (2, 5, 3, 3)),
        (nn.BatchNorm3d(5), (2, 5, 2, 3, 3)),
    ],
)
def test_affine_batch_norm_equals_the_fused_op_in_eval_mode(norm, shape):
    norm = _with_running_stats(norm).eval()
    x = torch.randn(shape)
    with EvalBatchNormAsAffine():
        written_out = norm(x)
    torch.testing.assert_close(written_out, norm(x))
    assert written_out.grad_fn is None or "BatchNorm" not in written_out.grad_fn.name()
    # Training mode (batch statistics) and missing running statistics are not affine maps: left to the fused op.
    assert affine_batch_norm(x, norm.running_mean, norm.running_var, training=True) is None
    assert affine_batch_norm(x, None, None) is None


def _graph_names(tensors) -> set[str]:
    seen, names = set(), set()
    stack = [t.grad_fn for t in tensors if t.grad_fn is not None]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(fn.name())
        stack.extend(f for f, _ in fn.next_functions)
    return names


@pytest.fixture
def bn_victim() -> nn.Module:
    torch.manual_seed(0)
    return _with_running_stats(build_victim("ConvNet-8", 4, (3, 16, 16))).eval()


def test_client_update_equals_autograd_on_the_fused_batch_norm(bn_victim):
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([1, 3])
    update = Client().update(bn_victim, x, y)
    reference = torch.autograd.grad(F.cross_entropy(bn_victim(x), y), list(bn_victim.parameters()))
    for ours, theirs in zip(update.tensors, reference, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("restarts", [1, 3])
def test_the_attack_step_matches_the_fused_batch_norm(bn_victim, restarts):
    # The cost and the gradient reaching the dummy images equal those through the fused op (one restart: plain
    # autograd; several: vmap), and the attack's graph really runs the written-out form.
    update = Client().update(bn_victim, torch.randn(1, 3, 16, 16), torch.tensor([2]))

    def step() -> tuple[torch.Tensor, torch.Tensor, set[str]]:
        attack = GradientInversion(bn_victim, num_classes=4, image_shape=(3, 16, 16), restarts=restarts)
        attack.set_target(update)
        attack.prepare()
        dummy = attack.dummy_update(attack.dummy_images, attack.target_labels)
        cost, tv = attack.restart_costs(attack.dummy_images, attack.target_labels)
        (image_grad,) = torch.autograd.grad((cost + 1e-2 * tv).sum(), attack.dummy_images)
        return cost.detach(), image_grad, _graph_names(dummy)

    cost, grad, names = step()
    with mock.patch.object(client_module, "_has_batchnorm", lambda victim: False):
        fused_cost, fused_grad, fused_names = step()
    torch.testing.assert_close(cost, fused_cost, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, fused_grad, rtol=1e-4, atol=1e-7)
    assert not any("BatchNorm" in n for n in names)
    assert any("BatchNorm" in n for n in fused_names)


def test_a_client_in_training_mode_keeps_the_fused_batch_norm(bn_victim):
    update = Client(train_mode=True).update(bn_victim, torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    attack = GradientInversion(
        bn_victim, num_classes=4, image_shape=(3, 16, 16), num_images=2, client=Client(train_mode=True)
    )
    attack.set_target(update)
    attack.prepare()
    dummy = attack.dummy_update(attack.dummy_images, attack.target_labels)
    assert any("BatchNorm" in n for n in _graph_names(dummy))


# --- BatchNorm in training mode (batch statistics; running statistics updated in place) ------------------------
def test_fedavg_with_training_mode_batch_norm_equals_a_hand_written_loop(bn_victim):
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    client = Client(protocol="fedavg", local_steps=3, local_lr=0.05, local_batch_size=2, train_mode=True)
    update = client.update(bn_victim, x, y)

    model = copy.deepcopy(bn_victim).train()
    start = [p.detach().clone() for p in model.parameters()]
    for step in range(3):
        i = step % 2
        loss = F.cross_entropy(model(x[2 * i : 2 * i + 2]), y[2 * i : 2 * i + 2])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads, strict=True):
                p -= 0.05 * g
    for ours, p, p0 in zip(update.tensors, model.parameters(), start, strict=True):
        torch.testing.assert_close(ours, p.detach() - p0, rtol=1e-4, atol=1e-6)
    assert all(not m.training for m in bn_victim.modules())  # the caller's model keeps its mode


@pytest.mark.parametrize("protocol", ["fedsgd", "fedavg"])
def test_training_mode_restarts_batched_equal_separate(bn_victim, protocol):
    client = Client(protocol=protocol, local_steps=2, local_lr=0.05, train_mode=True)
    update = client.update(bn_victim, torch.randn(2, 3, 16, 16), torch.tensor([0, 1]))
    attack = GradientInversion(
        bn_victim, num_classes=4, image_shape=(3, 16, 16), num_images=2, restarts=3, client=client
    )
    attack.set_target(update)
    attack.prepare()
    batched = attack.dummy_update(attack.dummy_images, attack.target_labels)
    for r in range(3):
        single = attack.dummy_update(attack.dummy_images[r : r + 1], attack.target_labels)
        # Relative to the whole update: a bias before a training-mode BatchNorm has a gradient of pure rounding.
        b = torch.cat([t[r].flatten() for t in batched])
        s = torch.cat([t[0].flatten() for t in single])
        assert (b - s).norm() <= 1e-5 * s.norm()
