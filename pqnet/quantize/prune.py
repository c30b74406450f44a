"""Bayesian pruning: zero the weights the posterior cannot tell from zero.

A weight is pruned at credible level ``c`` when zero lies inside its central ``c`` credible
interval, ``|mu| < z_c sigma`` with ``z_c = Phi^{-1}((1 + c) / 2)``: the signal-to-noise rule
of Bayesian compression (Louizos et al. 2017, "Bayesian Compression for Deep Learning";
Molchanov et al. 2017, "Variational Dropout Sparsifies Deep Neural Networks"). A pruned
weight is stored at width 0 (the value 0), so the entropy coder makes it nearly free.
"""

from __future__ import annotations

import torch

from .. import _checks
from ..inference.posterior import Posterior
from .budget import layer_posteriors
from .qnet import QuantizedNet


def credible_z(level: float) -> float:
    """``Phi^{-1}((1 + level) / 2)``: the half-width, in sds, of the central ``level`` interval."""
    return float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor((1 + level) / 2)))


def prune_mask(mu: torch.Tensor, sigma: torch.Tensor, level: float) -> torch.Tensor:
    """True where zero lies strictly inside the weight's central ``level`` credible interval."""
    return mu.abs() < credible_z(level) * sigma


def bayesian_prune(qnet: QuantizedNet, posterior: Posterior, level: float) -> QuantizedNet:
    """``qnet`` with every weight pruned whose ``level`` credible interval holds zero (see the
    module); ``config["prune"]`` records the level and the fraction pruned."""
    level = _checks.fraction("prune", level, closed_below=True)
    layers, pruned = dict(qnet.layers), 0
    for path, mu, sigma in layer_posteriors(posterior):
        mask = prune_mask(mu, sigma, level)
        layers[path] = layers[path].pruned(mask)
        pruned += int(mask.sum())
    config = {**qnet.config, "prune": {"level": level, "fraction": pruned / qnet.num_weights}}
    return QuantizedNet(layers, qnet.module, qnet.method, config)
