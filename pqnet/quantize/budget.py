"""Budget arguments and the search that meets an average-bit budget from below."""

from __future__ import annotations

import math
from collections.abc import Callable
from numbers import Integral, Real

import torch

from ..inference.posterior import Posterior
from .grids import MAX_BITS
from .qnet import weight_name

__all__ = ["check_avg_bits", "check_bits", "check_flag", "check_int", "check_nonnegative",
           "check_seed", "layer_posteriors", "meet_budget", "one_of"]


def check_bits(bits: object, name: str = "bits") -> int:
    """An integer bit-width in ``1..8``."""
    if isinstance(bits, bool) or not isinstance(bits, Integral) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"{name}: expected an integer bit-width in 1..{MAX_BITS}, got {bits!r}")
    return int(bits)


def check_avg_bits(avg_bits: object, name: str = "avg_bits") -> float:
    """A finite average bit budget of at least 1 (no method codes a weight in under 1 bit)."""
    if isinstance(avg_bits, bool) or not isinstance(avg_bits, Real) \
            or not math.isfinite(avg_bits) or avg_bits < 1:
        raise ValueError(f"{name}: expected a finite number of bits per weight >= 1, "
                         f"got {avg_bits!r}")
    return float(avg_bits)


def check_nonnegative(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) \
            or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite non-negative number, got {value!r}")
    return float(value)


def check_int(value: object, name: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or not low <= value <= high:
        raise ValueError(f"{name}: expected an integer in {low}..{high}, got {value!r}")
    return int(value)


def check_flag(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")
    return value


def check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, Integral):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    return int(seed)


def one_of(**given: object) -> str:
    """The name of the single argument that is not ``None``; an error naming them otherwise."""
    names = [k for k, v in given.items() if v is not None]
    if len(names) != 1:
        raise ValueError(f"{' / '.join(given)}: give exactly one of them, got "
                         f"{', '.join(names) or 'none'}")
    return names[0]


def layer_posteriors(posterior: Posterior) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """``(layer, mu, sigma)`` for the weight of every Bayesian layer, as float32 on the CPU."""
    if not isinstance(posterior, Posterior):
        raise TypeError(f"posterior: expected a pqnet Posterior, got {type(posterior).__name__}")
    out = []
    for layer in posterior.layers:
        name = weight_name(layer)
        if name not in posterior.loc:
            raise ValueError(f"posterior: layer {layer!r} has no random weight {name!r}")
        out.append((layer, posterior.loc[name].detach().cpu().float(),
                    posterior.scale[name].detach().cpu().float()))
    return out


def meet_budget(avg_bits_at: Callable[[float], float], budget: float, fewest: float,
                most: float, steps: int = 200) -> float:
    """Bisect a scalar parameter so its allocation's average bits meet ``budget`` from below.

    ``avg_bits_at`` must be monotone between ``fewest`` (a parameter whose allocation meets
    the budget) and ``most``. Returns ``most`` when even that meets the budget, else the
    parameter on the feasible side of the boundary, as close to it as float64 resolves:
    the allocation with the largest average bits ``<= budget`` the family reaches.
    """
    if avg_bits_at(most) <= budget:
        return most
    if avg_bits_at(fewest) > budget:
        raise ValueError(f"avg_bits: no allocation reaches {budget}; the fewest average bits "
                         f"are {avg_bits_at(fewest):.4f}")
    for _ in range(steps):
        mid = 0.5 * (fewest + most)
        if mid in (fewest, most):
            break
        if avg_bits_at(mid) <= budget:
            fewest = mid
        else:
            most = mid
    return fewest
