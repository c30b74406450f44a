"""Per-weight bit-widths from the posterior scale: each weight as coarse as its sigma allows."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .. import _checks
from ..inference.posterior import Posterior
from .budget import layer_posteriors, meet_budget, one_of
from .grids import MAX_BITS, grid_layer, grid_quantize
from .qnet import QuantizedNet


def error_ratios(mu: torch.Tensor, sigma: torch.Tensor, per_channel: bool = False
                 ) -> torch.Tensor:
    """``c[b-1] = min_{b' <= b} |q_b'(mu) - mu| / sigma`` for ``b = 1..7``: shape (7, *mu.shape).

    ``q_b`` is the layer's symmetric ``b``-bit grid (:mod:`pqnet.quantize.grids`). A weight
    needs ``b`` bits at tolerance ``k`` iff ``c[b-1] <= k`` first at ``b``, so
    :func:`bits_at` is a count; 8 bits are the fallback, whatever their error.
    """
    ratios = torch.stack([(grid_quantize(mu, b, per_channel)[1] - mu).abs() / sigma
                          for b in range(1, MAX_BITS)])
    return ratios.cummin(0).values


def bits_at(ratios: torch.Tensor, k: float) -> torch.Tensor:
    """uint8 widths ``b_i(k) = min{b in 1..7 : c_ib <= k}``, else 8: ``1 + #{b : c_ib > k}``."""
    return (1 + (ratios > k).sum(0)).to(torch.uint8)


def sigma_bits(posterior: Posterior, *, data: Dataset | None = None, seed: int = 0,
               k: float | None = None, avg_bits: float | None = None,
               per_channel: bool = False) -> QuantizedNet:
    """Give each weight the fewest bits whose grid rounds its mean within ``k`` std devs.

    With ``q_b`` the layer's symmetric ``b``-bit grid (step ``Delta_b = 2 max|mu| / (2^b - 1)``;
    ``+-mean|mu|`` at 1 bit), weight ``i`` gets

    .. math:: b_i = \\min\\{b \\in 1..8 : |q_b(\\mu_i) - \\mu_i| \\le k\\,\\sigma_i\\}

    (8 when none qualifies) and is stored at that width; the weights of a layer are grouped
    by width, one grid per group. A rounding error within ``k`` posterior standard
    deviations keeps the quantized weight plausible under ``q(w)`` — the per-weight form of
    the rule "lower uncertainty, more bits" of Louizos et al. 2017 ("Bayesian Compression
    for Deep Learning") and of the ICLR 2025 submission "Neural Network Adaptive
    Quantization based on Bayesian Deep Learning". ``b_i`` never decreases when ``sigma_i``
    does, nor when ``k`` does.

    Parameters
    ----------
    posterior : the fitted posterior (means and scales).
    data : unused (data-free); kept for the common quantizer signature.
    seed : unused (deterministic); recorded.
    k : the tolerance in standard deviations (default 1 when no ``avg_bits``). Or
        ``avg_bits``: the smallest ``k`` (by bisection) whose average bits are ``<= avg_bits``.
    per_channel : one grid per output channel instead of one per layer.
    """
    seed = _checks.seed(seed)
    per_channel = _checks.flag("per_channel", per_channel)
    if k is None and avg_bits is None:
        k = 1.0
    given = one_of(k=k, avg_bits=avg_bits)
    layers = layer_posteriors(posterior)
    ratios = {layer: error_ratios(mu, sigma, per_channel) for layer, mu, sigma in layers}
    if given == "k":
        k = _checks.nonnegative_float("k", k)
    else:
        budget = _checks.avg_bits("avg_bits", avg_bits)
        total = sum(mu.numel() for _, mu, _ in layers)

        def avg_bits_at(tolerance: float) -> float:
            return sum(int(bits_at(c, tolerance).sum()) for c in ratios.values()) / total

        # at the largest ratio every weight takes 1 bit; at k = 0 the most bits
        fewest = max(float(c.max()) for c in ratios.values())
        k = meet_budget(avg_bits_at, budget, fewest=fewest, most=0.0)
    quantized = {layer: grid_layer(mu, bits_at(ratios[layer], k), per_channel)
                 for layer, mu, _ in layers}
    return QuantizedNet(quantized, posterior.module, "sigma-bits",
                        {"k": k, "avg_bits": avg_bits, "per_channel": per_channel, "seed": seed})
