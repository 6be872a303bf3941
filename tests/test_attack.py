"""The attack end to end on a tiny victim: quality, restart selection, batched restarts, the Python API."""

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

import lightning_inversion as li
from lightning_inversion.attack import GradientInversion, dummy_images_as_pixels
from lightning_inversion.client import Client
from lightning_inversion.images import normalize
from lightning_inversion.metrics import psnr
from lightning_inversion.restarts import PixelMean

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
THRESHOLD_DB = 17.0


def target_gradient(victim, pixels, label):
    x = normalize(pixels, MEAN, STD)
    return torch.autograd.grad(F.cross_entropy(victim(x), label), list(victim.parameters()))


def run_api(victim, pixels, steps=300, **options):
    gradient = target_gradient(victim, pixels, torch.tensor([3]))
    return li.reconstruct(
        victim,
        gradient,
        torch.tensor([3]),
        image_shape=(3, 16, 16),
        mean=MEAN,
        std=STD,
        max_steps=steps,
        tv=1e-4,
        ground_truth=pixels,
        **options,
    )


class WrongSign(GradientInversion):
    """A broken objective: maximises the matching cost instead of minimising it."""

    def restart_costs(self, images, labels, slots=None):
        cost, tv = super().restart_costs(images, labels, slots)
        return -cost, tv


def test_reconstruction_quality_beats_init_and_a_broken_objective(tiny_victim, cat16):
    result = run_api(tiny_victim, cat16)
    assert result.images.shape == (1, 3, 16, 16)
    assert 0 <= result.images.min() and result.images.max() <= 1
    assert result.metrics["psnr"] > THRESHOLD_DB
    assert result.steps == 300 and result.chosen_restart == 0
    # Neither the initial images nor the wrong sign get there.
    broken = GradientInversion(
        tiny_victim, num_classes=10, image_shape=(3, 16, 16), mean=MEAN, std=STD, tv=1e-4
    )
    assert psnr(dummy_images_as_pixels(broken)[0], cat16).item() < THRESHOLD_DB - 4
    broken.__class__ = WrongSign
    broken.set_target(Client().update(tiny_victim, normalize(cat16, MEAN, STD), torch.tensor([3])))
    pl.Trainer(max_steps=200, logger=False, enable_checkpointing=False, enable_progress_bar=False).fit(broken)
    assert psnr(broken.reconstruction.images, cat16).item() < THRESHOLD_DB - 4


def test_api_leaves_the_users_model_as_it_was(tiny_victim, cat16):
    tiny_victim.train()
    run_api(tiny_victim, cat16, steps=2)
    assert tiny_victim.training
    assert all(p.requires_grad for p in tiny_victim.parameters())


def make_attack(victim, pixels, restarts, seed=0, **options):
    attack = GradientInversion(
        victim,
        num_classes=10,
        image_shape=(3, 16, 16),
        mean=MEAN,
        std=STD,
        restarts=restarts,
        seed=seed,
        **options,
    )
    attack.set_target(Client().update(victim, normalize(pixels, MEAN, STD), torch.tensor([3])))
    return attack


def fit(attack, steps):
    trainer = pl.Trainer(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(attack)
    return attack.reconstruction


def test_batched_restarts_equal_separate_runs_over_the_first_steps(tiny_victim, cat16):
    batched = fit(make_attack(tiny_victim, cat16, restarts=3, seed=5, tv=1e-4), steps=15)
    for r in range(3):
        single = fit(make_attack(tiny_victim, cat16, restarts=1, seed=5 + r, tv=1e-4), steps=15)
        assert torch.allclose(batched.restarts[r], single.restarts[0], atol=1e-5), r
        assert batched.scores[r] == pytest_approx(single.scores[0])


@pytest.mark.slow
def test_batched_restarts_reach_the_quality_of_separate_runs(tiny_victim, cat16):
    """After a few hundred steps rounding has moved the images apart (see attack.py); the quality stays."""
    batched = fit(make_attack(tiny_victim, cat16, restarts=4, seed=5, tv=1e-4), steps=300)
    separate = [
        fit(make_attack(tiny_victim, cat16, restarts=1, seed=5 + r, tv=1e-4), steps=300) for r in range(4)
    ]
    quality = [float(psnr(batched.restarts[r], cat16).mean()) for r in range(4)]
    alone = [float(psnr(run.restarts[0], cat16).mean()) for run in separate]
    assert all(abs(q - a) < 1.0 for q, a in zip(quality, alone)), (quality, alone)
    assert abs(sum(quality) - sum(alone)) / 4 < 0.5 and min(quality) > THRESHOLD_DB


def pytest_approx(value):
    import pytest

    return pytest.approx(value, rel=1e-4, abs=1e-6)


def test_a_nan_restart_and_a_restart_that_never_ran_never_win(tiny_victim, cat16):
    attack = make_attack(tiny_victim, cat16, restarts=3)
    fit(attack, steps=5)
    with torch.no_grad():
        attack.dummy_images[1] = math.nan
        attack.dummy_images[2] = normalize(cat16, MEAN, STD)  # a perfect restart...
    result = attack.reconstruct_result()
    assert result.chosen_restart == 2  # ... wins while it has run
    assert math.isinf(result.scores[1])
    attack.restart_steps[2] = 0  # ... and must not win once it has never run
    result = attack.reconstruct_result()
    assert result.chosen_restart == 0
    assert math.isinf(result.scores[2])
    attack.restart_steps[0] = 0
    assert attack.reconstruct_result().chosen_restart is None  # nothing valid: no winner at all


def test_mean_and_median_combine_only_valid_restarts(tiny_victim, cat16):
    attack = make_attack(tiny_victim, cat16, restarts=3, restart_selection="median")
    fit(attack, steps=3)
    with torch.no_grad():
        attack.dummy_images[1] = math.nan
    result = attack.reconstruct_result()
    valid = result.restarts[[0, 2]]
    assert torch.allclose(result.images, valid.median(0).values)
    attack.restart_selection = PixelMean()
    assert torch.allclose(attack.reconstruct_result().images, valid.mean(0))


def test_idlg_and_dlg_label_strategies(tiny_victim, cat16):
    attack = make_attack(tiny_victim, cat16, restarts=1, label_strategy="idlg")
    assert attack.target_labels.tolist() == [3]
    dlg = make_attack(tiny_victim, cat16, restarts=2, label_strategy="dlg")
    assert dlg.dummy_labels.shape == (2, 1, 10)
    before = dlg.dummy_labels.detach().clone()
    fit(dlg, steps=3)
    assert not torch.equal(before, dlg.dummy_labels.detach())  # soft labels are optimised too
    assert dlg.reconstruction.labels.shape == (1,)


def test_the_optimiser_only_touches_the_dummy_images(tiny_victim, cat16):
    weights = [p.detach().clone() for p in tiny_victim.parameters()]
    attack = make_attack(tiny_victim, cat16, restarts=2, optimizer=torch.optim.SGD, lr=0.01, signed=False)
    fit(attack, steps=3)
    assert all(torch.equal(a, b) for a, b in zip(weights, tiny_victim.parameters()))
    assert all(p.grad is None for p in tiny_victim.parameters())


def test_batched_targets_equal_separate_fits_over_the_first_steps(tiny_victim, cat16):
    """T targets (each its own update, labels and seed) in one fit: each equals its own separate fit at first."""
    pixels = [cat16, cat16.flip(-1), cat16.flip(-2)]
    labels = [3, 5, 7]
    updates = [
        Client().update(tiny_victim, normalize(x, MEAN, STD), torch.tensor([y])) for x, y in zip(pixels, labels)
    ]
    batched = GradientInversion(
        tiny_victim, num_classes=10, image_shape=(3, 16, 16), mean=MEAN, std=STD, restarts=2, targets=3, seed=4,
        tv=1e-4,
    )  # fmt: skip
    batched.set_targets(updates)
    assert batched.target_labels.tolist() == [[3], [5], [7]]
    fit(batched, steps=10)
    results = batched.reconstructions
    assert len(results) == 3 and batched.images_by_target.shape == (3, 2, 1, 3, 16, 16)
    for t in range(3):
        single = GradientInversion(
            tiny_victim, num_classes=10, image_shape=(3, 16, 16), mean=MEAN, std=STD, restarts=2,
            seed=4 + 2 * t, tv=1e-4,
        )  # fmt: skip
        single.set_target(updates[t])
        alone = fit(single, steps=10)
        assert torch.allclose(results[t].restarts, alone.restarts, atol=1e-5), t
        assert results[t].scores == pytest_approx(alone.scores)
        assert results[t].chosen_restart == alone.chosen_restart and results[t].labels.tolist() == [labels[t]]
