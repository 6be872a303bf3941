"""Bad input is refused: exit status 2, one message naming the option or file, no traceback, no silent result.

Most command-line cases run in-process through ``main(..., exit_on_error=True)``, which exits as the script does;
two run ``python invert.py`` as a subprocess to show the whole path end to end.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lightning_inversion as li
from lightning_inversion.attack import GradientInversion
from lightning_inversion.cli import main
from lightning_inversion.client import Client, Update
from lightning_inversion.data import PhotoData
from lightning_inversion.errors import InputError
from lightning_inversion.report import metrics_json
from lightning_inversion.update_io import save_update
from lightning_inversion.victims import build_victim

ROOT = Path(__file__).resolve().parents[1]
# The cat photo at 16×16 and an untrained ConvNet-8: the attack's data, victim and shapes for every case.
SMALL = [
    "fit",
    "--config",
    str(ROOT / "configs/demo.yaml"),
    "--data.init_args.image_size=16",
    "--model.victim=ConvNet-8",
    "--trainer.max_steps=2",
    "--report.lpips=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
FOLDER_DATA = ["--data=lightning_inversion.data.ImageFolderData", "--data.target_indices=[0]"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Update files and image folders, good and bad, for the victim and data of :data:`SMALL`."""
    folder = tmp_path_factory.mktemp("inputs")
    torch.manual_seed(0)
    victim = build_victim("ConvNet-8", 8, (3, 16, 16))
    images, labels = PhotoData(image_size=16, target_indices=[1]).attack_targets()
    gradient = Client().update(victim, images, labels)
    delta = Client(protocol="fedavg", local_steps=2, local_lr=1e-2).update(victim, images, labels)
    paths = {name: folder / name for name in ("gradient.safetensors", "delta.pt", "delta.safetensors")}
    save_update(gradient, paths["gradient.safetensors"])
    save_update(delta, paths["delta.pt"])
    save_update(delta, paths["delta.safetensors"])
    paths["delta_plain.pt"] = folder / "delta_plain.pt"  # names -> tensors and the labels: no description
    torch.save({**dict(zip(delta.names, delta.tensors)), "__labels__": delta.labels}, paths["delta_plain.pt"])

    def variant(name: str, **changes) -> None:
        state = gradient.state_dict()
        state.update(changes)
        paths[name] = folder / name
        torch.save(state, paths[name])

    tensors = [t.clone() for t in gradient.tensors]
    tensors[0][0, 0, 0, 0] = math.nan
    variant("nan.pt", tensors=tensors)
    variant("inf.pt", tensors=[t * math.inf for t in gradient.tensors])
    variant("zero.pt", tensors=[torch.zeros_like(t) for t in gradient.tensors])
    variant("fractional_labels.pt", labels=torch.tensor([1.5]))
    variant("label_out_of_range.pt", labels=torch.tensor([8]))
    variant("two_images.pt", num_images=2, labels=torch.tensor([1, 2]))
    paths["not_an_update.pt"] = folder / "not_an_update.pt"
    torch.save({"epoch": 3, "note": "a training log, not an update"}, paths["not_an_update.pt"])
    paths["other_victim.pt"] = folder / "other_victim.pt"
    save_update(
        Client().update(build_victim("ConvNet-16", 8, (3, 16, 16)), images, labels), paths["other_victim.pt"]
    )
    paths["update.txt"] = folder / "update.txt"
    paths["update.txt"].write_text("0.1 0.2 0.3")
    paths["truncated.pt"] = folder / "truncated.pt"
    paths["truncated.pt"].write_bytes(paths["delta.pt"].read_bytes()[:300])

    paths["empty"] = folder / "empty"
    paths["empty"].mkdir()
    paths["corrupt"] = folder / "corrupt"
    paths["corrupt"].mkdir()
    (paths["corrupt"] / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    paths["one_image"] = folder / "one_image"
    paths["one_image"].mkdir()
    from torchvision.utils import save_image

    save_image(torch.rand(3, 20, 20), paths["one_image"] / "a.png")
    return paths


def SLOW(*case):  # noqa: N802 - reads like a marker in the table
    """A case like the others, run only with ``-m slow`` to keep the default suite fast."""
    return (*case, True)


COSINE = ["--model.objective=Cosine"]

# (id, extra arguments, what the message must name[, slow]). {name} is replaced with the path of files[name].
CASES = [
    # values, refused by the parser's types
    ("restarts 0", ["--model.restarts=0"], ["model.restarts"]),
    SLOW("lr negative", ["--model.lr=-0.1"], ["model.lr"]),
    ("lr 0", ["--model.lr=0"], ["model.lr"]),
    ("tv negative", ["--model.tv=-1"], ["model.tv"]),
    SLOW("median filter negative", ["--model.median_filter_every=-1"], ["model.median_filter_every"]),
    (
        "objective k 0",
        [*COSINE, "--model.objective.layers=first", "--model.objective.k=0"],
        ["model.objective.k"],
    ),
    SLOW(
        "prior weight negative",
        ["--model.priors+=TotalVariation", "--model.priors.weight=-1"],
        ["priors.weight"],
    ),
    ("image_size 0", ["--data.image_size=0"], ["image_size"]),
    SLOW("num_images 0", ["--data.target_indices=null", "--data.num_images=0"], ["num_images"]),
    ("negative target index", ["--data.target_indices=[-1]"], ["target_indices"]),
    SLOW("start_index negative", ["--data.target_indices=null", "--data.start_index=-2"], ["start_index"]),
    ("local_steps 0", ["--client.local_steps=0"], ["client.local_steps"]),
    ("local_epochs 0", ["--client.local_epochs=0"], ["client.local_epochs"]),
    SLOW("local_lr 0", ["--client.local_lr=0"], ["client.local_lr"]),
    SLOW("num_clients 0", ["--client.num_clients=0"], ["client.num_clients"]),
    (
        "fractional folder labels",
        [*FOLDER_DATA, "--data.root={one_image}", "--data.labels=[1.5]"],
        ["labels"],
    ),
    # values that need the data, the victim or the Trainer to judge
    ("max_steps negative", ["--trainer.max_steps=-5"], ["--trainer.max_steps", ">= 0"]),
    ("max_steps 0 without analytic", ["--trainer.max_steps=0"], ["max_steps 0", "analytic"]),
    ("true half precision", ["--trainer.precision=bf16-true"], ["--trainer.precision", "bf16-mixed"]),
    ("num_nodes 0", ["--trainer.num_nodes=0"], ["--trainer", "num_nodes", "0"]),
    ("image_size too small", ["--data.image_size=2"], ["ConvNet-8", "(3, 2, 2)"]),
    (
        "num_images over the data",
        ["--data.target_indices=null", "--data.num_images=20"],
        ["num_images 20", "8"],
    ),
    ("num_images beside target_indices", ["--data.num_images=20"], ["target_indices [1]", "num_images 20"]),
    ("target index over the data", ["--data.target_indices=[99]"], ["target_indices [99]", "0 to 7"]),
    (
        "clients do not divide",
        ["--data.target_indices=[0,1,2,3]", "--client.num_clients=3"],
        ["num_clients=3"],
    ),
    ("unknown victim", ["--model.victim=ConvNet"], ["victim", "ConvNet-16"]),
    (
        "layer index out of range",
        [*COSINE, "--model.objective.layers=list", "--model.objective.indices=[99]"],
        ["layers", "99"],
    ),
    SLOW("layer selection without k", [*COSINE, "--model.objective.layers=first"], ["layers", "k >= 1"]),
    SLOW(
        "idlg on two images",
        ["--data.target_indices=[0,1]", "--model.label_strategy=idlg"],
        ["label_strategy"],
    ),
    (
        "missing victim weights",  # the file, not the image shape (the victim is not at fault)
        ["--model.victim_weights={update.txt}.pt"],
        ["error: weights file not found: ", "{update.txt}.pt"],
    ),
    # images
    ("empty image folder", [*FOLDER_DATA, "--data.root={empty}"], ["{empty}"]),
    SLOW("missing image folder", [*FOLDER_DATA, "--data.root={empty}/nowhere"], ["{empty}/nowhere"]),
    ("corrupt image", [*FOLDER_DATA, "--data.root={corrupt}"], ["{corrupt}/broken.png"]),
    SLOW("missing image file", [*FOLDER_DATA, "--data.files=[{empty}/cat.png]"], ["{empty}/cat.png"]),
    (
        "label out of range",
        [*FOLDER_DATA, "--data.root={one_image}", "--data.labels=[5]", "--data.num_classes=3"],
        ["labels [5]", "num_classes=3"],
    ),
    # update files
    ("NaN update", ["--update={nan.pt}"], ["{nan.pt}", "NaN"]),
    SLOW("infinite update", ["--update={inf.pt}"], ["{inf.pt}", "infinite"]),
    ("all-zero update", ["--update={zero.pt}"], ["{zero.pt}", "zero"]),
    (
        "gradient file, fedavg client",
        ["--update={gradient.safetensors}", "--client.protocol=fedavg"],
        ["{gradient.safetensors}", "--client.protocol", "'fedavg'", "'fedsgd'"],
    ),
    (
        "delta file, weights client",
        ["--update={delta.safetensors}", "--client.protocol=fedavg", "--client.send=weights"],
        ["{delta.safetensors}", "--client.send", "'weights'", "'delta'"],
    ),
    (
        "delta file, other local_lr",
        ["--update={delta.pt}", "--client.local_lr=0.5"],
        ["{delta.pt}", "--client.local_lr", "0.5", "0.01"],
    ),
    SLOW(
        "delta file, other local_steps",
        ["--update={delta.pt}", "--client.local_steps=7"],
        ["{delta.pt}", "--client.local_steps", "7", "2"],
    ),
    ("not an update", ["--update={not_an_update.pt}"], ["{not_an_update.pt}", "not a tensor"]),
    SLOW("truncated update", ["--update={truncated.pt}"], ["{truncated.pt}"]),
    ("update of another victim", ["--update={other_victim.pt}"], ["{other_victim.pt}", "shape"]),
    SLOW("update of two images", ["--update={two_images.pt}"], ["{two_images.pt}", "2 images"]),
    ("fractional labels in update", ["--update={fractional_labels.pt}"], ["{fractional_labels.pt}", "whole"]),
    ("label out of range in update", ["--update={label_out_of_range.pt}"], ["{label_out_of_range.pt}", "8"]),
    SLOW("missing update file", ["--update={empty}/update.pt"], ["{empty}/update.pt"]),
    SLOW("update file type", ["--update={update.txt}"], ["{update.txt}", ".safetensors"]),
]


def _fill(text: str, files: dict[str, Path]) -> str:
    for name, path in files.items():
        text = text.replace("{" + name + "}", str(path))
    return text


@pytest.mark.parametrize(
    ("extra", "named"),
    [pytest.param(*c[1:3], id=c[0], marks=[pytest.mark.slow] if c[3:] else []) for c in CASES],
)
def test_bad_input_exits_2_with_one_message(extra, named, files, tmp_path, capsys):
    args = [*SMALL, f"--trainer.default_root_dir={tmp_path}", *(_fill(a, files) for a in extra)]
    with pytest.raises(SystemExit) as exit_info:
        main(args, exit_on_error=True)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    message = err[err.rindex("error:") :]
    assert message.count("\n") == 1 and message.endswith("\n"), message  # one line
    for word in named:
        assert _fill(word, files) in message, message
    assert not list(tmp_path.rglob("metrics.json"))  # nothing ran


def test_a_missing_update_file_is_named_before_the_attack_is_built(tmp_path, capsys, monkeypatch):
    built = []
    original = GradientInversion.__init__

    @functools.wraps(original)  # the parser reads the signature
    def recording_init(self, *args, **kwargs):
        built.append(True)
        original(self, *args, **kwargs)

    monkeypatch.setattr(GradientInversion, "__init__", recording_init)
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(SystemExit) as exit_info:
        main([*SMALL, f"--trainer.default_root_dir={tmp_path}", f"--update={missing}"], exit_on_error=True)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.endswith(f"error: update file not found: {missing}\n")
    assert not built  # neither the victim nor the Trainer was built before the file was looked for


def test_there_are_enough_cases():
    assert len(CASES) >= 30 and sum(not c[3:] for c in CASES) >= 30


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--model.restarts=0"], "model.restarts"),
        ([*FOLDER_DATA, "--data.root={corrupt}"], "{corrupt}/broken.png"),
        pytest.param(["--update={zero.pt}"], "{zero.pt}", marks=pytest.mark.slow),
    ],
    ids=["parser", "corrupt image", "zero update"],
)
def test_the_script_prints_no_traceback(extra, named, files, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = [*SMALL, f"--trainer.default_root_dir={tmp_path}", *(_fill(a, files) for a in extra)]
    out = subprocess.run(
        [sys.executable, "invert.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert _fill(named, files) in out.stderr.splitlines()[-1] or _fill(named, files) in out.stderr


def test_main_raises_the_users_error_to_python_callers(files, tmp_path, capsys):
    with pytest.raises(InputError, match="NaN"):
        main([*SMALL, f"--trainer.default_root_dir={tmp_path}", f"--update={files['nan.pt']}"])
    assert "error:" in capsys.readouterr().err


# --- what the update file records wins over the client options' defaults -----------------------------------
def test_a_fedavg_file_is_attacked_as_fedavg_with_the_default_client(files, tmp_path):
    """The file records delta, 2 local steps, lr 1e-2: the default (FedSGD) options take them, so the attack equals
    one given those options explicitly (before, the delta was attacked as a gradient)."""
    run = [*SMALL, "--trainer.max_steps=3", f"--trainer.default_root_dir={tmp_path}"]
    default = main([*run, f"--update={files['delta.pt']}"])
    assert default.model.client.protocol == "fedavg" and default.model.client.kind == "delta"
    assert default.model.client.local_steps == 2 and default.model.client.local_lr == pytest.approx(1e-2)
    explicit = main(
        [
            *run,
            f"--update={files['delta.pt']}",
            "--client.protocol=fedavg",
            "--client.local_steps=2",
            "--client.local_lr=0.01",
        ]
    )
    assert torch.equal(default.model.reconstruction.restarts, explicit.model.reconstruction.restarts)
    # A file that records nothing is what the client options say it is.
    plain = main(
        [
            *run,
            f"--update={files['delta_plain.pt']}",
            "--client.protocol=fedavg",
            "--client.local_steps=2",
            "--client.local_lr=0.01",
        ]
    )
    assert torch.equal(default.model.reconstruction.restarts, plain.model.reconstruction.restarts)


def test_client_matching_adopts_the_record_and_refuses_contradictions():
    victim = nn.Linear(4, 3)
    x, y = torch.randn(4, 4), torch.tensor([0, 1, 2, 0])
    update = Client(
        protocol="fedavg", local_steps=3, local_lr=0.05, local_batch_size=2, num_clients=2
    ).update(victim, x, y)
    adopted = Client().matching(update)
    assert (adopted.protocol, adopted.send, adopted.num_clients) == ("fedavg", "delta", 2)
    assert (adopted.local_steps, adopted.local_lr, adopted.local_batch_size) == (3, 0.05, 2)
    assert Client(protocol="fedavg", local_steps=3).matching(update).local_lr == 0.05  # agreeing options stay
    with pytest.raises(
        InputError, match=r"num_clients 4 contradicts the update, which records num_clients 2"
    ):
        Client(num_clients=4).matching(update)
    with pytest.raises(InputError, match=r"local_epochs 5 means 10 local steps.*local_steps 3"):
        Client(local_epochs=5, local_batch_size=2).matching(update)
    epochs = Client(protocol="fedavg", local_epochs=2, local_lr=0.05, local_batch_size=2)
    assert epochs.matching(epochs.update(victim, x, y), adopt=False) is epochs  # 2 epochs: 4 recorded steps
    # An update that records nothing (a plain file) leaves the client as it is.
    plain = Update(list(update.tensors), list(update.names), "gradient", meta={"recorded": []})
    client = Client(protocol="fedavg", num_clients=2)
    assert client.matching(plain) is client


# --- values refused before they make noise ------------------------------------------------------------------
def _small_attack(victim: nn.Module, **options) -> GradientInversion:
    return GradientInversion(
        victim, num_classes=10, image_shape=(3, 16, 16), mean=(0.5,) * 3, std=(0.5,) * 3, **options
    )


def _gradient(victim: nn.Module, labels=(3,)) -> Update:
    images = torch.randn(len(labels), 3, 16, 16, generator=torch.Generator().manual_seed(0))
    return Client().update(victim, images, torch.tensor(labels))


@pytest.mark.parametrize(
    ("spoil", "match"),
    [
        (lambda u: u.tensors[0].fill_(math.nan), "NaN or infinite"),
        (lambda u: u.tensors[-1].fill_(math.inf), "NaN or infinite"),
        (lambda u: [t.zero_() for t in u.tensors], "every tensor is zero"),
        (lambda u: setattr(u, "labels", torch.tensor([2.5])), "whole class indices"),
        (lambda u: setattr(u, "labels", torch.tensor([10])), "out of range"),
        (lambda u: setattr(u, "labels", torch.tensor([-1])), ">= 0"),
    ],
    ids=["nan", "inf", "zero", "fractional label", "label too large", "negative label"],
)
def test_set_target_refuses_an_update_that_cannot_be_attacked(tiny_victim, spoil, match):
    update = _gradient(tiny_victim)
    spoil(update)
    with pytest.raises(InputError, match=match):
        _small_attack(tiny_victim).set_target(update)


def test_weights_equal_to_the_victims_are_refused(tiny_victim):
    update = Update(
        [p.detach().clone() for p in tiny_victim.parameters()],
        [n for n, _ in tiny_victim.named_parameters()],
        "weights",
        torch.tensor([3]),
        1,
    )
    with pytest.raises(InputError, match="new weight equals the victim's"):
        _small_attack(tiny_victim, client=Client(protocol="fedavg", send="weights")).set_target(update)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"restarts": 0}, "restarts"),
        ({"lr": 0.0}, "lr"),
        ({"lr": math.nan}, "lr"),
        ({"tv": -1e-3}, "tv"),
        ({"num_images": 3, "client": Client(num_clients=2)}, "num_clients"),
    ],
)
def test_the_module_refuses_bad_options(tiny_victim, options, match):
    with pytest.raises(InputError, match=match):
        _small_attack(tiny_victim, **options)


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"local_steps": 0}, "local_steps"),
        ({"local_epochs": 0}, "local_epochs"),
        ({"local_lr": 0.0}, "local_lr"),
        ({"local_batch_size": 1.5}, "local_batch_size"),
        ({"num_clients": 0}, "num_clients"),
    ],
)
def test_the_client_refuses_bad_options(options, match):
    with pytest.raises(InputError, match=match):
        Client(**options)


def test_max_steps_0_is_refused_unless_the_recovery_is_closed_form(tiny_victim, cat16):
    gradient = torch.autograd.grad(
        nn.functional.cross_entropy(tiny_victim((cat16 - 0.5) / 0.5), torch.tensor([3])),
        list(tiny_victim.parameters()),
    )
    with pytest.raises(InputError, match="max_steps 0"):
        li.reconstruct(
            tiny_victim,
            gradient,
            torch.tensor([3]),
            image_shape=(3, 16, 16),
            mean=(0.5,) * 3,
            std=(0.5,) * 3,
            max_steps=0,
        )


def test_metrics_json_is_strict_json():
    text = metrics_json({"psnr": math.inf, "attack": {"scores": [0.5, math.nan]}, "ssim": 0.9})

    def refuse(constant):
        raise AssertionError(f"{constant} in metrics.json")

    metrics = json.loads(text, parse_constant=refuse)
    assert metrics["psnr"] is None and metrics["attack"]["scores"] == [0.5, None] and metrics["ssim"] == 0.9
    assert metrics["not_finite"] == {"psnr": "inf", "attack.scores[1]": "nan"}


# --- the Python API --------------------------------------------------------------------------------------------
class BatchNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(nn.functional.avg_pool2d(torch.relu(self.norm(self.conv(x))), 2).flatten(1))


def _api(model: nn.Module, gradient, labels: torch.Tensor | None = None, **options):
    labels = torch.tensor([3, 5]) if labels is None else labels
    return li.reconstruct(
        model, gradient, labels, image_shape=(3, 16, 16), num_images=len(labels), max_steps=3, **options
    )


def test_the_api_takes_the_models_mode():
    """A training-mode batch-norm model's gradient is attacked in training mode (before: eval mode, silently)."""
    torch.manual_seed(0)
    model = BatchNormNet().train()
    images, labels = torch.rand(2, 3, 16, 16), torch.tensor([3, 5])
    gradient = Client(train_mode=True).update(model, images, labels).tensors
    default = _api(model, gradient)
    explicit = _api(model, gradient, client=Client(train_mode=True))
    assert torch.equal(default.restarts, explicit.restarts)
    with pytest.raises(InputError, match=r"train_mode=False.*training mode"):
        _api(model, gradient, client=Client(train_mode=False))
    model.norm.eval()
    model.add_module("drop", nn.Dropout())  # in training mode, beside a batch norm in eval mode
    with pytest.raises(InputError, match="partly in training and partly in eval mode"):
        _api(model, gradient)
    assert model.norm.training is False  # left as it was


def test_the_api_names_what_is_wrong_with_its_arguments(tiny_victim):
    gradient = list(_gradient(tiny_victim, (3, 5)).tensors)
    with pytest.raises(InputError, match=r"target_gradient\[1\] \(conv.bias\) is NoneType"):
        _api(tiny_victim, [gradient[0], None, *gradient[2:]])
    with pytest.raises(InputError, match="has no parameters"):
        _api(nn.Flatten(), gradient)
    with pytest.raises(InputError, match="whole class indices"):
        _api(tiny_victim, gradient, labels=torch.tensor([3.0, 4.5]))
    with pytest.raises(InputError, match="list of tensors"):
        _api(tiny_victim, torch.cat([g.flatten() for g in gradient]))
    with pytest.raises(InputError, match="cannot take images of shape"):
        li.reconstruct(tiny_victim, gradient, torch.tensor([3, 5]), image_shape=(3, 4, 4), num_images=2)


def test_the_module_refuses_a_client_that_contradicts_the_update(tiny_victim):
    images, labels = torch.randn(2, 3, 16, 16), torch.tensor([1, 2])
    fedavg = {"protocol": "fedavg", "local_steps": 2, "local_lr": 1e-2}
    update = Client(**fedavg, num_clients=2).update(tiny_victim, images, labels)
    attack = _small_attack(tiny_victim, num_images=2, client=Client(**fedavg))
    with pytest.raises(InputError, match="num_clients 1 contradicts the update, which records num_clients 2"):
        attack.set_target(update)
