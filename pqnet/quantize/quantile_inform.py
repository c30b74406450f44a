"""Quantile Inform: per-layer bit-widths from quantiles of the per-weight uncertainty."""

from __future__ import annotations

import math
from numbers import Real

import torch
from torch.utils.data import Dataset

from .. import _checks
from ..inference.posterior import Posterior
from .budget import layer_posteriors, meet_budget, one_of
from .grids import grid_layer
from .qnet import QuantizedNet
from .sigma_bits import bits_at, error_ratios


def quantile_ratios(ratios: torch.Tensor, q: float) -> torch.Tensor:
    """``tau_b = Q_q(c_ib over i)``, ``b = 1..7``: the ``ceil(q n)``-th smallest ratio."""
    flat = ratios.reshape(len(ratios), -1)
    return flat.kthvalue(max(1, math.ceil(q * flat.shape[1])), dim=1).values


def quantile_inform(posterior: Posterior, *, data: Dataset | None = None, seed: int = 0,
                    avg_bits: float | None = None, k: float | None = None, q: float = 0.9,
                    per_channel: bool = False) -> QuantizedNet:
    """One width per layer: what the ``q``-quantile of its weights' uncertainty asks for.

    Quantile Inform, from the ICLR 2025 submission "Neural Network Adaptive Quantization
    based on Bayesian Deep Learning" (its text is not public; this is pqnet's reading of
    "allocate bit-widths across layers from quantiles of the per-weight uncertainty, to meet
    an average-bit budget"):

    1. each weight's need ``n_i(k)`` is its sigma-bits width
       (:func:`~pqnet.quantize.sigma_bits.sigma_bits`): the fewest bits whose grid rounds
       ``mu_i`` within ``k sigma_i``;
    2. layer ``l`` gets the ``q``-quantile of its needs,
       ``b_l = min{b : #{i : n_i(k) <= b} >= q n_l}``: the width that serves a fraction
       ``q`` of its weights at their posterior's precision. With
       ``c_ib = min_{b' <= b} |q_b'(mu_i) - mu_i| / sigma_i`` this is
       ``b_l = min{b : tau_lb <= k}`` (8 if none), ``tau_lb`` the ``q``-quantile of ``c_ib``;
    3. with a budget, ``k`` is the smallest tolerance (bisection) whose average bits
       ``sum_l n_l b_l / N`` are ``<= avg_bits``: the budget is met from below, as closely as
       the per-layer allocations allow;
    4. each layer is rounded to the symmetric ``b_l``-bit grid under which its rounded means
       are most probable under the posterior (:func:`~pqnet.quantize.grids.grid_scale` with
       ``sigma``; one per output channel with ``per_channel``). The needs in (1) measure
       ``sigma`` against the min-max grid's resolution, which does not depend on ``sigma``,
       so a weight's need never falls when its ``sigma`` does.

    The budget is met through ``k`` at a fixed ``q`` rather than through ``q`` at a fixed
    ``k``: at ``k = 1`` every weight's need is met (``q = 1``) at 2.3 bits on the digits BNN,
    so a larger budget would go unused, while ``k`` reaches every budget from 1 to 8 bits.

    Parameters
    ----------
    posterior : the fitted posterior (means and scales).
    data : unused (data-free); kept for the common quantizer signature.
    seed : unused (deterministic); recorded.
    avg_bits : the budget; or ``k``, the tolerance in posterior standard deviations
        (default 1 when there is no budget).
    q : the quantile in ``(0, 1]``: the fraction of each layer's weights whose need is met.
    per_channel : one grid per output channel instead of one per layer.
    """
    seed = _checks.seed(seed)
    per_channel = _checks.flag("per_channel", per_channel)
    if isinstance(q, bool) or not isinstance(q, Real) or not 0 < q <= 1:
        raise ValueError(f"q: expected a quantile in (0, 1], got {q!r}")
    q = float(q)
    if k is None and avg_bits is None:
        k = 1.0
    given = one_of(avg_bits=avg_bits, k=k)
    layers = layer_posteriors(posterior)
    taus = {layer: quantile_ratios(error_ratios(mu, sigma, per_channel), q)
            for layer, mu, sigma in layers}
    sizes = {layer: mu.numel() for layer, mu, _ in layers}

    def layer_bits(tolerance: float) -> dict[str, int]:
        return {layer: int(bits_at(tau, tolerance)) for layer, tau in taus.items()}

    def avg_bits_at(tolerance: float) -> float:
        return sum(b * sizes[layer] for layer, b in layer_bits(tolerance).items()) / sum(
            sizes.values())

    if given == "k":
        k = _checks.nonnegative_float("k", k)
    else:
        fewest = max(float(tau.max()) for tau in taus.values())  # every layer at 1 bit
        k = meet_budget(avg_bits_at, _checks.avg_bits("avg_bits", avg_bits), fewest=fewest,
                        most=0.0)
    quantized = {layer: grid_layer(mu, layer_bits(k)[layer], per_channel, sigma)
                 for layer, mu, sigma in layers}
    return QuantizedNet(quantized, posterior.module, "quantile-inform",
                        {"avg_bits": avg_bits, "k": k, "q": q, "per_channel": per_channel,
                         "seed": seed})
