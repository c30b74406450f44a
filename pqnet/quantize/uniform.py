"""Uniform post-training quantization of the posterior means: the first baseline."""

from __future__ import annotations

import math

from torch.utils.data import Dataset

from .. import _checks
from ..inference.posterior import Posterior
from .budget import layer_posteriors, one_of
from .grids import MAX_BITS, grid_layer
from .qnet import QuantizedNet


def uniform(posterior: Posterior, *, data: Dataset | None = None, seed: int = 0,
            bits: int | None = None, avg_bits: float | None = None,
            per_channel: bool = False) -> QuantizedNet:
    """Round every posterior mean to a symmetric ``b``-bit grid, the same ``b`` in every layer.

    ``q(mu) = m (-1 + 2j / (2^b - 1))`` with ``j = round((mu / m + 1)(2^b - 1) / 2)``,
    ``m = max|mu|`` over the layer (or output channel with ``per_channel``); for ``b = 1``
    the levels are ``+-mean|mu|`` (binary-weight networks, Rastegari et al. 2016). This is
    the min-max symmetric scheme of post-training quantization (Krishnamoorthi 2018,
    "Quantizing deep convolutional networks for efficient inference", Sec. 2).

    Parameters
    ----------
    posterior : the fitted posterior; only its means are used.
    data : unused (post-training and data-free); kept for the common quantizer signature.
    seed : unused (deterministic); recorded.
    bits : the width in ``1..8``. Or ``avg_bits``: a budget, giving
        ``b = min(8, floor(avg_bits))`` so the method runs at the budgets of the others.
    per_channel : one grid per output channel instead of one per tensor.
    """
    seed = _checks.seed(seed)
    per_channel = _checks.flag("per_channel", per_channel)
    if one_of(bits=bits, avg_bits=avg_bits) == "bits":
        bits = _checks.bits("bits", bits, MAX_BITS)
    else:
        bits = min(MAX_BITS, math.floor(_checks.avg_bits("avg_bits", avg_bits)))
    layers = {layer: grid_layer(mu, bits, per_channel)
              for layer, mu, _ in layer_posteriors(posterior)}
    return QuantizedNet(layers, posterior.module, "uniform",
                        {"bits": bits, "avg_bits": avg_bits, "per_channel": per_channel,
                         "seed": seed})
