"""Budget arguments and the search that meets an average-bit budget from below."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..inference.posterior import Posterior
from .qnet import weight_name

__all__ = ["layer_posteriors", "meet_budget", "one_of"]


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
                most: float, steps: int = 200, argument: str = "avg_bits") -> float:
    """Bisect a scalar parameter so its allocation's average bits meet ``budget`` from below.

    ``avg_bits_at`` must be monotone between ``fewest`` (a parameter whose allocation meets
    the budget) and ``most``. Returns ``most`` when even that meets the budget, else the
    parameter on the feasible side of the boundary, as close to it as float64 resolves:
    the allocation with the largest average bits ``<= budget`` the family reaches.
    """
    if avg_bits_at(most) <= budget:
        return most
    if avg_bits_at(fewest) > budget:
        raise ValueError(f"{argument}: no allocation reaches {budget}; the fewest bits are "
                         f"{avg_bits_at(fewest):.4f}")
    for _ in range(steps):
        mid = 0.5 * (fewest + most)
        if mid in (fewest, most):
            break
        if avg_bits_at(mid) <= budget:
            fewest = mid
        else:
            most = mid
    return fewest
