"""Reconstruct a federated-learning client's private images from its update: ``python invert.py fit --help``."""

from lightning_inversion.cli import main

if __name__ == "__main__":
    main()
