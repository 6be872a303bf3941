"""The attack's parts, each against an independent reference: the objectives, the priors and the slot that hands
them what the client's forward pass saw, the label strategies and the restart bank."""

import dataclasses
import math
from unittest import mock

import pytest
import torch
from torch import nn

from lightning_inversion.analytic import find_linear_layers, last_layer
from lightning_inversion.attack import GradientInversion
from lightning_inversion.client import BATCHNORM_STATISTICS, Client, Update
from lightning_inversion.labels import (
    IDLG,
    LABEL_STRATEGIES,
    AutoLabels,
    BatchCounts,
    GivenLabels,
    SoftLabels,
)
from lightning_inversion.objectives import L1, L2, OBJECTIVES, Cosine, LocalCosine, MaxDifference
from lightning_inversion.priors import ImagePrior, TotalVariation, total_variation
from lightning_inversion.restarts import (
    SELECTIONS,
    LowestMatching,
    LowestTotalVariation,
    PixelMean,
    PixelMedian,
    choose,
    initial_restarts,
    local_restarts,
    valid_scores,
)
from lightning_inversion.victims import build_victim


# --- objectives ------------------------------------------------------------------------------------------------
def _reference_cost(name, dummy, target, weights):
    """Each cost written out with Python floats over flattened lists: one restart."""
    d = [g.flatten().tolist() for g in dummy]
    t = [x.flatten().tolist() for x in target]
    if name == "l2":
        return sum(w * sum((a - b) ** 2 for a, b in zip(g, x)) for w, g, x in zip(weights, d, t))
    if name == "l1":
        return sum(w * sum(abs(a - b) for a, b in zip(g, x)) for w, g, x in zip(weights, d, t))
    if name == "max":
        return sum(w * max(abs(a - b) for a, b in zip(g, x)) for w, g, x in zip(weights, d, t))
    dots = [sum(a * b for a, b in zip(g, x)) for g, x in zip(d, t)]
    gg = [sum(a * a for a in g) for g in d]
    tt = [sum(b * b for b in x) for x in t]
    if name == "sim":
        num = sum(w * p for w, p in zip(weights, dots))
        return 1 - num / math.sqrt(
            sum(w * a for w, a in zip(weights, gg)) * sum(w * b for w, b in zip(weights, tt))
        )
    return sum(1 - w * p / math.sqrt(a * b) for w, p, a, b in zip(weights, dots, gg, tt))


@pytest.mark.parametrize("part", [Cosine, LocalCosine, L2, L1, MaxDifference])
@pytest.mark.parametrize("flat", [False, True])
def test_objectives_equal_the_costs_written_out(part, flat):
    gen = torch.Generator().manual_seed(1)
    target = [
        torch.randn(4, 3, generator=gen),
        torch.randn(4, generator=gen),
        torch.randn(2, 4, generator=gen),
    ]
    dummy = [torch.randn(2, *t.shape, generator=gen) for t in target]  # two restarts
    objective = part(layers="last", k=2, weighting="linear").bind(target, flat=flat)
    assert objective.indices == [1, 2]
    weights = [2 / 3, 1 / 3]  # linear over all three tensors, (n - i) / n, then the last two selected
    costs = objective([dummy[1], dummy[2]])
    for r in range(2):
        expected = _reference_cost(part.cost, [dummy[1][r], dummy[2][r]], target[1:], weights)
        assert costs[r].item() == pytest.approx(expected, rel=1e-5)
    assert OBJECTIVES[part.cost] is part


def test_objective_options_are_checked():
    with pytest.raises(ValueError, match="k"):
        Cosine(layers="first", k=0)
    with pytest.raises(ValueError, match="k >= 1"):
        Cosine(layers="first").bind([torch.ones(2)])


# --- priors ----------------------------------------------------------------------------------------------------
def test_total_variation_takes_any_leading_axes():
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 4, 3, 5, 6, generator=gen)  # (T, R, B, C, H, W)
    tv = total_variation(images)
    assert tv.shape == (2, 3)
    for t in range(2):
        for r in range(3):
            x = images[t, r].tolist()  # (B, C, H, W) as nested lists
            dx = [abs(w[j + 1] - w[j]) for b in x for c in b for w in c for j in range(5)]
            dy = [abs(c[i + 1][j] - c[i][j]) for b in x for c in b for i in range(4) for j in range(6)]
            assert tv[t, r].item() == pytest.approx(sum(dx) / len(dx) + sum(dy) / len(dy), rel=1e-5)
    prior = TotalVariation(weight=0.5)
    torch.testing.assert_close(prior(images), 0.5 * tv)
    with pytest.raises(ValueError, match="weight"):
        TotalVariation(weight=-1)


class MeanOfBatchNormInputs(ImagePrior):
    """A prior of the test: Σ over BatchNorm layers of the squared per-channel means of their inputs."""

    needs = frozenset({BATCHNORM_STATISTICS})

    def penalty(self, images, seen):
        stats = seen[BATCHNORM_STATISTICS]
        return sum(mean.pow(2).sum(-1) for mean, _ in stats.values())


def _hooked_statistics(victim, images):
    """The reference: a plain forward of each restart's images, BatchNorm inputs caught by forward hooks."""
    found = {}
    handles = [
        m.register_forward_pre_hook(lambda m, args, name=name: found.setdefault(name, args[0]))
        for name, m in victim.named_modules()
        if isinstance(m, nn.BatchNorm2d)
    ]
    try:
        victim(images)
    finally:
        for h in handles:
            h.remove()
    return {n: (x.mean((0, 2, 3)), x.var((0, 2, 3), unbiased=False)) for n, x in found.items()}


@pytest.mark.parametrize("train_mode", [False, True])
@pytest.mark.parametrize("restarts", [1, 3])
def test_priors_get_the_batchnorm_statistics_of_the_client_pass(train_mode, restarts):
    torch.manual_seed(0)
    victim = build_victim("ConvNet-8", 4, (3, 16, 16)).eval()
    client = Client(train_mode=train_mode)
    attack = GradientInversion(
        victim, num_classes=4, image_shape=(3, 16, 16), num_images=2, restarts=restarts, tv=0,
        priors=[MeanOfBatchNormInputs(weight=2.0)], client=client,
    )  # fmt: skip
    attack.set_target(client.update(victim, torch.randn(2, 3, 16, 16), torch.tensor([1, 2])))
    attack.prepare()
    images = attack.dummy_images.detach().clone().requires_grad_()
    _, seen = attack.client_pass(images, attack.target_labels)
    stats = seen[BATCHNORM_STATISTICS]
    names = [n for n, m in victim.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert list(stats) == names and len(names) > 1
    victim.train(train_mode)
    for r in range(restarts):
        reference = _hooked_statistics(victim, images[r])
        for name in names:
            torch.testing.assert_close(stats[name][0][r], reference[name][0], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(stats[name][1][r], reference[name][1], rtol=1e-4, atol=1e-5)
    # Differentiable in the images, and the prior's value is in the loss with its weight.
    cost, prior = attack.restart_costs(images, attack.target_labels)
    expected = 2.0 * sum(m.pow(2).sum(-1) for m, _ in stats.values())
    torch.testing.assert_close(prior, expected)
    (grad,) = torch.autograd.grad(prior.sum(), images)
    victim.train(train_mode)
    reference_loss = sum(
        2.0 * sum(m.pow(2).sum() for m, _ in _hooked_statistics(victim, images[r]).values())
        for r in range(restarts)
    )
    (expected_grad,) = torch.autograd.grad(reference_loss, images)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-3, atol=1e-6)


def test_nothing_is_recorded_when_no_prior_needs_it():
    victim = build_victim("ConvNet-8", 4, (3, 16, 16)).eval()
    attack = GradientInversion(victim, num_classes=4, image_shape=(3, 16, 16), restarts=2)
    attack.set_target(Client().update(victim, torch.randn(1, 3, 16, 16), torch.tensor([1])))
    attack.prepare()
    with mock.patch.object(nn.Module, "register_forward_pre_hook") as register:
        _, seen = attack.client_pass(attack.dummy_images, attack.target_labels)
    assert seen == {} and register.call_count == 0  # no hook, no statistics: no cost


def test_statistics_pool_over_aggregated_clients():
    victim = build_victim("ConvNet-8", 4, (3, 16, 16)).eval()
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    params, buffers = dict(victim.named_parameters()), dict(victim.named_buffers())
    seen = {BATCHNORM_STATISTICS: {}}
    Client(num_clients=2).simulate(victim, params, buffers, images, labels, seen=seen)
    reference = _hooked_statistics(victim, images)  # the whole batch at once
    for name, (mean, var) in seen[BATCHNORM_STATISTICS].items():
        torch.testing.assert_close(mean, reference[name][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(var, reference[name][1], rtol=1e-4, atol=1e-5)


def test_fedavg_statistics_average_the_local_steps_as_the_running_statistics_do():
    victim = build_victim("ConvNet-8", 4, (3, 16, 16)).eval()
    images, labels = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    params, buffers = dict(victim.named_parameters()), dict(victim.named_buffers())
    seen = {BATCHNORM_STATISTICS: {}}
    client = Client(protocol="fedavg", local_steps=3, local_batch_size=2, local_lr=1e-7)  # weights stay put
    client.simulate(victim, params, buffers, images, labels, seen=seen)
    # minibatches 0, 1, 0, weighted m (1 − m)^(K−1−k) with BatchNorm's momentum m = 0.1, as the buffers weigh them
    first, second = _hooked_statistics(victim, images[:2]), _hooked_statistics(victim, images[2:])
    weights = torch.tensor([0.1 * 0.9**2, 0.1 * 0.9, 0.1])
    weights = weights / weights.sum()
    for name, (mean, var) in seen[BATCHNORM_STATISTICS].items():
        for j, value in enumerate((mean, var)):
            expected = (
                weights[0] * first[name][j] + weights[1] * second[name][j] + weights[2] * first[name][j]
            )
            torch.testing.assert_close(value, expected, rtol=1e-4, atol=1e-5)


def test_total_variation_twice_is_refused():
    with pytest.raises(ValueError, match="total variation is given twice"):
        GradientInversion("MLP", num_classes=4, image_shape=(3, 4, 4), tv=1e-2, priors=[TotalVariation(1.0)])


# --- label strategies ------------------------------------------------------------------------------------------
def test_label_strategies_and_the_shared_last_layer_finder():
    torch.manual_seed(0)
    victim = build_victim("MLP", 5, (1, 4, 4))
    weight_index, bias_index = last_layer(victim, 5)
    names = [n for n, _ in victim.named_parameters()]
    _, w, b = find_linear_layers(victim)[-1]  # analytic.py's list of linear layers agrees
    assert (weight_index, bias_index) == (w, b) and names[w].endswith("weight")
    x = torch.rand(1, 1, 4, 4)
    update = Client().update(victim, x, torch.tensor([3]))
    assert GivenLabels().labels(update, victim, 1, 5).tolist() == [3]
    # iDLG by hand: the one row of the last layer's weight gradient with a negative sum
    rows = update.tensors[weight_index].sum(1)
    assert IDLG().labels(update, victim, 1, 5).tolist() == [int(rows.argmin())] == [3]
    unlabelled = Update(update.tensors, update.names, update.kind, None, 1)
    assert isinstance(AutoLabels().resolve(unlabelled, 1), IDLG)
    assert isinstance(AutoLabels().resolve(unlabelled, 3), BatchCounts)
    assert isinstance(AutoLabels().resolve(update, 1), GivenLabels)
    assert SoftLabels().labels(update, victim, 1, 5) is None and SoftLabels.soft
    with pytest.raises(ValueError, match="not known"):
        GivenLabels().labels(unlabelled, victim, 1, 5)
    assert set(LABEL_STRATEGIES) == {"auto", "given", "idlg", "batch", "dlg"}


# --- the restart bank ------------------------------------------------------------------------------------------
def test_each_restart_starts_as_a_separate_run_with_its_seed():
    images, labels = initial_restarts(3, 7, "randn", (2, 1, 2, 2), soft_labels=(2, 5))
    for r in range(3):
        gen = torch.Generator().manual_seed(7 + r)
        assert torch.equal(images[r], torch.randn(2, 1, 2, 2, generator=gen))
        assert torch.equal(labels[r], torch.randn(2, 5, generator=gen))
    uniform, none = initial_restarts(2, 0, "rand", (1, 1, 3, 3))
    assert none is None and uniform.min() >= -1 and uniform.max() <= 1
    assert not initial_restarts(1, 0, "zeros", (1, 1, 2, 2))[0].any()


def test_restarts_split_over_processes_cover_each_once():
    for restarts, world in [(5, 2), (2, 3), (8, 4)]:
        slices = [local_restarts(restarts, world, rank).tolist() for rank in range(world)]
        assert sorted(sum(slices, [])) == list(range(restarts))


def test_selection_and_combination():
    restarts = torch.arange(4.0).view(4, 1, 1).expand(4, 2, 2)
    scores = valid_scores(torch.tensor([3.0, math.nan, 1.0, 2.0]), torch.tensor([5, 5, 5, 0]))
    assert scores.tolist() == [3.0, math.inf, 1.0, math.inf]
    images, chosen = choose(LowestMatching(), restarts, scores)
    assert chosen == 2 and torch.equal(images, restarts[2])
    images, chosen = choose(PixelMean(), restarts, scores)
    assert chosen is None and torch.equal(images, torch.full((2, 2), 1.0))  # mean of restarts 0 and 2
    images, _ = choose(PixelMedian(), restarts, valid_scores(torch.ones(4), torch.ones(4)))
    assert torch.equal(images, torch.full((2, 2), 1.0))  # torch's lower median of 0, 1, 2, 3
    nothing, chosen = choose(LowestMatching(), restarts, torch.full((4,), math.inf))
    assert chosen is None and torch.isnan(nothing).all()
    assert LowestTotalVariation.score == "tv" and set(SELECTIONS) == {"matching", "tv", "mean", "median"}


def test_with_several_targets_priors_see_each_targets_restarts_on_their_own(tiny_victim, cat16):
    from lightning_inversion.images import normalize
    from lightning_inversion.priors import GroupConsistency

    prior = GroupConsistency(weight=1.0, start=0.0, ramp=0.0)
    attack = GradientInversion(
        tiny_victim, num_classes=10, image_shape=(3, 16, 16), restarts=2, targets=2, tv=0, priors=[prior]
    )
    updates = [Client().update(tiny_victim, normalize(x, attack.mean, attack.std), torch.tensor([y]))
               for x, y in [(cat16, 3), (cat16.flip(-1), 5)]]  # fmt: skip
    attack.set_targets(updates)
    attack.prepare()
    images = attack.dummy_images.detach()
    slots = torch.arange(4)
    cost, penalty = attack.restart_costs(images, attack._labels(slots), slots)
    expected = torch.cat([prior(images[:2]), prior(images[2:])])  # the consensus of each target's restarts
    torch.testing.assert_close(penalty, expected)
    assert not torch.allclose(penalty, prior(images))  # not one consensus over both targets
    each = [
        attack.matchings[t](attack.dummy_update(images[2 * t : 2 * t + 2], attack.target_labels[t]))
        for t in range(2)
    ]
    torch.testing.assert_close(cost, torch.cat(each))


# --- the pieces the LightningModule hands over, each on its own -----------------------------------------------
def test_attack_options_are_refused_by_name():
    from lightning_inversion.errors import InputError
    from lightning_inversion.parts import check_number, check_options, check_whole, part

    good = dict(
        restarts=1, num_images=1, num_classes=2, median_filter_every=0, lr=0.1, tv=0.0, image_shape=(3, 4, 4),
        mean=(0.5,) * 3, std=(0.2,) * 3,
    )  # fmt: skip
    check_options(**good)
    bad = [("restarts", 0), ("num_images", True), ("num_classes", 1.5), ("median_filter_every", -1), ("lr", 0.0),
           ("tv", math.nan), ("image_shape", (3, 4)), ("mean", (0.5,)), ("std", (0.2, 0.0, 0.2))]  # fmt: skip
    for name, value in bad:
        with pytest.raises(InputError, match=name):
            check_options(**{**good, name: value})
    check_whole("targets", 3, 1)
    check_number("tv", 0, positive=False)
    with pytest.raises(InputError, match="targets must be a whole number >= 1, got 0"):
        check_whole("targets", 0, 1)
    with pytest.raises(InputError, match="lr must be a finite number > 0"):
        check_number("lr", math.inf, positive=True)
    assert isinstance(part("l2", OBJECTIVES), L2)
    given = L1()
    assert part(given, OBJECTIVES) is given


def test_attack_priors_put_total_variation_first_and_sum_with_weights():
    from lightning_inversion.priors import attack_priors, prior_sum

    other = TotalVariation(0.5)
    assert attack_priors(0.0, None) == [] and attack_priors(0.0, [other]) == [other]
    first, second = attack_priors(0.25, [ImagePrior(2.0)])
    assert isinstance(first, TotalVariation) and first.weight == 0.25 and second.weight == 2.0
    images = torch.rand(3, 2, 1, 4, 4)
    # Total variation written out for one restart: mean absolute neighbour differences, along W then H.
    by_hand = torch.tensor(
        [
            (x[..., 1:] - x[..., :-1]).abs().mean() + (x[..., 1:, :] - x[..., :-1, :]).abs().mean()
            for x in images
        ]
    )
    torch.testing.assert_close(
        prior_sum([TotalVariation(0.25), TotalVariation(0.5)], images, {}), 0.75 * by_hand
    )
    assert torch.equal(prior_sum([], images, {}), torch.zeros(3))


def test_priors_that_read_the_update_are_refused_with_several_targets(tiny_victim):
    from lightning_inversion.errors import InputError
    from lightning_inversion.priors import prepare_priors

    class ReadsUpdate(ImagePrior):
        def prepare(self, victim, update):
            self.seen = update

    update = Client().update(tiny_victim, torch.randn(1, 3, 16, 16), torch.tensor([1]))
    prior = ReadsUpdate()
    prepare_priors([TotalVariation(), prior], tiny_victim, update, targets=1)
    assert prior.seen is update
    prepare_priors([TotalVariation()], tiny_victim, update, targets=3)  # reads nothing: fine for any T
    with pytest.raises(InputError, match="ReadsUpdate reads the target update: use targets 1"):
        prepare_priors([prior], tiny_victim, update, targets=2)


def test_an_objective_binds_each_target_to_the_same_tensors():
    from lightning_inversion.errors import InputError

    first = [torch.tensor([3.0, 0.0]), torch.tensor([1.0])]  # the larger norm in tensor 0
    second = [torch.tensor([0.1, 0.0]), torch.tensor([2.0])]  # ... in tensor 1
    bound = Cosine(layers="last", k=1).bind_targets([first, second])
    assert [m.indices for m in bound] == [[1], [1]]
    dummy = [torch.tensor([[1.0], [-2.0]])]  # two restarts of the last tensor
    torch.testing.assert_close(bound[1](dummy), torch.tensor([0.0, 2.0]))  # 1 − cos: aligned, opposite
    with pytest.raises(InputError, match="compare other tensors for each target"):
        Cosine(layers="topk", k=1).bind_targets([first, second])
    with pytest.raises(InputError, match="objective layers 'list'"):
        L2(layers="list", indices=[5]).bind_targets([first])


def test_each_target_update_is_checked_and_gives_its_labels(tiny_victim):
    from lightning_inversion.targets import TargetMismatchError, check_targets

    client = Client()
    x = torch.randn(1, 3, 16, 16)
    with_labels = client.update(tiny_victim, x, torch.tensor([4]))
    without = dataclasses.replace(with_labels, labels=None)  # the server does not know the label
    found = check_targets([with_labels, without], 2, tiny_victim, client, AutoLabels(), 1, 10)
    assert found[0].tolist() == [4]  # given
    assert found[1].tolist() == [4]  # recovered from the last layer (iDLG)
    assert check_targets([with_labels], 1, tiny_victim, client, SoftLabels(), 1, 10) == [None]
    with pytest.raises(TargetMismatchError, match="2 target updates for an attack on targets=3"):
        check_targets([with_labels, without], 3, tiny_victim, client, AutoLabels(), 1, 10)
    with pytest.raises(TargetMismatchError, match="label_strategy 'given'"):
        check_targets([without], 1, tiny_victim, client, GivenLabels(), 1, 10)


def test_target_threat_model_resolves_the_labels_against_each_update():
    from lightning_inversion.threat_model import target_threat_model, threat_model

    labelled = Update([torch.zeros(1)], ["w"], labels=torch.tensor([1]), num_images=1)
    plain = Update([torch.zeros(1)], ["w"])
    assert target_threat_model(AutoLabels(), labelled, [], 1, False) == threat_model(
        "given", [], 1, True, False
    )
    assert target_threat_model(AutoLabels(), plain, [], 2, True) == threat_model("batch", [], 2, False, True)
    assert target_threat_model(AutoLabels(), None, [], 1, False)["labels"] is None  # no target yet


def test_slot_labels_and_trees_split_by_target():
    from lightning_inversion.restarts import slot_labels, split_tree

    shared, per_target = torch.tensor([7, 8]), torch.tensor([[1, 2], [3, 4], [5, 6]])  # (B,), (T, B)
    slots = torch.tensor([1, 2, 5])  # R = 2: targets 0, 1, 2
    assert torch.equal(slot_labels(slots, shared, None, 2), shared)
    assert slot_labels(slots, per_target, None, 2).tolist() == [[1, 2], [3, 4], [5, 6]]
    soft = torch.randn(6, 2, 4)
    assert torch.equal(slot_labels(slots, per_target, soft, 2), soft[[1, 2, 5]])
    x, y = torch.arange(5), torch.arange(10).view(5, 2)
    parts = split_tree({"a": (x, [y]), "b": {}}, [2, 3])
    assert parts[0]["a"][0].tolist() == [0, 1] and parts[1]["a"][1][0].tolist() == [[4, 5], [6, 7], [8, 9]]
    assert isinstance(parts[1]["a"], tuple) and parts[0]["b"] == {} and parts[1]["b"] == {}
    assert split_tree({}, [1, 1]) == [{}, {}]
    with pytest.raises(TypeError, match="cannot split str"):
        split_tree("no", [1])


def test_slot_costs_match_each_slot_with_its_own_target():
    from lightning_inversion.restarts import slot_costs

    class Offset:  # a stand-in objective: the dummy's sum plus the target's number
        def __init__(self, t):
            self.t = t

        def __call__(self, dummy):
            return dummy[0].sum(1) + self.t

    dummy = [torch.arange(8.0).view(4, 2)]  # four slots of R = 2 restarts: targets 0, 0, 1, 1
    images = torch.rand(4, 1, 1, 3, 3)
    cost, prior = slot_costs([Offset(100.0), Offset(200.0)], [TotalVariation(2.0)], 2, dummy, images, {})
    assert cost.tolist() == [101.0, 105.0, 209.0, 213.0]
    torch.testing.assert_close(prior, 2 * total_variation(images))
    some = torch.tensor([1, 2])  # one slot of each target
    cost, _ = slot_costs(
        [Offset(100.0), Offset(200.0)], [], 2, dummy[:1] and [dummy[0][1:3]], images[1:3], {}, some
    )
    assert cost.tolist() == [105.0, 209.0]
    assert slot_costs([Offset(0.0)], [], 4, dummy, images, {})[0].tolist() == [1.0, 5.0, 9.0, 13.0]


def test_each_targets_result_is_chosen_among_its_own_restarts():
    from lightning_inversion.restarts import as_pixels, target_reconstructions

    normalised = torch.randn(4, 1, 3, 2, 2)
    pixels = as_pixels(normalised, (0.5, 0.4, 0.3), (0.2, 0.25, 0.5))
    by_hand = normalised * torch.tensor([0.2, 0.25, 0.5]).view(3, 1, 1) + torch.tensor([0.5, 0.4, 0.3]).view(
        3, 1, 1
    )
    torch.testing.assert_close(pixels, by_hand.clamp(0, 1))
    scores = torch.tensor([3.0, 1.0, 0.5, math.inf])  # target 0 picks restart 1, target 1 restart 0
    steps = torch.tensor([4, 4, 4, 0])
    results = target_reconstructions(
        LowestMatching(),
        pixels,
        scores,
        steps,
        torch.tensor([[1], [2]]),
        ["given", "batch"],
        2.0,
        [{"t": 0}, {"t": 1}],
    )
    assert [r.chosen_restart for r in results] == [1, 0]
    assert torch.equal(results[0].images, pixels[1]) and torch.equal(results[1].images, pixels[2])
    assert [r.labels.tolist() for r in results] == [[1], [2]] and [r.labels_from for r in results] == [
        "given",
        "batch",
    ]
    assert results[1].restart_steps == [4, 0] and results[1].threat_model == {"t": 1}
    soft = torch.zeros(4, 1, 5)
    soft[2, 0, 3] = 1.0  # the chosen restart of target 1 says class 3
    results = target_reconstructions(LowestMatching(), pixels, scores, steps, soft, ["dlg", "dlg"], 0.0)
    assert results[1].labels.tolist() == [3] and results[0].threat_model is None
