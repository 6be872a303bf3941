"""Reconstruct a federated-learning client's private images from its update: ``python invert.py fit --help``."""

import os

# OpenMP threads that sleep while they wait instead of spinning: beside another busy process on a small machine,
# spinning threads slowed the demo 3.2x, sleeping ones 1.5x (benchmarks/threads.py). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lightning_inversion.cli import main

if __name__ == "__main__":
    main()
