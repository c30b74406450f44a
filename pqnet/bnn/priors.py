"""Priors over the weights of a Bayesian layer: zero-mean isotropic Normals.

Both priors are ``Normal(0, s)`` on every entry of a weight tensor; they differ in how the
scale ``s`` is chosen, so the KL to the mean-field Normal guide stays closed-form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class NormalPrior:
    """``w ~ Normal(0, scale)`` for every weight of every layer."""

    scale: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"prior: scale must be a positive finite number, got {self.scale}")

    def scale_for(self, fan_in: int) -> float:
        return self.scale


@dataclass(frozen=True)
class FanInPrior:
    """``w ~ Normal(0, gain / sqrt(fan_in))``: the per-layer scale of He et al. (2015).

    With ``gain = sqrt(2)`` a draw from the prior keeps ReLU activations at unit variance,
    so the prior is a network that already computes something sensible.
    """

    gain: float = math.sqrt(2.0)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.gain) and self.gain > 0):
            raise ValueError(f"prior: gain must be a positive finite number, got {self.gain}")

    def scale_for(self, fan_in: int) -> float:
        return self.gain / math.sqrt(max(fan_in, 1))


Prior = NormalPrior | FanInPrior
PRIORS = {"normal": NormalPrior, "fan-in": FanInPrior}


def make_prior(prior: str | float | Prior) -> Prior:
    """``"normal"``, ``"fan-in"``, a positive float (the Normal's scale) or a prior object."""
    if isinstance(prior, (NormalPrior, FanInPrior)):
        return prior
    if isinstance(prior, bool):
        raise TypeError(f"prior: expected a name, a positive float or a prior, got {prior!r}")
    if isinstance(prior, (int, float)):
        return NormalPrior(float(prior))
    if isinstance(prior, str) and prior.replace("_", "-") in PRIORS:
        return PRIORS[prior.replace("_", "-")]()
    raise ValueError(
        f"prior: unknown prior {prior!r}; expected one of {', '.join(PRIORS)}, "
        "a positive float, NormalPrior(...) or FanInPrior(...)"
    )
