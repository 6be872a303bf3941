"""Does the train-mode attack return to the truth when it starts near it?

The demo's private image (the cat at 28×28), an untrained victim (built after ``seed_everything(0)``), a
train-mode FedSGD client (BatchNorm on the image's own statistics), labels given. The attack (cosine + TV 1e-5,
Adam with the step decay, signed unless ``--unsigned``) starts from the cat plus Gaussian noise of std ``--eps``
in normalised pixels instead of from noise, and runs ``--steps`` steps. Printed: the PSNR of the start and of the
end against the cat, and the matching cost (1 − cosine over all tensors) at both. ``--per-tensor`` adds 1 − cos
per gradient tensor at the start (``--steps 0``: the start only), ``--variants`` the cost of coarse versions of
the cat, and ``--eval-mode`` puts the client in eval mode, for the contrast. ``--pin-statistics`` makes every
BatchNorm layer normalise with the cat's own batch statistics (what ``RecoveredStatistics`` solves from moved
buffers) instead of the perturbed image's: as constants (eval mode with the client's statistics), or
``straight-through`` (their values, with the gradient of the image's own statistics: the exact update at the
cat). If the attack walks away from a start that close, the cost has lower points around the truth than on the
way to it, and more steps or a few restarts from random starts are unlikely to find the truth either.

Example::

    OMP_NUM_THREADS=1 nice python benchmarks/train_mode_basin.py --eps 0.1 --lr 0.01
"""

from __future__ import annotations

import argparse
import contextlib

import pytorch_lightning as pl
import torch

from lightning_inversion.attack import GradientInversion
from lightning_inversion.client import Client
from lightning_inversion.data import PhotoData
from lightning_inversion.metrics import psnr
from lightning_inversion.notices import lightning_notices_silenced
from lightning_inversion.victims import build_victim


def _norm(tensors: list[torch.Tensor]) -> float:
    return sum(float(t.pow(2).sum()) for t in tensors) ** 0.5


def _cost(tensors: list[torch.Tensor], target: list[torch.Tensor]) -> float:
    """1 − the cosine between two updates over all their tensors."""
    dot = sum(float((a * b).sum()) for a, b in zip(tensors, target, strict=True))
    return 1 - dot / (_norm(tensors) * _norm(target))


@contextlib.contextmanager
def pinned_statistics(victim: torch.nn.Module, statistics: dict, straight_through: bool):
    """Within this context every BatchNorm layer of ``victim`` normalises with ``statistics[name]`` (mean, biased
    var), plus, if ``straight_through``, the input's own statistics minus their detached value."""

    def hook(name: str):
        def normalise(module, args, output):
            x = args[0]
            axes = [0, *range(2, x.dim())]
            mean, var = statistics[name]
            if straight_through:
                own_mean, own_var = x.mean(axes), x.var(axes, correction=0)
                mean = mean + own_mean - own_mean.detach()
                var = var + own_var - own_var.detach()
            shape = [1, -1] + [1] * (x.dim() - 2)
            y = (x - mean.view(shape)) / (var.view(shape) + module.eps).sqrt()
            return y * module.weight.view(shape) + module.bias.view(shape)

        return normalise

    handles = [
        m.register_forward_hook(hook(n))
        for n, m in victim.named_modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--eps", type=float, default=0.1, help="std of the noise added to the cat (normalised)"
    )
    parser.add_argument("--lr", type=float, default=0.01, help="the attack's learning rate")
    parser.add_argument(
        "--steps", type=int, default=300, help="attack steps (decay at 3/8, 5/8, 7/8); 0: the start only"
    )
    parser.add_argument("--unsigned", action="store_true", help="plain Adam instead of signed Adam")
    parser.add_argument("--eval-mode", action="store_true", help="an eval-mode client instead (the contrast)")
    parser.add_argument("--victim", default="ConvNet-16")
    parser.add_argument(
        "--pin-statistics",
        choices=["constant", "straight-through"],
        help="BatchNorm normalises with the cat's own statistics, not the perturbed image's (needs --steps 0)",
    )
    parser.add_argument(
        "--per-tensor",
        action="store_true",
        help="also 1 − cos per gradient tensor at the start, and its share",
    )
    parser.add_argument(
        "--variants",
        action="store_true",
        help="also the matching cost of coarse versions of the cat (16×16 and back, half contrast, brighter, grey)",
    )
    args = parser.parse_args()
    if args.pin_statistics and (args.steps > 0 or args.eval_mode):
        parser.error("--pin-statistics measures the start only, of a train-mode client: add --steps 0")

    data = PhotoData(image_size=28, target_indices=[1])
    images, labels = data.client_batch(data.target_clients()[0])  # the chosen target, the cat
    image, label = images[0], int(labels[0])
    pl.seed_everything(0, verbose=False)
    victim = build_victim(args.victim, data.num_classes, tuple(data.image_shape)).eval()
    client = Client(train_mode=not args.eval_mode)
    update = client.update(victim, image[None], torch.tensor([label]))
    cat_statistics = None
    if args.pin_statistics:
        seen = {"batchnorm_statistics": {}}
        params = {n: p.detach() for n, p in victim.named_parameters()}
        buffers = {n: b.clone() for n, b in victim.named_buffers()}
        client.simulate(victim, params, buffers, image[None], torch.tensor([label]), seen=seen)
        cat_statistics = {n: (m.detach(), v.detach()) for n, (m, v) in seen["batchnorm_statistics"].items()}

    def pinned():
        if cat_statistics is None:
            return contextlib.nullcontext()
        return pinned_statistics(victim, cat_statistics, args.pin_statistics == "straight-through")

    mean, std = torch.tensor(data.mean).view(3, 1, 1), torch.tensor(data.std).view(3, 1, 1)
    truth = (image * std + mean).clamp(0, 1)[None]
    attack = GradientInversion(
        victim=victim,
        num_classes=data.num_classes,
        image_shape=tuple(data.image_shape),
        mean=data.mean,
        std=data.std,
        tv=1e-5,
        client=client,
        label_strategy="given",
        lr=args.lr,
        signed=not args.unsigned,
    )
    attack.set_target(update)
    start = image + args.eps * torch.randn(image.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        attack.dummy_images.copy_(start[None, None])
    with pinned():
        at_start = client.update(victim, start[None], torch.tensor([label])).tensors
    start_cost = _cost(at_start, update.tensors)
    if args.variants:
        pixels = image * std + mean
        grey = pixels.mean()
        small = torch.nn.functional.interpolate(pixels[None], size=16, mode="bilinear", align_corners=False)
        variants = {
            "16×16 and back": torch.nn.functional.interpolate(
                small, size=28, mode="bilinear", align_corners=False
            )[0],
            "half contrast": grey + 0.5 * (pixels - grey),
            "+0.1 brightness": (pixels + 0.1).clamp(0, 1),
            "grey (0.5)": torch.full_like(pixels, 0.5),
        }
        for name, variant in variants.items():
            with pinned():
                tensors = client.update(victim, ((variant - mean) / std)[None], torch.tensor([label])).tensors
            print(f"the cat, {name}: matching cost {_cost(tensors, update.tensors):.4f}")
    if args.per_tensor:
        total = _norm(update.tensors) ** 2
        print("tensor | 1 − cos at the start | share of the target's squared norm")
        for name, a, b in zip(update.names, at_start, update.tensors, strict=True):
            cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
            print(f"{name} | {1 - float(cos):.3f} | {float(b.pow(2).sum()) / total:.3f}")

    if args.steps < 1:  # the start only (--per-tensor)
        mode = "eval" if args.eval_mode else "train"
        pin = f", statistics pinned ({args.pin_statistics})" if args.pin_statistics else ""
        print(
            f"{args.victim}, {mode}-mode client{pin}, eps {args.eps}: matching cost at the start {start_cost:.4g}"
        )
        return

    def pixels_psnr(images: torch.Tensor) -> float:
        return float(psnr((images * std + mean).clamp(0, 1)[None], truth)[0])

    with lightning_notices_silenced():
        trainer = pl.Trainer(
            max_steps=args.steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
        )
        trainer.fit(attack)
    end = attack.dummy_images.detach()[0, 0]
    print(
        f"{args.victim}, {'eval' if args.eval_mode else 'train'}-mode client, eps {args.eps}, lr {args.lr}, {'unsigned' if args.unsigned else 'signed'} Adam, "
        f"{args.steps} steps: PSNR {pixels_psnr(start):.2f} -> {pixels_psnr(end):.2f} dB, "
        f"matching cost {start_cost:.3f} -> {float(attack.last_cost.min()):.3f}"
    )


if __name__ == "__main__":
    main()
