"""Audit defenses on the client: leakage against utility over defense strengths: ``python audit.py --config configs/audit_demo.yaml``."""

import os

# OpenMP threads that sleep while they wait instead of spinning: beside another busy process on a small machine,
# spinning threads slowed the demo 3.2x, sleeping ones 1.5x (benchmarks/threads.py). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging

from lightning_inversion.auditing import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
