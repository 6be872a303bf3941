"""DataModules: the datasets victims are trained on and attack targets are drawn from."""

from .base import MissingDataError, VisionData
from .photos import PHOTO_NAMES, PhotoData, load_photo

__all__ = ["MissingDataError", "PHOTO_NAMES", "PhotoData", "VisionData", "load_photo"]
