"""The image priors of issue 13 against hand-computed references: BatchNorm statistics and group consistency."""

import logging
import math

import pytest
import torch
from torch import nn

from lightning_inversion.client import Update
from lightning_inversion.errors import InputError
from lightning_inversion.priors import (
    BATCHNORM_STATISTICS,
    BatchNormStatistics,
    GroupConsistency,
    RunningStatistics,
    StatisticsSource,
)
from tests.helpers import TinyConvNet


def _bn_victim() -> nn.Module:
    """conv (fixed to the identity on 2 channels) → BN → linear; BN's running statistics set by hand."""
    victim = nn.Sequential(nn.Conv2d(2, 2, 1, bias=False), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 3))
    with torch.no_grad():
        victim[0].weight.copy_(torch.eye(2).view(2, 2, 1, 1))
        victim[1].running_mean.copy_(torch.tensor([0.0, 1.0]))
        victim[1].running_var.copy_(torch.tensor([1.0, 1.0]))
        victim[1].num_batches_tracked.fill_(10)
    return victim.eval()


def _update(victim: nn.Module) -> Update:
    return Update(
        [torch.zeros_like(p) for p in victim.parameters()], [n for n, _ in victim.named_parameters()]
    )


def test_running_statistics_are_the_victims_buffers():
    victim = _bn_victim()
    stats = RunningStatistics().statistics(victim, _update(victim))
    assert list(stats) == ["1"]
    mean, var = stats["1"]
    assert mean.tolist() == [0.0, 1.0] and var.tolist() == [1.0, 1.0]


def test_running_statistics_refuse_a_victim_without_batchnorm():
    victim = TinyConvNet()
    with pytest.raises(InputError, match="no BatchNorm layer"):
        RunningStatistics().statistics(victim, _update(victim))
    with pytest.raises(InputError, match="needs a victim with BatchNorm"):
        BatchNormStatistics(RunningStatistics()).prepare(victim, _update(victim))


def test_running_statistics_of_an_untrained_victim_warn(caplog):
    victim = _bn_victim()
    victim[1].num_batches_tracked.zero_()
    with caplog.at_level(logging.WARNING, logger="lightning_inversion.priors"):
        RunningStatistics().statistics(victim, _update(victim))
    assert "never tracked a batch" in caplog.text


def _statistics_of(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance over batch and pixels, by explicit sums: (..., C) each."""
    lead, (b, c, h, w) = images.shape[:-4], images.shape[-4:]
    x = images.movedim(-3, -1).reshape(*lead, b * h * w, c)  # (..., n, C)
    n = b * h * w
    mean = x.sum(-2) / n
    var = ((x - mean.unsqueeze(-2)) ** 2).sum(-2) / n
    return mean, var


def test_batchnorm_statistics_penalty_by_hand():
    victim = _bn_victim()
    prior = BatchNormStatistics(RunningStatistics(), weight=0.5)
    prior.prepare(victim, _update(victim))
    # Two restarts of a batch of two 2×2 images. Restart 0: channel 0 is 1 everywhere (mean 1, var 0), channel 1
    # alternates 0 and 2 (mean 1, var 1). Against the reference (0, 1) and (1, 1):
    # ‖(1, 1) − (0, 1)‖ + ‖(0, 1) − (1, 1)‖ = 1 + 1 = 2. Restart 1 has the reference's statistics: channel 0 is
    # ±1 (mean 0, var 1), channel 1 is 0 and 2 (mean 1, var 1): penalty 0.
    images = torch.zeros(2, 2, 2, 2, 2)
    images[0, :, 0] = 1.0
    images[0, :, 1] = torch.tensor([[0.0, 2.0], [2.0, 0.0]])
    images[1, :, 0] = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    images[1, :, 1] = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    mean, var = _statistics_of(images)
    assert mean[0].tolist() == [1.0, 1.0] and var[0].tolist() == [0.0, 1.0]
    seen = {BATCHNORM_STATISTICS: {"1": (mean, var)}}
    assert prior.penalty(images, seen).tolist() == [2.0, 0.0]
    assert prior(images, seen).tolist() == [1.0, 0.0]  # weighted
    # A mean off by (3, 4) in one channel each: the Euclidean norm, not the squared one nor the sum.
    seen = {BATCHNORM_STATISTICS: {"1": (torch.tensor([[3.0, 5.0]]), torch.tensor([[1.0, 1.0]]))}}
    assert prior.penalty(images[:1], seen).tolist() == [5.0]


def test_batchnorm_statistics_kl_distance_by_hand():
    """distance="kl": per channel KL(N(μ, σ²) ‖ N(μ̂, σ̂²)), the mean over channels; 0 at the reference and the
    same for a channel at any scale."""

    class Ref(StatisticsSource):
        def __init__(self, scale):
            self.scale = scale

        def statistics(self, victim, update):
            return {"1": (torch.tensor([0.0, 1.0]) * self.scale, torch.tensor([1.0, 1.0]) * self.scale**2)}

    victim = _bn_victim()
    prior = BatchNormStatistics(Ref(1.0), distance="kl")
    prior.prepare(victim, _update(victim))
    images = torch.zeros(2, 2, 2, 2, 2)  # only the leading shape matters here
    # channel 0: N(0, 4) against N(0, 1): ½ log(1/4) + 4/2 − ½; channel 1: N(3, 1) against N(1, 1): (1 + 4)/2 − ½
    mean, var = torch.tensor([[0.0, 3.0], [0.0, 1.0]]), torch.tensor([[4.0, 1.0], [1.0, 1.0]])
    expected = (0.5 * math.log(0.25) + 1.5 + 2.0) / 2
    got = prior.penalty(images, {BATCHNORM_STATISTICS: {"1": (mean, var)}})
    torch.testing.assert_close(got, torch.tensor([expected, 0.0]), rtol=1e-4, atol=1e-5)
    # A layer 100 times larger, its reference too: the same divergence (the l2 form grows 100- and 10⁴-fold)
    large = BatchNormStatistics(Ref(100.0), distance="kl")
    large.prepare(victim, _update(victim))
    scaled = large.penalty(images, {BATCHNORM_STATISTICS: {"1": (mean * 100, var * 1e4)}})
    torch.testing.assert_close(scaled, got, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="distance"):
        BatchNormStatistics(Ref(1.0), distance="l1")


def test_batchnorm_statistics_weight_the_first_layer_and_sum_over_layers():
    class Ref(StatisticsSource):
        def statistics(self, victim, update):
            return {"0": (torch.zeros(1), torch.ones(1)), "2": (torch.zeros(1), torch.ones(1))}

    victim = nn.Sequential(nn.BatchNorm2d(1), nn.Identity(), nn.BatchNorm2d(1), nn.Flatten(), nn.Linear(1, 2))
    prior = BatchNormStatistics(Ref(), first_layer_weight=10.0)
    prior.prepare(victim, _update(victim))
    seen = {
        BATCHNORM_STATISTICS: {
            "0": (torch.tensor([[2.0]]), torch.tensor([[1.0]])),  # 2
            "2": (torch.tensor([[0.0]]), torch.tensor([[4.0]])),  # 3
        }
    }
    assert prior.penalty(torch.zeros(1, 1, 1, 1, 1), seen).tolist() == [10 * 2.0 + 3.0]


def test_batchnorm_statistics_match_a_real_forward_pass_and_pull_toward_the_reference():
    """The statistics of the BN input computed by a forward hook give the hand-computed penalty, and the
    penalty's gradient moves the images toward the reference."""
    victim = _bn_victim()
    prior = BatchNormStatistics(RunningStatistics())
    prior.prepare(victim, _update(victim))
    images = (torch.randn(3, 4, 2, 2, 2) * 2 + 3).requires_grad_()
    mean, var = _statistics_of(images)
    expected = (mean - torch.tensor([0.0, 1.0])).norm(dim=-1) + (var - 1).norm(dim=-1)
    seen = {BATCHNORM_STATISTICS: {"1": (mean, var)}}
    penalty = prior.penalty(images, seen)
    torch.testing.assert_close(penalty, expected)
    penalty.sum().backward()
    with torch.no_grad():
        moved = images - 0.01 * images.grad
        assert bool(
            (prior.penalty(moved, {BATCHNORM_STATISTICS: {"1": _statistics_of(moved)}}) < penalty).all()
        )


def test_batchnorm_statistics_need_the_client_to_hand_them_over():
    victim = _bn_victim()
    prior = BatchNormStatistics(RunningStatistics())
    assert BATCHNORM_STATISTICS in prior.needs
    with pytest.raises(RuntimeError, match="prepare"):
        prior.penalty(torch.zeros(1, 1, 2, 2, 2), {})
    prior.prepare(victim, _update(victim))
    with pytest.raises(RuntimeError, match="did not hand over"):
        prior.penalty(torch.zeros(1, 1, 2, 2, 2), {})


def test_group_consistency_by_hand():
    prior = GroupConsistency(weight=2.0, start=0.0, ramp=0.0)
    images = torch.zeros(2, 1, 1, 2, 2)  # (R, B, C, H, W)
    images[1] = 1.0  # consensus 0.5 everywhere: each restart is 0.5 away in each of 4 pixels
    # ‖x_r − x̄‖₂ = sqrt(4 · 0.25) = 1, divided by sqrt(4): 0.5 per restart
    assert prior.penalty(images, {}).tolist() == [0.5, 0.5]
    assert prior(images).tolist() == [1.0, 1.0]
    # Leading target axis: (T, R, B, C, H, W); target 1's restarts agree.
    both = torch.stack([images, torch.ones_like(images)])
    assert prior.penalty(both, {}).tolist() == [[0.5, 0.5], [0.0, 0.0]]
    # The consensus is a constant: restart 0's gradient is (x_0 − x̄) / ‖x_0 − x̄‖ / sqrt(4), no term through x̄.
    x = images.clone().requires_grad_()
    prior.penalty(x, {})[0].backward()
    assert torch.allclose(x.grad[0], torch.full((1, 1, 2, 2), -0.5 / 1.0 / 2.0))
    assert bool((x.grad[1] == 0).all())
    with pytest.raises(ValueError, match="restart axis"):
        prior.penalty(torch.zeros(1, 1, 2, 2), {})


def test_group_consistency_schedule():
    prior = GroupConsistency(weight=1.0, start=0.25, ramp=0.5)
    assert [prior.scale(p) for p in (0.0, 0.2, 0.25, 0.5, 0.75, 1.0)] == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]
    images = torch.zeros(2, 1, 1, 2, 2)
    images[1] = 1.0
    prior.at_step(10, 100)
    assert prior(images).tolist() == [0.0, 0.0]
    prior.at_step(50, 100)
    assert prior(images).tolist() == [0.25, 0.25]
    assert math.isclose(GroupConsistency(start=0.5, ramp=0.0).scale(0.5), 1.0)


def test_threat_model_names_each_assumption():
    from lightning_inversion.threat_model import threat_model

    class Recovered(StatisticsSource):
        assumption = "recovered"

    plain = threat_model("idlg", [], 1, True, False)
    assert plain == {
        "labels": "recovered (idlg)",
        "batchnorm_statistics": "none",
        "num_images": 1,
        "num_images_from": "update",
        "client_mode": "eval",
    }
    priors = [GroupConsistency(), BatchNormStatistics(RunningStatistics())]
    assert threat_model("given", priors, 4, False, True) == {
        "labels": "given",
        "batchnorm_statistics": "running",
        "num_images": 4,
        "num_images_from": "assumed",
        "client_mode": "train",
    }
    both = priors + [BatchNormStatistics(Recovered())]
    assert threat_model("dlg", both, 1, True, False)["batchnorm_statistics"] == "running+recovered"
    switched_off = [BatchNormStatistics(RunningStatistics(), weight=0.0)]
    assert threat_model("batch", switched_off, 2, True, False)["batchnorm_statistics"] == "none"


# --- wired into the attack ---------------------------------------------------------------------------------------
class _BNVictim(nn.Module):
    """conv → BN → ReLU → pool → linear, with BN running statistics set as after training."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 5)
        with torch.no_grad():
            # statistics images in [0, 1] can reach through this conv
            self.bn.running_mean.copy_(torch.tensor([-0.02, -0.2, 0.05, -0.15]))
            self.bn.running_var.copy_(torch.tensor([0.02, 0.06, 0.03, 0.05]))
            self.bn.num_batches_tracked.fill_(100)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.nn.functional.avg_pool2d(torch.relu(self.bn(self.conv(x))), 2).flatten(1))


def _attack(victim, train_mode: bool, restarts: int, priors, num_images: int = 2):
    from lightning_inversion.attack import GradientInversion
    from lightning_inversion.client import Client

    client = Client(train_mode=train_mode)
    module = GradientInversion(
        victim,
        num_classes=5,
        image_shape=(3, 8, 8),
        mean=(0.0,) * 3,
        std=(1.0,) * 3,
        num_images=num_images,
        restarts=restarts,
        client=client,
        priors=priors,
        tv=0.0,
    )
    x = torch.rand(num_images, 3, 8, 8)
    module.set_target(client.update(victim, x, torch.arange(num_images)))
    module.prepare()
    return module


@pytest.mark.parametrize("train_mode", [False, True])
@pytest.mark.parametrize("restarts", [1, 3])
def test_batchnorm_prior_in_the_attack_matches_the_hand_computed_penalty(train_mode, restarts):
    """The prior the attack adds is Σ ‖μ − μ̂‖ + ‖σ² − σ̂²‖ of the conv output (the BN input) of each restart's
    dummy batch against the running statistics, for eval- and train-mode clients and batched restarts."""
    victim = _BNVictim().eval()
    module = _attack(victim, train_mode, restarts, [BatchNormStatistics(RunningStatistics(), weight=0.5)])
    images = module.dummy_images.detach()
    _, prior = module.restart_costs(images, module.target_labels)
    with torch.no_grad():
        conv = victim.conv(images.flatten(0, 1)).unflatten(0, images.shape[:2])  # (R, B, 4, 8, 8)
    mean, var = _statistics_of(conv)
    ref_mean, ref_var = victim.bn.running_mean, victim.bn.running_var
    expected = 0.5 * ((mean - ref_mean).norm(dim=-1) + (var - ref_var).norm(dim=-1))
    torch.testing.assert_close(prior, expected, rtol=1e-5, atol=1e-6)
    assert victim.bn.num_batches_tracked.item() == 100  # the victim's own buffers are left alone


def test_batchnorm_prior_pulls_the_statistics_toward_the_reference_in_a_fit():
    import pytorch_lightning as pl

    victim = _BNVictim().eval()
    prior = BatchNormStatistics(RunningStatistics(), weight=1e3)  # the prior leads the signed steps
    module = _attack(victim, False, 2, [prior])
    before = module.restart_costs(module.dummy_images.detach(), module.target_labels)[1]
    trainer = pl.Trainer(
        max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module)
    after = module.restart_costs(module.dummy_images.detach(), module.target_labels)[1]
    assert bool((after < 0.5 * before).all())
    model = module.reconstruction.threat_model
    assert model["batchnorm_statistics"] == "running" and model["client_mode"] == "eval"
    assert model["labels"] == "given" and model["num_images_from"] == "update"


def test_batchnorm_prior_refuses_a_victim_without_batchnorm():
    from lightning_inversion.attack import GradientInversion

    victim = TinyConvNet(side=8, num_classes=5).eval()
    module = GradientInversion(
        victim, num_classes=5, image_shape=(3, 8, 8), mean=(0.0,) * 3, std=(1.0,) * 3,
        priors=[BatchNormStatistics(RunningStatistics())],
    )  # fmt: skip
    from lightning_inversion.client import Client

    module.set_target(Client().update(victim, torch.rand(1, 3, 8, 8), torch.tensor([1])))
    with pytest.raises(InputError, match="needs a victim with BatchNorm layers"):
        module.prepare()


def test_group_consistency_follows_the_attack_steps():
    import pytorch_lightning as pl

    victim = _BNVictim().eval()
    prior = GroupConsistency(weight=1.0, start=0.5, ramp=0.0)
    module = _attack(victim, False, 2, [prior])
    seen = []
    original = prior.at_step

    def record(step, max_steps):
        seen.append((step, max_steps))
        original(step, max_steps)

    prior.at_step = record
    pl.Trainer(
        max_steps=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(module)  # fmt: skip
    assert seen == [(0, 4), (1, 4), (2, 4), (3, 4)]
    assert prior.scale(prior.schedule["progress"]) == 1.0  # on from half-way
