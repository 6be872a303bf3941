"""The matching costs, TV, the box and the decay schedule, against values computed by hand."""

import math

import pytest
import torch

from lightning_inversion.images import box_bounds, denormalize, median_filter3x3, normalize, project_box
from lightning_inversion.objectives import (
    GradientMatching,
    TargetStack,
    decay_milestones,
    dots_and_squares,
    layer_weights,
    matching_cost,
    select_layers,
)
from lightning_inversion.priors import total_variation

# Two "parameters": a vector and a 1×2 matrix; one restart (leading axis of size 1).
DUMMY = [torch.tensor([[1.0, 2.0]]), torch.tensor([[[0.0, 1.0]]])]
TARGET = [torch.tensor([1.0, 0.0]), torch.tensor([[1.0, 1.0]])]


@pytest.mark.parametrize(
    ("cost", "expected"),
    [
        # <g,t> = 2, |g|^2 = 6, |t|^2 = 3
        ("sim", 1 - 2 / math.sqrt(18)),
        # (0, 2) and (-1, 0)
        ("l2", 4.0 + 1.0),
        ("l1", 2.0 + 1.0),
        ("max", 2.0 + 1.0),
        # cos1 = 1 / sqrt(5), cos2 = 1 / sqrt(2)
        ("simlocal", (1 - 1 / math.sqrt(5)) + (1 - 1 / math.sqrt(2))),
    ],
)
def test_costs_by_hand(cost, expected):
    value = matching_cost(DUMMY, TARGET, [1.0, 1.0], cost)
    assert value.shape == (1,)
    assert value.item() == pytest.approx(expected, rel=1e-6)


def test_weighted_costs_by_hand():
    w = layer_weights(2, "linear")
    assert w == [1.0, 0.5]
    assert matching_cost(DUMMY, TARGET, w, "l2").item() == pytest.approx(4.0 + 0.5)
    # <g,t>_w = 1 + 0.5, |g|^2_w = 5 + 0.5, |t|^2_w = 1 + 0.5 * 2
    assert matching_cost(DUMMY, TARGET, w, "sim").item() == pytest.approx(1 - 1.5 / math.sqrt(5.5 * 2.0))
    assert layer_weights(3, "exp") == pytest.approx([1.0, math.exp(-1), math.exp(-2)])


def test_sim_is_one_global_cosine_not_a_mean_of_layer_cosines():
    # Scaling one layer changes the global cosine but not per-layer cosines.
    scaled = [DUMMY[0] * 10, DUMMY[1]]
    assert matching_cost(scaled, TARGET, [1, 1], "simlocal").item() == pytest.approx(
        matching_cost(DUMMY, TARGET, [1, 1], "simlocal").item(), rel=1e-6
    )
    assert matching_cost(scaled, TARGET, [1, 1], "sim").item() != pytest.approx(
        matching_cost(DUMMY, TARGET, [1, 1], "sim").item(), rel=1e-3
    )


def test_costs_are_batched_over_restarts():
    dummy = [torch.cat([d, -d, 2 * d]) for d in DUMMY]  # three restarts
    costs = matching_cost(dummy, TARGET, [1, 1], "sim")
    assert costs.shape == (3,)
    assert costs[0].item() == pytest.approx(1 - 2 / math.sqrt(18))
    assert costs[1].item() == pytest.approx(1 + 2 / math.sqrt(18))
    assert costs[2].item() == pytest.approx(costs[0].item())  # the cosine ignores scale
    assert matching_cost([t[None] for t in TARGET], TARGET, [1, 1], "sim").item() == pytest.approx(
        0, abs=1e-6
    )


def test_dots_and_squares_backward_matches_autograd():
    # The hand-written backward (a t + 2 b g per tensor) against autograd on the plain expression, in fp64.
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 3, 3, 3), (4,), (6, 4)]
    dummy = [torch.randn(3, *s, dtype=torch.float64, generator=gen, requires_grad=True) for s in shapes]
    target = [torch.randn(*s, dtype=torch.float64, generator=gen) for s in shapes]
    assert torch.autograd.gradcheck(lambda *d: dots_and_squares(d, target), dummy)
    dots, squares = dots_and_squares(dummy, target)
    expected_dots = torch.stack([(g * t).flatten(1).sum(1) for g, t in zip(dummy, target)])
    expected_squares = torch.stack([(g * g).flatten(1).sum(1) for g in dummy])
    torch.testing.assert_close(dots, expected_dots)
    torch.testing.assert_close(squares, expected_squares)
    weights = [1.0, 0.5, 0.25]
    for cost in ("sim", "simlocal"):
        fused = torch.autograd.grad(matching_cost(dummy, target, weights, cost).sum(), dummy)
        dot = [(g * t).flatten(1).sum(1) for g, t in zip(dummy, target)]
        sq = [(g * g).flatten(1).sum(1) for g in dummy]
        tsq = [t.pow(2).sum() for t in target]
        if cost == "sim":
            num = sum(w * d for w, d in zip(weights, dot))
            den = (
                sum(w * q for w, q in zip(weights, sq)).sqrt()
                * sum(w * q for w, q in zip(weights, tsq)).sqrt()
            )
            reference = 1 - num / den
        else:
            reference = sum(1 - w * d / (q.sqrt() * u.sqrt()) for w, d, q, u in zip(weights, dot, sq, tsq))
        by_autograd = torch.autograd.grad(reference.sum(), dummy)
        for a, b in zip(fused, by_autograd):
            torch.testing.assert_close(a, b)


def test_dots_and_squares_are_accurate_in_fp32():
    # Sums over millions of entries, as for ResNet-18's gradient: fp32 against fp64, relative error.
    gen = torch.Generator().manual_seed(0)
    dummy = [torch.randn(2, 2_000_000, generator=gen), torch.randn(2, 512, 3, 3, generator=gen)]
    target = [torch.randn(2_000_000, generator=gen), torch.randn(512, 3, 3, generator=gen)]
    dots, squares = dots_and_squares(dummy, target)
    exact_dots, exact_squares = dots_and_squares([d.double() for d in dummy], [t.double() for t in target])
    assert ((squares.double() - exact_squares) / exact_squares).abs().max() < 1e-6
    target_norms = torch.stack([t.double().norm() for t in target])[:, None]
    assert ((dots.double() - exact_dots).abs() / (exact_squares.sqrt() * target_norms)).max() < 1e-6  # cosine


@pytest.mark.parametrize("weighting", ["equal", "linear"])
def test_the_flat_cosine_equals_the_per_tensor_one(weighting):
    # GPUs run the cosine over one concatenated vector: the same value and gradient, selection and weights included.
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 3, 3, 3), (4,), (6, 4), (6,)]
    target = [torch.randn(*s, generator=gen) for s in shapes]
    dummy = [torch.randn(3, *s, generator=gen, requires_grad=True) for s in shapes[1:]]
    costs, grads = [], []
    for flat in (False, True):
        objective = GradientMatching(target, "sim", selection="last", k=3, weighting=weighting, flat=flat)
        assert objective.flat is flat
        cost = objective(dummy)
        costs.append(cost)
        grads.append(torch.autograd.grad(cost.sum(), dummy))
    torch.testing.assert_close(costs[1], costs[0])
    for a, b in zip(grads[1], grads[0]):
        torch.testing.assert_close(a, b)
    assert not GradientMatching(target, "l2", flat=True).flat  # only the cosine has a flat form


@pytest.mark.parametrize(("cost", "flat"), [("sim", False), ("sim", True), ("simlocal", False), ("l2", False),
                                           ("l1", False), ("max", False)])  # fmt: skip
def test_a_target_stack_matches_each_slot_with_its_own_target(cost, flat):
    # The reference: each target's own matching on its own slots, one call per slot.
    gen = torch.Generator().manual_seed(1)
    shapes = [(4, 3, 3, 3), (4,), (6, 4), (6,)]
    targets = [[torch.randn(*s, generator=gen) for s in shapes] for _ in range(3)]
    matchings = [
        GradientMatching(t, cost, selection="last", k=3, weighting="linear", flat=flat) for t in targets
    ]
    stack = TargetStack(matchings)
    assert len(stack) == 3 and stack.indices == [1, 2, 3]
    for owners in (torch.tensor([0, 1, 2]), torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([1, 2, 2])):
        dummy = [torch.randn(len(owners), *s, generator=gen, requires_grad=True) for s in shapes[1:]]
        expected = torch.cat(
            [matchings[t]([g[i : i + 1] for g in dummy]) for i, t in enumerate(owners.tolist())]
        )
        for _ in range(2):  # the second call reuses the slots' targets
            cost_of_slots = stack(dummy, owners)
            torch.testing.assert_close(cost_of_slots, expected)
            got = torch.autograd.grad(cost_of_slots.sum(), dummy)
            for a, b in zip(got, torch.autograd.grad(expected.sum(), dummy, retain_graph=True), strict=True):
                torch.testing.assert_close(a, b)


def test_dots_and_squares_under_torch_func():
    # The attack may differentiate or batch the objective with torch.func (vmap over restarts, grad).
    target = [torch.randn(3, 2, dtype=torch.float64)]
    dummy = torch.randn(4, 3, 2, dtype=torch.float64)
    by_func = torch.func.grad(lambda d: matching_cost([d], target, [1.0], "sim").sum())(dummy)
    leaf = dummy.clone().requires_grad_()
    (by_autograd,) = torch.autograd.grad(matching_cost([leaf], target, [1.0], "sim").sum(), leaf)
    torch.testing.assert_close(by_func, by_autograd)
    per_restart = torch.func.vmap(lambda d: dots_and_squares([d[None]], target)[0][0, 0])(dummy)
    torch.testing.assert_close(per_restart, (dummy * target[0]).flatten(1).sum(1))


def test_layer_selection():
    target = [torch.full((2,), v) for v in (1.0, 5.0, 3.0, 4.0)]
    assert select_layers(target, "all") == [0, 1, 2, 3]
    assert select_layers(target, "first", k=2) == [0, 1]
    assert select_layers(target, "last", k=2) == [2, 3]
    assert select_layers(target, "topk", k=2) == [1, 3]
    assert select_layers(target, "list", indices=[3, -4]) == [0, 3]
    with pytest.raises(ValueError, match="k >= 1"):
        select_layers(target, "first")
    with pytest.raises(ValueError, match="out of range"):
        select_layers(target, "list", indices=[7])


def test_gradient_matching_uses_the_selected_tensors_and_their_weights():
    objective = GradientMatching(TARGET, cost="l2", selection="last", k=1, weighting="linear")
    assert objective.indices == [1]
    assert objective.weights == [0.5]
    assert objective([DUMMY[1]]).item() == pytest.approx(0.5 * 1.0)


def test_total_variation_by_hand():
    x = torch.tensor([[0.0, 1.0], [2.0, 4.0]]).view(1, 1, 1, 2, 2)  # (R, B, C, H, W)
    # horizontal |1-0|, |4-2| -> mean 1.5; vertical |2-0|, |4-1| -> mean 2.5
    assert total_variation(x).item() == pytest.approx(4.0)
    assert total_variation(torch.cat([x, 2 * x])).tolist() == pytest.approx([4.0, 8.0])


def test_box_is_the_pixel_range_in_normalised_space():
    x = torch.zeros(2, 1, 3, 3)
    low, high = box_bounds((0.5,), (0.25,), x)
    assert low.item() == pytest.approx(-2.0) and high.item() == pytest.approx(2.0)
    projected = project_box(torch.tensor([-5.0, -1.0, 3.0]).view(3, 1, 1), low, high)
    assert projected.flatten().tolist() == [-2.0, -1.0, 2.0]
    pixels = torch.rand(2, 3, 4, 4)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.3, 0.4)
    assert torch.allclose(denormalize(normalize(pixels, mean, std), mean, std), pixels, atol=1e-6)


def test_decay_milestones_are_at_three_five_and_seven_eighths():
    assert decay_milestones(24000) == [9000, 15000, 21000]
    assert decay_milestones(800) == [300, 500, 700]


def test_median_filter_removes_an_isolated_spike():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 9.0
    assert median_filter3x3(x).abs().max().item() == 0.0
    assert median_filter3x3(torch.ones(2, 3, 4, 4)).eq(1).all()
