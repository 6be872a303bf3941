"""Image metrics on every image size the tool accepts."""

import math

import pytest
import torch

from lightning_inversion.metrics import flat_psnr, restart_agreement, ssim


@pytest.mark.parametrize("side", [3, 4, 7, 8, 9, 10, 11, 12, 16])
def test_ssim_measures_images_of_any_side(side):
    truth = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(side))
    noisy = (truth + 0.3 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert torch.allclose(ssim(truth, truth), torch.ones(2), atol=1e-5)
    assert (ssim(noisy, truth) < 0.95).all()


def test_flat_psnr_is_the_psnr_of_the_images_mean_colour():
    half = torch.tensor([0.0, 1.0]).view(
        1, 1, 1, 2
    )  # mean 0.5, squared error 0.25 everywhere: 10 log10(4) dB
    two = torch.cat([half, torch.full((1, 1, 1, 2), 0.3)])  # a flat image is its own mean: infinite PSNR
    floors = flat_psnr(two)
    assert floors[0].item() == pytest.approx(10 * math.log10(4), abs=1e-4) and floors[1].isinf()


def test_restart_agreement_is_the_mean_psnr_of_the_other_restarts_against_the_chosen_one():
    # In [0.1, 0.8], so that no shifted pixel is clamped.
    images = 0.1 + 0.7 * torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    brighter = images + 0.1  # squared error 0.01 everywhere: 20 dB
    darker = images + torch.tensor([0.05, -0.05]).view(2, 1, 1, 1)  # 0.0025: 10 log10(400) = 26.02 dB
    garbage = torch.rand(2, 3, 8, 8)
    restarts = torch.stack([images, brighter.flip(0), darker, garbage])  # the second in the other order
    # The garbage restart never ran (score inf): left out.
    agreement = restart_agreement(restarts, images, [0.1, 0.2, 0.3, math.inf], chosen=0)
    assert agreement == pytest.approx((20 + 10 * math.log10(400)) / 2, abs=1e-3)
    # Combined images (no chosen restart) are compared with every restart.
    both = restart_agreement(restarts[1:3], images, [0.2, 0.3], chosen=None)
    assert both == pytest.approx(agreement, abs=1e-6)
    swapped = restart_agreement(restarts[:2].flip(0), brighter.flip(0), [0.2, 0.1], chosen=0)
    assert swapped == pytest.approx(20, abs=1e-3)


def test_restart_agreement_needs_another_restart_and_finite_images():
    images = torch.rand(1, 3, 8, 8)
    assert restart_agreement(images[None], images, [0.1], chosen=0) is None
    assert restart_agreement(torch.stack([images, images]), images, [0.1, math.nan], chosen=0) is None
    nan = torch.full_like(images, math.nan)
    assert restart_agreement(torch.stack([images, images]), nan, [0.1, 0.2], chosen=None) is None
    assert math.isinf(restart_agreement(torch.stack([images, images]), images, [0.1, 0.2], chosen=0))
