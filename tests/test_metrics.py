"""Image metrics on every image size the tool accepts."""

import pytest
import torch

from lightning_inversion.metrics import ssim


@pytest.mark.parametrize("side", [3, 4, 7, 8, 9, 10, 11, 12, 16])
def test_ssim_measures_images_of_any_side(side):
    truth = torch.rand(2, 3, side, side, generator=torch.Generator().manual_seed(side))
    noisy = (truth + 0.3 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert torch.allclose(ssim(truth, truth), torch.ones(2), atol=1e-5)
    assert (ssim(noisy, truth) < 0.95).all()
