"""Attack every target image on its own and tabulate the results: ``python evaluate.py --config configs/eval_photos.yaml``."""

import logging

from lightning_inversion.evaluation import main

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main()
