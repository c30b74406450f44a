"""Search spaces of per-layer bit-widths: the widths themselves, or a low-degree curve over depth.

A network with layers ``l = 0..L-1`` of ``n_l`` quantized weights gets one width ``b_l`` per
layer, taken from an allowed set ``W`` (default ``{1, ..., 8}``). Its average is the one of
:class:`~pqnet.quantize.QuantizedNet`, ``avg_bits(b) = sum_l n_l b_l / sum_l n_l``.

Three parameterisations ``theta -> b`` (NUQ, Gennari do Nascimento, Costain & Prisacariu,
ECCV 2020, Sec. 3.2, parameterise the widths of deep networks by a curve over depth):

``layers``
    ``theta_l = b_l in W``: every allocation, ``|W|^L`` of them (small networks only).
``bezier``
    a Bezier curve of degree ``d`` over the depth ``t_l = l / (L - 1)``,
    ``c(t) = sum_k C(d, k) t^k (1 - t)^(d - k) P_k``, control points ``P_k in W``; the curve
    stays in the convex hull of its control points, so inside ``[min W, max W]``.
``chebyshev``
    a Chebyshev series ``c(t) = sum_k a_k T_k(2 t - 1)``, ``a_0`` an integer in
    ``[min W, max W]``, ``a_k`` (``k >= 1``) on a half-bit grid in ``[-h, h]``,
    ``h = (max W - min W) / 2``.

For the curves, ``b_l`` is the width of ``W`` nearest to ``c(t_l)`` (ties to the smaller), so
every parameter maps to a valid allocation. :meth:`BitSpace.grid` enumerates the parameter
grid and keeps one ``theta`` per distinct allocation: the candidates of the search, on which
the Gaussian process works.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from numbers import Integral

import torch

from .. import _checks
from ..inference.posterior import Posterior
from ..quantize.budget import layer_posteriors
from ..quantize.grids import MAX_BITS

__all__ = ["MAX_CANDIDATES", "SPACES", "BitSpace"]

SPACES = ("layers", "bezier", "chebyshev")
MAX_CANDIDATES = 1 << 17  # the largest parameter grid that is enumerated


@dataclass(frozen=True)
class BitSpace:
    """The allocations ``b = (b_0, ..., b_{L-1})`` reachable by one parameterisation.

    Parameters
    ----------
    layers : the module paths of the quantized layers, in depth order.
    sizes : ``n_l``, the number of weights of each layer.
    kind : ``"layers"``, ``"bezier"`` or ``"chebyshev"`` (see the module docstring).
    degree : the curve's degree ``d`` (``d + 1`` parameters); unused for ``"layers"``.
    widths : the allowed widths ``W``, integers in ``1..8``.

    Examples
    --------
    >>> space = BitSpace(("conv", "fc1", "fc2"), (150, 4000, 100), "bezier", degree=1)
    >>> space.bits(torch.tensor([[8.0, 2.0]]))  # a line from 8 bits down to 2
    tensor([[8, 5, 2]])
    """

    layers: tuple[str, ...]
    sizes: tuple[int, ...]
    kind: str = "layers"
    degree: int = 2
    widths: tuple[int, ...] = tuple(range(1, MAX_BITS + 1))

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("posterior: no quantized layers, so the search space is empty")
        if len(self.sizes) != len(self.layers) or any(
                isinstance(n, bool) or not isinstance(n, Integral) or n < 1 for n in self.sizes):
            raise ValueError(f"sizes: expected one positive weight count per layer, got "
                             f"{self.sizes!r} for {len(self.layers)} layers")
        if self.kind not in SPACES:
            raise ValueError(f"space: unknown search space {self.kind!r}; expected one of "
                             f"{', '.join(SPACES)}")
        if isinstance(self.widths, (str, bytes)) or not isinstance(self.widths, Iterable):
            raise ValueError(f"widths: expected integer widths in 1..{MAX_BITS}, "
                             f"got {self.widths!r}")
        widths = tuple(sorted({_checks.bits("widths", w, MAX_BITS) for w in self.widths}))
        if not widths:
            raise ValueError(f"widths: the search space is empty; give at least one width in "
                             f"1..{MAX_BITS}")
        object.__setattr__(self, "widths", widths)
        object.__setattr__(self, "degree", _checks.int_in("degree", self.degree, 0, 16))
        count = math.prod(len(v) for v in self.levels())
        if count > MAX_CANDIDATES:
            argument = "space" if self.kind == "layers" else "degree"
            raise ValueError(f"{argument}: the {self.kind!r} space has {count:,} parameter "
                             f"settings, more than {MAX_CANDIDATES:,} to enumerate; use a curve "
                             "('bezier' or 'chebyshev') of low degree, or fewer widths")

    @classmethod
    def from_posterior(cls, posterior: Posterior, kind: str = "layers", degree: int = 2,
                       widths: Sequence[int] = tuple(range(1, MAX_BITS + 1))) -> BitSpace:
        """The space over the quantized (Bayesian Linear/Conv) layers of ``posterior``."""
        layers = layer_posteriors(posterior)
        return cls(tuple(p for p, _, _ in layers), tuple(mu.numel() for _, mu, _ in layers),
                   kind, degree, widths)

    # -- the parameterisation ------------------------------------------------------------------

    @property
    def dim(self) -> int:
        """The number of parameters ``theta``."""
        return len(self.layers) if self.kind == "layers" else self.degree + 1

    def levels(self) -> list[torch.Tensor]:
        """The values each parameter takes on the enumerated grid (float64)."""
        widths = torch.tensor(self.widths, dtype=torch.float64)
        if self.kind != "chebyshev":
            return [widths] * self.dim
        low, high = self.widths[0], self.widths[-1]
        half = (high - low) / 2
        return [torch.arange(low, high + 1, dtype=torch.float64)] + [
            torch.arange(-half, half + 0.25, 0.5, dtype=torch.float64)] * self.degree

    def basis(self) -> torch.Tensor:
        """``(L, d + 1)``: the curve's basis functions at the layers' depths ``t_l``."""
        count = len(self.layers)
        t = torch.linspace(0, 1, count, dtype=torch.float64) if count > 1 else \
            torch.zeros(1, dtype=torch.float64)
        k = torch.arange(self.degree + 1, dtype=torch.float64)
        if self.kind == "bezier":
            binom = torch.tensor([math.comb(self.degree, int(j)) for j in k], dtype=torch.float64)
            return binom * t[:, None] ** k * (1 - t[:, None]) ** (self.degree - k)
        x = (2 * t - 1).clamp(-1, 1)
        return torch.cos(k * torch.arccos(x)[:, None])  # T_k(x) = cos(k arccos x)

    def bits(self, params: torch.Tensor) -> torch.Tensor:
        """``(n, L)`` int64 widths of the parameters ``params`` (``(n, dim)``, or ``(dim,)``)."""
        params = torch.as_tensor(params, dtype=torch.float64)
        single = params.dim() == 1
        params = params.reshape(-1, self.dim)
        values = params if self.kind == "layers" else params @ self.basis().T
        widths = torch.tensor(self.widths, dtype=torch.float64)
        nearest = (values[..., None] - widths).abs().argmin(-1)  # first minimum: the smaller
        out = torch.tensor(self.widths)[nearest]
        return out[0] if single else out

    def avg_bits(self, bits: torch.Tensor) -> torch.Tensor:
        """``sum_l n_l b_l / sum_l n_l`` of each row of ``bits`` (``(n, L)`` or ``(L,)``)."""
        sizes = torch.tensor(self.sizes, dtype=torch.float64)
        return torch.as_tensor(bits, dtype=torch.float64) @ sizes / sizes.sum()

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(params, bits)``: the parameter grid with one ``theta`` (the first in enumeration
        order) per distinct allocation, and the allocations, ``(m, dim)`` and ``(m, L)``."""
        levels = self.levels()
        params = torch.cartesian_prod(*levels) if len(levels) > 1 else levels[0][:, None]
        bits = self.bits(params)
        _, group = torch.unique(bits, dim=0, return_inverse=True)
        first = torch.full((int(group.max()) + 1,), len(group)).scatter_reduce(
            0, group, torch.arange(len(group)), "amin")
        keep = first.sort().values
        return params[keep], bits[keep]

    def nearest(self, target: Sequence[int], bits: torch.Tensor) -> int:
        """The row of ``bits`` closest to the allocation ``target`` in weighted squared error
        ``sum_l n_l (b_l - target_l)^2`` (the first on a tie)."""
        target = torch.as_tensor(list(target), dtype=torch.float64)
        if target.shape != (len(self.layers),):
            raise ValueError(f"warm_start: expected {len(self.layers)} widths per allocation, "
                             f"got {target.tolist()}")
        sizes = torch.tensor(self.sizes, dtype=torch.float64)
        return int(((bits.double() - target).square() * sizes).sum(-1).argmin())

    def describe(self) -> dict:
        """A JSON-able record of the space."""
        return {"kind": self.kind, "degree": self.degree if self.kind != "layers" else None,
                "widths": list(self.widths), "layers": list(self.layers),
                "sizes": list(self.sizes)}
