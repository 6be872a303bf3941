"""The attack without Lightning (:class:`~lightning_inversion.inversion.Inversion`) against the LightningModule
built on it, what a run keeps beside its tensors, and the shape of the code: a small LightningModule and plain
modules that never import Lightning."""

import ast
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch

from lightning_inversion.attack import GradientInversion
from lightning_inversion.client import Client
from lightning_inversion.errors import InputError
from lightning_inversion.images import box_bounds, normalize, project_box
from lightning_inversion.inversion import (
    Inversion,
    StepTicks,
    Stopwatch,
    check_steps,
    decay_schedule,
    logs_this_step,
    restore_rng,
    resume_remark,
    rng_state,
)
from lightning_inversion.labels import AutoLabels
from lightning_inversion.objectives import Cosine
from lightning_inversion.priors import TotalVariation
from lightning_inversion.restarts import LowestMatching

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_inversion"
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
# The modules that hold the attack's math: none of them, nor anything of the package they import, uses Lightning.
PLAIN = ["inversion", "restarts", "targets", "labels", "objectives", "priors", "threat_model", "parts", "client",
         "checkpoints", "analytic", "images", "notices", "errors"]  # fmt: skip


def test_a_plain_loop_over_the_inversion_gives_the_lightning_modules_images(tiny_victim, cat16):
    update = Client().update(tiny_victim, normalize(cat16, MEAN, STD), torch.tensor([3]))
    options = dict(num_classes=10, image_shape=(3, 16, 16), mean=MEAN, std=STD, restarts=2, seed=5)
    module = GradientInversion(tiny_victim, tv=1e-3, lr_decay=False, **options)
    module.set_target(update)
    trainer = pl.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(module)
    # The same attack, written as a plain PyTorch loop: signed Adam under the box, no Trainer.
    parts = Cosine(), [TotalVariation(1e-3)], AutoLabels(), LowestMatching()
    plain = Inversion(tiny_victim, Client(), *parts, **options)
    plain.set_target(update)
    plain.prepare()
    optimizer = torch.optim.Adam([plain.dummy_images], lr=0.1)
    low, high = box_bounds(MEAN, STD, plain.dummy_images)
    for _ in range(6):
        optimizer.zero_grad()
        cost, prior = plain.restart_costs(plain.dummy_images, plain.target_labels)
        (cost + prior).sum().backward(inputs=[plain.dummy_images])
        plain.dummy_images.grad.sign_()
        optimizer.step()
        with torch.no_grad():
            plain.dummy_images.copy_(project_box(plain.dummy_images, low, high))
            plain.restart_steps += 1
    torch.testing.assert_close(plain.dummy_images, module.dummy_images, rtol=0, atol=0)
    assert plain.reconstruction.scores == module.reconstruction.scores  # built on first access after the loop
    assert plain.reconstruction.chosen_restart == module.reconstruction.chosen_restart
    assert plain.reconstruction.labels.tolist() == [3] and plain.labels_from == "given"


def test_a_runs_state_comes_back_from_a_checkpoint(tiny_victim):
    client = Client()
    updates = [client.update(tiny_victim, torch.randn(1, 3, 16, 16), torch.tensor([t])) for t in (1, 2)]
    options = dict(num_classes=10, image_shape=(3, 16, 16), mean=MEAN, std=STD, targets=2)
    parts = Cosine(), [], AutoLabels(), LowestMatching()
    saved = Inversion(tiny_victim, client, *parts, **options)
    saved.set_targets(updates)
    saved._clock.seconds = 12.5
    state = saved.run_state({"victim": "digest"}, max_steps=9)
    assert list(state) == ["target_update", "target_updates", "attack_identity", "attack_seconds",
                           "attack_max_steps", "attack_rng"]  # fmt: skip
    assert state["attack_seconds"] == 12.5 and state["attack_max_steps"] == 9
    assert "attack_max_steps" not in saved.run_state({}, max_steps=None)
    restored = Inversion(tiny_victim, client, *parts, **options)
    restored.restore_run_state(state)
    assert restored._clock.seconds == 12.5 and len(restored.updates) == 2
    for mine, theirs in zip(restored.updates, updates, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(mine.tensors, theirs.tensors, strict=True))
    assert restored.update is restored.updates[0]
    one = Inversion(tiny_victim, client, *parts, **{**options, "targets": 1})
    one.set_target(updates[0])
    assert "target_updates" not in one.run_state({})  # one target: target_update alone, as always


def test_the_rng_state_and_the_clock_survive_a_pause():
    state = rng_state(torch.device("cpu"))
    first = torch.rand(4)
    restore_rng(state, torch.device("cpu"))
    assert torch.equal(torch.rand(4), first)
    clock = Stopwatch(2.0)
    assert clock.elapsed() == 2.0 and clock.started is None
    clock.start()
    assert clock.elapsed() >= 2.0
    clock.stop()
    assert clock.seconds >= 2.0 and clock.started is None and clock.elapsed() == clock.seconds


def test_logging_steps_ticks_and_the_learning_rate_plan():
    def logged(max_steps, every):
        return [s for s in range(1, 11) if logs_this_step(SimpleNamespace(global_step=s - 1, max_steps=max_steps,
                                                                        log_every_n_steps=every))]  # fmt: skip

    assert logged(7, 3)[:3] == [3, 6, 7]  # every third step and the last one
    assert logged(-1, 4) == [4, 8] and logged(5, 0) == list(range(1, 11))
    assert len(StepTicks(5, processes=2)) == 10 and len(StepTicks(-1)) == 1 and len(StepTicks(None)) == 1
    assert float(StepTicks(3)[0]) == 0.0
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    plan = decay_schedule(optimizer, 8)
    assert plan["optimizer"] is optimizer and sorted(plan["lr_scheduler"]["scheduler"].milestones) == [
        3,
        5,
        7,
    ]
    with pytest.raises(ValueError, match="set trainer.max_steps"):
        decay_schedule(optimizer, -1)
    assert resume_remark(None, 5) is None and resume_remark(8, 8) is None
    assert "planned for 8 steps with max_steps=16" in resume_remark(8, 16) and "[3, 5, 7]" in resume_remark(
        8, 16
    )


def test_zero_steps_are_refused_unless_there_is_a_reason():
    check_steps(0, exact=True, steps_run=0)  # a closed-form recovery needs no step
    check_steps(0, exact=False, steps_run=3)  # a resumed run that already ran
    check_steps(5, exact=False, steps_run=0)
    with pytest.raises(InputError, match="max_steps 0 runs no optimisation step"):
        check_steps(0, exact=False, steps_run=0)


def test_analytic_init_is_refused_for_several_targets(tiny_victim):
    parts = Cosine(), [], AutoLabels(), LowestMatching()
    with pytest.raises(InputError, match="init 'analytic' recovers one target's images"):
        Inversion(tiny_victim, Client(), *parts, 10, (3, 16, 16), MEAN, STD, targets=2, init="analytic")
    assert math.isnan(
        float(Inversion(tiny_victim, Client(), *parts, 10, (3, 16, 16), MEAN, STD).last_cost[0])
    )


def _package_imports(name: str) -> tuple[set[str], set[str]]:
    """The top-level packages and the package's own modules that ``lightning_inversion.<name>`` imports."""
    outside, inside = set(), set()
    for node in ast.walk(ast.parse((PACKAGE / f"{name}.py").read_text())):
        if isinstance(node, ast.Import):
            outside |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module.startswith("lightning_inversion."):
                inside.add(node.module.split(".")[1])
            elif node.level == 0:
                outside.add(node.module.split(".")[0])
            elif node.module:
                inside.add(node.module.split(".")[0])
            else:  # from . import x
                inside |= {alias.name for alias in node.names}
    return outside, inside


def test_the_plain_modules_never_import_lightning():
    seen, todo = set(), list(PLAIN)
    while todo:
        name = todo.pop()
        if name in seen or not (PACKAGE / f"{name}.py").exists():
            continue
        seen.add(name)
        outside, inside = _package_imports(name)
        assert not outside & {"pytorch_lightning", "lightning", "lightning_fabric"}, name
        assert "attack" not in inside and "cli" not in inside, name
        todo += sorted(inside)
    assert set(PLAIN) <= seen
    assert "pytorch_lightning" in _package_imports("attack")[0]  # the check sees an import where there is one


def test_the_lightning_module_stays_small():
    lines = (PACKAGE / "attack.py").read_text().splitlines()
    assert len(lines) <= 250, f"attack.py has {len(lines)} lines: move the math to a Lightning-free module"
    assert max(map(len, lines)) <= 120  # not by long lines: ruff formats the code at 110
