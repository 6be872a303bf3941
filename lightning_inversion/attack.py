"""The attack: gradient inversion as a LightningModule whose parameters are the dummy images.

Geiping, Bauermeister, Dröge, Moeller, "Inverting Gradients — How easy is it to break privacy in federated
learning?", NeurIPS 2020. The training step is the gradient-matching objective (cosine + total variation by
default), optimised with signed Adam under a box constraint, from several random restarts at once.

Layout of the state:
    dummy_images  (R, B, C, H, W)  nn.Parameter, normalised input space of the victim
    dummy_labels  (R, B, K)        nn.Parameter, DLG soft-label logits (label_strategy="dlg" only)
    target_labels (B,)             buffer, the labels the attacker knows or recovered
    restart_steps (R,)             buffer, optimisation steps each restart ran (a restart with 0 never wins)

The update the attack matches (the target gradient) is set with :meth:`GradientInversion.set_target` and saved in
every checkpoint, so resuming never needs the private data. The module never sees ground truth.

What the Trainer adds:
    several devices  restarts are split over ranks (``strategy="ddp"``, any ``num_nodes``): every rank holds all R
                     restarts but puts only its slice into the loss, scaled by the world size, so DDP's gradient
                     average hands each slice the gradient of the one rank that computed it and the restarts stay
                     independent; the best restart is chosen over all ranks. Each rank runs the victim on its
                     slice of restarts at once, which rounds differently from one process running all of them
                     (see "Batched restarts" below): the images equal a one-device run's over the first steps and
                     drift apart after that, with the same quality in distribution.
    mixed precision  ``bf16-mixed``/``16-mixed`` run the victim's passes in half precision; the dummy images, their
                     gradients (sign step, box) and the matching objective stay in fp32. True half precision
                     (``bf16-true``, ``16-true``) is refused: it rounds the cosine loss to zero.
    checkpoints      the dummy images, optimiser and scheduler state, step, restart counters, torch RNG state,
                     the target update and what identifies the run (:meth:`GradientInversion.run_identity`);
                     ``fit(ckpt_path=...)`` continues bit-identically. The learning-rate
                     milestones are those of the checkpointed run (the scheduler state wins over a new max_steps).

Batched restarts: restart r starts from the images of a separate run with seed ``seed + r`` and follows the same
update rule, but the victim's passes over R restarts at once (``torch.func.vmap``) round differently from passes
over one (the dummy update differs by about one unit in the last place). The sign step hides this until a gradient
entry close to zero takes the other sign; from there the two trajectories drift apart. Measured on a small
ConvNet (16×16 image, 4 restarts, CPU): bit-identical images at 20 steps, at most 4e-4 apart in pixel value at 100
steps, up to 0.2 at 300 steps, with each restart's PSNR within 0.3 dB of its separate run's. So batched restarts
equal separate runs over the first steps and give the same quality in distribution, not the same images, after.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import pytorch_lightning as pl
import torch
from jsonargparse.typing import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, Dataset

from .client import Client, Update, _has_batchnorm, update_problem
from .errors import InputError
from .images import IMAGENET_MEAN, IMAGENET_STD, box_bounds, denormalize, median_filter3x3, project_box
from .labels import batch_label_counts, idlg_label
from .objectives import (
    Cost,
    GradientMatching,
    LayerSelection,
    LayerWeighting,
    decay_milestones,
    total_variation,
)

log = logging.getLogger(__name__)

LabelStrategy = Literal["auto", "given", "idlg", "batch", "dlg"]
RestartSelection = Literal["matching", "tv", "mean", "median"]
Init = Literal["randn", "rand", "zeros", "analytic"]
# Called as ``optimizer(params, lr)``: the learning rate is the module's ``lr``, never an option of the optimiser.
OptimizerFactory = Callable[[Iterable[Tensor], float], Optimizer]

# Trainer precisions that would hold the dummy images and the objective in half precision (REFERENCE §9).
TRUE_HALF_PRECISIONS = ("16-true", "bf16-true")


# Lightning's remarks that do not apply here, each with the reason; silenced while the attack (and the CLI) runs.
LIGHTNING_NOTICES = {
    r"Found \d+ module\(s\) in eval mode": "the victim runs in the client's mode (eval by default) on purpose",
    r"You're resuming from a checkpoint that ended before the epoch ended": "the step ticks hold no state: "
    "a resumed attack ends with the same images as an uninterrupted one",
    r"The number of training batches .* is smaller than the logging interval": "the attack logs its last step",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated": "Lightning's own use of a torch API",
    r"Starting from v1.9.0, `tensorboardX` has been removed": "the CSV logger is used without TensorBoard",
    r"The dirpath has changed from": "a resumed run writes into a folder of its own; the attack monitors nothing",
}


@contextmanager
def lightning_notices_silenced() -> Iterator[None]:
    """Run a Trainer without :data:`LIGHTNING_NOTICES`; every other warning still shows."""
    with warnings.catch_warnings():
        for message in LIGHTNING_NOTICES:
            warnings.filterwarnings("ignore", message=message)
        yield


class TargetMismatchError(InputError):
    """The update does not fit the victim (a tensor's count, name or shape, or the protocol)."""


@dataclass
class Reconstruction:
    """The outcome of an attack.

    Attributes:
        images: the chosen (or combined) reconstruction, de-normalised and clamped to [0, 1], ``(B, C, H, W)``.
        labels: the labels the attack used or recovered, ``(B,)``.
        restarts: every restart, de-normalised and clamped to [0, 1], ``(R, B, C, H, W)``.
        stats: per-restart scores, the chosen restart, steps and seconds.
        metrics: the report's measurements against ground truth, when it was known.
    """

    images: Tensor
    labels: Tensor
    restarts: Tensor
    stats: dict = field(default_factory=dict)
    metrics: dict | None = None


class _StepTicks(Dataset):
    """The attack has no data to iterate over: one dummy item per optimisation step drives the Trainer."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> Tensor:
        return torch.zeros(())


class GradientInversion(pl.LightningModule):
    """Reconstruct a client's private images from the update it shared.

    Args:
        victim: the shared model: a name from ``lightning_inversion.victims.list_victims()`` or any ``nn.Module``.
            Its parameters are frozen (``requires_grad=False``); the attack differentiates the client's update
            functionally.
        num_classes: classes of the victim (set from the data by the CLI).
        image_shape: ``(C, H, W)`` of the victim's input (set from the data by the CLI).
        mean: per-channel normalisation mean of the victim's input (set from the data by the CLI).
        std: per-channel normalisation std (set from the data by the CLI).
        num_images: B, the number of images in the client's batch (set from the data by the CLI).
        restarts: R independent trials, optimised together as a batch axis; the best one wins.
        cost: the gradient-matching cost: ``sim`` (the paper's global cosine), ``l2`` (DLG), ``l1``, ``max``,
            ``simlocal`` (per-tensor cosines).
        layers: which gradient tensors to compare: ``all``, ``first``/``last`` k, ``topk`` k by target-gradient
            norm, or an explicit ``list``.
        layers_k: k for ``first``, ``last`` and ``topk``.
        layer_indices: the tensor indices for ``layers: list``.
        layer_weights: weights of the compared tensors: ``equal``, ``linear`` ((L−i)/L) or ``exp`` (e^−i).
        tv: weight of the total-variation prior (about 1e-2 for CIFAR in the paper; 0 disables it).
        signed: feed the optimiser the sign of the image gradient (the paper's signed Adam).
        boxed: clamp the dummy images to the valid pixel range [0, 1] after every step.
        init: initial dummy images: ``randn``, ``rand`` (uniform in [−1, 1]), ``zeros``, or ``analytic``: the
            closed-form recovery through the victim's first biased linear layer (Phong et al. 2017; §4 of the
            paper). When that layer reads the image itself (an MLP) the image is recovered exactly, without a
            single optimisation step (run with ``trainer.max_steps 0``); otherwise the layer's input features are
            recovered (``analytic_features``, measured by the report) and the images start from ``randn``.
        optimizer: the optimiser class (or callable) over the dummy images (and soft labels) only, e.g.
            ``torch.optim.Adam``, ``torch.optim.SGD`` or ``torch.optim.LBFGS``; its options other than the
            learning rate go in ``init_args`` (e.g. ``momentum``).
        lr: the optimiser's learning rate, the only one (``optimizer`` is called as ``optimizer(params, lr)``).
        lr_decay: multiply the learning rate by 0.1 at 3/8, 5/8 and 7/8 of ``trainer.max_steps``.
        median_filter_every: apply a 3×3 median filter to the dummy images every this many steps (0: never).
        label_strategy: ``given`` (labels shared with the update), ``idlg`` (recovered from the last layer, one
            image), ``batch`` (label counts recovered from the last layer, any B), ``dlg`` (soft labels optimised
            jointly with the images, one per image and restart); ``auto``: ``given`` when the update carries
            labels, else ``idlg`` for one image and ``batch`` for several.
        restart_selection: how the final images are chosen without ground truth: the restart with the lowest
            ``matching`` cost (without TV) or the lowest ``tv``; or the per-pixel ``mean``/``median`` over valid
            restarts. A restart whose score is NaN, or that never ran, never wins.
        client: the client's protocol (FedSGD gradient or FedAvg local steps), known to the server. ``None``:
            FedSGD in eval mode.
        pretrained: with a victim given by name, load its pretrained weights (torchvision models).
        victim_weights: a state-dict file (``.pt``, ``.safetensors`` or ``.npz``) loaded into the victim, given by
            name or as a module: the global weights the server sent.
        victim_checkpoint: a checkpoint written by ``train_victim.py``: the victim's architecture and weights come
            from it (``victim`` is then ignored), and its classes, image shape and normalisation must agree with
            the data's.
        seed: restart r starts from images drawn with seed ``seed + r``, as R separate runs with seeds seed,
            seed+1, … do (the trajectories then agree up to rounding; see the module docstring).
    """

    def __init__(
        self,
        victim: str | nn.Module = "ConvNet-16",
        num_classes: PositiveInt = 8,
        image_shape: tuple[int, int, int] = (3, 32, 32),
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
        num_images: PositiveInt = 1,
        restarts: PositiveInt = 1,
        cost: Cost = "sim",
        layers: LayerSelection = "all",
        layers_k: PositiveInt | None = None,
        layer_indices: list[int] | None = None,
        layer_weights: LayerWeighting = "equal",
        tv: NonNegativeFloat = 1e-2,
        signed: bool = True,
        boxed: bool = True,
        init: Init = "randn",
        optimizer: OptimizerFactory = torch.optim.Adam,
        lr: PositiveFloat = 0.1,
        lr_decay: bool = True,
        median_filter_every: NonNegativeInt = 0,
        label_strategy: LabelStrategy = "auto",
        restart_selection: RestartSelection = "matching",
        client: Client | None = None,
        pretrained: bool = False,
        victim_weights: str | None = None,
        victim_checkpoint: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check_whole("restarts", restarts, 1)
        _check_whole("num_images", num_images, 1)
        _check_whole("num_classes", num_classes, 1)
        _check_whole("median_filter_every", median_filter_every, 0)
        if layers_k is not None:
            _check_whole("layers_k", layers_k, 1)
        _check_number("lr", lr, positive=True)
        _check_number("tv", tv, positive=False)
        if len(image_shape) != 3 or not all(_whole(s) and s >= 1 for s in image_shape):
            raise InputError(f"image_shape must be three whole numbers >= 1 (C, H, W), got {image_shape}")
        if len(mean) != image_shape[0] or len(std) != image_shape[0]:
            raise InputError(f"mean {mean} and std {std} must have one value per channel of {image_shape}")
        if not all(math.isfinite(s) and s > 0 for s in std):
            raise InputError(f"std must be finite and > 0 in every channel, got {std}")
        # Plain Python values (not the parser's PositiveInt...): hyperparameters load with weights_only=True.
        num_classes, num_images, restarts = int(num_classes), int(num_images), int(restarts)
        layers_k = None if layers_k is None else int(layers_k)
        tv, lr, median_filter_every = float(tv), float(lr), int(median_filter_every)
        image_shape = tuple(int(s) for s in image_shape)
        if client is not None:
            client.split(num_images)
        ignore = ["client", "optimizer"] + ([] if isinstance(victim, str) else ["victim"])
        self.save_hyperparameters(ignore=ignore)
        if victim_checkpoint is not None:
            victim = self._victim_from_checkpoint(victim_checkpoint, num_classes, image_shape, mean, std)
        elif isinstance(victim, str):
            from .victims import build_victim

            try:
                victim = build_victim(
                    victim,
                    num_classes,
                    tuple(image_shape),
                    pretrained=pretrained,
                    weights_path=victim_weights,
                )
            except KeyError as error:  # an unknown name: the message lists the valid ones
                raise InputError(f"victim: {error.args[0]}") from None
            except RuntimeError as error:  # e.g. images too small for the victim's pooling layers
                reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
                raise InputError(
                    f"the victim {victim} cannot be built for images of shape {tuple(image_shape)} (image_size, "
                    f"image_shape): {reason}"
                ) from None
        elif victim_weights is not None:  # any nn.Module (a class path in YAML): the server's weights go in
            from .victims.weights import load_weights_into

            load_weights_into(victim, victim_weights)
        _check_victim(victim, num_classes, tuple(image_shape))
        self.victim = victim.requires_grad_(False)
        self.client = client or Client()
        self.num_classes = num_classes
        self.image_shape = tuple(image_shape)
        self.mean, self.std = tuple(mean), tuple(std)
        self.num_images, self.restarts = num_images, restarts
        self.cost, self.layers, self.layers_k, self.layer_indices = cost, layers, layers_k, layer_indices
        self.layer_weighting = layer_weights
        self.tv, self.signed, self.boxed, self.init = tv, signed, boxed, init
        self.optimizer_factory, self.lr, self.lr_decay = optimizer, lr, lr_decay
        self.median_filter_every = median_filter_every
        self.label_strategy, self.restart_selection, self.seed = label_strategy, restart_selection, seed

        images, soft_labels = [], []
        for r in range(restarts):
            gen = torch.Generator().manual_seed(seed + r)
            images.append(self._initial_images(gen))
            if label_strategy == "dlg":
                soft_labels.append(torch.randn(num_images, num_classes, generator=gen))
        self.dummy_images = nn.Parameter(torch.stack(images))  # (R, B, C, H, W)
        self.dummy_labels = nn.Parameter(torch.stack(soft_labels)) if label_strategy == "dlg" else None
        self.register_buffer("target_labels", torch.zeros(num_images, dtype=torch.long))
        self.register_buffer("restart_steps", torch.zeros(restarts, dtype=torch.long))
        self.update: Update | None = None
        self._local: Tensor = torch.arange(restarts)  # the restarts this process optimises
        self._world = 1  # processes sharing the restarts
        self.last_cost = torch.full((restarts,), math.nan)  # each restart's latest matching cost (no TV)
        self._reconstruction: Reconstruction | None = None
        self.analytic_features: Tensor | None = None  # the closed-form input of the first linear layer
        self.analytic_exact = False  # whether those are the images themselves
        self._started: float | None = None
        self._seconds = 0.0
        self._rng_to_restore: dict | None = None  # a checkpoint's RNG state, applied once on the right device

    # --- setting up ---------------------------------------------------------------------------------------
    @staticmethod
    def _victim_from_checkpoint(path: str, num_classes: int, image_shape, mean, std) -> nn.Module:
        from .victims import load_victim_checkpoint

        victim, meta = load_victim_checkpoint(path)
        expected = {
            "num_classes": num_classes,
            "image_shape": tuple(image_shape),
            "mean": tuple(mean),
            "std": tuple(std),
        }
        found = {k: tuple(meta[k]) if isinstance(meta[k], list | tuple) else meta[k] for k in expected}
        differ = [k for k in expected if not _same(found[k], expected[k])]
        if differ:
            details = ", ".join(f"{k}: checkpoint {found[k]} vs data {expected[k]}" for k in differ)
            raise TargetMismatchError(
                f"the victim checkpoint {path} was trained on other data than the attack's ({details}): choose "
                "the data the victim was trained on"
            )
        return victim

    def _initial_images(self, gen: torch.Generator) -> Tensor:
        shape = (self.num_images, *self.image_shape)
        if self.init == "randn":
            return torch.randn(shape, generator=gen)
        if self.init == "rand":
            return torch.rand(shape, generator=gen) * 2 - 1
        if self.init == "zeros":
            return torch.zeros(shape)
        return torch.randn(shape, generator=gen)  # "analytic" starts here and is replaced in set_target

    def _analytic_init(self, update: Update, overwrite_images: bool = True) -> None:
        from .analytic import recover_inputs

        layer, _ = self.analytic_layer
        features, is_mixture = recover_inputs(self.victim, update, layer)
        self.analytic_features = features
        self.analytic_exact = features.numel() == math.prod(self.image_shape) and not is_mixture
        if self.analytic_exact and overwrite_images:
            with torch.no_grad():
                self.dummy_images.copy_(features.view(self.image_shape).expand_as(self.dummy_images))
        elif not self.analytic_exact:
            log.warning(
                "closed-form recovery gives the %d inputs of layer %r%s, not the image: the images are optimised",
                features.numel(),
                layer,
                " (a mixture of the batch's inputs)" if is_mixture else "",
            )

    @property
    def analytic_layer(self) -> tuple[str, int]:
        """The first biased linear layer of the victim (its module name, and its weight's parameter index)."""
        from .analytic import find_linear_layers

        layers = find_linear_layers(self.victim)
        if not layers:
            raise ValueError("init 'analytic' needs a victim with a biased nn.Linear layer")
        name, weight_index, _ = layers[0]
        return name, weight_index

    def set_target(self, update: Update) -> None:
        """Set the update to invert; checks it against the victim and recovers labels if asked to."""
        params = list(self.victim.named_parameters())
        if len(update.tensors) != len(params):
            raise TargetMismatchError(
                f"the update has {len(update.tensors)} tensors but the victim has {len(params)} parameters"
            )
        for i, ((name, p), t) in enumerate(zip(params, update.tensors, strict=True)):
            if t.shape != p.shape:
                raise TargetMismatchError(
                    f"update tensor {i} ({name}) has shape {tuple(t.shape)}, the victim expects {tuple(p.shape)}"
                )
        if update.kind != self.client.kind:
            raise TargetMismatchError(
                f"the update is a {update.kind!r} but the client protocol {self.client.protocol!r} sends "
                f"{self.client.kind!r}: set the client's protocol/send options to match the update"
            )
        try:  # what the update records about its client (FedAvg settings, clients, mode) must be this client's
            self.client.matching(update, adopt=False)
        except InputError as error:
            raise TargetMismatchError(str(error)) from None
        if update.num_images is not None and update.num_images != self.num_images:
            raise TargetMismatchError(
                f"the update comes from {update.num_images} images but the attack reconstructs {self.num_images}"
            )
        self.client.split(self.num_images)
        problem = update_problem(update, self.victim)
        if problem is not None:
            raise TargetMismatchError(f"the update cannot be attacked: {problem}")
        if update.labels is not None and bool((update.labels >= self.num_classes).any()):
            raise TargetMismatchError(
                f"labels {update.labels.tolist()} are out of range for the victim's {self.num_classes} classes"
            )
        self.update = update
        if self.init == "analytic":
            try:
                self._analytic_init(update)
            except ValueError as error:
                raise InputError(f"init 'analytic': {error}") from None
        labels = self._labels_for(update)
        if labels is not None:
            self.target_labels.copy_(labels.to(self.target_labels.device))

    @property
    def labels_from(self) -> str:
        """The label strategy in use: ``label_strategy``, with ``auto`` resolved against the target update."""
        if self.label_strategy != "auto":
            return self.label_strategy
        if self.update is not None and self.update.labels is not None:
            return "given"
        return "idlg" if self.num_images == 1 else "batch"

    def _labels_for(self, update: Update) -> Tensor | None:
        strategy = self.labels_from
        if strategy == "dlg":
            return None
        if strategy == "given":
            if update.labels is None:
                raise TargetMismatchError(
                    "the labels are not known: pass them with the update, or choose label_strategy "
                    "'idlg' (one image), 'batch' or 'dlg'"
                )
            if update.labels.shape != (self.num_images,):
                raise TargetMismatchError(
                    f"labels of shape {tuple(update.labels.shape)}, expected ({self.num_images},)"
                )
            return update.labels.long()
        weight, bias = self._label_recovery_input(update)
        if strategy == "idlg":
            if self.num_images != 1:
                raise TargetMismatchError(
                    "iDLG recovers the label of one image; use label_strategy 'batch' for B > 1"
                )
            return torch.tensor([idlg_label(weight, update.kind)])
        return batch_label_counts(weight, bias, self.num_images, update.kind)

    def _label_recovery_input(self, update: Update) -> tuple[Tensor, Tensor | None]:
        try:
            return self._last_linear_gradients(update)
        except ValueError as error:
            raise InputError(f"label_strategy {self.label_strategy!r}: {error}") from None

    def _last_linear_gradients(self, update: Update) -> tuple[Tensor, Tensor | None]:
        """The last layer's weight (and bias) entries of the update, found as the last (K, D) tensor."""
        tensors = update.tensors
        if update.kind == "weights":
            tensors = [t - p.to(t) for t, p in zip(tensors, self.victim.parameters(), strict=True)]
        for i in range(len(tensors) - 1, -1, -1):
            t = tensors[i]
            if t.dim() == 2 and t.shape[0] == self.num_classes:
                has_bias = i + 1 < len(tensors) and tensors[i + 1].shape == (self.num_classes,)
                return t, tensors[i + 1] if has_bias else None
        raise ValueError(f"no {self.num_classes}-row linear layer found in the update for label recovery")

    def setup(self, stage: str) -> None:
        world, rank = 1, 0
        if self._trainer is not None:
            world, rank = self.trainer.world_size, self.trainer.global_rank
            check_precision(self.trainer.precision)
        self._local = torch.arange(self.restarts).tensor_split(world)[rank]
        self.__dict__.pop("_local_on_device", None)
        self._world = world

    def on_fit_start(self) -> None:
        # Checked here, not in setup: a checkpoint being resumed is restored after setup and brings the update.
        if self.update is None:
            raise RuntimeError(
                "no target update: call set_target(update) before fitting, or resume a checkpoint"
            )
        if (
            self._trainer is not None
            and self.trainer.max_steps == 0
            and not self.analytic_exact
            and int(self.restart_steps.max()) == 0
        ):
            raise InputError(
                "trainer max_steps 0 runs no optimisation step: the images would be the random initialisation. "
                "Give max_steps >= 1; 0 fits only init 'analytic' on a victim whose first linear layer reads the "
                "image (an MLP)"
            )
        if self._rng_to_restore is not None:
            self._restore_rng(self._rng_to_restore)
            self._rng_to_restore = None
        update = self.update.to(self.device)
        self.update = update
        # The objective holds the target's selection and norms, prepared once; kept out of the module tree so
        # that DDP never broadcasts the target gradient as a buffer.
        # On a GPU the cosine runs over one concatenated vector (fewer kernel launches); on a CPU per tensor, which
        # is faster there (BENCHMARKS.md, "Speed changes made").
        try:
            objective = GradientMatching(
                update.tensors,
                self.cost,
                self.layers,
                self.layers_k,
                self.layer_indices,
                self.layer_weighting,
                flat=self.device.type == "cuda",
            )
        except ValueError as error:  # a layer selection that does not fit this victim
            raise InputError(f"layers {self.layers!r}: {error}") from None
        self.__dict__["objective"] = objective.to(self.device)
        low, high = box_bounds(self.mean, self.std, self.dummy_images)
        self.__dict__["_box"] = (low, high)
        self.last_cost = self.last_cost.to(self.device)

    # --- the objective -------------------------------------------------------------------------------------
    def dummy_update(self, images: Tensor, labels: Tensor) -> list[Tensor]:
        """The client's update for each restart's dummy images, for the compared tensors only.

        Args:
            images: ``(r, B, C, H, W)`` dummy images.
            labels: ``(B,)`` hard labels, or ``(r, B, K)`` soft-label logits.

        Returns:
            one ``(r, *shape)`` tensor per compared victim parameter.
        """
        params = dict(self.victim.named_parameters())
        buffers = dict(self.victim.named_buffers())
        only = self.objective.indices
        soft = labels.dim() == 3
        train_mode = self.client.train_mode
        r = images.shape[0]

        def one(x: Tensor, y: Tensor, b: dict[str, Tensor]) -> tuple[Tensor, ...]:
            return tuple(self.client.simulate(self.victim, params, b, x, y, only=only))

        if r == 1:  # a single restart does not pay for batching
            b = {k: v.clone() for k, v in buffers.items()} if train_mode else buffers
            return [g.unsqueeze(0) for g in one(images[0], labels[0] if soft else labels, b)]
        if (
            train_mode
            and images.device.type == "cpu"
            and torch.is_autocast_enabled("cpu")
            and self._has_batchnorm
        ):
            # PyTorch's vmap rule for batch norm rejects bf16 inputs with fp32 weights on the CPU: there, and only
            # there, restarts run one after another. (In eval mode the client writes batch norm out as an affine
            # map, see client.EvalBatchNormAsAffine, and vmap takes it.)
            parts = [
                self.dummy_update(images[i : i + 1], labels[i : i + 1] if soft else labels) for i in range(r)
            ]
            return [torch.cat(tensors) for tensors in zip(*parts, strict=True)]
        if train_mode:  # BatchNorm updates its statistics in place: give each restart its own copy
            buffers = {k: v.expand(r, *v.shape).clone() for k, v in buffers.items()}
        in_dims = (0, 0 if soft else None, 0 if train_mode else None)
        return list(torch.func.vmap(one, in_dims=in_dims, randomness="different")(images, labels, buffers))

    @property
    def _has_batchnorm(self) -> bool:
        return _has_batchnorm(self.victim)

    def restart_costs(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Matching cost and total variation of each restart, both ``(r,)`` in fp32.

        Under mixed precision the victim's passes run in half precision; the dummy update is cast to fp32 and the
        objective runs outside autocast, so the cosine is never rounded in half precision.
        """
        dummy = self.dummy_update(images, labels)  # the objective casts to fp32 what is not
        with torch.autocast(self.device.type, enabled=False):
            return self.objective(dummy), total_variation(images.float())

    def _labels(self, idx: Tensor) -> Tensor:
        return self.target_labels if self.dummy_labels is None else self.dummy_labels[idx]

    def _local_index(self) -> Tensor:
        """This process's restarts as an index on the module's device, copied there once (a copy syncs)."""
        idx = self.__dict__.get("_local_on_device")
        if idx is None or idx.device != self.device or len(idx) != len(self._local):
            idx = self.__dict__["_local_on_device"] = self._local.to(self.device)
        return idx

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        idx = self._local_index()
        if len(idx) == 0:  # more processes than restarts: this one only joins the all-reduce
            return self.dummy_images.sum() * 0
        everything = len(idx) == self.restarts
        images = self.dummy_images if everything else self.dummy_images[idx]
        cost, tv = self.restart_costs(images, self._labels(idx))
        loss = cost + self.tv * tv  # (r,)
        with torch.no_grad():
            self.last_cost[idx] = cost.detach()
        if self._logs_this_step():
            # This process's restarts only: a sync over ranks every step would cost more than the numbers are worth.
            best = cost.detach().min()
            self.log("train/matching_cost", best, prog_bar=True)
            if self.cost == "sim":  # the global cosine between the dummy and the target update
                self.log("train/gradient_cosine", 1 - best)
            self.log("train/loss", loss.detach().mean())
            self.log("train/tv", tv.detach().mean())
        # DDP averages gradients over processes: each slice comes from one process, so scale by the world size.
        return loss.sum() * self._world

    def _logs_this_step(self) -> bool:
        """Whether the Trainer writes this step's scalars: every ``log_every_n_steps`` steps and the last one.

        ``self.log`` costs about a millisecond a call, as much as a whole step of a small victim, and the
        loggers write only on those steps anyway (the progress bar keeps the latest value).
        """
        if self._trainer is None:
            return True
        step = self.trainer.global_step + 1  # the step this training_step is about to complete
        last = self.trainer.max_steps is not None and step >= self.trainer.max_steps > 0
        return last or step % max(self.trainer.log_every_n_steps, 1) == 0

    def _optimized(self) -> list[Tensor]:
        return [self.dummy_images] + ([self.dummy_labels] if self.dummy_labels is not None else [])

    def backward(self, loss: Tensor, *args, **kwargs) -> None:
        loss.backward(inputs=self._optimized())  # the victim never accumulates .grad

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        if self.signed:
            for p in self._optimized():
                if p.grad is not None:
                    p.grad.sign_()

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        with torch.no_grad():
            # Counted here, not in training_step: L-BFGS evaluates the closure up to max_iter times a step. Every
            # restart takes part in every step (on some process), so all counters advance together.
            self.restart_steps += 1
            if self.median_filter_every and (self.global_step + 1) % self.median_filter_every == 0:
                self.dummy_images.copy_(median_filter3x3(self.dummy_images))
            if self.boxed:
                self.dummy_images.copy_(project_box(self.dummy_images, *self._box))

    def configure_optimizers(self):
        optimizer = self.optimizer_factory(self._optimized(), self.lr)
        if self.signed and isinstance(optimizer, torch.optim.LBFGS):
            log.warning("signed gradients with L-BFGS break its line search; consider signed=False")
        if not self.lr_decay:
            return optimizer
        max_steps = self.trainer.max_steps
        if max_steps is None or max_steps < 0:
            raise ValueError(
                "set trainer.max_steps: the learning-rate decay is placed at 3/8, 5/8, 7/8 of it"
            )
        # On resume, the checkpoint's scheduler state (its milestones included) replaces these milestones.
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, decay_milestones(max_steps), gamma=0.1)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"},
        }

    def train_dataloader(self) -> DataLoader:
        steps = self.trainer.max_steps if self.trainer.max_steps and self.trainer.max_steps > 0 else 1
        # Under DDP a DistributedSampler deals the ticks out over the processes: give each one epoch of max_steps.
        return DataLoader(_StepTicks(steps * self._world), batch_size=None, num_workers=0)

    def train(self, mode: bool = True) -> GradientInversion:
        super().train(mode)
        self.victim.train(self.client.train_mode)  # the client's mode, whatever the Trainer asks
        return self

    # --- checkpoints ---------------------------------------------------------------------------------------
    # Everything saved here is tensors and plain Python values: checkpoints load with ``weights_only=True``.
    def run_identity(self) -> dict:
        """What, besides the hyper-parameters and the target update, makes two runs the same attack.

        The digest of the victim's weights, the client's protocol and the optimiser; saved in every checkpoint
        (``attack_identity``) so that a resumed run can check that it continues the same attack.
        """
        if "_identity" not in self.__dict__:
            from .checkpoints import digest

            self.__dict__["_identity"] = {
                "victim": digest(dict(self.victim.state_dict())),
                "client": {k: v for k, v in sorted(vars(self.client).items()) if _plain(v)},
                "optimizer": _describe(self.optimizer_factory),
            }
        return self.__dict__["_identity"]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.update is not None:
            checkpoint["target_update"] = self.update.state_dict()
        checkpoint["attack_identity"] = self.run_identity()
        checkpoint["attack_seconds"] = self._elapsed()
        if self._trainer is not None:
            checkpoint["attack_max_steps"] = int(self.trainer.max_steps)
        rng = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        checkpoint["attack_rng"] = rng

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "target_update" in checkpoint:
            self.update = Update.from_state_dict(checkpoint["target_update"])
            if self.init == "analytic" and self.analytic_features is None:  # not saved; the images are
                self._analytic_init(self.update, overwrite_images=False)
        self._seconds = float(checkpoint.get("attack_seconds", 0.0))
        if self._trainer is None:  # loading weights (load_from_checkpoint), not resuming a run
            return
        self._rng_to_restore = checkpoint.get("attack_rng")
        planned = checkpoint.get("attack_max_steps")
        if self.lr_decay and planned is not None and planned != self.trainer.max_steps:
            rank_zero_warn(
                f"resuming a run planned for {planned} steps with max_steps={self.trainer.max_steps}: the "
                f"learning-rate milestones stay those of {planned} steps ({decay_milestones(planned)})"
            )

    def _restore_rng(self, state: dict) -> None:
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], self.device)

    # --- the end: scoring restarts without ground truth ----------------------------------------------------
    def on_train_start(self) -> None:
        self._started = time.perf_counter()

    def _elapsed(self) -> float:
        return self._seconds + (time.perf_counter() - self._started if self._started is not None else 0.0)

    def on_train_end(self) -> None:
        self._seconds = self._elapsed()
        self._started = None
        self.reconstruction = self.reconstruct_result(sync=True)

    @property
    def reconstruction(self) -> Reconstruction | None:
        """The result of the last ``fit`` (``None`` before one ran a step).

        Under ``ddp_spawn`` the run happens in worker processes and only the module's state comes back to the
        caller, so the result is rebuilt from the returned dummy images on first access.
        """
        if self._reconstruction is None and self._came_back_from_workers():
            self._reconstruction = self.reconstruct_result()
        return self._reconstruction

    @reconstruction.setter
    def reconstruction(self, value: Reconstruction | None) -> None:
        self._reconstruction = value

    def _came_back_from_workers(self) -> bool:
        # The caller's copy of a spawned run has run steps but no trainer (or a finished one), and no result.
        if self.update is None or (self._trainer is not None and not self.trainer.state.finished):
            return False
        return bool(self.restart_steps.max() > 0)

    @torch.no_grad()
    def restart_scores(self, sync: bool = False) -> Tensor:
        """Each restart's score for selection (lower is better), ``(R,)``; NaN or never-run restarts get +inf."""
        scores = torch.zeros(self.restarts, device=self.dummy_images.device)
        idx = self._local.to(scores.device)
        if len(idx):
            images = self.dummy_images[idx]
            if self.restart_selection == "tv":
                scores[idx] = total_variation(images.float())
            else:
                with torch.enable_grad():
                    cost, _ = self.restart_costs(images, self._labels(idx))
                scores[idx] = cost.detach()
        if sync and self._trainer is not None and self.trainer.world_size > 1:
            scores = self.trainer.strategy.reduce(scores, reduce_op="sum")
        ran = (self.restart_steps > 0) | self.analytic_exact  # a closed-form result needs no step
        return torch.where(torch.isfinite(scores) & ran, scores, torch.full_like(scores, math.inf))

    def reconstruct_result(self, sync: bool = False) -> Reconstruction:
        """Score the restarts and build the :class:`Reconstruction` (images de-normalised to [0, 1])."""
        if "objective" not in self.__dict__:
            self.on_fit_start()
        scores = self.restart_scores(sync)
        steps = self.restart_steps
        restarts = denormalize(self.dummy_images.detach().float(), self.mean, self.std).clamp(0, 1)
        valid = torch.isfinite(scores)
        chosen: int | None = None
        if not valid.any():
            log.error("no restart has a finite score (all NaN or never run): no reconstruction is chosen")
            images = torch.full_like(restarts[0], math.nan)
        elif self.restart_selection in ("mean", "median"):
            kept = restarts[valid]
            images = kept.mean(0) if self.restart_selection == "mean" else kept.median(0).values
        else:
            chosen = int(scores.argmin())
            images = restarts[chosen]
        if self.dummy_labels is not None:
            pick = chosen if chosen is not None else 0
            labels = self.dummy_labels[pick].detach().argmax(-1)
        else:
            labels = self.target_labels.clone()
        stats = {
            "scores": [float(s) for s in scores.cpu()],
            "chosen_restart": chosen,
            "restart_selection": self.restart_selection,
            "labels_from": self.labels_from,
            "restart_steps": [int(s) for s in steps.cpu()],
            "steps": int(steps.max()) if len(steps) else 0,
            "seconds": round(self._seconds, 3),
        }
        return Reconstruction(images.cpu(), labels.cpu(), restarts.cpu(), stats)


def _plain(value) -> bool:
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, bool | int | float | str)


def _describe(factory) -> str:
    """A stable description of an optimiser factory: its qualified name and any bound arguments."""
    import functools

    if isinstance(factory, functools.partial):
        bound = [_describe(a) if callable(a) else repr(a) for a in factory.args]
        bound += [f"{k}={v!r}" for k, v in sorted(factory.keywords.items())]
        return f"{_describe(factory.func)}({', '.join(bound)})"
    target = factory if callable(factory) and hasattr(factory, "__qualname__") else type(factory)
    return f"{getattr(target, '__module__', '')}.{target.__qualname__}"


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_whole(name: str, value, low: int) -> None:
    if not _whole(value) or value < low:
        raise InputError(f"{name} must be a whole number >= {low}, got {value!r}")


def _check_number(name: str, value, positive: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise InputError(f"{name} must be a finite number {'>' if positive else '>='} 0, got {value!r}")


def _check_victim(victim: nn.Module, num_classes: int, image_shape: tuple[int, int, int]) -> None:
    """Refuse a victim without parameters, or one that cannot classify images of ``image_shape`` into
    ``num_classes`` classes, before anything is computed with it (one forward pass of a zero image)."""
    params = list(victim.parameters())
    if not params:
        raise InputError(
            f"the victim {type(victim).__name__} has no parameters: there is no update to invert"
        )
    modes = [(m, m.training) for m in victim.modules()]
    victim.eval()  # batch norm in training mode refuses a batch of one
    try:
        with torch.no_grad():
            logits = victim(torch.zeros(1, *image_shape, device=params[0].device, dtype=params[0].dtype))
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(
            f"the victim {type(victim).__name__} cannot take images of shape {image_shape} (image_size, "
            f"image_shape): {reason}"
        ) from None
    finally:
        for m, mode in modes:
            m.training = mode
    if not isinstance(logits, Tensor) or logits.dim() != 2 or logits.shape[-1] != num_classes:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise InputError(
            f"the victim {type(victim).__name__} gives outputs of shape {shape} for one image, not (1, "
            f"{num_classes}) logits for num_classes={num_classes}"
        )


def _same(a, b) -> bool:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(math.isclose(x, y, rel_tol=1e-6) for x, y in zip(a, b, strict=True))
    return a == b


def check_precision(precision: str) -> None:
    """Refuse a Trainer precision that holds the attack itself in half precision.

    Raises:
        InputError: for ``bf16-true`` and ``16-true``.
    """
    if str(precision) in TRUE_HALF_PRECISIONS:
        raise InputError(
            f"precision {precision!r} holds the dummy images and the matching objective in half precision: the "
            "cosine loss rounds to zero and the images stop improving. Use 'bf16-mixed' or '16-mixed' (the "
            "victim's passes in half precision, the images and the objective in fp32) or '32-true'."
        )


def dummy_images_as_pixels(module: GradientInversion, idx: Sequence[int] | None = None) -> Tensor:
    """The current dummy images de-normalised and clamped to [0, 1], ``(R, B, C, H, W)`` (or selected restarts)."""
    images = module.dummy_images.detach().float()
    if idx is not None:
        images = images[list(idx)]
    return denormalize(images, module.mean, module.std).clamp(0, 1)
