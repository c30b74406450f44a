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
FIXED_SCALE = PWFN_MIN_SCALE
"""The scale of a fixed weight (:meth:`MeanFieldNormalGuide.fix`): PWFN's lower clamp."""


def softplus_inverse(x: torch.Tensor) -> torch.Tensor:
    """``rho`` with ``softplus(rho) = x`` (stable for small and large ``x``)."""
    return x + torch.log(-torch.expm1(-x))


def pwfn_scale(w: torch.Tensor, base: float = 0.0025) -> torch.Tensor:
    """PWFN's initial scale (Subia-Waud & Dasmahapatra, NeurIPS 2023, Sec. 3).

    A weight at a power of two is already representable and gets the smallest sigma; one
    far from both neighbouring powers of two gets a larger one. With
    ``d_i = |w_i - 2^floor(log2|w_i|)| |w_i - 2^ceil(log2|w_i|)| / w_i^2`` (the product of
    the relative distances to the two nearest powers of two) and ``q75`` the layer's 75th
    percentile of ``d``:

    .. math:: \\sigma_i = \\mathrm{clamp}(\\mathrm{base} \\cdot d_i / q_{75},\\;
        2^{-30},\\; 0.05).
    """
    a = w.detach().abs().float().clamp_min(PWFN_MIN_SCALE)
    below = torch.exp2(torch.floor(torch.log2(a)))
    distance = (a - below) * (2 * below - a) / a.square()
    q75 = torch.quantile(distance.flatten(), 0.75).clamp_min(torch.finfo(torch.float32).tiny)
    return (base * distance / q75).clamp(PWFN_MIN_SCALE, PWFN_MAX_SCALE).to(w.dtype)


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
        self.fixed: set[str] = set()  # sites with fixed weights (buffers fixed_mask/value_*)

    def fix(self, site: str, mask: torch.Tensor, value: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """From now on the weights of ``site`` where ``mask`` are ``value``, with scale
        :data:`FIXED_SCALE`, and their ``loc`` and ``rho`` get no gradient (a ``where``
        selects the fixed value), so no optimiser can move them. Fixing is cumulative.

        Every argument is checked before any change (:meth:`_fix_arguments`). Returns the
        mask (bool) and the value (of the site's shape) as used."""
        mask, value = self._fix_arguments(site, mask, value)
        key = _key(site)
        self.register_buffer(f"fixed_mask_{key}", mask.clone())
        self.register_buffer(f"fixed_value_{key}", torch.where(mask, value, 0).detach().clone())
        self.fixed.add(site)
        return mask, value

    def _fix_arguments(self, site: str, mask: object, value: object
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """``mask`` as a bool tensor and ``value`` as a real one, both of the site's shape;
        refused: an unknown site, a mask not of booleans (or 0 and 1) of that shape, a value
        that does not broadcast to it or is not finite where fixed, a mask that would free
        a fixed weight."""
        if site not in self.sites:
            raise ValueError(f"site: expected one of {self.sites}, got {site!r}")
        loc = self.loc[_key(site)]
        shape = tuple(loc.shape)
        try:
            mask = torch.as_tensor(mask)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"mask: expected booleans of shape {shape} for {site}: {err}"
                             ) from err
        try:
            value = torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"value: expected a number or a real tensor for {site}: {err}"
                             ) from err
        if mask.shape != loc.shape or not (mask.dtype == torch.bool
                                           or bool(((mask == 0) | (mask == 1)).all())):
            raise ValueError(f"mask: expected booleans of shape {shape} for {site}, got "
                             f"{mask.dtype} of shape {tuple(mask.shape)}")
        if value.is_complex():
            raise ValueError(f"value: expected real numbers for {site}, got {value.dtype}")
        mask = mask.to(device=loc.device, dtype=torch.bool)
        try:
            value = value.to(device=loc.device, dtype=loc.dtype).expand(loc.shape)
        except RuntimeError as err:
            raise ValueError(f"value: expected a number or a tensor that broadcasts to "
                             f"{shape}, got shape {tuple(value.shape)}") from err
        if not bool(torch.isfinite(value[mask]).all()):
            raise ValueError(f"value: the fixed weights of {site} must be finite")
        old = self.fixed_mask(site)
        if old is not None and bool((old & ~mask).any()):
            raise ValueError(f"mask: would free weights of {site} that are fixed")
        return mask, value

    def fixed_mask(self, site: str) -> torch.Tensor | None:
        """The boolean mask of ``site``'s fixed weights, or ``None`` if none is fixed."""
        return getattr(self, f"fixed_mask_{_key(site)}") if site in self.fixed else None

    def loc_of(self, site: str) -> torch.Tensor:
        loc = self.loc[_key(site)]
        if site not in self.fixed:
            return loc
        key = _key(site)
        return torch.where(getattr(self, f"fixed_mask_{key}"),
                           getattr(self, f"fixed_value_{key}"), loc)

    def scale_of(self, site: str) -> torch.Tensor:
        scale = F.softplus(self.rho[_key(site)])
        if site not in self.fixed:
            return scale
        return torch.where(getattr(self, f"fixed_mask_{_key(site)}"), FIXED_SCALE, scale)

    def distribution(self, site: str) -> dist.Distribution:
        loc = self.loc_of(site)
        return dist.Normal(loc, self.scale_of(site)).to_event(loc.dim())

    def forward(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        with self.handler, poutine.scale(scale=self.kl_weight):
            return {s: pyro.sample(s, self.distribution(s)) for s in self.sites}
