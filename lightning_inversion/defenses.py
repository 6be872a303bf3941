"""Defenses on the client: what an honest client does to its update before sharing it, and what the server knows.

A defense has two faces, kept apart in code:

- :meth:`Defense.defend` is the honest client's: it may draw randomness (noise) from a generator that lives only
  inside that call, seeded from the defense's ``seed`` or, without one, from the operating system's entropy. The
  draw is never stored and never reaches the attacker.
- :meth:`Defense.simulate` is the attacker's: the rule the server knows (a clipping norm, a pruning or
  quantisation rule), applied to the dummy images' update as a differentiable function, with no randomness.

Shipped: :class:`DPSGD` (per-example clipping and Gaussian noise through Opacus, Abadi et al. 2016),
:class:`ClipUpdate` (the update clipped to a global norm), :class:`GaussianNoise` and :class:`LaplaceNoise` on the
update, :class:`Prune` (top-k sparsification: the largest p % of each tensor's entries kept, as the gradient
pruning of Zhu et al. 2019) and :class:`Quantize` (8-bit down to 1-bit sign, as compressed FL sends). Secure
aggregation is the client's ``num_clients``. A client applies its defenses in order (``Client(defenses=[...])``,
``client.defenses`` in YAML); under aggregation every client defends its own update before the average.

Nothing here imports Lightning. Opacus is imported only by :class:`DPSGD`'s honest face and its accountant
(``pip install lightning-inversion[dp]``).
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
from jsonargparse.typing import (
    NonNegativeFloat,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    restricted_number_type,
)
from torch import Tensor

from .errors import InputError

Percent = restricted_number_type("Percent", float, [(">", 0), ("<=", 100)], join="and")
Percent.__doc__ = "A percentage in (0, 100]."
Bits = restricted_number_type("Bits", int, [(">=", 1), ("<=", 16)], join="and")
Bits.__doc__ = "A number of bits from 1 (the sign) to 16."

# Rényi orders below Opacus's default range (1.1 … 63), tried for small noise.
NEAR_ONE_ORDERS = [1 + x / 1000 for x in range(1, 101)]

# Opacus's per-example clip factor is C / (norm + 1e-6), at most 1 (opacus.optimizers.DPOptimizer).
CLIP_EPS = 1e-6


def _number(name: str, value, low: float, *, strict: bool, high: float | None = None) -> float:
    """``value`` as a float, or an InputError naming the option: the parser's rule, enforced from Python too."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if strict else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"> {low:g}" if strict else f">= {low:g}"
        bound += f" and <= {high:g}" if high is not None else ""
        raise InputError(f"defense option {name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _seed(value) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise InputError(f"defense option seed must be a whole number or null, got {value!r}")
    return value


def private_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one honest draw: seeded with ``seed``, or from the OS's entropy when ``None``."""
    generator = torch.Generator(device=device)
    if seed is None:
        generator.seed()  # non-deterministic: nobody, the attacker included, can replay it
    else:
        generator.manual_seed(int(seed))
    return generator


def global_norm(tensors: list[Tensor]) -> Tensor:
    """The L2 norm of all tensors together (a scalar, or ``(...)`` for leading batch dims shared by all)."""
    return torch.stack([t.pow(2).sum() for t in tensors]).sum().sqrt()


class Defense:
    """A transformation of the client's update before it is shared (see the module docstring).

    Subclasses implement :meth:`simulate` (deterministic, differentiable: the rule the server knows) and, when the
    client draws randomness, :meth:`defend`. ``strength`` names the ``__init__`` argument an audit sweeps and
    ``stronger`` whether a ``higher`` or ``lower`` value of it protects more.
    """

    strength: str = ""
    stronger: Literal["higher", "lower"] = "higher"

    def defend(self, tensors: list[Tensor], generator: torch.Generator | None = None) -> list[Tensor]:
        """The honest client's face: the update it shares. ``generator`` is the client's private one."""
        return self.simulate(tensors)

    def simulate(self, tensors: list[Tensor]) -> list[Tensor]:
        """The attacker's face: the known rule applied to the dummy update, differentiably; no randomness."""
        raise NotImplementedError

    @property
    def draws(self) -> bool:
        """Whether the honest face draws randomness (then it needs a private generator)."""
        return False

    @property
    def seed(self) -> int | None:
        return getattr(self, "_seed", None)

    def options(self) -> dict:
        """The ``__init__`` arguments of this defense, plain values."""
        return {}

    def describe(self) -> str:
        """A short name with the options, e.g. ``Prune(keep_percent=10)``."""
        options = ", ".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.options().items()
        )
        return f"{type(self).__name__}({options})"

    def __repr__(self) -> str:
        return self.describe()


class ClipUpdate(Defense):
    """Clip the whole update to a global L2 norm: ``u · min(1, C / (‖u‖ + 1e-6))``.

    Args:
        max_norm: the norm C the update is clipped to.
    """

    strength = "max_norm"
    stronger = "lower"

    def __init__(self, max_norm: PositiveFloat = 1.0) -> None:
        self.max_norm = _number("max_norm", max_norm, 0, strict=True)

    def simulate(self, tensors: list[Tensor]) -> list[Tensor]:
        factor = (self.max_norm / (global_norm(tensors) + CLIP_EPS)).clamp(max=1.0)
        return [t * factor for t in tensors]

    def options(self) -> dict:
        return {"max_norm": self.max_norm}


class _Noise(Defense):
    """Independent noise on every entry of the update; the attacker knows the law, not the draw."""

    strength = "scale"

    def __init__(self, scale: NonNegativeFloat = 1e-3, seed: int | None = None) -> None:
        self.scale = _number("scale", scale, 0, strict=False)
        self._seed = _seed(seed)

    @property
    def draws(self) -> bool:
        return self.scale > 0

    def simulate(self, tensors: list[Tensor]) -> list[Tensor]:
        return list(tensors)  # zero-mean noise: the attacker's best guess of the update is the update

    def defend(self, tensors: list[Tensor], generator: torch.Generator | None = None) -> list[Tensor]:
        if self.scale == 0:
            return list(tensors)
        if generator is None:
            generator = private_generator(self._seed, tensors[0].device)
        return [t + self._draw(t, generator) for t in tensors]

    def _draw(self, like: Tensor, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def options(self) -> dict:
        return {"scale": self.scale, "seed": self._seed}


class GaussianNoise(_Noise):
    """Add Gaussian noise ``N(0, scale²)`` to every entry of the update.

    Args:
        scale: the standard deviation, in the update's units (clip first, with :class:`ClipUpdate`, to calibrate
            it to a sensitivity).
        seed: seeds the client's private noise (reproducible audits); ``null`` draws it from the OS's entropy.
    """

    def _draw(self, like: Tensor, generator: torch.Generator) -> Tensor:
        noise = torch.randn(like.shape, generator=generator, device=like.device, dtype=torch.float64)
        return (noise * self.scale).to(like.dtype)


class LaplaceNoise(_Noise):
    """Add Laplacian noise of scale ``b`` (density ``exp(−|x|/b) / 2b``) to every entry of the update.

    Args:
        scale: the scale b, in the update's units (standard deviation ``√2 · b``).
        seed: seeds the client's private noise (reproducible audits); ``null`` draws it from the OS's entropy.
    """

    def _draw(self, like: Tensor, generator: torch.Generator) -> Tensor:
        # Inverse CDF of the Laplace law on u ~ U(-1/2, 1/2): −b · sign(u) · log(1 − 2|u|).
        u = torch.rand(like.shape, generator=generator, device=like.device, dtype=torch.float64) - 0.5
        return (-self.scale * u.sign() * torch.log1p(-2 * u.abs())).to(like.dtype)


class Prune(Defense):
    """Gradient pruning / top-k sparsification: keep the largest ``keep_percent`` % of each tensor's entries by
    magnitude (``ceil(p · n / 100)`` of n, at least one), zero the rest.

    The attacker applies the same rule to the dummy update; the kept entries stay differentiable.

    Args:
        keep_percent: p, the percentage of entries kept in each tensor, in (0, 100].
    """

    strength = "keep_percent"
    stronger = "lower"

    def __init__(self, keep_percent: Percent = 10.0) -> None:
        self.keep_percent = _number("keep_percent", keep_percent, 0, strict=True, high=100)

    def kept(self, numel: int) -> int:
        """How many of ``numel`` entries are kept."""
        return max(1, min(numel, math.ceil(self.keep_percent * numel / 100 - 1e-9)))

    def simulate(self, tensors: list[Tensor]) -> list[Tensor]:
        out = []
        for t in tensors:
            k = self.kept(t.numel())
            if k == t.numel():
                out.append(t)
                continue
            flat = t.reshape(-1)
            index = flat.detach().abs().topk(k).indices
            mask = torch.zeros_like(flat).index_fill(0, index, 1.0)
            out.append((flat * mask).reshape(t.shape))
        return out

    def options(self) -> dict:
        return {"keep_percent": self.keep_percent}


class Quantize(Defense):
    """Quantise every tensor of the update as compressed FL sends it: ``bits ≥ 2`` rounds to the nearest of
    ``2^(bits−1) − 1`` symmetric levels per sign, scaled by the tensor's largest magnitude (8 bits: 127 levels,
    int8); ``bits = 1`` sends the sign only (signSGD).

    Rounding has no useful derivative: the attacker's simulation computes the quantised values but passes the
    gradient straight through (the straight-through estimator).

    Args:
        bits: bits per entry, 1 (the sign) to 16.
    """

    strength = "bits"
    stronger = "lower"

    def __init__(self, bits: Bits = 8) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
            raise InputError(f"defense option bits must be a whole number from 1 to 16, got {bits!r}")
        self.bits = int(bits)

    def quantize(self, t: Tensor) -> Tensor:
        """The values sent for ``t`` (no gradient)."""
        t = t.detach()
        if self.bits == 1:
            return t.sign()
        levels = 2 ** (self.bits - 1) - 1
        scale = t.abs().max() / levels
        # An all-zero tensor stays zero; no branch on the value, so that vmap (the target axis) can batch it.
        return torch.round(t / torch.where(scale > 0, scale, 1.0)).clamp(-levels, levels) * scale

    def simulate(self, tensors: list[Tensor]) -> list[Tensor]:
        return [t + (self.quantize(t) - t).detach() for t in tensors]

    def defend(self, tensors: list[Tensor], generator: torch.Generator | None = None) -> list[Tensor]:
        return [self.quantize(t) for t in tensors]

    def options(self) -> dict:
        return {"bits": self.bits}


class DPSGD(Defense):
    """DP-SGD (Abadi et al. 2016): every example's gradient clipped to ``max_grad_norm`` (over all parameters),
    the clipped gradients summed, Gaussian noise of std ``noise_multiplier · max_grad_norm`` added, the sum divided
    by the (local) batch size; at every local step of FedAvg, once for FedSGD.

    The honest client runs this through Opacus (``GradSampleModule`` and ``DPOptimizer``, noise from its private
    generator); the attacker simulates the per-example clipping with ``torch.func.vmap`` (:meth:`clip_and_average`),
    without the noise. The ε spent for ``delta`` comes from Opacus's accountant (:meth:`epsilon`): sampling rate
    ``b / B`` (the local minibatch over the client's examples), the local steps of one update, times ``rounds``.

    DP-SGD acts on the gradients of each local step, so it comes before any other defense of the client
    whatever its place in the list. Per-example gradients need BatchNorm in eval mode (training mode mixes the
    examples of a batch).

    Args:
        noise_multiplier: σ, the noise std over the clipping norm (0: clipping only, no guarantee).
        max_grad_norm: C, each example's gradient norm bound.
        delta: the δ for which ε is reported.
        rounds: the number of rounds the client shares such an update, for the ε it spends in all.
        accountant: Opacus's accountant: ``rdp`` (Rényi DP), ``prv`` (privacy random variables) or ``gdp``.
        secure_mode: Opacus's noise robust to floating-point attacks.
        seed: seeds the client's private noise (reproducible audits); ``null`` draws it from the OS's entropy.
    """

    strength = "noise_multiplier"

    def __init__(
        self,
        noise_multiplier: NonNegativeFloat = 1.0,
        max_grad_norm: PositiveFloat = 1.0,
        delta: OpenUnitInterval = 1e-5,
        rounds: PositiveInt = 1,
        accountant: Literal["rdp", "prv", "gdp"] = "rdp",
        secure_mode: bool = False,
        seed: int | None = None,
    ) -> None:
        self.noise_multiplier = _number("noise_multiplier", noise_multiplier, 0, strict=False)
        self.max_grad_norm = _number("max_grad_norm", max_grad_norm, 0, strict=True)
        self.delta = _number("delta", delta, 0, strict=True, high=1)
        if self.delta >= 1:
            raise InputError(f"defense option delta must be in (0, 1), got {delta!r}")
        if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
            raise InputError(f"defense option rounds must be a whole number >= 1, got {rounds!r}")
        if accountant not in ("rdp", "prv", "gdp"):
            raise InputError(f"defense option accountant must be 'rdp', 'prv' or 'gdp', got {accountant!r}")
        self.rounds = int(rounds)
        self.accountant = accountant
        self.secure_mode = bool(secure_mode)
        self._seed = _seed(seed)

    @property
    def draws(self) -> bool:
        return self.noise_multiplier > 0

    def simulate(self, tensors: list[Tensor]) -> list[Tensor]:
        return list(tensors)  # DP-SGD acts per example, inside the client's steps (clip_and_average)

    def clip_and_average(self, per_example: list[Tensor], expected_batch_size: int) -> list[Tensor]:
        """The attacker's face of one DP-SGD step: Opacus's per-example clipping, summed, over the batch size.

        Args:
            per_example: one ``(B, *shape)`` tensor per parameter, every parameter of the victim.
            expected_batch_size: the divisor (Opacus's ``expected_batch_size``: the local batch size).
        """
        norms = torch.stack([g.reshape(g.shape[0], -1).norm(2, dim=-1) for g in per_example], 1).norm(
            2, dim=1
        )
        factor = (self.max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)  # (B,)
        return [torch.einsum("i,i...", factor, g) / expected_batch_size for g in per_example]

    def optimizer(
        self, optimizer: torch.optim.Optimizer, expected_batch_size: int, generator: torch.Generator | None
    ) -> torch.optim.Optimizer:
        """The honest face: Opacus's ``DPOptimizer`` around ``optimizer`` (over a ``GradSampleModule``'s
        parameters), its noise drawn from ``generator``."""
        DPOptimizer = _opacus("opacus.optimizers", "DPOptimizer")
        return DPOptimizer(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            expected_batch_size=expected_batch_size,
            generator=generator,
            secure_mode=self.secure_mode,
        )

    def epsilon(self, sample_rate: float, steps: int, rounds: int | None = None) -> float:
        """The ε spent for ``delta`` by ``steps`` DP-SGD steps at ``sample_rate`` in each of ``rounds`` rounds
        (default: the defense's ``rounds``), from Opacus's accountant; ``inf`` without noise."""
        if self.noise_multiplier == 0:
            return math.inf
        create_accountant = _opacus("opacus.accountants", "create_accountant")
        accountant = create_accountant(self.accountant)
        rounds = self.rounds if rounds is None else int(rounds)
        accountant.history = [(self.noise_multiplier, float(sample_rate), int(steps) * rounds)]
        if self.accountant != "rdp":
            return float(accountant.get_epsilon(delta=self.delta))
        # Small noise puts the best Rényi order below Opacus's default range (it warns: a looser bound); then
        # orders down to 1.001 are tried too. Every order gives a valid bound.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            epsilon = float(accountant.get_epsilon(delta=self.delta))
        if not any("Optimal order is the smallest alpha" in str(w.message) for w in caught):
            for w in caught:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
            return epsilon
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Optimal order is the smallest alpha", UserWarning)
            return min(epsilon, float(accountant.get_epsilon(delta=self.delta, alphas=NEAR_ONE_ORDERS)))

    def privacy(self, sample_rate: float, steps: int) -> dict:
        """What ``metrics.json`` records: ε for δ, the sampling rate, steps per round and rounds, σ, C."""
        return {
            "mechanism": "DP-SGD (Opacus)",
            "epsilon": self.epsilon(sample_rate, steps),
            "delta": self.delta,
            "accountant": self.accountant,
            "sample_rate": float(sample_rate),
            "steps_per_round": int(steps),
            "rounds": self.rounds,
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
        }

    def options(self) -> dict:
        options = {"noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm}
        if self.rounds != 1:
            options["rounds"] = self.rounds
        return options


def _opacus(module: str, name: str):
    try:
        imported = __import__(module, fromlist=[name])
    except ImportError:
        raise InputError(
            "the DPSGD defense needs Opacus: pip install 'lightning-inversion[dp]' (or pip install opacus)"
        ) from None
    return getattr(imported, name)
