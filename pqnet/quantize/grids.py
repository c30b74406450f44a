"""Shared pieces of the quantizers: symmetric grids, rounding, and layers built from them.

The symmetric ``b``-bit grid of a tensor (or of each output channel, ``per_channel``) has
``2^b`` evenly spaced levels from ``-m`` to ``m``, step ``Delta_b = 2m / (2^b - 1)``:

- ``b >= 2``: ``m = max |w|`` (min-max grid, no clipping, so ``|q(w) - w| <= Delta_b / 2``),
  or, given posterior scales, the clipped grid the posterior finds most probable;
- ``b = 1``: ``m = mean |w|``, the levels ``+-mean|w|`` of binary-weight networks, which
  minimise ``||w - m sign(w)||^2`` (Rastegari et al. 2016, "XNOR-Net", Sec. 3.1).

Every grid is stored as its half-range ``m`` (one float32 per tensor or channel).
"""

from __future__ import annotations

import torch

from .qnet import MAX_WIDTH, QuantizedLayer, gather_levels, grid_levels

__all__ = ["MAX_BITS", "grid_layer", "grid_levels", "grid_quantize", "grid_scale",
           "nearest_level", "round_to_grid"]

MAX_BITS = MAX_WIDTH  # codes are uint8


CLIP_FRACTIONS = torch.linspace(0.02, 1.0, 50)


def grid_scale(w: torch.Tensor, bits: int, per_channel: bool = False,
               sigma: torch.Tensor | None = None) -> torch.Tensor:
    """Half-range ``m`` of the ``bits``-bit grid: ``mean|w|`` for 1 bit, else ``max|w|``.

    With posterior scales ``sigma``, the grid is the one under which the rounded means are
    most probable under the posterior, ``m = argmin_m sum_i ((q_m(w_i) - w_i) / sigma_i)^2``:
    at 1 bit in closed form, ``m = sum_i |w_i| / sigma_i^2 / sum_i sigma_i^-2``; else over
    ``m = t max|w|``, ``t`` in :data:`CLIP_FRACTIONS` (clipping the tails that the posterior
    says are cheap to move, as MSE-optimal clipping does for plain weights).

    Returns shape ``(1,)``, or ``(w.shape[0],)`` with ``per_channel``.
    """
    rows = w.shape[0] if per_channel else 1
    a = w.detach().float().reshape(rows, -1).abs()
    if sigma is None:
        return a.mean(1) if bits == 1 else a.amax(1)
    precision = sigma.detach().float().reshape(rows, -1).pow(-2)
    if bits == 1:
        return (a * precision).sum(1) / precision.sum(1)
    flat = w.detach().float().reshape(rows, -1)
    best, best_error = a.amax(1), torch.full((rows,), float("inf"))
    for t in CLIP_FRACTIONS:
        m = t * a.amax(1)
        levels = grid_levels(m, bits)
        error = ((gather_levels(levels, round_to_grid(flat, m, bits)) - flat).square()
                 * precision).sum(1)
        better = error < best_error
        best, best_error = torch.where(better, m, best), torch.where(better, error, best_error)
    return best


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``j = clamp(round((w / m + 1) (2^b - 1) / 2), 0, 2^b - 1)``: the nearest
    level of the grid of half-range ``scale`` (shape ``(1,)`` or ``(w.shape[0],)``)."""
    top = 2 ** bits - 1
    m = scale.reshape(-1, *([1] * (w.dim() - 1)))
    m = torch.where(m > 0, m, torch.ones_like(m))  # an all-zero row: every level is 0
    return ((w.float() / m + 1) * (top / 2)).round().clamp(0, top).to(torch.uint8)


def grid_quantize(w: torch.Tensor, bits: int, per_channel: bool = False,
                  sigma: torch.Tensor | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, values, scale)`` of ``w`` on its symmetric ``bits``-bit grid (the posterior's
    most probable grid when ``sigma`` is given, see :func:`grid_scale`)."""
    scale = grid_scale(w, bits, per_channel, sigma)
    codes = round_to_grid(w, scale, bits)
    return codes, gather_levels(grid_levels(scale, bits), codes), scale


def grid_layer(w: torch.Tensor, bits: int | torch.Tensor, per_channel: bool = False,
               sigma: torch.Tensor | None = None) -> QuantizedLayer:
    """Quantize ``w`` on symmetric grids: every weight at width ``bits`` (an int), or each
    weight at its own width (a tensor of ``w``'s shape); each width has its own grid over
    the whole tensor (or channel), so a weight's level does not depend on the others' widths."""
    if isinstance(bits, int):
        bits = torch.full(w.shape, bits, dtype=torch.uint8)
    bits = bits.to(torch.uint8)
    codes = torch.zeros(w.shape, dtype=torch.uint8)
    scales = {}
    for width in bits.unique().tolist():
        width_codes, _, scales[width] = grid_quantize(w, width, per_channel, sigma)
        mask = bits == width
        codes[mask] = width_codes[mask]
    return QuantizedLayer.from_grid(codes, bits, scales)


def nearest_level(w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """uint8 index of the nearest entry of the ascending 1-d codebook ``levels``."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(w.float().contiguous(), midpoints).to(torch.uint8)
