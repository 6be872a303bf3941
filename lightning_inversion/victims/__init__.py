"""The victim model zoo: CIFAR-style ResNets, ConvNet, the DLG LeNet, an MLP and torchvision classifiers.

Build one by name with :func:`build_victim`; :func:`list_victims` lists the names. Nothing here imports Lightning.
"""

from lightning_inversion.victims import resnet_cifar, small, torchvision_zoo  # noqa: F401  (registration)
from lightning_inversion.victims.checkpoint import load_victim_checkpoint
from lightning_inversion.victims.registry import build_victim, list_victims, register_victim
from lightning_inversion.victims.weights import MissingWeightsError

__all__ = ["MissingWeightsError", "build_victim", "list_victims", "load_victim_checkpoint", "register_victim"]
