"""Attack every target image on its own and tabulate the results: ``python evaluate.py --config configs/eval_photos.yaml``.

The same LightningCLI as ``invert.py fit`` (every option of it), with each chosen image its own client by default.
"""

import os

# OpenMP threads that sleep while they wait instead of spinning: beside another busy process on a small machine,
# spinning threads slowed the demo 3.2x, sleeping ones 1.5x (benchmarks/threads.py). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging

from lightning_inversion.evaluation import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
