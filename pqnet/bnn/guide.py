"""The mean-field Normal guide and the rules for its initial scales.

Each weight gets ``q(w) = Normal(loc, softplus(rho))``, sampled directly (unlike
:class:`pyro.infer.autoguide.AutoNormal`, which samples through a ``Delta``). So
:class:`~pyro.infer.TraceMeanField_ELBO` sees a Normal against a Normal prior and uses the
closed-form KL, and :class:`~pqnet.bnn.layers.LocalReparameterization` can see the Normal.
"""

from __future__ import annotations

import contextlib
import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from torch import nn

PWFN_MIN_SCALE = 2.0**-30
PWFN_MAX_SCALE = 0.05


def softplus_inverse(x: torch.Tensor) -> torch.Tensor:
    """``rho`` with ``softplus(rho) = x`` (stable for small and large ``x``)."""
    return x + torch.log(-torch.expm1(-x))


def pwfn_scale(w: torch.Tensor) -> torch.Tensor:
    """PWFN's initial scale (Subia-Waud & Dasmahapatra, NeurIPS 2023, Sec. 3).

    A weight close to a power of two is already representable and gets a small sigma; one
    between two powers of two gets a larger one. With ``r_i`` the distance of ``|w_i|`` to
    the nearest power of two relative to ``|w_i|``, and ``q75`` the layer's 75th percentile
    of ``|w|``:

    .. math:: \\sigma_i = \\mathrm{clamp}(r_i \\cdot q_{75},\\; 2^{-30},\\; 0.05).
    """
    a = w.detach().abs().clamp_min(PWFN_MIN_SCALE)
    lower = torch.exp2(torch.floor(torch.log2(a)))
    relative = torch.minimum(a - lower, 2 * lower - a) / a
    q75 = torch.quantile(w.detach().abs().flatten().float(), 0.75)
    return (relative * q75).clamp(PWFN_MIN_SCALE, PWFN_MAX_SCALE)


def initial_scale(w: torch.Tensor, rule: float | str, relative: float = 0.1) -> torch.Tensor:
    """Initial posterior scale for weights ``w``.

    ``rule``: a positive float (that constant), ``"relative"`` (``relative * |w|``, at least
    1e-6) or ``"pwfn"`` (:func:`pwfn_scale`).
    """
    if isinstance(rule, (int, float)) and not isinstance(rule, bool):
        if not (math.isfinite(rule) and rule > 0):
            raise ValueError(f"init_scale: must be positive and finite, got {rule}")
        return torch.full_like(w, float(rule))
    if rule == "relative":
        if not relative > 0:
            raise ValueError(f"init_relative_scale: must be positive, got {relative}")
        return (relative * w.detach().abs()).clamp_min(1e-6)
    if rule == "pwfn":
        return pwfn_scale(w)
    raise ValueError(
        f"init_scale: expected a positive float, 'relative' or 'pwfn', got {rule!r}"
    )


def _key(site: str) -> str:
    return site.replace(".", "/")  # parameter names may not contain dots


class MeanFieldNormalGuide(nn.Module):
    """``q(w) = prod_i Normal(w_i | loc_i, softplus(rho_i))`` over the named sites.

    ``kl_weight`` scales every site (Pyro's ``poutine.scale``), which scales the closed-form
    KL in :class:`~pyro.infer.TraceMeanField_ELBO`: the beta of a KL warm-up.
    """

    def __init__(self, locs: dict[str, torch.Tensor], scales: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.sites = list(locs)
        self.loc = nn.ParameterDict(
            {_key(s): nn.Parameter(locs[s].detach().clone()) for s in self.sites}
        )
        self.rho = nn.ParameterDict(
            {_key(s): nn.Parameter(softplus_inverse(scales[s].detach().clone()))
             for s in self.sites}
        )
        self.kl_weight = 1.0
        self.handler: contextlib.AbstractContextManager = contextlib.nullcontext()

    def loc_of(self, site: str) -> torch.Tensor:
        return self.loc[_key(site)]

    def scale_of(self, site: str) -> torch.Tensor:
        return F.softplus(self.rho[_key(site)])

    def distribution(self, site: str) -> dist.Distribution:
        loc = self.loc_of(site)
        return dist.Normal(loc, self.scale_of(site)).to_event(loc.dim())

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        with self.handler, poutine.scale(scale=self.kl_weight):
            return {s: pyro.sample(s, self.distribution(s)) for s in self.sites}
