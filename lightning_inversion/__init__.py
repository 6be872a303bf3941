"""lightning-inversion: how much private data leaks from a federated-learning client's update.

Gradient inversion (Geiping et al. 2020, "Inverting Gradients") as a Lightning module, with the simulated
client, label recovery and closed-form recovery beside it.
"""

from .analytic import recover_linear_input
from .api import reconstruct
from .attack import GradientInversion, Reconstruction
from .client import Client, Update
from .update_io import load_update
from .victims import build_victim, list_victims

__all__ = [
    "Client",
    "GradientInversion",
    "Reconstruction",
    "Update",
    "build_victim",
    "list_victims",
    "load_update",
    "reconstruct",
    "recover_linear_input",
]
__version__ = "0.1.0"
