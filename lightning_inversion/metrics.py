"""How good a reconstruction is, measured against the ground truth (which only the report ever sees).

PSNR and SSIM on de-normalised images clamped to [0, 1] (data range 1), per image then averaged; LPIPS (AlexNet)
where its backbone weights can be had; MSE; feature MSE (victim logits); label accuracy. For a batch the
reconstructions are matched to the ground truth first (Hungarian assignment), since the attacker does not know
the order. Nothing here imports Lightning.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from .images import normalize

log = logging.getLogger(__name__)


def psnr(images: Tensor, truth: Tensor) -> Tensor:
    """PSNR per image in dB, ``(B, C, H, W)`` pairs in [0, 1] -> ``(B,)``."""
    return peak_signal_noise_ratio(
        images.clamp(0, 1), truth.clamp(0, 1), data_range=1.0, reduction="none", dim=(1, 2, 3)
    )


def flat_psnr(truth: Tensor) -> Tensor:
    """PSNR of a flat image of each image's own mean colour, ``(B, C, H, W)`` in [0, 1] -> ``(B,)``: what a
    reconstruction that recovers the colours and nothing else scores (a floor to read PSNR against)."""
    return psnr(truth.mean((-2, -1), keepdim=True).expand_as(truth), truth)


def ssim(images: Tensor, truth: Tensor) -> Tensor:
    """SSIM per image, ``(B, C, H, W)`` pairs in [0, 1] -> ``(B,)`` (Gaussian window, shrunk for small images)."""
    side = min(images.shape[-2:])
    kernel = max(3, min(11, side if side % 2 else side - 1))  # odd, as the Gaussian window must be
    return structural_similarity_index_measure(
        images.clamp(0, 1),
        truth.clamp(0, 1),
        data_range=1.0,
        reduction="none",
        kernel_size=kernel,
        sigma=1.5 * kernel / 11,  # the window's reach follows sigma: the standard 1.5 at the standard 11
    )


def match_to_truth(images: Tensor, truth: Tensor) -> Tensor:
    """The order of reconstructions that best matches the ground truth (Hungarian assignment on MSE).

    Returns:
        ``perm`` with ``images[perm[i]]`` the reconstruction assigned to ``truth[i]``.
    """
    cost = (images[None].flatten(2) - truth[:, None].flatten(2)).pow(2).mean(-1)  # (B_truth, B_images)
    rows, cols = linear_sum_assignment(cost.double().cpu().numpy())
    return torch.as_tensor(cols[rows.argsort()], dtype=torch.long)


def restart_agreement(
    restarts: Tensor, images: Tensor, scores: Sequence[float], chosen: int | None = None
) -> float | None:
    """How closely the other restarts agree with the reconstruction, with no ground truth needed: the mean PSNR in
    dB of each other restart's images against ``images``, each restart's images put in their order first (the
    assignment of :func:`match_to_truth`). Restarts that match the update about as well with different images show
    that the update does not pin the images down (or that some restarts failed): a value near the PSNR of
    unrelated images says the reconstruction is one image among many, not the private one.

    Args:
        restarts: every restart's images in [0, 1], ``(R, B, C, H, W)``.
        images: the reconstruction, ``(B, C, H, W)``.
        scores: each restart's selection score; a restart with a score that is not finite (diverged, never ran)
            is left out.
        chosen: the restart ``images`` is (left out); ``None`` when the images combine several.

    Returns:
        The mean PSNR (``inf`` when they are the same images), or ``None`` when no other restart has a finite
        score or the reconstruction is not finite.
    """
    if not bool(torch.isfinite(images).all()):
        return None
    others = [
        r for i, (r, s) in enumerate(zip(restarts, scores, strict=True)) if i != chosen and math.isfinite(s)
    ]
    if not others:
        return None
    values = [psnr(r[match_to_truth(r, images)], images).mean() for r in others]
    return float(torch.stack(values).mean())


def lpips_backbone_url(net: str = "alex") -> str:
    """The published ImageNet weights of an LPIPS backbone (torchvision's)."""
    from torchvision import models

    return {
        "alex": models.AlexNet_Weights.IMAGENET1K_V1,
        "vgg": models.VGG16_Weights.IMAGENET1K_V1,
        "squeeze": models.SqueezeNet1_1_Weights.IMAGENET1K_V1,
    }[net].url


def lpips_backbone_file(net: str = "alex") -> Path:
    """Where torchvision looks for an LPIPS backbone's weights: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(lpips_backbone_url(net)).name


class LPIPSMetric:
    """LPIPS (AlexNet) where its weights are on this machine; otherwise unavailable, said once, never a crash.

    Nothing is downloaded: the backbone's weight file must already be in ``$TORCH_HOME/hub/checkpoints``.

    Args:
        net: the LPIPS backbone (``alex``, ``vgg`` or ``squeeze``).
    """

    _warned = False

    def __init__(self, net: str = "alex") -> None:
        self.net = net
        self.model: nn.Module | None = None
        self.reason: str | None = None
        path = lpips_backbone_file(net)
        if not path.is_file():
            self.reason = f"LPIPS is unavailable: it needs {path.name} in {path.parent} (from {lpips_backbone_url(net)})"
        else:
            try:
                import lpips

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torchvision's notice about lpips's `pretrained=True`
                    self.model = lpips.LPIPS(net=net, verbose=False).eval()
            except Exception as error:  # a damaged weight file
                self.reason = f"LPIPS is unavailable: {path} cannot be loaded ({type(error).__name__})"
        if self.reason and not LPIPSMetric._warned:
            log.warning(self.reason)
            LPIPSMetric._warned = True

    @property
    def available(self) -> bool:
        return self.model is not None

    @torch.no_grad()
    def __call__(self, images: Tensor, truth: Tensor) -> Tensor | None:
        """LPIPS per image ``(B,)`` for images in [0, 1], or ``None`` when unavailable."""
        if self.model is None:
            return None
        model = self.model.to(images.device)
        if images.shape[1] == 1:  # LPIPS backbones take RGB
            images, truth = images.expand(-1, 3, -1, -1), truth.expand(-1, 3, -1, -1)
        return model(images * 2 - 1, truth * 2 - 1).flatten()


def _mean(values: Tensor | None) -> float | None:
    return None if values is None else float(values.float().mean())


@torch.no_grad()
def evaluate(
    images: Tensor,
    truth: Tensor,
    labels: Tensor | None = None,
    truth_labels: Tensor | None = None,
    victim: nn.Module | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    lpips: LPIPSMetric | None = None,
) -> dict:
    """Compare a reconstruction with the ground truth.

    Args:
        images: reconstruction ``(B, C, H, W)`` in [0, 1], in the attack's order.
        truth: ground truth ``(B, C, H, W)`` in [0, 1].
        labels: the labels the attack used or recovered ``(B,)``, in the attack's order.
        truth_labels: the true labels ``(B,)``.
        victim: the victim, for feature MSE (its logits on both, in normalised space with ``mean``/``std``).
        lpips: an :class:`LPIPSMetric`; LPIPS is ``None`` in the result when it is absent or unavailable.

    Returns:
        per-image lists and means: ``psnr``, ``ssim``, ``lpips``, ``mse``, ``feature_mse``, ``label_accuracy``,
        and ``order`` (the Hungarian assignment used).
    """
    images, truth = images.float().cpu(), truth.float().cpu()
    if images.shape != truth.shape:
        raise ValueError(f"reconstruction {tuple(images.shape)} and ground truth {tuple(truth.shape)} differ")
    order = match_to_truth(images, truth) if len(images) > 1 else torch.zeros(1, dtype=torch.long)
    matched = images[order]
    p, s = psnr(matched, truth), ssim(matched, truth)
    mse = (matched - truth).pow(2).flatten(1).mean(1)
    lp = lpips(matched, truth) if lpips is not None else None
    result = {
        "psnr": _mean(p),
        "ssim": _mean(s),
        "lpips": _mean(lp),
        "mse": _mean(mse),
        "per_image": {
            "psnr": p.tolist(),
            "ssim": s.tolist(),
            "lpips": None if lp is None else lp.cpu().tolist(),
            "mse": mse.tolist(),
        },
        "order": order.tolist(),
    }
    if lpips is not None and not lpips.available:
        result["lpips_unavailable"] = lpips.reason
    if victim is not None and mean is not None and std is not None:
        device = next(victim.parameters()).device
        was_training = victim.training
        victim.eval()
        f_rec = victim(normalize(matched, mean, std).to(device)).float()
        f_true = victim(normalize(truth, mean, std).to(device)).float()
        victim.train(was_training)
        result["feature_mse"] = float((f_rec - f_true).pow(2).mean())
    if labels is not None and truth_labels is not None:
        # Each dummy image was optimised with its own label, so labels follow the image assignment.
        matched_labels = labels.cpu()[order]
        result["label_accuracy"] = float((matched_labels == truth_labels.cpu()).float().mean())
    return result


def summarize(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and standard deviation of the non-missing values (NaN, NaN if none)."""
    kept = [v for v in values if v is not None and not math.isnan(v)]
    if not kept:
        return math.nan, math.nan
    t = torch.tensor(kept, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False))
