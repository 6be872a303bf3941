"""DataModules on tiny data written in the layout torchvision reads from disk; nothing is downloaded."""

from __future__ import annotations

import os
import pickle
import struct
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from jsonargparse import ArgumentParser
from PIL import Image

from lightning_inversion.data import (
    CIFAR10Data,
    CIFAR100Data,
    ImageFolderData,
    ImageNetData,
    MissingDataError,
    MNISTData,
    PhotoData,
    VisionData,
)
from lightning_inversion.images import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MNIST_MEAN,
    MNIST_STD,
)

# A pixel planted at (0, 0) of test image 0, per channel, to check normalisation with each dataset's constants.
PIXEL = (200, 100, 30)
CIFAR_TEST_LABELS = [3, 3, 1, 4, 1, 7]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every download attempt fails at once, as on a machine without network."""

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture
def no_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """Accept generated CIFAR files, whose md5 is not the real archive's."""
    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: os.path.isfile(path)
    )


def _cifar_images(rng: np.random.Generator, n: int) -> np.ndarray:
    data = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    data[0, :, 0, 0] = PIXEL
    return data.reshape(n, 3072)  # CIFAR's row layout: R plane, G plane, B plane


def write_cifar(root: Path, hundred: bool = False) -> Path:
    """A CIFAR-10 (or CIFAR-100) folder with 5×2 training and 6 test images, as torchvision reads it."""
    rng = np.random.default_rng(0)
    key = "fine_labels" if hundred else "labels"
    folder = root / ("cifar-100-python" if hundred else "cifar-10-batches-py")
    folder.mkdir(parents=True)
    train = ["train"] if hundred else [f"data_batch_{i}" for i in range(1, 6)]
    for name in train:
        batch = {"data": _cifar_images(rng, 2), key: [5, 9]}
        (folder / name).write_bytes(pickle.dumps(batch))
    test = {"data": _cifar_images(rng, 6), key: CIFAR_TEST_LABELS}
    (folder / ("test" if hundred else "test_batch")).write_bytes(pickle.dumps(test))
    meta_name, meta_key = ("meta", "fine_label_names") if hundred else ("batches.meta", "label_names")
    (folder / meta_name).write_bytes(
        pickle.dumps({meta_key: [f"c{i}" for i in range(100 if hundred else 10)]})
    )
    return folder


def write_mnist(root: Path) -> None:
    """MNIST's four uncompressed idx files with 4 training and 5 test digits."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, labels in (("train", [1, 2, 3, 4]), ("t10k", [7, 2, 1, 0, 4])):
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        images[0, 0, 0] = PIXEL[0]
        header = struct.pack(">IIII", 0x0803, len(labels), 28, 28)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(header + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 0x0801, len(labels)) + bytes(labels)
        )


def write_image(
    path: Path, size: tuple[int, int] = (40, 30), color: tuple[int, int, int] | None = None
) -> None:
    """A small RGB image (width, height): random pixels, or one solid colour."""
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    if color is None:
        array = np.random.default_rng(abs(hash(path.name)) % 2**32).integers(
            0, 256, (h, w, 3), dtype=np.uint8
        )
    else:
        array = np.broadcast_to(np.array(color, dtype=np.uint8), (h, w, 3)).copy()
    Image.fromarray(array).save(path)


def expected(pixel: tuple[int, ...], mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    return torch.tensor([(v / 255 - m) / s for v, m, s in zip(pixel, mean, std, strict=True)])


# --- CIFAR and MNIST ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cls", "hundred", "mean", "std"),
    [(CIFAR10Data, False, CIFAR10_MEAN, CIFAR10_STD), (CIFAR100Data, True, CIFAR100_MEAN, CIFAR100_STD)],
)
def test_cifar_targets_are_normalised_test_images(tmp_path, no_md5, cls, hundred, mean, std):
    write_cifar(tmp_path, hundred)
    data = cls(root=str(tmp_path), num_images=2, download=False)
    images, labels = data.attack_targets()
    assert images.shape == (2, 3, 32, 32) and images.dtype == torch.float32
    assert labels.tolist() == CIFAR_TEST_LABELS[:2]
    torch.testing.assert_close(images[0, :, 0, 0], expected(PIXEL, mean, std))
    assert data.num_classes == (100 if hundred else 10) and data.image_shape == (3, 32, 32)
    assert (data.mean, data.std) == (mean, std)


def test_cifar_target_selection(tmp_path, no_md5):
    write_cifar(tmp_path)
    root = str(tmp_path)
    _, labels = CIFAR10Data(root=root, num_images=3, start_index=2).attack_targets()
    assert labels.tolist() == CIFAR_TEST_LABELS[2:5]
    data = CIFAR10Data(root=root, num_images=3, distinct_labels=True)
    assert data.target_index_list(data.target_set()) == [0, 2, 3]
    images, labels = CIFAR10Data(root=root, target_indices=[5, 0]).attack_targets()
    assert labels.tolist() == [7, 3] and images.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="distinct labels"):
        CIFAR10Data(root=root, num_images=5, distinct_labels=True).attack_targets()


def test_cifar_training_batches_are_augmented_test_images_are_not(tmp_path, no_md5):
    write_cifar(tmp_path)
    data = CIFAR10Data(root=str(tmp_path), batch_size=4)
    images, labels = next(iter(data.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and set(labels.tolist()) <= {5, 9}
    assert len(data.train_set()) == 10 and len(data.target_set()) == 6
    assert data.train_set() is data.train_set()  # opened once
    first, again = data.target_set()[1][0], data.target_set()[1][0]
    assert torch.equal(first, again)


def test_mnist_targets(tmp_path):
    write_mnist(tmp_path)
    data = MNISTData(root=str(tmp_path), num_images=4, distinct_labels=True, start_index=1)
    images, labels = data.attack_targets()
    assert images.shape == (4, 1, 28, 28) and labels.tolist() == [2, 1, 0, 4]
    first, _ = MNISTData(root=str(tmp_path)).attack_targets()
    torch.testing.assert_close(first[0, :, 0, 0], expected(PIXEL[:1], MNIST_MEAN, MNIST_STD))
    train_image, train_label = data.train_set()[0]
    assert train_image.shape == (1, 28, 28) and train_label == 1


@pytest.mark.parametrize(
    ("cls", "path"),
    [(CIFAR10Data, "cifar-10-batches-py"), (CIFAR100Data, "cifar-100-python"), (MNISTData, "MNIST/raw")],
)
@pytest.mark.parametrize("download", [True, False])
def test_missing_dataset_names_path_and_remedy(tmp_path, cls, path, download):
    start = time.perf_counter()
    with pytest.raises(MissingDataError) as info:
        cls(root=str(tmp_path), download=download).attack_targets()
    message = str(info.value)
    assert os.path.join(str(tmp_path), path) in message
    assert "download=True" in message and "copy" in message
    assert ("download failed" in message) == download
    assert "network disabled in tests" in message or not download
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert time.perf_counter() - start < 5


def test_prepare_data_reports_missing_dataset(tmp_path):
    with pytest.raises(MissingDataError, match="CIFAR-10"):
        CIFAR10Data(root=str(tmp_path)).prepare_data()


# --- ImageNet ----------------------------------------------------------------------------------------------
def write_imagenet(root: Path) -> None:
    for wnid in ("n01", "n02"):
        for i in range(2):
            write_image(root / "train" / wnid / f"{wnid}_{i}.JPEG")
    for wnid in ("n02", "n03"):
        write_image(root / "val" / wnid / f"ILSVRC2012_val_{wnid}.JPEG")


def test_imagenet_folder(tmp_path):
    write_imagenet(tmp_path)
    data = ImageNetData(root=str(tmp_path), image_size=16, num_images=2)
    assert data.num_classes == 3 and data.image_shape == (3, 16, 16)
    images, labels = data.attack_targets()
    assert images.shape == (2, 3, 16, 16) and labels.tolist() == [
        1,
        2,
    ]  # val's n02, n03 in the union n01..n03
    train_image, train_label = data.train_set()[0]
    assert train_image.shape == (3, 16, 16) and train_label == 0
    assert (data.mean, data.std) == (IMAGENET_MEAN, IMAGENET_STD)


def test_imagenet_missing_or_unsorted(tmp_path):
    data = ImageNetData(root=str(tmp_path / "imagenet"))
    assert data.num_classes == 1000
    with pytest.raises(MissingDataError, match="cannot be downloaded") as info:
        data.attack_targets()
    assert str(tmp_path / "imagenet" / "val") in str(info.value)
    write_image(tmp_path / "imagenet" / "val" / "ILSVRC2012_val_00000001.JPEG")
    with pytest.raises(MissingDataError, match="holds images but no class folders"):
        ImageNetData(root=str(tmp_path / "imagenet")).attack_targets()


# --- your own images ---------------------------------------------------------------------------------------
def test_image_folder_with_class_folders(tmp_path):
    write_image(tmp_path / "cat" / "a.png", color=PIXEL)
    write_image(tmp_path / "cat" / "b.png")
    write_image(tmp_path / "dog" / "c.png", size=(20, 50))
    data = ImageFolderData(root=str(tmp_path), image_size=8, num_images=3)
    assert data.num_classes == 2 and data.image_shape == (3, 8, 8)
    images, labels = data.attack_targets()
    assert images.shape == (3, 3, 8, 8) and labels.tolist() == [0, 0, 1]
    solid = expected(PIXEL, IMAGENET_MEAN, IMAGENET_STD)[:, None, None].expand(3, 8, 8)
    torch.testing.assert_close(images[0], solid, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="class sub-folders"):
        ImageFolderData(root=str(tmp_path), labels=[0, 1, 2])


def test_image_folder_flat_and_files(tmp_path):
    for name in ("b.png", "a.jpg"):
        write_image(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    data = ImageFolderData(root=str(tmp_path), num_images=2, num_classes=5, mean=(0.5,) * 3, std=(0.25,) * 3)
    images, labels = data.attack_targets()
    assert labels.tolist() == [0, 0] and data.num_classes == 5 and images.shape == (2, 3, 32, 32)
    assert data.paths == [str(tmp_path / "a.jpg"), str(tmp_path / "b.png")]
    labelled = ImageFolderData(files=[str(tmp_path / "b.png"), str(tmp_path / "a.jpg")], labels=[4, 2])
    assert labelled.num_classes == 5 and labelled.attack_targets()[1].tolist() == [4, 2]  # every image
    assert labelled.labels_known and not data.labels_known
    relative = ImageFolderData(root=str(tmp_path), files=["a.jpg"], num_classes=3)
    assert relative.attack_targets()[0].shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="2 images"):
        ImageFolderData(root=str(tmp_path), labels=[1])


def test_image_folder_errors_name_the_file(tmp_path):
    with pytest.raises(MissingDataError, match="does not exist"):
        ImageFolderData(root=str(tmp_path / "nowhere"))
    with pytest.raises(MissingDataError, match="missing.png"):
        ImageFolderData(files=[str(tmp_path / "missing.png")])
    with pytest.raises(MissingDataError, match="no images"):
        ImageFolderData(root=str(tmp_path))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png"):
        ImageFolderData(root=str(tmp_path)).attack_targets()
    with pytest.raises(ValueError, match="root"):
        ImageFolderData()


# --- scikit-image photos -----------------------------------------------------------------------------------
def test_photo_targets_are_whole_photos():
    data = PhotoData(image_size=16, num_images=8)
    images, labels = data.attack_targets()
    assert images.shape == (8, 3, 16, 16) and labels.tolist() == list(range(8))
    assert data.num_classes == 8


def test_photo_training_crops_are_deterministic_and_held_out():
    data = PhotoData(image_size=16, train_size=64, val_size=16, seed=3)
    train, val = data.train_set(), data.val_set()
    assert (len(train), len(val)) == (64, 16)
    image, label = train[13]
    assert image.shape == (3, 16, 16) and label == 13 % 8
    again, _ = PhotoData(image_size=16, train_size=64, seed=3).train_set()[13]
    assert torch.equal(image, again)
    assert not torch.equal(train[12][0], train[20][0])  # same photo, another crop
    assert {train[i][1] for i in range(64)} == set(range(8)) and {y for _, y in val} <= set(range(8))
    assert not torch.equal(train[0][0], val[0][0])
    other_seed, _ = PhotoData(image_size=16, train_size=64, seed=4).train_set()[13]
    assert not torch.equal(image, other_seed)
    with pytest.raises(IndexError):
        train[64]


def test_photo_crops_respect_the_held_out_band():
    # A photo whose left 3/4 is black and right 1/4 white: training crops stay black, validation crops white.
    from lightning_inversion.data.photos import PhotoCrops

    photo = torch.zeros(3, 40, 80)
    photo[:, :, 60:] = 1
    kwargs = dict(size=8, scale=(0.1, 0.4), seed=0, mean=(0.0,) * 3, std=(1.0,) * 3)
    train = PhotoCrops([photo], 20, band=(0.0, 0.75), **kwargs)
    val = PhotoCrops([photo], 20, band=(0.75, 1.0), **kwargs)
    assert all(train[i][0].max() < 1e-6 for i in range(20))
    assert all(val[i][0].min() > 1 - 1e-6 for i in range(20))


# --- the command line ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cls", [CIFAR10Data, CIFAR100Data, MNISTData, ImageNetData, ImageFolderData, PhotoData]
)
def test_every_option_is_typed_and_documented(cls):
    parser = ArgumentParser()
    parser.add_class_arguments(cls, "data")
    options = {
        a.dest: a.help for a in parser._actions if a.dest.startswith("data.") and a.dest != "data.help"
    }
    assert {"data.root", "data.num_images", "data.batch_size"} <= set(options)
    undocumented = [name for name, text in options.items() if not text or text.startswith("(type:")]
    assert not undocumented
    assert issubclass(cls, VisionData)
