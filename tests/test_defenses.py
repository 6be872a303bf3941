"""Defenses on the client, each against an independent reference; the attacker never sees the client's draw."""

import math
import warnings

import pytest
import pytorch_lightning as pl
import torch
from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer
from scipy import stats

import lightning_inversion.defenses as defenses_module
from lightning_inversion.attack import GradientInversion
from lightning_inversion.cli import main
from lightning_inversion.client import Client, cross_entropy
from lightning_inversion.defenses import (
    DPSGD,
    ClipUpdate,
    GaussianNoise,
    LaplaceNoise,
    Prune,
    Quantize,
)
from lightning_inversion.errors import InputError
from lightning_inversion.evaluation import QUIET_TRAINER, _quiet_lightning
from lightning_inversion.victims import build_victim

from .helpers import TinyConvNet
from .test_cli import ROOT


def _batch(n: int = 4, side: int = 16, classes: int = 10):
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, side, side, generator=generator)
    labels = torch.arange(n) % classes
    return images, labels


def _state(victim):
    params = {n: p.detach() for n, p in victim.named_parameters()}
    buffers = {n: b for n, b in victim.named_buffers()}
    return params, buffers


def _max_difference(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def _opacus_gradient(victim, images, labels, noise_multiplier, max_grad_norm, seed):
    """Opacus's own DP-SGD gradient, as its documentation builds it: GradSampleModule, DPOptimizer, pre_step."""
    model = GradSampleModule(victim)
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=1.0),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=len(images),
        generator=torch.Generator().manual_seed(seed),
    )
    optimizer.zero_grad()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Full backward hook is firing")  # Opacus's hooks, as meant
        torch.nn.functional.cross_entropy(model(images), labels).backward()
    optimizer.pre_step()
    gradient = [p.grad.detach().clone() for p in victim.parameters()]
    model._close()
    return gradient


def test_dpsgd_update_is_opacus_per_example_clipped_noised_gradient_for_the_same_seed():
    torch.manual_seed(0)
    victim = TinyConvNet()
    images, labels = _batch()
    reference_victim = TinyConvNet()
    reference_victim.load_state_dict(victim.state_dict())
    reference = _opacus_gradient(reference_victim, images, labels, 0.7, 0.05, seed=3)
    update = Client(defenses=[DPSGD(noise_multiplier=0.7, max_grad_norm=0.05, seed=3)]).update(
        victim, images, labels
    )
    assert _max_difference(update.tensors, reference) < 1e-6
    # the clipping binds (per-example norms far above 0.05) and the noise is there: not the plain gradient
    plain = Client().update(victim, images, labels)
    assert _max_difference(update.tensors, plain.tensors) > 1e-2


def test_the_attackers_dpsgd_is_opacus_without_noise_by_hand_and_through_opacus():
    torch.manual_seed(0)
    victim = TinyConvNet()
    images, labels = _batch()
    client = Client(defenses=[DPSGD(noise_multiplier=0.0, max_grad_norm=0.05)])
    simulated = client.simulate(victim, *_state(victim), images, labels)
    reference_victim = TinyConvNet()
    reference_victim.load_state_dict(victim.state_dict())
    through_opacus = _opacus_gradient(reference_victim, images, labels, 0.0, 0.05, seed=0)
    assert _max_difference(simulated, through_opacus) < 1e-7
    # by hand: one example at a time, clipped over all parameters, summed, over the batch size
    total = [torch.zeros_like(p) for p in victim.parameters()]
    for x, y in zip(images, labels):
        grads = torch.autograd.grad(cross_entropy(victim(x[None]), y[None]), list(victim.parameters()))
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        total = [t + g * min(1.0, 0.05 / (float(norm) + 1e-6)) for t, g in zip(total, grads)]
    assert _max_difference(simulated, [t / len(images) for t in total]) < 1e-7


@pytest.mark.parametrize("protocol", ["fedsgd", "fedavg"])
def test_dpsgd_honest_and_simulated_agree_without_noise_on_a_batchnorm_victim(protocol):
    torch.manual_seed(0)
    victim = build_victim("ConvNet-4", 10, (3, 16, 16)).eval()
    images, labels = _batch()
    options = dict(protocol=protocol, local_steps=3, local_lr=10.0, local_batch_size=3)
    if protocol == "fedavg":  # the client's SGD: momentum and weight decay act on the private gradient
        options.update(momentum=0.9, weight_decay=0.01)
    client = Client(**options, defenses=[DPSGD(noise_multiplier=0.0, max_grad_norm=1e-3)])
    honest = client.update(victim, images, labels)
    simulated = client.simulate(victim, *_state(victim), images, labels)
    scale = max(float(t.abs().max()) for t in honest.tensors)
    assert _max_difference(honest.tensors, simulated) < 1e-4 * scale
    undefended = Client(**options).update(victim, images, labels)
    assert _max_difference(honest.tensors, undefended.tensors) > 0.1 * scale  # the clipping binds


@pytest.mark.parametrize(
    ("protocol", "sample_rate", "steps"), [("fedsgd", 1.0, 2), ("fedavg", 0.5, 6)], ids=["fedsgd", "fedavg"]
)
def test_epsilon_is_opacus_accountants(protocol, sample_rate, steps):
    client = Client(
        protocol=protocol,
        local_steps=3,
        local_batch_size=2,
        defenses=[DPSGD(noise_multiplier=1.3, max_grad_norm=1.0, delta=1e-5, rounds=2, seed=0)],
    )
    update = client.update(TinyConvNet(), *_batch())
    accountant = RDPAccountant()
    for _ in range(steps):  # the local steps of both rounds
        accountant.step(noise_multiplier=1.3, sample_rate=sample_rate)
    privacy = update.meta["privacy"]
    assert privacy["sample_rate"] == sample_rate and privacy["rounds"] == 2
    assert privacy["epsilon"] == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-6)


def test_epsilon_is_written_into_metrics_json(tmp_path):
    cli = main(
        [
            "fit",
            "--config",
            str(ROOT / "configs/demo.yaml"),
            "--data.init_args.image_size=16",
            "--model.victim=ConvNet-4",
            "--client.defenses=[{class_path: DPSGD, init_args: {noise_multiplier: 2.0, seed: 0}}]",
            "--trainer.max_steps=1",
            "--trainer.logger=false",
            "--trainer.enable_checkpointing=false",
            f"--trainer.default_root_dir={tmp_path}",
            "--report.lpips=false",
            f"--report.output_dir={tmp_path}",
        ]
    )
    import json

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    accountant = RDPAccountant()
    accountant.step(noise_multiplier=2.0, sample_rate=1.0)
    assert metrics["privacy"]["epsilon"] == pytest.approx(accountant.get_epsilon(delta=1e-5), rel=1e-6)
    assert metrics["defenses"] == ["DPSGD(noise_multiplier=2, max_grad_norm=1)"]
    assert cli.model.client.dpsgd.noise_multiplier == 2.0


def test_clipping_is_torchs_clip_grad_norm():
    tensors = [torch.randn(5, 3), torch.randn(7)]
    reference = [t.clone().requires_grad_() for t in tensors]
    for r, t in zip(reference, tensors):
        r.grad = t.clone()
    torch.nn.utils.clip_grad_norm_(reference, max_norm=0.5)
    assert _max_difference(ClipUpdate(0.5).defend(tensors), [r.grad for r in reference]) < 1e-7
    assert _max_difference(ClipUpdate(100.0).defend(tensors), tensors) == 0  # below the norm: unchanged


@pytest.mark.parametrize("keep_percent", [0.5, 10.0, 33.3, 100.0])
def test_pruning_keeps_torch_topk(keep_percent):
    tensors = [torch.randn(20, 10), torch.randn(7), torch.randn(3, 3, 2, 2)]
    pruned = Prune(keep_percent).defend(tensors)
    for t, p in zip(tensors, pruned):
        k = max(1, math.ceil(keep_percent * t.numel() / 100))
        top = t.abs().flatten().topk(k).indices
        expected = torch.zeros(t.numel()).index_copy(0, top, t.flatten()[top]).reshape(t.shape)
        assert torch.equal(p, expected)
        assert int((p != 0).sum()) == k


def test_quantisation_is_torchs_int8_and_sign():
    tensors = [torch.randn(50, 4), torch.randn(9)]
    for t, q in zip(tensors, Quantize(8).defend(tensors)):
        reference = torch.fake_quantize_per_tensor_affine(t, float(t.abs().max()) / 127, 0, -127, 127)
        assert torch.allclose(q, reference, atol=1e-7)
    assert all(torch.equal(q, t.sign()) for t, q in zip(tensors, Quantize(1).defend(tensors)))
    # the attacker's face: the same values, the identity's gradient (straight through)
    x = torch.randn(6, requires_grad=True)
    (y,) = Quantize(4).simulate([x])
    assert torch.equal(y, Quantize(4).defend([x.detach()])[0])
    (gradient,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(gradient, torch.ones(6))


def test_noise_follows_its_law():
    zeros = [torch.zeros(200_000)]
    (gauss,) = GaussianNoise(0.3, seed=0).defend(zeros)
    (laplace,) = LaplaceNoise(0.3, seed=0).defend(zeros)
    assert stats.kstest(gauss.numpy(), stats.norm(scale=0.3).cdf).pvalue > 1e-3
    assert stats.kstest(laplace.numpy(), stats.laplace(scale=0.3).cdf).pvalue > 1e-3
    assert stats.kstest(gauss.numpy(), stats.laplace(scale=0.3 / math.sqrt(2)).cdf).pvalue < 1e-6


@pytest.mark.parametrize(
    "defense",
    [
        lambda seed: GaussianNoise(1e-3, seed=seed),
        lambda seed: LaplaceNoise(1e-3, seed=seed),
        lambda seed: DPSGD(noise_multiplier=1.0, max_grad_norm=0.1, seed=seed),
    ],
    ids=["gaussian", "laplace", "dpsgd"],
)
def test_the_attacker_never_sees_the_clients_draw(defense, monkeypatch):
    torch.manual_seed(0)
    victim = TinyConvNet()
    images, labels = _batch()
    clients = [Client(defenses=[ClipUpdate(1.0), defense(seed)]) for seed in (0, 1, None)]
    honest = [c.update(victim, images, labels).tensors for c in clients]
    assert _max_difference(honest[0], honest[1]) > 1e-5  # the draws differ with the seed ...
    assert (
        _max_difference(honest[0], clients[0].update(victim, images, labels).tensors) == 0
    )  # ... and repeat

    target = clients[0].update(victim, images, labels)  # the honest side, before the patch below

    # The attacker's face draws nothing: no private generator is made, the global generator is untouched, and
    # the result is the same whatever the client's seed.
    def no_draw(*args, **kwargs):
        raise AssertionError("the attacker's side made a private generator")

    monkeypatch.setattr(defenses_module, "private_generator", no_draw)
    monkeypatch.setattr("lightning_inversion.client.private_generator", no_draw)
    state = torch.get_rng_state()
    simulated = [c.simulate(victim, *_state(victim), images, labels) for c in clients]
    assert torch.equal(torch.get_rng_state(), state)
    assert (
        _max_difference(simulated[0], simulated[1]) == 0 and _max_difference(simulated[0], simulated[2]) == 0
    )
    # ... and so does the attack itself on the noised update
    attack = GradientInversion(
        TinyConvNet(), num_classes=10, image_shape=(3, 16, 16), num_images=4, client=clients[0]
    )
    attack.victim.load_state_dict(victim.state_dict())
    attack.set_target(target)
    with _quiet_lightning():
        pl.Trainer(**{**QUIET_TRAINER, "max_steps": 2}).fit(attack)
    assert attack.reconstruct_result().stats()["steps"] == 2


@pytest.mark.parametrize("defense", [Prune(20.0), Quantize(2), ClipUpdate(1e-3)], ids=repr)
def test_deterministic_defenses_honest_equals_simulated_under_aggregation_and_fedavg(defense):
    torch.manual_seed(0)
    victim = TinyConvNet()
    images, labels = _batch()
    client = Client(protocol="fedavg", local_steps=2, local_lr=0.5, num_clients=2, defenses=[defense])
    honest = client.update(victim, images, labels)
    simulated = client.simulate(victim, *_state(victim), images, labels)
    assert _max_difference(honest.tensors, simulated) < 1e-7
    # each client defends its own update before the average: not the defense of the average
    undefended = Client(protocol="fedavg", local_steps=2, local_lr=0.5, num_clients=2).update(
        victim, images, labels
    )
    assert _max_difference(honest.tensors, defense.defend(undefended.tensors)) > 0
    assert honest.meta["defenses"] == [defense.describe()]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: GaussianNoise(-0.1), "scale must be a finite number >= 0"),
        (lambda: LaplaceNoise(float("nan")), "scale must be a finite number >= 0"),
        (lambda: DPSGD(noise_multiplier=-1.0), "noise_multiplier must be a finite number >= 0"),
        (lambda: DPSGD(max_grad_norm=0.0), "max_grad_norm must be a finite number > 0"),
        (lambda: DPSGD(delta=1.0), "delta must be in (0, 1)"),
        (lambda: Prune(0.0), "keep_percent must be a finite number > 0 and <= 100"),
        (lambda: Prune(100.5), "keep_percent must be a finite number > 0 and <= 100"),
        (lambda: Quantize(0), "bits must be a whole number from 1 to 16"),
        (lambda: Client(defenses=[DPSGD(), DPSGD()]), "at most one DPSGD"),
    ],
)
def test_bad_defense_parameters_are_refused_from_python(build, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        build()


@pytest.mark.parametrize(
    ("defense", "line"),
    [
        (
            "{class_path: GaussianNoise, init_args: {scale: -1}}",
            "--client.defenses.scale must be a number >= 0",
        ),
        (
            "{class_path: lightning_inversion.defenses.Prune, init_args: {keep_percent: 0}}",
            "--client.defenses.keep_percent must be a percentage in (0, 100], got 0",
        ),
        (
            "{class_path: Prune, init_args: {keep_percent: 101}}",
            "--client.defenses.keep_percent must be a percentage in (0, 100], got 101",
        ),
        (
            "{class_path: DPSGD, init_args: {noise_multiplier: -0.5}}",
            "--client.defenses.noise_multiplier must be a number >= 0",
        ),
    ],
)
def test_bad_defense_parameters_are_refused_by_the_parser_with_one_line(defense, line, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(
            ["fit", "--config", str(ROOT / "configs/demo.yaml"), f"--client.defenses=[{defense}]"],
            exit_on_error=True,
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {line}")


def test_dpsgd_refuses_batchnorm_in_training_mode():
    victim = build_victim("ConvNet-4", 10, (3, 16, 16))
    client = Client(train_mode=True, defenses=[DPSGD()])
    with pytest.raises(InputError, match="BatchNorm in training mode"):
        client.update(victim, *_batch())


@pytest.mark.parametrize(
    "defense",
    [Prune(20.0), Quantize(8), Quantize(1), ClipUpdate(1e-3), GaussianNoise(1e-3), LaplaceNoise(1e-3)],
    ids=repr,
)
def test_the_attackers_side_batches_over_targets(defense):
    """Targets (and restarts) are a vmap axis of the attacker's simulation: each slot's defended update is the
    defense of that slot's own update, zero tensors included."""
    updates = [torch.randn(3, 5, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    updates[2] = torch.zeros(3, 5)
    batched = torch.func.vmap(lambda t: defense.simulate([t])[0])(torch.stack(updates))
    for k, t in enumerate(updates):
        assert torch.equal(batched[k], defense.simulate([t])[0])
