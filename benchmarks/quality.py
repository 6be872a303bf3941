"""Reconstruction quality in the protocol of Geiping et al. 2020's Table 1, at a CPU-sized budget.

Cells: victims (default ConvNet-16 and ResNet20-4), each untrained (random init) and trained (a short training
with :class:`~lightning_inversion.classifier.VictimClassifier` on the dataset's own training split: random crops
of the shipped photos, or CIFAR-10's training images), against two attacks:

- ``l2 + L-BFGS`` (DLG-style): Euclidean gradient matching, L-BFGS (lr 1), no TV, no signs, no box;
- ``sim + signed Adam`` (the paper's): one global cosine + TV, Adam on signed gradients, step decay, box.

Labels are given to both (the paper's setting), so the columns differ only in the objective and the optimiser.
Both get the same budget of gradient evaluations: ``--steps`` Adam steps, or ``--steps / 20`` L-BFGS steps of up
to 20 evaluations each. Each target image is attacked on its own (:func:`lightning_inversion.evaluation.
evaluate_targets`); a cell is the mean ± std PSNR over the targets, and each cell's ``evaluation.csv``/``.md``/``.png``
land in ``--output``. Trained weights are kept in ``--output``/weights and reused.

Datasets: the 8 offline photos (always) and CIFAR-10 when it is at ``--cifar-root``.

Examples::

    OMP_NUM_THREADS=1 python benchmarks/quality.py                       # about 10 minutes on 2 CPU cores
    OMP_NUM_THREADS=1 python benchmarks/quality.py --victims ConvNet-64 ResNet20-4 --steps 1000 --images 8
    python benchmarks/quality.py --accelerator gpu --steps 4800 --images 8 --cifar-root data
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_inversion.data import CIFAR10Data, PhotoData, VisionData  # noqa: E402
from lightning_inversion.evaluation import evaluate_targets  # noqa: E402
from lightning_inversion.victims import build_victim  # noqa: E402

log = logging.getLogger("quality")

LBFGS_EVALUATIONS = 20  # torch.optim.LBFGS's max_iter: function evaluations per step at most


def attacks(steps: int, tv: float) -> dict[str, tuple[dict, int]]:
    """Attack options and step counts of the two columns, at the same budget of gradient evaluations."""
    dlg = dict(
        objective="l2",
        optimizer=torch.optim.LBFGS,
        lr=1.0,
        signed=False,
        boxed=False,
        tv=0.0,
        lr_decay=False,
    )
    ours = dict(objective="sim", tv=tv)  # signed Adam, lr 0.1, step decay and box are the defaults
    return {
        "l2 + L-BFGS": (dlg, max(1, steps // LBFGS_EVALUATIONS)),
        "sim + signed Adam": (ours, steps),
    }


def trained_victim(
    name: str, data: VisionData, epochs: int, batches: int, folder: Path, accelerator: str
) -> tuple[nn.Module, float | None]:
    """A victim trained briefly on ``data``'s training split (cached in ``folder``), and its validation accuracy."""
    from lightning_inversion.classifier import VictimClassifier

    tag = f"{name}-{type(data).__name__}-{epochs}x{batches}"
    weights, info = folder / f"{tag}.pt", folder / f"{tag}.json"
    pl.seed_everything(0, verbose=False)
    classifier = VictimClassifier(
        name,
        num_classes=data.num_classes,
        image_shape=tuple(data.image_shape),
        mean=tuple(data.mean),
        std=tuple(data.std),
        lr=0.02,
        milestones=(max(1, epochs - 1),),
    )
    if weights.is_file():
        classifier.victim.load_state_dict(torch.load(weights, weights_only=True))
        return classifier.victim.eval(), json.loads(info.read_text()).get("val_acc")
    started = time.perf_counter()
    trainer = pl.Trainer(
        max_epochs=epochs,
        limit_train_batches=batches,
        limit_val_batches=4,
        num_sanity_val_steps=0,
        accelerator=accelerator,
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(classifier, datamodule=data)
    accuracy = trainer.callback_metrics.get("val/acc")
    accuracy = None if accuracy is None else float(accuracy)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(classifier.victim.state_dict(), weights)
    info.write_text(json.dumps({"val_acc": accuracy, "seconds": time.perf_counter() - started}))
    log.info(
        "trained %s on %s in %.0f s: validation accuracy %s",
        name,
        tag,
        time.perf_counter() - started,
        accuracy,
    )
    return classifier.victim.eval(), accuracy


def datasets(args: argparse.Namespace) -> dict[str, VisionData]:
    found: dict[str, VisionData] = {
        "photos": PhotoData(train_size=args.train_size, val_size=256, batch_size=64),
    }
    cifar = Path(args.cifar_root) / CIFAR10Data.folder
    if args.cifar_root and cifar.is_dir():
        found["CIFAR-10"] = CIFAR10Data(root=args.cifar_root, download=False, batch_size=64)
    elif args.cifar_root:
        log.info("no CIFAR-10 at %s: the photos only", cifar)
    return found


def _cell(values: tuple[float, float], failed: int) -> str:
    mean, std = values
    text = "n/a" if math.isnan(mean) else f"{mean:.2f} ± {std:.2f}"
    return text + (f" ({failed} failed)" if failed else "")


def run(args: argparse.Namespace) -> str:
    output = Path(args.output)
    columns = attacks(args.steps, args.tv)
    trainer_kwargs = {"accelerator": args.accelerator}
    header = "| data | victim | weights (val. acc.) | " + " | ".join(columns) + " |"
    lines = [header, "|---|---|---|" + "---|" * len(columns)]
    for data_name, data in datasets(args).items():
        targets = list(range(min(args.images, len(data.target_set()))))
        for victim_name in args.victims:
            for trained in (False, True):
                if trained:
                    victim, accuracy = trained_victim(
                        victim_name,
                        data,
                        args.train_epochs,
                        args.train_batches,
                        output / "weights",
                        args.accelerator,
                    )
                    weights = "trained" + (f" ({accuracy:.2f})" if accuracy is not None else "")
                else:
                    pl.seed_everything(0, verbose=False)
                    victim = build_victim(victim_name, data.num_classes, tuple(data.image_shape)).eval()
                    weights = "untrained"
                cells = []
                for attack_name, (options, steps) in columns.items():
                    folder = (
                        output / data_name / victim_name / weights.split()[0] / attack_name.replace(" ", "")
                    )
                    started = time.perf_counter()
                    evaluation = evaluate_targets(
                        data,
                        victim,
                        targets=targets,
                        attack_options=options,
                        trainer_kwargs={**trainer_kwargs, "max_steps": steps},
                        output_dir=folder,
                        lpips=args.lpips,
                    )
                    failed = sum(
                        1 for row in evaluation.rows if row["psnr"] is None or math.isnan(row["psnr"])
                    )
                    cells.append(_cell(evaluation.summary["psnr"], failed))
                    log.info(
                        "%s, %s, %s, %s: PSNR %s (%.0f s)",
                        data_name,
                        victim_name,
                        weights,
                        attack_name,
                        cells[-1],
                        time.perf_counter() - started,
                    )
                lines.append(f"| {data_name} | {victim_name} | {weights} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--victims", nargs="+", default=["ConvNet-16", "ResNet20-4"])
    parser.add_argument(
        "--images", type=int, default=3, help="targets per cell (the first N of the target split)"
    )
    parser.add_argument("--steps", type=int, default=200, help="gradient evaluations per target and attack")
    parser.add_argument("--tv", type=float, default=1e-4, help="TV weight of the cosine attack")
    parser.add_argument("--train-epochs", type=int, default=2, help="epochs of the trained victims")
    parser.add_argument("--train-batches", type=int, default=16, help="batches of 64 per training epoch")
    parser.add_argument("--train-size", type=int, default=1024, help="photo crops in the training split")
    parser.add_argument("--cifar-root", default="data", help="where CIFAR-10 is (used only when it is there)")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--lpips", action="store_true", help="also measure LPIPS (needs AlexNet's weights)")
    parser.add_argument(
        "--output", default="outputs/quality", help="per-cell evaluations and trained weights"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    started = time.perf_counter()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {vars(args)}\n")
    table = run(args)
    print(table)
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
