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

``--realistic`` measures instead the settings where real deployments are (the photos only): trained victims with
BatchNorm (the offline demo victim, ConvNet-8 trained with the recipe of ``configs/victim_demo.yaml``, and a
ResNet20 trained the same way), clients in eval and in train mode, batches of 1 and 4, each image prior on and
off (total variation alone; with the BatchNorm-statistics prior on the victim's running statistics; with group
consistency across restarts as well; for train-mode clients, with the prior on the private batch's own statistics
recovered from the moved buffers). Every row states its threat model (labels, BatchNorm statistics, images
known, client mode) and, as a floor, the PSNR of a flat image of each photo's true mean colour.

Examples::

    OMP_NUM_THREADS=1 python benchmarks/quality.py                       # about 10 minutes on 2 CPU cores
    OMP_NUM_THREADS=1 python benchmarks/quality.py --victims ConvNet-64 ResNet20-4 --steps 1000 --images 8
    OMP_NUM_THREADS=1 python benchmarks/quality.py --realistic --images 8       # the realistic settings
    python benchmarks/quality.py --accelerator gpu --steps 4800 --images 8 --cifar-root data
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from dataclasses import dataclass
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
    name: str,
    data: VisionData,
    epochs: int,
    batches: int,
    folder: Path,
    accelerator: str,
    milestones: tuple[int, ...] | None = None,
) -> tuple[nn.Module, float | None]:
    """A victim trained briefly on ``data``'s training split (cached in ``folder``), and its validation accuracy.

    The learning rate drops tenfold after each epoch of ``milestones`` (by default after the last but one).
    """
    from lightning_inversion.classifier import VictimClassifier

    milestones = tuple(milestones or (max(1, epochs - 1),))
    default = milestones == (max(1, epochs - 1),)
    tag = f"{name}-{type(data).__name__}-{epochs}x{batches}" + (
        "" if default else f"-m{'-'.join(map(str, milestones))}"
    )
    scale = getattr(data, "crop_scale", (0.1, 0.4))
    tag += "" if tuple(scale) == (0.1, 0.4) else f"-crops{scale[0]:g}-{scale[1]:g}"
    weights, info = folder / f"{tag}.pt", folder / f"{tag}.json"
    pl.seed_everything(0, verbose=False)
    classifier = VictimClassifier(
        name,
        num_classes=data.num_classes,
        image_shape=tuple(data.image_shape),
        mean=tuple(data.mean),
        std=tuple(data.std),
        lr=0.02,
        milestones=milestones,
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
        "photos": PhotoData(
            train_size=args.train_size, val_size=256, batch_size=64, crop_scale=tuple(args.crop_scale)
        ),
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


def recipe_victim(name: str, data: VisionData, args: argparse.Namespace) -> tuple[nn.Module, float | None]:
    """A victim trained by the recipe of ``configs/victim_demo.yaml`` (the lr drops after epochs 5 and 7 unless
    ``--train-milestones``), cached under ``--output``, and its validation accuracy."""
    milestones = tuple(args.train_milestones or (5, 7))
    weights = Path(args.output) / "weights"
    return trained_victim(
        name, data, args.train_epochs, args.train_batches, weights, args.accelerator, milestones=milestones
    )


@dataclass
class Setting:
    """One row of the realistic table: a victim, the client's mode, the batch and the attack's budget."""

    name: str
    victim: str
    trained: bool
    train_mode: bool
    num_images: int
    steps: int
    tv: float
    restarts: int = 1
    goal: str = ""
    image_size: int = 32


# The settings. Goals: the trained demo victim >= 18 dB, the demo with a train-mode client >= 18 dB, the
# BatchNorm prior >= 2 dB above total variation alone for a batch of 4 on a trained BatchNorm CNN.
REALISTIC = (
    Setting("demo (untrained ConvNet-64)", "ConvNet-64", False, False, 1, 300, 1e-5, image_size=28),
    Setting(
        "demo, train-mode client", "ConvNet-64", False, True, 1, 300, 1e-5, goal=">= 18 dB", image_size=28
    ),
    Setting("trained demo victim (ConvNet-8)", "ConvNet-8", True, False, 1, 1500, 1e-4, goal=">= 18 dB"),
    Setting("trained demo victim, train-mode client", "ConvNet-8", True, True, 1, 1500, 1e-4),
    Setting("trained demo victim, batch 4", "ConvNet-8", True, False, 4, 300, 0.1, goal="BN prior >= +2 dB"),
    Setting("trained ResNet20, batch 4", "ResNet20", True, False, 4, 1500, 1e-4, 2, "BN prior >= +2 dB"),
    Setting("trained ResNet20, train-mode client, batch 4", "ResNet20", True, True, 4, 1500, 1e-4, 2),
)
REALISTIC_COLUMNS = (
    "TV",
    "TV + BN prior",
    "TV + BN prior + group consistency",
    "TV + recovered BN statistics",
)


def realistic_priors(column: str, setting: Setting, args: argparse.Namespace) -> list | None:
    """The priors of a column for a setting (besides TV), or ``None`` where the column does not apply.

    ``TV + BN prior`` matches the victim's running statistics (a trained victim's); ``TV + recovered BN
    statistics`` the private batch's own, solved from the buffers a train-mode client's update moved.
    """
    from lightning_inversion.buffers import RecoveredStatistics
    from lightning_inversion.priors import BatchNormStatistics, GroupConsistency, RunningStatistics

    if column == "TV":
        return []
    if column == REALISTIC_COLUMNS[3]:
        if not setting.train_mode:  # an eval-mode client's buffers do not move
            return None
        return [
            BatchNormStatistics(
                RecoveredStatistics(), weight=args.recovered_weight, distance=args.recovered_distance
            )
        ]
    if not setting.trained:  # an untrained victim's running statistics are BatchNorm's initial (0, 1)
        return None
    priors = [BatchNormStatistics(RunningStatistics(), weight=args.bn_weight, distance=args.bn_distance)]
    if column == REALISTIC_COLUMNS[2]:
        if setting.restarts < 2:
            return None
        priors.append(GroupConsistency(weight=args.group_weight))
    return priors


def attack_batches(
    data: PhotoData,
    victim: nn.Module,
    setting: Setting,
    targets: list[int],
    options: dict,
    client,
    trainer_kwargs: dict,
) -> list[float]:
    """PSNR of each target photo, attacked ``setting.num_images`` at a time (one update per group of photos);
    reconstructions are matched to the ground truth before measuring."""
    from lightning_inversion.attack import GradientInversion
    from lightning_inversion.images import denormalize
    from lightning_inversion.metrics import match_to_truth, psnr
    from lightning_inversion.notices import lightning_notices_silenced

    dataset, values = data.target_set(), []
    b = setting.num_images
    for start in range(0, len(targets) - b + 1, b):
        group = targets[start : start + b]
        x = torch.stack([dataset[i][0] for i in group])
        y = torch.tensor([int(dataset[i][1]) for i in group])
        module = GradientInversion(
            victim,
            num_classes=data.num_classes,
            image_shape=tuple(data.image_shape),
            mean=tuple(data.mean),
            std=tuple(data.std),
            num_images=b,
            client=client,
            **options,
        )
        module.set_target(client.update(victim, x, y))
        settings = dict(
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            devices=1,
        )
        with lightning_notices_silenced():
            pl.Trainer(**settings, **trainer_kwargs).fit(module)
        truth = denormalize(x, data.mean, data.std).clamp(0, 1)
        images = module.reconstruction.images
        values += psnr(images[match_to_truth(images, truth)], truth).tolist()
    return values


def flat_image_psnr(data: PhotoData, targets: list[int]) -> list[float]:
    """PSNR of a flat image of each photo's true mean colour: what a reconstruction without any detail scores."""
    from lightning_inversion.images import denormalize
    from lightning_inversion.metrics import flat_psnr

    dataset = data.target_set()
    truth = torch.stack([denormalize(dataset[i][0], data.mean, data.std).clamp(0, 1) for i in targets])
    return flat_psnr(truth).tolist()


def realistic(args: argparse.Namespace) -> str:
    """The realistic settings' table (markdown): mean ± std PSNR over the photos per setting and prior."""
    from lightning_inversion.client import Client
    from lightning_inversion.priors import ImagePrior
    from lightning_inversion.threat_model import threat_model

    output = Path(args.output)
    data = PhotoData(
        train_size=args.train_size, val_size=256, batch_size=64, crop_scale=tuple(args.crop_scale)
    )  # the victims' training data
    targets = list(range(min(args.images, len(data.target_set()))))
    trainer_kwargs = {"accelerator": args.accelerator}
    chosen = [s for s in REALISTIC if not args.settings or s.name in args.settings]
    header = (
        "| setting | threat model | steps (TV) | flat image | " + " | ".join(REALISTIC_COLUMNS) + " | goal |"
    )
    lines = [header, "|---|---|---|---|" + "---|" * len(REALISTIC_COLUMNS) + "---|"]
    for setting in chosen:
        # The photos at the setting's size (the demo's 28×28); trained victims train at the default 32×32.
        photos = data if setting.image_size == data.image_size else PhotoData(image_size=setting.image_size)
        flat = flat_image_psnr(photos, targets)
        if setting.trained:
            victim, accuracy = recipe_victim(setting.victim, data, args)
            weights = f"trained ({accuracy:.2f})" if accuracy is not None else "trained"
        else:
            pl.seed_everything(0, verbose=False)
            victim = build_victim(setting.victim, photos.num_classes, tuple(photos.image_shape)).eval()
            weights = "untrained"
        client = Client(train_mode=setting.train_mode)
        steps = args.realistic_steps or setting.steps
        used = targets[: len(targets) - len(targets) % setting.num_images]
        tv = setting.tv if args.realistic_tv is None else args.realistic_tv
        if args.realistic_restarts:
            setting = dataclasses.replace(setting, restarts=args.realistic_restarts)
        cells, assumed = [], None
        for column in REALISTIC_COLUMNS:
            priors = realistic_priors(column, setting, args)
            if args.columns and column not in args.columns:
                cells.append("not run")
                continue
            if priors is None:
                cells.append("n/a")
                continue
            options = dict(tv=tv, restarts=setting.restarts, priors=priors)
            started = time.perf_counter()
            if setting.num_images == 1:
                evaluation = evaluate_targets(
                    photos,
                    victim,
                    targets=used,
                    attack_options=options,
                    client=client,
                    trainer_kwargs={**trainer_kwargs, "max_steps": steps},
                    output_dir=output
                    / "realistic"
                    / setting.name.replace(" ", "_")
                    / column.replace(" ", ""),
                    lpips=False,
                    # a prior that reads the target update (the recovered statistics) takes one target per fit
                    targets_per_fit=1
                    if any(type(p).prepare is not ImagePrior.prepare for p in priors)
                    else 8,
                )
                values = [row["psnr"] for row in evaluation.rows]
            else:
                values = attack_batches(
                    photos, victim, setting, used, options, client, {**trainer_kwargs, "max_steps": steps}
                )
            model = threat_model("given", priors, setting.num_images, True, setting.train_mode)
            assumed = model if assumed is None else assumed
            text = _cell(summarize_values(values), 0)
            cells.append(f"{text} (BN: {model['batchnorm_statistics']})" if priors else text)
            log.info("%s, %s: PSNR %s (%.0f s)", setting.name, column, text, time.perf_counter() - started)
        threat = f"labels {assumed['labels']}, {assumed['num_images']} image(s) known, {assumed['client_mode']}-mode client"
        flat_cell = _cell(summarize_values(flat[: len(used)]), 0)
        lines.append(
            f"| {setting.name}, {weights} | {threat} | {steps} (TV {tv:g}"
            + (f", {setting.restarts} restarts" if setting.restarts > 1 else "")
            + f") | {flat_cell} | "
            + " | ".join(cells)
            + f" | {setting.goal or '-'} |"
        )
    return "\n".join(lines)


def statistics_distances(args: argparse.Namespace) -> str:
    """How far batches are from a trained victim's running statistics, in the BatchNorm prior's ``l2`` form
    (``R_BN`` with every layer weighted 1): the private photos themselves against what an attack starts from or
    ends near. The prior helps only where the truth is much nearer than the alternatives."""
    from lightning_inversion.client import _batchnorm_inputs
    from lightning_inversion.priors import RunningStatistics

    data = PhotoData(
        train_size=args.train_size, val_size=256, batch_size=64, crop_scale=tuple(args.crop_scale)
    )
    lines = ["| victim | batch | R_BN to the running statistics |", "|---|---|---|"]
    photos = torch.stack([data.target_set()[i][0] for i in range(len(data.target_set()))])
    crops = torch.stack([data.train_set()[i][0] for i in range(64)])
    mean, std = torch.tensor(data.mean).view(3, 1, 1), torch.tensor(data.std).view(3, 1, 1)
    generator = torch.Generator().manual_seed(0)
    batches = {
        "photos 0-3": photos[:4],
        "photos 4-7": photos[4:8],
        "all 8 photos": photos,
        "photos 0-3, 4×4 blocks": nn.functional.interpolate(
            nn.functional.avg_pool2d(photos[:4], 4), scale_factor=4
        ),
        "photos 0-3, flat mean colours": photos[:4].mean((2, 3), keepdim=True).expand_as(photos[:4]),
        "grey (0.5)": ((0.5 - mean) / std).expand_as(photos[:4]),
        "N(0, 1) noise (the attack's start)": torch.randn(photos[:4].shape, generator=generator),
        "4 training crops": crops[:4],
        "64 training crops": crops,
    }
    for name in args.victims:
        victim, _ = recipe_victim(name, data, args)
        reference = RunningStatistics().statistics(victim, None)
        for label, x in batches.items():
            seen: dict = {}
            with torch.no_grad(), _batchnorm_inputs(victim, seen):
                victim(x)
            total = sum(
                float((seen[n][0] - m).norm() + (seen[n][1] - v).norm()) for n, (m, v) in reference.items()
            )
            lines.append(f"| {name} | {label} | {total:.1f} |")
    return "\n".join(lines)


def summarize_values(values: list[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation; NaN for no values."""
    if not values:
        return math.nan, math.nan
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=False)) if len(values) > 1 else 0.0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--victims", nargs="+", default=["ConvNet-16", "ResNet20-4"])
    parser.add_argument(
        "--images", type=int, default=3, help="targets per cell (the first N of the target split)"
    )
    parser.add_argument("--steps", type=int, default=200, help="gradient evaluations per target and attack")
    parser.add_argument("--tv", type=float, default=1e-4, help="TV weight of the cosine attack")
    parser.add_argument(
        "--train-epochs", type=int, help="epochs of the trained victims (default 2; --realistic: 8)"
    )
    parser.add_argument(
        "--train-batches", type=int, help="batches of 64 per training epoch (default 16; --realistic: 32)"
    )
    parser.add_argument(
        "--train-size", type=int, help="photo crops in the training split (default 1024; --realistic: 2048)"
    )
    parser.add_argument("--cifar-root", default="data", help="where CIFAR-10 is (used only when it is there)")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--lpips", action="store_true", help="also measure LPIPS (needs AlexNet's weights)")
    parser.add_argument(
        "--output", default="outputs/quality", help="per-cell evaluations and trained weights"
    )
    parser.add_argument("--realistic", action="store_true", help="the realistic settings' table instead")
    parser.add_argument(
        "--statistics-distances",
        action="store_true",
        help="instead: how far batches are from the trained --victims' running BatchNorm statistics",
    )
    parser.add_argument("--settings", nargs="*", help="--realistic: only these settings (by name)")
    parser.add_argument("--realistic-steps", type=int, help="--realistic: steps for every setting")
    parser.add_argument("--realistic-tv", type=float, help="--realistic: TV weight for every setting")
    parser.add_argument("--realistic-restarts", type=int, help="--realistic: restarts for every setting")
    parser.add_argument("--columns", nargs="*", help="--realistic: only these columns (by name)")
    parser.add_argument("--bn-weight", type=float, default=1e-4, help="weight of the BatchNorm prior")
    parser.add_argument("--group-weight", type=float, default=1e-2, help="weight of group consistency")
    parser.add_argument(
        "--bn-distance", choices=["l2", "kl"], default="l2", help="the BatchNorm prior's form"
    )
    parser.add_argument(
        "--recovered-weight", type=float, default=1.0, help="weight of the prior on recovered BN statistics"
    )
    parser.add_argument(
        "--recovered-distance", choices=["l2", "kl"], default="kl", help="its form (see BatchNormStatistics)"
    )
    parser.add_argument(
        "--train-milestones", type=int, nargs="+", help="--realistic: epochs of lr drops (default 5 7)"
    )
    parser.add_argument(
        "--crop-scale",
        type=float,
        nargs=2,
        default=[0.1, 0.4],
        help="the trained victims' training crops: their side as fractions of a photo's short side",
    )
    args = parser.parse_args(argv)
    # --realistic trains with the recipe of configs/victim_demo.yaml: 8 epochs of 32 batches of 64 (2,048 crops)
    recipe = (8, 32, 2048) if args.realistic or args.statistics_distances else (2, 16, 1024)
    for name, value in zip(("train_epochs", "train_batches", "train_size"), recipe, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    started = time.perf_counter()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, {vars(args)}\n")
    if args.statistics_distances:
        table = statistics_distances(args)
    else:
        table = realistic(args) if args.realistic else run(args)
    print(table)
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
