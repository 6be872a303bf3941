"""Train a victim classifier with the paper's recipe: ``python train_victim.py fit --config configs/victim_cifar10.yaml``."""

from lightning_inversion.classifier import VictimClassifier
from lightning_inversion.cli import main

if __name__ == "__main__":
    main(model_class=VictimClassifier)
