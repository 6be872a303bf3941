"""Whole attacks on a GPU through ``reconstruct()``: median seconds per step, peak memory and PSNR.

Run on a machine with CUDA: ``python benchmarks/gpu_steps.py``. Each row attacks one photo (scikit-image's cat)
for 200 steps; the median step is taken after 20 warm-up steps, with ``torch.cuda.synchronize`` at every step.
"""

import logging
import time
import warnings

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

import lightning_inversion as li
from lightning_inversion.data import PhotoData
from lightning_inversion.images import IMAGENET_MEAN, IMAGENET_STD, denormalize

RUNS = [
    ("resnet18", 8, "32-true"),
    ("resnet18", 8, "bf16-mixed"),
    ("resnet18", 1, "32-true"),
    ("ResNet20-4", 8, "32-true"),
    ("ConvNet-64", 8, "32-true"),
    ("ConvNet-64", 1, "32-true"),
]


class StepTimer(pl.Callback):
    """Wall time at the end of every step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_end(self, *args) -> None:
        torch.cuda.synchronize()
        self.times.append(time.perf_counter())


def main(steps: int = 200, warmup: int = 20) -> None:
    for name, restarts, precision in RUNS:
        torch.manual_seed(0)
        side = 224 if name == "resnet18" else 32
        images, labels = PhotoData(image_size=side, target_indices=[1]).attack_targets()
        victim = li.build_victim(name, 8, (3, side, side)).eval()
        gradient = torch.autograd.grad(F.cross_entropy(victim(images), labels), list(victim.parameters()))
        timer = StepTimer()
        torch.cuda.reset_peak_memory_stats()
        result = li.reconstruct(
            victim,
            gradient,
            labels,
            image_shape=(3, side, side),
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            max_steps=steps,
            restarts=restarts,
            tv=1e-4,
            ground_truth=denormalize(images, IMAGENET_MEAN, IMAGENET_STD).clamp(0, 1),
            trainer_kwargs={"accelerator": "gpu", "precision": precision, "callbacks": [timer]},
        )
        step = torch.tensor(timer.times).diff()[warmup:].median().item()
        print(
            f"{name} R={restarts} {precision}: median {step * 1e3:.1f} ms/step, "
            f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB, psnr {result.metrics['psnr']:.2f}; "
            f"24k steps -> {step * 24000 / 60:.1f} min",
            flush=True,
        )


if __name__ == "__main__":
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    main()
