"""The privacy audit: how much a defense protects, and what it costs in accuracy (``python audit.py``).

For every setting of a grid (no defense; each swept defense at each strength; secure aggregation over each number
of clients) the audit

1. attacks every target with the client defended so (:class:`~lightning_inversion.client.Client` with
   ``defenses``; the attack simulates what the server knows of them), and measures PSNR, SSIM, LPIPS and label
   accuracy against the ground truth (one loop over targets; restarts stay a batch axis);
2. trains the victim with the same defense on the data's training split (the photo crops of ``train_victim.py``:
   :class:`DefendedClassifier`, DP-SGD through Opacus) and measures its accuracy on the validation split, the
   utility the defense leaves. Secure aggregation averages equal clients' gradients, which is the batch gradient:
   its rows take the undefended victim's accuracy.

Outputs in ``output_dir``, all rewritten after every setting so an interrupted audit keeps what finished:
``audit.csv`` (one row per setting), ``audit.md`` (the table and, per defense, the weakest strength at which the
mean PSNR falls below the threshold), ``audit.png`` (leakage against strength per defense, and the
privacy–utility frontier: PSNR against victim accuracy), ``grid_<defense>.png`` (the reconstructions of every
strength, one line each, under the ground truth) and ``audit.html``, one self-contained page with all of it
(images as data URIs, no external reference).
"""

from __future__ import annotations

import base64
import contextlib
import csv
import html
import io
import logging
import math
import re
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace
from jsonargparse.typing import PositiveFloat, PositiveInt
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from .attack import GradientInversion
from .classifier import VictimClassifier
from .cli import StopOnSignal, _drop_lightning_tips, _type_error_line
from .client import Client
from .data import VisionData
from .defenses import DPSGD, Defense, private_generator
from .errors import InputError
from .evaluation import DECIDED, QUIET_TRAINER
from .evaluation import _quiet_lightning as _quiet_fit
from .images import denormalize
from .metrics import LPIPSMetric, evaluate, flat_psnr, summarize
from .report import InversionReport, OutputFolderError, check_writable, draw_rows
from .targets import attack_victim

log = logging.getLogger(__name__)

COLUMNS = (
    "defense",
    "parameter",
    "strength",
    "epsilon",
    "psnr_mean",
    "psnr_std",
    "ssim_mean",
    "ssim_std",
    "lpips_mean",
    "lpips_std",
    "label_accuracy",
    "victim_accuracy",
    "victim_epsilon",
    "targets",
    "seconds",
)
NO_DEFENSE = "none"
SECURE_AGGREGATION = "SecureAggregation"


@dataclass
class Sweep:
    """One defense swept over strengths.

    Args:
        defense: the defense (``class_path`` and ``init_args``); its other options stay as given.
        strengths: the values of the defense's strength option (``noise_multiplier`` of DPSGD, ``max_norm`` of
            ClipUpdate, ``scale`` of the noises, ``keep_percent`` of Prune, ``bits`` of Quantize).
    """

    defense: Defense
    strengths: list[float]


@dataclass
class VictimTraining:
    """How the victim is trained under each defense to measure its utility (SGD with momentum, constant lr).

    Args:
        epochs: passes over the data's training split.
        batch_size: examples per step (the update a client shares, defended like one).
        lr: the SGD learning rate.
        momentum: the SGD momentum.
        seed: seeds the victim's initial weights and the order of the examples.
    """

    epochs: PositiveInt = 3
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 0.02
    momentum: float = 0.9
    seed: int = 0


@dataclass
class Setting:
    """One point of the grid: a defense (or none, or secure aggregation) at one strength."""

    name: str
    parameter: str
    strength: float | None
    client: Client
    stronger: str = "higher"


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's per-fit banners (accelerator, tips) kept out of a loop over dozens of fits."""
    loggers = [logging.getLogger(n) for n in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with _quiet_fit():
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# --- utility: the victim trained under a defense ---------------------------------------------------------------
class DefendedClassifier(VictimClassifier):
    """A victim trained with its client's defenses on every step's gradient (a FedSGD client per batch).

    The other defenses act on the batch gradient before the optimiser's step (their honest face, with private
    draws); DP-SGD runs through Opacus (``GradSampleModule`` and ``DPOptimizer``), with the victim's BatchNorm
    layers replaced by GroupNorm as Opacus's ``ModuleValidator.fix`` does (BatchNorm mixes the examples of a
    batch, so per-example gradients do not exist). Momentum and the learning rate act after the defense, on the
    server's side.

    Args:
        defenses: the client's defenses.
        **kwargs: see :class:`~lightning_inversion.classifier.VictimClassifier`.
    """

    def __init__(self, defenses: list[Defense] | None = None, batch_size: int = 64, **kwargs) -> None:
        super().__init__(**kwargs)
        self.batch_size = int(batch_size)
        self.defenses = list(defenses or [])
        self.dp = next((d for d in self.defenses if isinstance(d, DPSGD)), None)
        self.automatic_optimization = False
        self._generators: dict[int, torch.Generator] = {}
        if self.dp is not None:
            from opacus import GradSampleModule
            from opacus.validators import ModuleValidator

            opacus_log = logging.getLogger("opacus")
            level = opacus_log.level
            opacus_log.setLevel(logging.WARNING)  # it logs every BatchNorm it replaces
            try:
                self.victim = GradSampleModule(ModuleValidator.fix(self.victim))
            finally:
                opacus_log.setLevel(level)

    def on_fit_start(self) -> None:
        self._generators = {
            id(d): private_generator(d.seed, self.device)
            for d in self.defenses
            if d.draws and d is not self.dp
        }

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, labels = batch
        optimizer = self.optimizers()
        optimizer.zero_grad()
        logits = self(images)
        loss = F.cross_entropy(logits, labels)
        self.manual_backward(loss)
        params = [p for p in self.parameters() if p.grad is not None]
        if self.dp is None and self.defenses:
            grads = [p.grad for p in params]
            for defense in self.defenses:
                grads = defense.defend(grads, self._generators.get(id(defense)))
            for p, g in zip(params, grads, strict=True):
                p.grad = g
        optimizer.step()  # a DPOptimizer clips per example and adds its noise first
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        hp = self.hparams
        optimizer = torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum)
        if self.dp is None:
            return optimizer
        return self.dp.optimizer(optimizer, self.batch_size, private_generator(self.dp.seed))


def _materialize(dataset, limit: int | None = None) -> TensorDataset:
    """A dataset read once into tensors (the photo crops are cut on the fly, the same for every victim)."""
    n = len(dataset) if limit is None else min(limit, len(dataset))
    items = [dataset[i] for i in range(n)]
    images = torch.stack([torch.as_tensor(x) for x, _ in items])
    labels = torch.tensor([int(y) for _, y in items])
    return TensorDataset(images, labels)


def train_victim(
    victim: str,
    data: VisionData,
    defenses: list[Defense],
    training: VictimTraining,
    train: TensorDataset,
    val: TensorDataset,
) -> dict[str, Any]:
    """Train ``victim`` (a registry name) with ``defenses`` on ``train``; its accuracy on ``val``.

    Returns:
        ``accuracy``, ``epsilon`` (DP-SGD: Opacus's accountant over the steps at sampling rate batch / examples;
        the batches are shuffled, not Poisson-sampled, as most DP training is) and ``seconds``.
    """
    started = time.perf_counter()
    torch.manual_seed(training.seed)
    model = DefendedClassifier(
        defenses,
        training.batch_size,
        victim=victim,
        num_classes=data.num_classes,
        image_shape=tuple(data.image_shape),
        mean=tuple(data.mean),
        std=tuple(data.std),
        lr=training.lr,
        momentum=training.momentum,
        nesterov=False,
        weight_decay=0.0,
    )
    order = torch.Generator().manual_seed(training.seed)
    loader = DataLoader(train, batch_size=training.batch_size, shuffle=True, generator=order, drop_last=True)
    with _quiet_lightning(), warnings.catch_warnings():
        # Opacus's hooks on the first layer fire on outputs (the images need no gradient): as meant.
        warnings.filterwarnings("ignore", "Full backward hook is firing", UserWarning)
        warnings.filterwarnings("ignore", "You defined a `validation_step` but have no `val_dataloader`")
        trainer = pl.Trainer(
            max_epochs=training.epochs, limit_val_batches=0, **{**QUIET_TRAINER, "max_steps": -1}
        )
        trainer.fit(model, train_dataloaders=loader)
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in DataLoader(val, batch_size=256):
            correct += int((model(x).argmax(-1) == y).sum())
    epsilon = None
    if model.dp is not None:
        steps = training.epochs * (len(train) // training.batch_size)
        epsilon = model.dp.epsilon(training.batch_size / len(train), steps, rounds=1)
    return {"accuracy": correct / len(val), "epsilon": epsilon, "seconds": time.perf_counter() - started}


# --- leakage: the attack on each target ------------------------------------------------------------------------
def attack_targets(
    data: VisionData,
    victim: nn.Module,
    groups: list[list[int]],
    options: dict[str, Any],
    client: Client,
    settings: dict[str, Any],
    metric: LPIPSMetric | None,
) -> list[dict[str, Any]]:
    """Attack the updates ``client`` shares for each group of target images, all groups in one fit (the target
    axis: one target per group); the measurements and the images of each."""
    dataset = data.target_set()
    batches = []
    for indices in groups:
        items = [dataset[i] for i in indices]
        x = torch.stack([torch.as_tensor(image) for image, _ in items])  # (B, C, H, W), normalised
        y = torch.tensor([int(label) for _, label in items])
        batches.append((x, y, denormalize(x, data.mean, data.std).clamp(0, 1)))
    module = GradientInversion(
        victim,
        num_classes=data.num_classes,
        image_shape=tuple(data.image_shape),
        mean=tuple(data.mean),
        std=tuple(data.std),
        num_images=len(groups[0]),
        targets=len(groups),
        client=client,
        **options,
    )
    updates = [client.update(victim, x, y) for x, y, _ in batches]
    module.set_targets(updates)
    started = time.perf_counter()
    with _quiet_lightning():
        pl.Trainer(**settings).fit(module)
    seconds = (time.perf_counter() - started) / len(groups)
    results = []
    for (_, y, truth), update, result in zip(batches, updates, module.reconstructions, strict=True):
        images = result.images.float().cpu()
        if torch.isnan(images).any():
            measured = {"psnr": math.nan, "ssim": math.nan, "lpips": None, "label_accuracy": None}
            order = torch.arange(len(y))
        else:
            measured = evaluate(images, truth, result.labels, y, victim, data.mean, data.std, metric)
            order = measured["order"]
        privacy = update.meta.get("privacy") or {}
        results.append(
            {
                "psnr": measured["psnr"],
                "ssim": measured["ssim"],
                "lpips": measured.get("lpips"),
                "label_accuracy": measured.get("label_accuracy"),
                "epsilon": privacy.get("epsilon"),
                "seconds": seconds,
                "image": images[order][0],  # the reconstruction matched to the target image itself
                "truth": truth[0],
            }
        )
    return results


# --- the grid ----------------------------------------------------------------------------------------------------
def settings_of(base: Client, sweeps: list[Sweep], num_clients: list[int]) -> list[Setting]:
    """Every setting of the audit, each checked before anything runs (a bad strength is an InputError)."""
    options = base.options()
    settings = [Setting(NO_DEFENSE, "", None, base)]
    for sweep in sweeps:
        defense = sweep.defense
        kind = type(defense)
        if not defense.strength:
            raise InputError(f"the defense {kind.__name__} has no strength to sweep")
        if not sweep.strengths:
            raise InputError(f"the sweep of {kind.__name__} lists no strengths")
        for value in sweep.strengths:
            args = {**_init_args(defense), defense.strength: _as_type(kind, defense.strength, value)}
            try:
                swept = kind(**args)
            except InputError as error:
                raise InputError(f"the sweep of {kind.__name__}: {error}") from None
            client = Client(**{**options, "defenses": [*base.defenses, swept]})
            settings.append(Setting(kind.__name__, defense.strength, float(value), client, defense.stronger))
    for n in num_clients:
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise InputError(f"num_clients of the audit must be whole numbers >= 2, got {n!r}")
        client = Client(**{**options, "num_clients": n})
        settings.append(Setting(SECURE_AGGREGATION, "num_clients", float(n), client, "higher"))
    return settings


def _init_args(defense: Defense) -> dict[str, Any]:
    import inspect

    names = [n for n in inspect.signature(type(defense).__init__).parameters if n != "self"]
    return {
        n: getattr(defense, n if n != "seed" else "_seed")
        for n in names
        if hasattr(defense, n) or n == "seed"
    }


def _as_type(kind: type, name: str, value: float):
    import inspect

    annotation = str(inspect.signature(kind.__init__).parameters[name].annotation)
    if ("int" in annotation or "Bits" in annotation) and float(value) == int(value):
        return int(value)
    return float(value)


def run_audit(
    data: VisionData,
    victim: str,
    settings: list[Setting],
    targets: list[int],
    attack_options: dict[str, Any] | None = None,
    trainer_kwargs: dict[str, Any] | None = None,
    training: VictimTraining | None = None,
    output_dir: str | Path = "outputs/audit",
    lpips: bool = True,
    threshold: float = 12.0,
    description: str = "",
) -> list[dict[str, Any]]:
    """Run every setting on every target and train the victim under it; write the outputs after each setting.

    Args:
        data: the targets (its target split) and the victim's training and validation splits.
        victim: the victim's registry name (the attacked model, untrained, and the architecture trained).
        settings: the grid, from :func:`settings_of`.
        targets: indices into the target split. Under secure aggregation with n clients, target i is attacked
            in the batch of the n images i, i+1, … (cyclically), one per client.
        attack_options: :class:`~lightning_inversion.attack.GradientInversion` arguments.
        trainer_kwargs: the attack's ``Trainer`` arguments over a quiet default.
        training: how the victim is trained for its accuracy (``None``: no training, no accuracy).
        output_dir: where the outputs go.
        lpips: measure LPIPS where its weights can be had.
        threshold: the PSNR (dB) below which a reconstruction counts as stopped, for ``audit.md``.
        description: a line for the reports.

    Returns:
        the rows of ``audit.csv``.
    """
    options = dict(attack_options or {})
    options.pop("victim", None)
    model = attack_victim(
        victim, data.num_classes, tuple(data.image_shape), tuple(data.mean), tuple(data.std),
        options.pop("pretrained", False), options.pop("victim_weights", None), options.pop("victim_checkpoint", None),
    )  # fmt: skip
    check_writable(output_dir, "output_dir")
    quiet = {**QUIET_TRAINER, **(trainer_kwargs or {})}
    metric = LPIPSMetric() if lpips else None
    notes = [metric.reason] if metric is not None and metric.reason else []
    size = len(data.target_set())
    train = val = None
    if training is not None:
        train, val = _materialize(data.train_set()), _materialize(data.val_set())
    accuracies: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    pictures: dict[str, list[tuple[str, Tensor, list[str]]]] = {}
    truths: Tensor | None = None
    floor = None
    baseline = None
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for k, setting in enumerate(settings):
            started = time.perf_counter()
            n = setting.client.num_clients
            groups = [[(index + j) % size for j in range(n)] for index in targets]
            results = attack_targets(data, model, groups, options, setting.client, quiet, metric)
            utility: dict[str, Any] = {"accuracy": None, "epsilon": None}
            if training is not None:
                key = ",".join(d.describe() for d in setting.client.defenses)
                if key not in accuracies:
                    accuracies[key] = train_victim(
                        victim, data, setting.client.defenses, training, train, val
                    )
                utility = accuracies[key]
            row = _row(setting, results, utility, time.perf_counter() - started)
            rows.append(row)
            if truths is None:
                truths = torch.stack([r["truth"] for r in results])
                floors = flat_psnr(truths)
                floor = float(floors.mean())
                notes.append(
                    "a flat image of each target's own mean colour scores "
                    f"{', '.join(f'{v:.1f}' for v in floors.tolist())} dB (mean {floor:.1f}): a PSNR near that "
                    "recovers the colours, not the image; look at the grids"
                )
            label = "none" if setting.strength is None else f"{setting.parameter} {_number(setting.strength)}"
            captions = [_caption(r["psnr"]) for r in results]
            line = (label, torch.stack([r["image"] for r in results]), captions)
            if setting.name == NO_DEFENSE:
                baseline = line
                pictures.setdefault(NO_DEFENSE, [line])
            else:
                pictures.setdefault(setting.name, [] if baseline is None else [baseline]).append(line)
            log.info(
                "setting %d/%d %s %s: PSNR %.2f ± %.2f dB, victim accuracy %s, %.0f s",
                k + 1,
                len(settings),
                setting.name,
                "" if setting.strength is None else _number(setting.strength),
                row["psnr_mean"],
                row["psnr_std"],
                "n/a" if row["victim_accuracy"] is None else f"{row['victim_accuracy']:.3f}",
                row["seconds"],
            )
            pending = len(settings) - k - 1
            extra = (
                [f"{pending} of {len(settings)} settings still to run when this was written"]
                if pending
                else []
            )
            write_audit(
                output_dir, rows, truths, targets, pictures, threshold, description, [*notes, *extra], floor
            )
    finally:
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    return rows


def _row(setting: Setting, results: list[dict], utility: dict, seconds: float) -> dict[str, Any]:
    def stats(key: str) -> tuple[float | None, float | None]:
        values = [r[key] for r in results if r[key] is not None]
        if not values:
            return None, None
        mean, std = summarize(values)
        return mean, std

    psnr, ssim, lpips = stats("psnr"), stats("ssim"), stats("lpips")
    labels = stats("label_accuracy")[0]
    return {
        "defense": setting.name,
        "parameter": setting.parameter,
        "strength": setting.strength,
        "stronger": setting.stronger,
        "epsilon": results[0]["epsilon"],
        "psnr_mean": psnr[0],
        "psnr_std": psnr[1],
        "ssim_mean": ssim[0],
        "ssim_std": ssim[1],
        "lpips_mean": lpips[0],
        "lpips_std": lpips[1],
        "label_accuracy": labels,
        "victim_accuracy": utility["accuracy"],
        "victim_epsilon": utility["epsilon"],
        "targets": len(results),
        "seconds": seconds,
    }


def _caption(psnr: float) -> str:
    return "failed (NaN)" if psnr is None or math.isnan(psnr) else f"{psnr:.1f} dB"


def _number(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:g}"


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.6g}"
    return str(value)


# --- the outputs ---------------------------------------------------------------------------------------------------
def weakest_stopping(rows: list[dict[str, Any]], threshold: float) -> dict[str, dict[str, Any] | None]:
    """Per defense, the weakest strength whose mean PSNR is below ``threshold`` dB (``None``: none is)."""
    found: dict[str, dict[str, Any] | None] = {}
    for row in rows:
        if row["defense"] == NO_DEFENSE:
            continue
        found.setdefault(row["defense"], None)
    for name in found:
        mine = [r for r in rows if r["defense"] == name and r["psnr_mean"] is not None]
        below = [r for r in mine if r["psnr_mean"] < threshold]
        if below:
            higher = below[0]["stronger"] == "higher"
            found[name] = (
                min(below, key=lambda r: r["strength"]) if higher else max(below, key=lambda r: r["strength"])
            )
    return found


def audit_markdown(
    rows: list[dict[str, Any]], threshold: float, description: str = "", notes: list[str] | None = None
) -> str:
    """The table of ``audit.csv`` and, per defense, the weakest strength that stops the attack."""

    def pm(mean, std, spec):
        return "n/a" if mean is None or math.isnan(mean) else f"{mean:{spec}} ± {std:{spec}}"

    def pct(value):
        return "n/a" if value is None else f"{100 * value:.1f} %"

    def eps(value):
        return "" if value is None else ("∞" if math.isinf(value) else f"{value:.3g}")

    lines = ["# Privacy audit", ""]
    if description:
        lines += [description, ""]
    lines += [
        "| defense | strength | ε (attacked update) | PSNR (dB) | SSIM | LPIPS | label acc. | victim acc. | "
        "ε (victim training) | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        strength = "" if r["strength"] is None else f"{r['parameter']} {_number(r['strength'])}"
        lines.append(
            f"| {r['defense']} | {strength} | {eps(r['epsilon'])} | {pm(r['psnr_mean'], r['psnr_std'], '.2f')} | "
            f"{pm(r['ssim_mean'], r['ssim_std'], '.3f')} | {pm(r['lpips_mean'], r['lpips_std'], '.3f')} | "
            f"{pct(r['label_accuracy'])} | {pct(r['victim_accuracy'])} | {eps(r['victim_epsilon'])} | "
            f"{r['seconds']:.0f} |"
        )
    undefended = next((r for r in rows if r["defense"] == NO_DEFENSE), None)
    lines += [
        "",
        f"## The weakest strength that stops the attack (mean PSNR < {threshold:g} dB)",
        "",
        "| defense | weakest strength | PSNR (dB) | victim acc. there | victim acc. undefended |",
        "|---|---|---|---|---|",
    ]
    base = pct(undefended["victim_accuracy"]) if undefended else "n/a"
    for name, row in weakest_stopping(rows, threshold).items():
        if row is None:
            lines.append(f"| {name} | none of those swept | | | {base} |")
        else:
            lines.append(
                f"| {name} | {row['parameter']} {_number(row['strength'])} | {row['psnr_mean']:.2f} | "
                f"{pct(row['victim_accuracy'])} | {base} |"
            )
    lines += [""] + [f"Note: {note}" for note in notes or []]
    return "\n".join(lines).rstrip() + "\n"


def plot_audit(
    path: str | Path, rows: list[dict[str, Any]], threshold: float, floor: float | None = None
) -> None:
    """``audit.png``: per defense, mean PSNR (± std) and victim accuracy against strength; then the frontier.
    ``floor`` (dB): the flat-colour PSNR, drawn dash-dotted."""
    from matplotlib.figure import Figure

    names = list(dict.fromkeys(r["defense"] for r in rows if r["defense"] != NO_DEFENSE))
    undefended = next((r for r in rows if r["defense"] == NO_DEFENSE), None)
    panels = len(names) + 1
    columns = min(4, panels)
    lines = math.ceil(panels / columns)
    fig = Figure(figsize=(4.2 * columns, 3.4 * lines), layout="constrained")
    axes = fig.subplots(lines, columns, squeeze=False).ravel()
    colors = {name: f"C{i}" for i, name in enumerate(names)}
    for ax, name in zip(axes, names, strict=False):
        mine = [r for r in rows if r["defense"] == name and r["psnr_mean"] is not None]
        mine.sort(key=lambda r: r["strength"])
        x = [r["strength"] for r in mine]
        ax.errorbar(x, [r["psnr_mean"] for r in mine], [r["psnr_std"] for r in mine], marker="o", color="C0")
        ax.axhline(threshold, color="gray", ls=":", lw=1)
        if floor is not None:
            ax.axhline(floor, color="gray", ls="-.", lw=1)
        if undefended is not None and undefended["psnr_mean"] is not None:
            ax.axhline(undefended["psnr_mean"], color="C0", ls="--", lw=1)
        if x and min(x) > 0 and max(x) / min(x) >= 20:
            ax.set_xscale("log")
        if mine and mine[0]["stronger"] == "lower":
            ax.invert_xaxis()  # stronger to the right, for every defense
        ax.set_xlabel(f"{mine[0]['parameter'] if mine else ''} (stronger →)")
        ax.set_ylabel("PSNR (dB)", color="C0")
        ax.set_title(name, fontsize=10)
        accuracy = [(r["strength"], r["victim_accuracy"]) for r in mine if r["victim_accuracy"] is not None]
        if accuracy:
            twin = ax.twinx()
            twin.plot(*zip(*accuracy, strict=True), marker="s", color="C3")
            if undefended is not None and undefended["victim_accuracy"] is not None:
                twin.axhline(undefended["victim_accuracy"], color="C3", ls="--", lw=1)
            twin.set_ylim(0, 1.02)
            twin.set_ylabel("victim accuracy", color="C3")
    ax = axes[len(names)]
    for name in names:
        mine = [r for r in rows if r["defense"] == name and r["psnr_mean"] is not None]
        points = [(r["victim_accuracy"], r["psnr_mean"]) for r in mine if r["victim_accuracy"] is not None]
        if points:
            ax.plot(*zip(*points, strict=True), "o", color=colors[name], label=name, alpha=0.8)
    if undefended is not None and undefended["victim_accuracy"] is not None:
        ax.plot(undefended["victim_accuracy"], undefended["psnr_mean"], "k*", ms=12, label="no defense")
    ax.axhline(threshold, color="gray", ls=":", lw=1)
    if floor is not None:
        ax.axhline(floor, color="gray", ls="-.", lw=1)
    ax.set_xlabel("victim accuracy (utility →)")
    ax.set_ylabel("PSNR (dB) (leakage ↑)")
    ax.set_title("privacy–utility frontier (best: bottom right)", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    for extra in axes[panels:]:
        extra.set_visible(False)
    fig.suptitle(
        f"Leakage (PSNR, blue) and utility (victim accuracy, red) against defense strength; "
        f"dashed: no defense; dotted: {threshold:g} dB"
        + (
            ""
            if floor is None
            else f"; dash-dotted: a flat image of the targets' mean colours ({floor:.1f} dB)"
        ),
        fontsize=10,
    )
    fig.savefig(path, dpi=90)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name)


def write_audit(
    folder: str | Path,
    rows: list[dict[str, Any]],
    truths: Tensor | None,
    targets: list[int],
    pictures: dict[str, list[tuple[str, Tensor, list[str]]]],
    threshold: float,
    description: str = "",
    notes: list[str] | None = None,
    floor: float | None = None,
) -> Path:
    """Write ``audit.csv``, ``audit.md``, ``audit.png``, ``grid_<defense>.png`` and ``audit.html``; ``floor``: the
    targets' mean flat-colour PSNR (:func:`~.metrics.flat_psnr`), drawn in the plots."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "audit.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(COLUMNS)
        writer.writerows([[_cell(row[key]) for key in COLUMNS] for row in rows])
    markdown = audit_markdown(rows, threshold, description, notes)
    (folder / "audit.md").write_text(markdown)
    plot_audit(folder / "audit.png", rows, threshold, floor)
    grids = {}
    for name, lines in pictures.items():
        if not lines or truths is None:
            continue
        path = folder / f"grid_{_slug(name)}.png"
        truth_line = ("ground truth", truths, [f"target {i}" for i in targets])
        draw_rows(path, [truth_line, *lines], per_row=max(len(targets), 1), cell_inches=1.1)
        grids[name] = path
    (folder / "audit.html").write_text(audit_html(markdown, folder / "audit.png", grids))
    return folder


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def audit_html(markdown: str, plot: Path, grids: dict[str, Path]) -> str:
    """One self-contained page: the tables of ``audit.md`` and every picture embedded as a data URI."""
    body: list[str] = []
    table: list[list[str]] = []

    def flush() -> None:
        if not table:
            return
        head, *rest = [r for r in table if not set("".join(r)) <= set("-")]
        body.append("<table>")
        body.append("<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>")
        for r in rest:
            body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>")
        body.append("</table>")
        table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        flush()
        if line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif line.strip():
            body.append(f"<p>{html.escape(line)}</p>")
    flush()
    body.append("<h2>Leakage and utility against strength; the privacy–utility frontier</h2>")
    body.append(f'<img alt="audit plot" src="{_data_uri(plot)}">')
    for name, path in grids.items():
        body.append(f"<h2>Reconstructions under {html.escape(name)}</h2>")
        body.append(f'<img alt="reconstructions under {html.escape(name)}" src="{_data_uri(path)}">')
    style = (
        "body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #bbb;padding:3px 8px;text-align:right}img{max-width:100%;display:block}"
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>Privacy audit</title>'
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


# --- the command line ----------------------------------------------------------------------------------------------
def add_attack_sections(parser: ArgumentParser, seed_help: str, data_help: str) -> None:
    """The sections of an ``invert.py fit`` config, for ``audit.py`` (which runs many attacks and trainings)."""
    parser.add_argument("--config", action=ActionConfigFile, help="A YAML config with the sections below.")
    parser.add_argument("--seed_everything", type=int | None, default=0, help=seed_help)
    parser.add_subclass_arguments(VisionData, "data", help=data_help)
    parser.set_defaults({"data": {"class_path": "lightning_inversion.data.PhotoData"}})
    parser.add_class_arguments(GradientInversion, "model", skip=set(DECIDED), instantiate=False)
    parser.add_class_arguments(Client, "client")
    parser.add_class_arguments(pl.Trainer, "trainer", instantiate=False, fail_untyped=False)
    parser.set_defaults({"trainer.max_steps": QUIET_TRAINER["max_steps"]})
    parser.add_class_arguments(InversionReport, "report", instantiate=False)


def _changed(values: Namespace, defaults: Namespace) -> dict[str, Any]:
    """The entries of a parsed group that differ from the parser's defaults."""
    values, defaults = values.as_dict(), defaults.as_dict()
    return {k: v for k, v in values.items() if k not in defaults or defaults[k] != v}


def build_parser() -> ArgumentParser:
    """The parser of ``audit.py``: the sections of an ``invert.py fit`` config and an ``audit`` section."""
    parser = ArgumentParser(
        description="Sweep defenses on the client over strengths, attack every target under each and train the "
        "victim under each: leakage (PSNR, SSIM, LPIPS) against utility (victim accuracy) and ε.",
        default_env=False,
    )
    add_attack_sections(
        parser,
        "Seed of the global generators (the victim's weights).",
        "The targets and the victim's training data.",
    )
    parser.add_argument(
        "--audit.sweeps", type=list[Sweep], default=[], help="The defenses and their strengths."
    )
    parser.add_argument(
        "--audit.num_clients",
        type=list[PositiveInt],
        default=[],
        help="Secure aggregation: the numbers of clients (>= 2) whose average the server sees.",
    )
    parser.add_argument(
        "--audit.training",
        type=VictimTraining | None,
        default=VictimTraining(),
        help="How the victim is trained under each defense for its accuracy (null: not trained).",
    )
    parser.add_argument(
        "--audit.threshold", type=float, default=12.0, help="The PSNR (dB) that counts as the attack stopped."
    )
    return parser


def main(args: list[str] | None = None) -> list[dict[str, Any]]:
    """Run ``audit.py`` (``args=None`` reads ``sys.argv``); a bad setting exits 2 with one line."""
    _drop_lightning_tips()
    parser = build_parser()
    written = io.StringIO()
    try:  # a value a constrained type refuses: one line naming the option (as invert.py says it)
        with contextlib.redirect_stderr(written):
            config = parser.parse_args(args)
    except SystemExit as exit:
        line = _type_error_line(written.getvalue()) if exit.code == 2 else None
        sys.stderr.write(line or written.getvalue())
        raise
    sys.stderr.write(written.getvalue())
    defaults = parser.get_defaults()
    if config.seed_everything is not None:
        pl.seed_everything(config.seed_everything, verbose=False)
    output_dir = config.report.output_dir or "outputs/audit"
    try:
        init = parser.instantiate(config)
        settings = settings_of(init.client, init.audit.sweeps, list(init.audit.num_clients))
        data = init.data
        dataset = data.target_set()
        targets = [int(i) for i in data.target_index_list(dataset)]
        check_writable(output_dir, "--report.output_dir")
    except (InputError, OutputFolderError) as error:
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        if args is not None:
            raise
        sys.exit(2)
    attack = {key: init.model[key] for key in _changed(config.model, defaults.model)}
    trainer_kwargs = {key: init.trainer[key] for key in _changed(config.trainer, defaults.trainer)}
    trainer_kwargs["max_steps"] = config.trainer.max_steps
    training = init.audit.training
    description = (
        f"victim {config.model.victim} (attacked untrained; trained for accuracy: "
        + (
            f"{training.epochs} epochs of {len(data.train_set())} crops, batch {training.batch_size}"
            if training is not None
            else "not trained"
        )
        + f"), {len(targets)} targets {targets}, {config.trainer.max_steps} attack steps, "
        f"client {init.client.protocol}"
    )
    with StopOnSignal() as stop:
        trainer_kwargs["callbacks"] = [*(trainer_kwargs.get("callbacks") or []), stop]
        try:
            rows = run_audit(
                data,
                config.model.victim,
                settings,
                targets,
                attack_options={k: v for k, v in attack.items() if k != "victim"},
                trainer_kwargs=trainer_kwargs,
                training=training,
                output_dir=output_dir,
                lpips=config.report.lpips,
                threshold=config.audit.threshold,
                description=description,
            )
        except (SIGTERMException, KeyboardInterrupt):
            log.error("interrupted: the settings that finished are in %s", Path(output_dir).resolve())
            raise SystemExit(128 + (stop.signum or signal.SIGTERM)) from None
    log.info("wrote %s", Path(output_dir).resolve())
    return rows


__all__ = [
    "DefendedClassifier",
    "Sweep",
    "VictimTraining",
    "attack_targets",
    "audit_html",
    "main",
    "run_audit",
    "settings_of",
    "train_victim",
    "write_audit",
]
