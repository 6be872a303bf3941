"""Image metrics on every image size the tool accepts."""

import math

import pytest
import torch

from lightning_inversion.metrics import flat_psnr, ssim


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
