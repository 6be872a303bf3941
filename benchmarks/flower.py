"""Updates from a Flower client in train mode: PSNR with the BatchNorm buffers ignored vs used.

A Flower ``NumPyClient`` as in Flower's PyTorch quickstart (``net.train()``, SGD lr 0.01 momentum 0.9, one local
step over its batch) trains the tutorial CNN or the same CNN with BatchNorm (``tests/flower_helpers.py``) from the
server's global weights (a fresh initialisation) on the shipped photos and sends its new weights and buffers
(``state_dict()`` order, as ``.npz``). The attack reads the file as the command line does (:func:`load_update`
with the victim, then the change from the global weights), and reconstructs with the paper's attack (cosine,
TV 0.1, signed Adam, 1,500 steps) in the client's train mode:

- ``ignored``: the buffers are not used;
- ``recovered``: plus the BatchNorm-statistics prior (Yin et al. 2021) with the private batch's own statistics,
  solved from the moved running statistics (:class:`~lightning_inversion.buffers.RecoveredStatistics`);
- ``delta``: the ``ignored`` attack on the equivalent change of weights saved by the client (new − global), to
  check that new weights reach the same PSNR.

Labels are recovered from the update (iDLG for one image, label counts for four). Each cell: the mean PSNR over
the targets; the reconstructions are saved as a png per cell in ``--output``.

Example::

    OMP_NUM_THREADS=1 python benchmarks/flower.py --steps 1500 --output runs/flower
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_inversion import priors as priors_module  # noqa: E402
from lightning_inversion.api import reconstruct  # noqa: E402
from lightning_inversion.buffers import RecoveredStatistics  # noqa: E402
from lightning_inversion.client import Client  # noqa: E402
from lightning_inversion.data import PhotoData  # noqa: E402
from lightning_inversion.images import denormalize  # noqa: E402
from lightning_inversion.update_io import as_change, load_update  # noqa: E402
from tests.flower_helpers import BNNet, FlowerClient, TutorialNet, get_weights  # noqa: E402

log = logging.getLogger("flower")
NETS = {"tutorial": TutorialNet, "bn": BNNet}
FLOWER = {"lr": 0.01, "momentum": 0.9}  # Flower's PyTorch quickstart: SGD(lr=0.01, momentum=0.9), one pass
CLIENT = {"protocol": "fedavg", "local_steps": 1, "local_lr": 0.01, "momentum": 0.9}


def flower_update(net_name: str, images: torch.Tensor, labels: torch.Tensor, folder: Path, seed: int = 0):
    """Run the Flower client once; save its new weights and the equivalent delta as a Flower user would."""
    torch.manual_seed(seed)
    server_net = NETS[net_name](num_classes=8)
    global_arrays = get_weights(server_net)
    client_net = NETS[net_name](num_classes=8)
    sent, _, _ = FlowerClient(client_net, images, labels, **FLOWER).fit([a.copy() for a in global_arrays], {})
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "weights.npz", *sent)
    np.savez(folder / "delta.npz", *[s - g for s, g in zip(sent, global_arrays, strict=True)])
    return server_net


def prior_options(weight: float, distance: str = "l2", first_layer_weight: float = 1.0) -> dict:
    """The GradientInversion options that add the BatchNorm prior on recovered statistics."""
    prior = priors_module.BatchNormStatistics(
        RecoveredStatistics(), weight=weight, distance=distance, first_layer_weight=first_layer_weight
    )
    return {"priors": [prior]}


def attack(
    server_net, update, truth, num_images: int, steps: int, extra: dict, tv: float = 1e-2
) -> tuple[float, torch.Tensor]:
    server_net.train()  # the client's mode
    result = reconstruct(
        server_net,
        update,
        image_shape=(3, 32, 32),
        mean=PhotoData.mean,
        std=PhotoData.std,
        num_images=num_images,
        max_steps=steps,
        tv=tv,
        client=Client(**CLIENT, train_mode=True),
        ground_truth=truth,
        **extra,
    )
    return float(result.metrics["psnr"]), result.images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--images", type=int, nargs="+", default=[1, 4], help="batch sizes")
    parser.add_argument("--targets", type=int, default=8, help="photos (or groups of photos) per batch size")
    parser.add_argument("--skip", type=int, default=0, help="groups of photos to skip (to split a run)")
    parser.add_argument("--nets", nargs="+", default=["tutorial", "bn"], choices=list(NETS))
    parser.add_argument("--prior-weight", type=float, default=0.1)
    parser.add_argument("--prior-distance", choices=["l2", "kl"], default="l2", help="the prior's form")
    parser.add_argument(
        "--first-layer-weight",
        type=float,
        default=1.0,
        help="the prior's weight of the first BatchNorm layer",
    )
    parser.add_argument("--tv", type=float, default=0.1, help="weight of the total-variation prior")
    parser.add_argument("--columns", nargs="+", default=["ignored", "recovered", "delta"])
    parser.add_argument("--output", type=Path, default=Path("runs/flower"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(1)
    rows = []
    for num_images in args.images:
        groups = [i * num_images for i in range(args.skip, min(args.skip + args.targets, 8 // num_images))]
        for net_name in args.nets:
            psnrs: dict[str, list[float]] = {c: [] for c in args.columns}
            pictures: dict[str, list[torch.Tensor]] = {c: [] for c in args.columns}
            truths = []
            started = time.perf_counter()
            for start in groups:
                data = PhotoData(num_images=num_images, start_index=start)
                images, labels = data.attack_targets()
                truth = denormalize(images, data.mean, data.std).clamp(0, 1)
                truths.append(truth)
                folder = args.output / f"{net_name}_b{num_images}_{start}"
                server_net = flower_update(net_name, images, labels, folder)
                weights = load_update(folder / "weights.npz", server_net, default_kind="weights")
                weights = as_change(weights, server_net)  # what the server sees
                weights.meta["image_shape"] = [3, 32, 32]
                weights.num_images = num_images
                for column in args.columns:
                    if column == "recovered" and not weights.buffers_moved:
                        psnrs[column].append(float("nan"))
                        continue
                    if column == "delta":
                        update = load_update(folder / "delta.npz", server_net, default_kind="delta")
                        update.num_images = num_images
                    else:
                        update = weights
                    extra = (
                        prior_options(args.prior_weight, args.prior_distance, args.first_layer_weight)
                        if column == "recovered"
                        else {}
                    )
                    value, picture = attack(server_net, update, truth, num_images, args.steps, extra, args.tv)
                    psnrs[column].append(value)
                    pictures[column].append(picture)
                    log.info("%s B=%d photos %d..: %s %.2f dB", net_name, num_images, start, column, value)
            seconds = time.perf_counter() - started
            row = {
                "net": net_name,
                "images": num_images,
                "targets": len(groups),
                "seconds": round(seconds),
                **{c: float(np.nanmean(v)) if not all(np.isnan(v)) else None for c, v in psnrs.items()},
                "per_target": {c: [round(x, 2) for x in v] for c, v in psnrs.items()},
            }
            rows.append(row)
            log.info(json.dumps(row))
            save_grid(args.output / f"{net_name}_b{num_images}.png", truths, pictures)
    (args.output / "flower.json").write_text(json.dumps(rows, indent=1))
    print(
        "| net | images | targets | buffers ignored | recovered BN statistics | delta (ignored) | seconds |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [
            f"{r[c]:.2f} ({', '.join(f'{x:.2f}' for x in r['per_target'][c])})"
            if r.get(c) is not None
            else "n/a"
            for c in ("ignored", "recovered", "delta")
        ]
        print(f"| {r['net']} | {r['images']} | {r['targets']} | {' | '.join(cells)} | {r['seconds']} |")


def save_grid(path: Path, truths: list[torch.Tensor], pictures: dict[str, list[torch.Tensor]]) -> None:
    """Rows: the truth, then each column's reconstructions, targets side by side."""
    from torchvision.utils import save_image

    rows = [torch.cat(truths)]
    rows += [torch.cat([p.cpu() for p in found]) for found in pictures.values() if len(found) == len(truths)]
    save_image(torch.cat(rows), path, nrow=len(rows[0]), padding=1)


if __name__ == "__main__":
    main()
