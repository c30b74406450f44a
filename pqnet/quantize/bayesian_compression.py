"""Per-layer bit precision from the posterior variance (Bayesian Compression): a baseline."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from .. import _checks
from ..inference.posterior import Posterior
from .budget import layer_posteriors, meet_budget
from .grids import MAX_BITS, grid_layer
from .qnet import QuantizedNet


def _levels_per_sigma(mu: torch.Tensor, sigma: torch.Tensor) -> np.ndarray:
    """``R / (2 sigma_i)``, in numpy: the budget search evaluates it many times, and tiny
    torch ops pay for a thread-pool hand-off each."""
    return (2 * mu.abs().max().double() / (2 * sigma.double())).numpy()


def _width(levels_per_sigma: np.ndarray, sigma_scale: float) -> int:
    precision = np.log2(1 + levels_per_sigma / sigma_scale)
    return min(MAX_BITS, max(1, math.ceil(float(precision.mean()))))


def bayesian_compression(posterior: Posterior, *, data: Dataset | None = None, seed: int = 0,
                         avg_bits: float | None = None,
                         per_channel: bool = False) -> QuantizedNet:
    """One width per layer, read off the posterior variance; a uniform grid at that width.

    Louizos, Ullrich & Welling 2017, "Bayesian Compression for Deep Learning": the marginal
    posterior variance of the weights fixes the precision they can be stored at — a
    weight known only to ``+-sigma`` needs no finer grid than one of step ``~2 sigma``.
    A fixed-point grid of step ``2 s sigma_i`` over the layer's symmetric range
    ``R = 2 max|mu|`` has ``1 + R / (2 s sigma_i)`` levels, so weight ``i`` asks for
    ``p_i = log2(1 + R / (2 s sigma_i))`` bits and the layer gets

    .. math:: b_\\ell = \\mathrm{clamp}(\\lceil \\tfrac{1}{n_\\ell}\\sum_i p_i \\rceil, 1, 8)

    — the mean over the layer, then the ceiling, as in the paper's released code
    (``compression.py``, ``dist_fun=np.mean``). Two departures, both so that the rule fits
    pqnet's fixed-point grids: the code counts significand bits of a float (with a shared
    exponent) and compares the unit round-off to ``2 sigma^2``; here the grid is fixed-point
    over the layer's range and compared to the standard deviation, which has the units of
    the weight. The weights are then rounded to the symmetric ``b_l``-bit grid of
    :mod:`pqnet.quantize.grids`.

    Parameters
    ----------
    posterior : the fitted posterior (means and scales).
    data : unused (data-free); kept for the common quantizer signature.
    seed : unused (deterministic); recorded.
    avg_bits : a budget. Without it ``s = 1`` (the rule as stated); with it all the standard
        deviations are scaled by the smallest common ``s`` (bisection on ``log s``) whose
        average bits are ``<= avg_bits``.
    per_channel : round to one grid per output channel (the width stays per layer).
    """
    seed = _checks.seed(seed)
    per_channel = _checks.flag("per_channel", per_channel)
    layers = layer_posteriors(posterior)
    ratios = {layer: _levels_per_sigma(mu, sigma) for layer, mu, sigma in layers}
    total = sum(r.size for r in ratios.values())

    def avg_bits_at(log_scale: float) -> float:
        scale = math.exp(log_scale)
        return sum(_width(r, scale) * r.size for r in ratios.values()) / total

    log_scale = 0.0
    if avg_bits is not None:
        budget = _checks.avg_bits("avg_bits", avg_bits)
        # every p_i <= 1 once s >= R / (2 sigma_i); e^-100 times that puts every layer at 8
        largest = max(float(r.max()) for r in ratios.values())
        fewest = math.log(max(largest, 1e-30)) + 1
        log_scale = meet_budget(avg_bits_at, budget, fewest=fewest, most=fewest - 100)
    scale = math.exp(log_scale)
    quantized = {layer: grid_layer(mu, _width(ratios[layer], scale), per_channel)
                 for layer, mu, _ in layers}
    return QuantizedNet(quantized, posterior.module, "bayesian-compression",
                        {"avg_bits": avg_bits, "sigma_scale": scale, "per_channel": per_channel,
                         "seed": seed})
