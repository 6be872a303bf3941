"""DataModules: the datasets victims are trained on and attack targets are drawn from."""

from .base import MissingDataError, VisionData
from .folder import ImageFolderData
from .imagenet import ImageNetData
from .photos import PHOTO_NAMES, PhotoData, PhotoName, load_photo
from .torchvision_sets import CIFAR10Data, CIFAR100Data, MNISTData, TorchvisionData

__all__ = [
    "CIFAR100Data",
    "CIFAR10Data",
    "ImageFolderData",
    "ImageNetData",
    "MNISTData",
    "MissingDataError",
    "PHOTO_NAMES",
    "PhotoData",
    "PhotoName",
    "TorchvisionData",
    "VisionData",
    "load_photo",
]
