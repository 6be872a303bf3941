"""The base DataModule: one dataset, its normalisation, and the private images an attack targets."""

from __future__ import annotations

from collections.abc import Callable

import pytorch_lightning as pl
import torch
from jsonargparse.typing import NonNegativeInt, PositiveInt
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..errors import InputError


class MissingDataError(RuntimeError):
    """Data or weights that are not on this machine and cannot be fetched; the message says how to provide them."""


def check_whole(name: str, value, low: int) -> None:
    """Refuse ``value`` unless it is a whole number >= ``low`` (the parser's types say the same)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InputError(f"{name} must be a whole number >= {low}, got {value!r}")


class VisionData(pl.LightningDataModule):
    """A classification dataset with what the victim and the attack need to know about it.

    Subclasses set ``mean``, ``std``, ``num_classes`` and ``image_shape`` (``(C, H, W)``) and implement
    :meth:`train_set` and :meth:`target_set` (datasets yielding ``(normalised image, label)``), usually through
    :meth:`_cached` so each split is opened once per DataModule.

    Args:
        root: where the dataset lives or is downloaded to.
        batch_size: batch size for training a victim.
        num_workers: data-loader worker processes.
        target_indices: the attack targets, as indices into the target split (validation/test). Overrides
            ``num_images`` and ``start_index``.
        num_images: the number of attack targets B (one client batch); ``None``: the dataset's default (one
            image; every image of an :class:`~lightning_inversion.data.ImageFolderData`).
        start_index: the first target index when ``target_indices`` is not given.
        distinct_labels: pick ``num_images`` targets with pairwise different labels, scanning from
            ``start_index``.
        images_per_client: deal the chosen images out to clients of this many images each, in order: each client
            computes its own update and is attacked as its own target (1: every image on its own, the paper's
            evaluation). ``None``: one client holds them all (``evaluate.py``: each image its own client).
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    num_classes: int
    image_shape: tuple[int, int, int]
    # Whether the attacker is told the labels the client trained with (False: the attack must recover them).
    labels_known: bool = True

    def __init__(
        self,
        root: str = "data",
        batch_size: PositiveInt = 128,
        num_workers: NonNegativeInt = 0,
        target_indices: list[NonNegativeInt] | None = None,
        num_images: PositiveInt | None = None,
        start_index: NonNegativeInt = 0,
        distinct_labels: bool = False,
        images_per_client: PositiveInt | None = None,
    ) -> None:
        super().__init__()
        num_images = 1 if num_images is None else num_images  # a folder's default: see ImageFolderData
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
            ("num_images", num_images, 1),
            ("start_index", start_index, 0),
            *((("images_per_client", images_per_client, 1),) if images_per_client is not None else ()),
            *(("target_indices", i, 0) for i in target_indices or ()),
        ):
            check_whole(name, value, low)
        if target_indices:  # they choose the images: options that choose them otherwise must not disagree
            ignored = [
                f"{name} {value}"
                for name, value, unset in (
                    ("num_images", num_images, num_images in (1, len(target_indices))),
                    ("start_index", start_index, start_index == 0),
                    ("distinct_labels", distinct_labels, not distinct_labels),
                )
                if not unset
            ]
            if ignored:
                raise InputError(
                    f"target_indices {list(target_indices)} choose the {len(target_indices)} target images, so "
                    f"{' and '.join(ignored)} would be ignored: give target_indices or those options, not both"
                )
        self.root = root
        # Plain ints, not the parser's PositiveInt: whatever is saved from them loads with weights_only=True.
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.target_indices = None if target_indices is None else [int(i) for i in target_indices]
        self.num_images = int(num_images)
        self.start_index = int(start_index)
        self.distinct_labels = distinct_labels
        self.images_per_client = None if images_per_client is None else int(images_per_client)
        self._splits: dict[str, Dataset] = {}

    # --- what subclasses provide -------------------------------------------------------------------------
    def train_set(self) -> Dataset:
        """The training split (with augmentation), for training a victim."""
        raise TypeError(f"{type(self).__name__} has no training split: it only provides attack targets")

    def val_set(self) -> Dataset:
        """The held-out split for validating a victim; by default the target split."""
        return self.target_set()

    def target_set(self) -> Dataset:
        """The split attack targets come from (a validation or test split, no augmentation)."""
        raise TypeError(f"{type(self).__name__} must define target_set(), the split attack targets come from")

    # --- shared ------------------------------------------------------------------------------------------
    def _cached(self, name: str, build: Callable[[], Dataset]) -> Dataset:
        """The split ``name``, built by ``build`` on first use and kept for later calls."""
        if name not in self._splits:
            self._splits[name] = build()
        return self._splits[name]

    @property
    def chosen_images(self) -> int:
        """The number of private images chosen (``target_indices``, else ``num_images``), over all clients."""
        return len(self.target_indices) if self.target_indices else self.num_images

    @property
    def batch_images(self) -> int:
        """B, the number of private images each client holds."""
        return self.images_per_client or self.chosen_images

    @property
    def num_targets(self) -> int:
        """T, the number of clients the chosen images are dealt to, each attacked as its own target.

        Raises:
            InputError: ``images_per_client`` does not divide the chosen images.
        """
        chosen, each = self.chosen_images, self.batch_images
        if chosen % each:
            raise InputError(
                f"images_per_client {each} does not divide the {chosen} chosen images (target_indices or "
                "num_images): every client holds the same number of images"
            )
        return chosen // each

    def target_clients(self) -> list[list[int]]:
        """The indices into the target split of each client's images, ``T`` lists of ``B`` indices."""
        indices, each = self.target_index_list(self.target_set()), self.batch_images
        return [indices[t * each : (t + 1) * each] for t in range(self.num_targets)]

    def client_batch(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        """The private batch of images ``indices`` of the target split: normalised ``(B, C, H, W)``, labels ``(B,)``."""
        dataset = self.target_set()
        items = [dataset[i] for i in indices]
        images = torch.stack([torch.as_tensor(x) for x, _ in items])
        labels = torch.as_tensor([int(y) for _, y in items], dtype=torch.long)
        return images, labels

    def target_index_list(self, dataset: Dataset) -> list[int]:
        """The indices of the attack targets in ``dataset``."""
        n = len(dataset)
        if self.target_indices:
            bad = [i for i in self.target_indices if not 0 <= i < n]
            if bad:
                raise InputError(
                    f"target_indices {bad} are out of range: the target split has {n} images (0 to {n - 1})"
                )
            return list(self.target_indices)
        if not self.distinct_labels:
            if self.start_index + self.num_images > n:
                raise InputError(
                    f"num_images {self.num_images} from start_index {self.start_index} exceed the target split's "
                    f"{n} images"
                )
            return list(range(self.start_index, self.start_index + self.num_images))
        # Read labels from the dataset's label list when it has one, so the scan decodes no images.
        targets = getattr(dataset, "targets", None)
        chosen, seen = [], set()
        for i in range(self.start_index, n):
            label = int(targets[i]) if targets is not None else int(dataset[i][1])
            if label not in seen:
                seen.add(label)
                chosen.append(i)
                if len(chosen) == self.num_images:
                    return chosen
        raise InputError(
            f"distinct_labels: fewer than num_images={self.num_images} distinct labels from start_index "
            f"{self.start_index}"
        )

    def attack_targets(self) -> tuple[Tensor, Tensor]:
        """Every chosen private image in one batch: normalised images ``(N, C, H, W)`` and labels ``(N,)`` (the
        client's batch when one client holds them all)."""
        return self.client_batch(self.target_index_list(self.target_set()))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set(),
            batch_size=self.batch_size,
            shuffle=True,
            num_workers=self.num_workers,
            drop_last=False,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set(), batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.target_set(), batch_size=self.batch_size, num_workers=self.num_workers)
