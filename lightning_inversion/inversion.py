"""The attack without Lightning: dummy images for T targets × R restarts, the target updates, and the parts.

:class:`Inversion` is a plain ``nn.Module`` that holds the attack's state and computes what a step and the end of
a run need: it sets and checks the target updates (:mod:`.targets`, :mod:`.labels`), binds the objective and the
priors to them, runs the client's pass on the dummy images (:mod:`.client`), gives each slot's matching cost and
priors (:mod:`.restarts`), scores the restarts and builds the results. A plain loop can optimise it::

    inversion.set_target(update)
    inversion.prepare()
    optimizer = torch.optim.Adam([inversion.dummy_images], lr=0.1)
    cost, prior = inversion.restart_costs(inversion.dummy_images, inversion.target_labels)

:class:`~lightning_inversion.attack.GradientInversion` is this module with a Trainer's step, sign, box, devices and
checkpoints. The rest of this file is what a run carries beside the dummy images and what a checkpoint keeps of it:
the ticks that drive a Trainer (:class:`StepTicks`), what identifies a run (:func:`run_identity`), the target
updates (:func:`saved_targets`), the wall time (:class:`Stopwatch`) and the RNG state (:func:`rng_state`), all
tensors and plain Python values so that checkpoints load with ``weights_only=True``. Nothing here imports Lightning.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import Dataset

from . import restarts as bank
from .analytic import analytic_start
from .checkpoints import digest
from .client import Client, Update
from .errors import InputError
from .images import box_bounds
from .labels import LabelStrategy
from .objectives import MatchingObjective, TargetStack, decay_milestones
from .parts import describe, describe_factory
from .priors import ImagePrior, prepare_priors
from .restarts import Reconstruction, RestartSelection
from .targets import check_targets
from .threat_model import target_threat_model


class Inversion(nn.Module):
    """The attack's state and math: T targets × R restarts of dummy images, the target updates and the parts.

    Slots are ``(target, restart)`` pairs, target-major (slot ``t·R + r``); with one target, slot r is restart r.

    Layout of the state:
        dummy_images  (T·R, B, C, H, W)  nn.Parameter, normalised input space of the victim
        dummy_labels  (T·R, B, K)        nn.Parameter, DLG soft-label logits (:class:`~.labels.SoftLabels` only)
        target_labels (B,) or (T, B)     buffer, the labels the attacker knows or recovered
        restart_steps (T·R,)             buffer, optimisation steps each slot ran (a slot with 0 never wins)

    Args:
        victim: the victim, built and checked (:func:`~.targets.attack_victim`), its parameters frozen.
        client: the client's protocol.
        objective: the gradient-matching objective.
        priors: the image priors, with their weights.
        label_strategy: how the labels are known, recovered or optimised.
        restart_selection: how the result is chosen from the restarts.
        num_classes: K, the victim's classes.
        image_shape: ``(C, H, W)`` of the victim's input.
        mean: per-channel normalisation mean of the victim's input.
        std: per-channel normalisation std.
        num_images: B, the images in the client's batch.
        restarts: R, the restarts of each target.
        targets: T, the target updates.
        seed: slot s starts from images drawn with seed ``seed + s`` (:func:`~.restarts.initial_restarts`).
        init: how the dummy images start (``randn``, ``rand``, ``zeros`` or ``analytic``).
    """

    def __init__(
        self,
        victim: nn.Module,
        client: Client,
        objective: MatchingObjective,
        priors: list[ImagePrior],
        label_strategy: LabelStrategy,
        restart_selection: RestartSelection,
        num_classes: int,
        image_shape: tuple[int, int, int],
        mean: tuple[float, ...],
        std: tuple[float, ...],
        num_images: int = 1,
        restarts: int = 1,
        targets: int = 1,
        seed: int = 0,
        init: bank.Init = "randn",
    ) -> None:
        super().__init__()
        if targets > 1 and init == "analytic":
            raise InputError("init 'analytic' recovers one target's images: use targets 1")
        self.victim, self.client, self.objective, self.priors = victim, client, objective, priors
        self.label_strategy, self.restart_selection = label_strategy, restart_selection
        self.num_classes, self.image_shape, self.mean, self.std = (
            num_classes,
            image_shape,
            tuple(mean),
            tuple(std),
        )
        self.num_images, self.restarts, self.targets, self.seed, self.init = (
            num_images,
            restarts,
            targets,
            seed,
            init,
        )
        slots = targets * restarts
        soft = (num_images, num_classes) if label_strategy.soft else None
        images, soft_labels = bank.initial_restarts(slots, seed, init, (num_images, *image_shape), soft)
        self.dummy_images = nn.Parameter(images)  # (T·R, B, C, H, W): see images_by_target
        self.dummy_labels = nn.Parameter(soft_labels) if soft_labels is not None else None
        labels_shape = (num_images,) if targets == 1 else (targets, num_images)
        self.register_buffer("target_labels", torch.zeros(labels_shape, dtype=torch.long))  # (B,) or (T, B)
        self.register_buffer("restart_steps", torch.zeros(slots, dtype=torch.long))
        self.update: Update | None = None  # the first target's update
        self.updates: list[Update] = []  # every target's update
        self.matching = None  # the objective bound to the first target's update, by prepare()
        self.matchings: list = []  # the objective bound to each target's update
        self.stack: TargetStack | None = None  # all of them at once, with several targets
        self.last_cost = torch.full((slots,), math.nan)  # each slot's latest matching cost (no priors)
        self.analytic_features: Tensor | None = None  # the closed-form input of the first linear layer
        self.analytic_exact = False  # whether those are the images themselves
        self._local = torch.arange(slots)  # the slots this process optimises (all, unless set otherwise)
        self._box: tuple[Tensor, Tensor] | None = None  # the pixel range [0, 1] in normalised space
        self._reconstructions: list[Reconstruction] | None = None
        self._clock = Stopwatch()  # the attack's wall time, over resumed runs

    # --- the targets --------------------------------------------------------------------------------------
    def set_target(self, update: Update) -> None:
        """Set the update to invert; checks it against the victim and recovers labels if asked to."""
        self.set_targets([update])

    def set_targets(self, updates: list[Update]) -> None:
        """Set the T updates to invert (one per target), each checked and its labels recovered if asked to."""
        given = self.victim, self.client, self.label_strategy, self.num_images, self.num_classes
        found = check_targets(updates, self.targets, *given)
        for row, labels in zip(self.target_labels.view(self.targets, -1), found, strict=True):
            if labels is not None:
                row.copy_(labels.to(row.device))
        self.update, self.updates = updates[0], list(updates)
        if self.init == "analytic":
            self._analytic_init(updates[0])

    def _analytic_init(self, update: Update, overwrite_images: bool = True) -> None:
        try:
            self.analytic_features, self.analytic_exact = analytic_start(
                self.victim, update, self.image_shape
            )
        except ValueError as error:
            raise InputError(f"init 'analytic': {error}") from None
        if self.analytic_exact and overwrite_images:
            with torch.no_grad():
                start = self.analytic_features.view(self.image_shape).expand_as(self.dummy_images)
                self.dummy_images.copy_(start)

    @property
    def images_by_target(self) -> Tensor:
        """The dummy images as ``(T, R, B, C, H, W)`` (a view of the parameter)."""
        return self.dummy_images.view(self.targets, self.restarts, *self.dummy_images.shape[1:])

    @property
    def labels_from(self) -> str:
        """The label strategy in use, with ``auto`` resolved against the target update."""
        return self.label_strategy.resolve(self.update, self.num_images).name

    def prepare(self) -> None:
        """Bind the objective and the priors to the target updates on the images' device (before a step).

        Raises:
            RuntimeError: no target update is set.
            InputError: a layer selection that does not fit the victim.
        """
        if self.update is None:
            raise RuntimeError(
                "no target update: call set_target(update) before fitting, or resume a checkpoint"
            )
        device = self.dummy_images.device
        self.updates = [u.to(device) for u in (self.updates or [self.update])]
        self.update = self.updates[0]
        # On a GPU the cosine runs over one concatenated vector (fewer kernel launches); on a CPU per tensor, which
        # is faster there (BENCHMARKS.md).
        flat = device.type == "cuda"
        self.matchings = self.objective.bind_targets([u.tensors for u in self.updates], flat=flat)
        self.matching = self.matchings[0]
        self.stack = TargetStack(self.matchings) if self.targets > 1 else None
        prepare_priors(self.priors, self.victim, self.update, self.targets)
        self._box = box_bounds(self.mean, self.std, self.dummy_images)
        self.last_cost = self.last_cost.to(device)

    # --- the objective -------------------------------------------------------------------------------------
    def client_pass(self, images: Tensor, labels: Tensor) -> tuple[list[Tensor], dict]:
        """The client's update for each restart's dummy images (compared tensors only), and what its first forward
        pass saw for the priors (only what they need; nothing otherwise).

        Args:
            images: ``(r, B, C, H, W)`` dummy images.
            labels: ``(B,)`` hard labels, or ``(r, B, K)`` soft-label logits.

        Returns:
            one ``(r, *shape)`` tensor per compared victim parameter; ``seen`` with the leading ``r`` axis.
        """
        needs = sorted(set().union(*(p.needs for p in self.priors)))
        return bank.batched_client_pass(
            self.client, self.victim, images, labels, self.matching.indices, needs
        )

    def dummy_update(self, images: Tensor, labels: Tensor) -> list[Tensor]:
        """The client's update for each restart's dummy images, for the compared tensors only."""
        return self.client_pass(images, labels)[0]

    def restart_costs(
        self, images: Tensor, labels: Tensor, slots: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Matching cost and the weighted sum of the priors of each restart, both ``(r,)`` in fp32.

        ``slots``: the (target, restart) slots of ``images`` (on the CPU, ascending; all when ``None``), which say
        the target each is matched with (:func:`~.restarts.slot_costs`). Under mixed precision the victim's passes
        run in half precision; the dummy update is cast to fp32 and the objective runs outside autocast, so the
        cosine is never rounded in half precision.
        """
        dummy, seen = self.client_pass(images, labels)  # the objective casts to fp32 what is not
        matchings = self.stack if self.targets > 1 else [self.matching]
        with torch.autocast(self.dummy_images.device.type, enabled=False):
            return bank.slot_costs(matchings, self.priors, self.restarts, dummy, images, seen, slots)

    def _labels(self, idx: Tensor) -> Tensor:
        """The labels of some slots: ``(B,)`` shared, ``(r, B)`` per target, or ``(r, B, K)`` soft logits."""
        return bank.slot_labels(idx, self.target_labels, self.dummy_labels, self.restarts)

    def _optimized(self) -> list[Tensor]:
        """What the optimiser moves: the dummy images (and soft labels), never the victim."""
        return [self.dummy_images] + ([self.dummy_labels] if self.dummy_labels is not None else [])

    def train(self, mode: bool = True) -> Inversion:
        super().train(mode)
        self.victim.train(self.client.train_mode)  # the client's mode, whatever the caller asks
        return self

    # --- a run's state beside the tensors: tensors and plain Python values only (``weights_only=True``) -----
    def run_state(self, identity: dict, max_steps: int | None = None) -> dict:
        """What a checkpoint keeps beside the module's tensors: the target updates (:func:`saved_targets`), what
        identifies the run (``attack_identity``), its wall time so far (``attack_seconds``), the steps it was
        planned for (``attack_max_steps``) and the torch RNG state (``attack_rng``)."""
        state = saved_targets(self.update, self.updates, self.targets)
        state["attack_identity"] = identity
        state["attack_seconds"] = self._clock.elapsed()
        if max_steps is not None:
            state["attack_max_steps"] = int(max_steps)
        state["attack_rng"] = rng_state(self.dummy_images.device)
        return state

    def restore_run_state(self, checkpoint: dict) -> None:
        """Take back the target updates and the wall time of :meth:`run_state` (the RNG state is the caller's)."""
        if updates := loaded_targets(checkpoint):
            self.update, self.updates = updates[0], updates
            if self.init == "analytic" and self.analytic_features is None:  # not saved; the images are
                self._analytic_init(self.update, overwrite_images=False)
        self._clock.seconds = float(checkpoint.get("attack_seconds", 0.0))

    # --- the end: scoring restarts without ground truth ----------------------------------------------------
    def _sum_over_processes(self, scores: Tensor) -> Tensor:
        """Scores of this process's slots (zeros elsewhere) summed over the processes: one process here."""
        return scores

    def _running(self) -> bool:
        """Whether an optimisation is under way in this process (the results are built when it ends)."""
        return False

    @torch.no_grad()
    def restart_scores(self, sync: bool = False) -> Tensor:
        """Each restart's score for selection (lower is better), ``(R,)``; NaN or never-run restarts get +inf."""
        if self.matching is None:
            self.prepare()
        local = self._local.to(self.dummy_images.device)
        labels = self._labels(local)

        def matching(images: Tensor) -> Tensor:
            return self.restart_costs(images, labels, self._local)[0]

        scores = bank.restart_scores(self.restart_selection, self.dummy_images, local, matching)
        if sync:
            scores = self._sum_over_processes(scores)
        return bank.valid_scores(scores, self.restart_steps, self.analytic_exact)

    def reconstruct_results(self, sync: bool = False) -> list[Reconstruction]:
        """Score the restarts and build one :class:`Reconstruction` per target (images de-normalised to [0, 1]);
        each target's restarts are chosen among themselves (:func:`~.restarts.target_reconstructions`)."""
        scores, pixels = self.restart_scores(sync), dummy_images_as_pixels(self)
        labels = self.dummy_labels.detach() if self.dummy_labels is not None else self.target_labels
        updates = self.updates or [self.update] * self.targets
        labels_from = [self.label_strategy.resolve(u, self.num_images).name for u in updates]
        threat_models = [self.threat_model(u) for u in updates]
        return bank.target_reconstructions(
            self.restart_selection,
            pixels,
            scores,
            self.restart_steps,
            labels,
            labels_from,
            self._clock.seconds,
            threat_models,
        )

    def reconstruct_result(self, sync: bool = False) -> Reconstruction:
        """The first (with ``targets`` 1, the only) target's :class:`Reconstruction`."""
        return self.reconstruct_results(sync)[0]

    def finish(self, sync: bool = False) -> None:
        """Stop the clock and keep the results of the restarts as they are (:attr:`reconstructions`)."""
        self._clock.stop()
        self.reconstructions = self.reconstruct_results(sync)

    @property
    def reconstructions(self) -> list[Reconstruction] | None:
        """The results of the last optimisation, one per target (``None`` before one ran a step).

        Under ``ddp_spawn`` the run happens in worker processes and only the module's state comes back to the
        caller, so the results are rebuilt from the returned dummy images on first access.
        """
        steps_ran = self.update is not None and not self._running() and bool(self.restart_steps.max() > 0)
        if self._reconstructions is None and steps_ran:
            self._reconstructions = self.reconstruct_results()
        return self._reconstructions

    @reconstructions.setter
    def reconstructions(self, value: list[Reconstruction] | None) -> None:
        self._reconstructions = value

    @property
    def reconstruction(self) -> Reconstruction | None:
        """The result of the last optimisation for the first (with ``targets`` 1, the only) target."""
        return None if self.reconstructions is None else self.reconstructions[0]

    @reconstruction.setter
    def reconstruction(self, value: Reconstruction) -> None:
        self._reconstructions = [value]

    def threat_model(self, update: Update | None = None) -> dict:
        """What this attack assumes of one target (the first by default): labels, BatchNorm statistics, images
        known, the client's mode (:func:`~lightning_inversion.threat_model.threat_model`)."""
        update = update if update is not None else self.update
        return target_threat_model(
            self.label_strategy, update, self.priors, self.num_images, self.client.train_mode
        )


def dummy_images_as_pixels(module: Inversion, idx: Sequence[int] | None = None) -> Tensor:
    """The current dummy images de-normalised and clamped to [0, 1], ``(R, B, C, H, W)`` (or selected restarts)."""
    images = module.dummy_images if idx is None else module.dummy_images[list(idx)]
    return bank.as_pixels(images, module.mean, module.std)


class StepTicks(Dataset):
    """The attack has no data to iterate over: one dummy item per optimisation step drives the Trainer.

    Args:
        max_steps: the Trainer's (at least one tick).
        processes: under DDP a DistributedSampler deals the ticks out over the processes: each gets ``max_steps``.
    """

    def __init__(self, max_steps: int | None, processes: int = 1) -> None:
        self.steps = (max_steps if max_steps and max_steps > 0 else 1) * processes

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> Tensor:
        return torch.zeros(())


def logs_this_step(trainer) -> bool:
    """Whether a Trainer writes the scalars of the step it is in: every ``log_every_n_steps`` steps and the last.

    ``self.log`` costs about a millisecond a call, as much as a whole step of a small victim, and the loggers
    write only on those steps anyway (the progress bar keeps the latest value).

    Args:
        trainer: anything with the Trainer's ``global_step`` (the steps completed), ``max_steps`` and
            ``log_every_n_steps``.
    """
    step = trainer.global_step + 1  # the step under way
    last = trainer.max_steps is not None and step >= trainer.max_steps > 0
    return last or step % max(trainer.log_every_n_steps, 1) == 0


def decay_schedule(optimizer: Optimizer, max_steps: int | None) -> dict:
    """The optimiser with its learning rate ×0.1 at 3/8, 5/8 and 7/8 of ``max_steps``, as Lightning takes it.

    Raises:
        ValueError: no ``max_steps``.
    """
    if max_steps is None or max_steps < 0:
        raise ValueError("set trainer.max_steps: the learning-rate decay is placed at 3/8, 5/8, 7/8 of it")
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, decay_milestones(max_steps), gamma=0.1)
    return {
        "optimizer": optimizer,
        "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"},
    }


def resume_remark(planned: int | None, max_steps: int | None) -> str | None:
    """What a resumed run planned for ``planned`` steps and continued with another ``max_steps`` should know: its
    learning-rate milestones stay those of the plan (``None`` when there is nothing to say)."""
    if planned is None or planned == max_steps:
        return None
    return (
        f"resuming a run planned for {planned} steps with max_steps={max_steps}: the learning-rate milestones "
        f"stay those of {planned} steps ({decay_milestones(planned)})"
    )


def check_steps(max_steps: int | None, exact: bool, steps_run: int) -> None:
    """Refuse a run of 0 steps that would return the random initialisation (not a closed-form recovery, not a
    resumed run that already ran steps).

    Raises:
        InputError: ``max_steps`` 0 without a reason.
    """
    if max_steps == 0 and not exact and steps_run == 0:
        raise InputError(
            "trainer max_steps 0 runs no optimisation step: the images would be the random initialisation. "
            "Give max_steps >= 1; 0 fits only init 'analytic' on a victim whose first linear layer reads the "
            "image (an MLP)"
        )


def run_identity(inversion: Inversion, optimizer) -> dict:
    """What, besides the hyper-parameters and the target update, makes two runs the same attack.

    The digest of the victim's weights, the client's protocol, the optimiser factory and the parts (objective,
    priors, label strategy, restart selection), as plain values.
    """
    return {
        "victim": digest(dict(inversion.victim.state_dict())),
        "client": describe(inversion.client)["init_args"],
        "optimizer": describe_factory(optimizer),
        "parts": {
            "objective": describe(inversion.objective),
            "priors": [describe(p) for p in inversion.priors],
            "label_strategy": describe(inversion.label_strategy),
            "restart_selection": describe(inversion.restart_selection),
        },
    }


def saved_targets(update: Update | None, updates: list[Update], targets: int) -> dict:
    """The checkpoint entries of the target updates: ``target_update`` (the first) and, with several targets,
    ``target_updates`` (all of them)."""
    saved = {}
    if update is not None:
        saved["target_update"] = update.state_dict()
    if targets > 1 and updates:
        saved["target_updates"] = [u.state_dict() for u in updates]
    return saved


def loaded_targets(checkpoint: dict) -> list[Update]:
    """The target updates a checkpoint holds (:func:`saved_targets`), the first first; none if it holds none."""
    if "target_update" not in checkpoint:
        return []
    stored = checkpoint.get("target_updates") or [checkpoint["target_update"]]
    return [Update.from_state_dict(u) for u in stored]


def rng_state(device: torch.device) -> dict:
    """The torch RNG state: the CPU's, and the device's on a GPU."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    """Set the torch RNG state saved by :func:`rng_state` (the GPU's only on a GPU)."""
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


class Stopwatch:
    """The attack's wall time over interrupted runs: the seconds of earlier runs plus the running one's."""

    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds, self.started = float(seconds), None

    def start(self) -> None:
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return self.seconds + (time.perf_counter() - self.started if self.started is not None else 0.0)

    def stop(self) -> None:
        self.seconds, self.started = self.elapsed(), None
