"""Priors over the weights of a Bayesian layer: isotropic Normals.

Every prior is ``Normal(m, s)`` on each entry of a weight tensor, so the KL to the
mean-field Normal guide stays closed-form. They differ in the scale ``s`` and in the mean:
``m = 0``, or the network's own starting weights for an ``anchored`` prior.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class NormalPrior:
    """``w ~ Normal(0, scale)`` for every weight of every layer."""

    scale: float = 1.0
    anchored: ClassVar[bool] = False

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
    anchored: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not (math.isfinite(self.gain) and self.gain > 0):
            raise ValueError(f"prior: gain must be a positive finite number, got {self.gain}")

    def scale_for(self, fan_in: int) -> float:
        return self.gain / math.sqrt(max(fan_in, 1))


@dataclass(frozen=True)
class PWFNPrior(NormalPrior):
    """``w ~ Normal(w_0, scale)``, anchored at the starting (pretrained) weights ``w_0``.

    PWFN (Subia-Waud & Dasmahapatra, NeurIPS 2023) adds to the data loss a regulariser that
    pushes every sigma up toward its cap of 0.05, so that the posterior shows how far each
    weight can move before the loss notices. The KL to this prior is that regulariser, with
    the cap as the prior's scale ``c``: per weight,

    .. math::

        \\mathrm{KL} = \\log\\frac{c}{\\sigma} + \\frac{\\sigma^2 + (\\mu - w_0)^2}{2 c^2}
            - \\frac12,

    whose sigma part is smallest at ``sigma = c`` (it pushes sigma up to the cap and no
    further), and whose mean part keeps the means near the pretrained net. Its strength is
    the fit's ``kl_weight``.
    """

    scale: float = 0.05
    anchored: ClassVar[bool] = True


Prior = NormalPrior | FanInPrior | PWFNPrior
PRIORS = {"normal": NormalPrior, "fan-in": FanInPrior, "pwfn": PWFNPrior}


def make_prior(prior: str | float | Prior) -> Prior:
    """``"normal"``, ``"fan-in"``, ``"pwfn"``, a positive float (the Normal's scale) or a
    prior object."""
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
        "a positive float, NormalPrior(...), FanInPrior(...) or PWFNPrior(...)"
    )
