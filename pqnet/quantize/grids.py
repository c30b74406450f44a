"""Shared pieces of the quantizers: symmetric grids, rounding, and layers built from them.

The symmetric ``b``-bit grid of a tensor (or of each output channel, ``per_channel``) has
``2^b`` evenly spaced levels from ``-m`` to ``m``, step ``Delta_b = 2m / (2^b - 1)``:

- ``b >= 2``: ``m = max |w|`` (min-max grid, no clipping, so ``|q(w) - w| <= Delta_b / 2``);
- ``b = 1``: ``m = mean |w|``, the levels ``+-mean|w|`` of binary-weight networks, which
  minimise ``||w - m sign(w)||^2`` (Rastegari et al. 2016, "XNOR-Net", Sec. 3.1).

Every grid is stored as its half-range ``m`` (one float32 per tensor or channel).
"""

from __future__ import annotations

import torch

from .qnet import QuantizedLayer, gather_levels, grid_levels

__all__ = ["MAX_BITS", "grid_layer", "grid_levels", "grid_quantize", "grid_scale",
           "nearest_level", "round_to_grid"]

MAX_BITS = 8  # codes are uint8


def grid_scale(w: torch.Tensor, bits: int, per_channel: bool = False) -> torch.Tensor:
    """Half-range ``m`` of the ``bits``-bit grid: ``mean|w|`` for 1 bit, else ``max|w|``.

    Returns shape ``(1,)``, or ``(w.shape[0],)`` with ``per_channel``.
    """
    rows = w.detach().float().reshape(w.shape[0] if per_channel else 1, -1).abs()
    return rows.mean(1) if bits == 1 else rows.amax(1)


def round_to_grid(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``j = clamp(round((w / m + 1) (2^b - 1) / 2), 0, 2^b - 1)``: the nearest
    level of the grid of half-range ``scale`` (shape ``(1,)`` or ``(w.shape[0],)``)."""
    top = 2 ** bits - 1
    m = scale.reshape(-1, *([1] * (w.dim() - 1)))
    m = torch.where(m > 0, m, torch.ones_like(m))  # an all-zero row: every level is 0
    return ((w.float() / m + 1) * (top / 2)).round().clamp(0, top).to(torch.uint8)


def grid_quantize(w: torch.Tensor, bits: int, per_channel: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, values, scale)`` of ``w`` on its symmetric ``bits``-bit grid."""
    scale = grid_scale(w, bits, per_channel)
    codes = round_to_grid(w, scale, bits)
    return codes, gather_levels(grid_levels(scale, bits), codes), scale


def grid_layer(w: torch.Tensor, bits: int | torch.Tensor,
               per_channel: bool = False) -> QuantizedLayer:
    """Quantize ``w`` on symmetric grids: every weight at width ``bits`` (an int), or each
    weight at its own width (a tensor of ``w``'s shape); each width has its own grid over
    the whole tensor (or channel), so a weight's level does not depend on the others' widths."""
    if isinstance(bits, int):
        bits = torch.full(w.shape, bits, dtype=torch.uint8)
    bits = bits.to(torch.uint8)
    codes = torch.zeros(w.shape, dtype=torch.uint8)
    scales = {}
    for width in bits.unique().tolist():
        width_codes, _, scales[width] = grid_quantize(w, width, per_channel)
        mask = bits == width
        codes[mask] = width_codes[mask]
    return QuantizedLayer.from_grid(codes, bits, scales)


def nearest_level(w: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """uint8 index of the nearest entry of the ascending 1-d codebook ``levels``."""
    midpoints = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(w.float().contiguous(), midpoints).to(torch.uint8)
