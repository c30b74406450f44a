"""Pruning a quantized net by its posterior: the weights it cannot tell from zero, or those
with the smallest means.

Two rules, each storing a pruned weight at width 0 (the value 0), which the entropy coder
makes nearly free:

- **by credible level** (:func:`bayesian_prune`): a weight is pruned at level ``c`` when zero
  lies inside its central ``c`` credible interval, ``|mu| < z_c sigma`` with
  ``z_c = Phi^{-1}((1 + c) / 2)``: the signal-to-noise rule of Bayesian compression (Louizos
  et al. 2017, "Bayesian Compression for Deep Learning"; Molchanov et al. 2017, "Variational
  Dropout Sparsifies Deep Neural Networks");
- **by fraction** (:func:`magnitude_prune`): the given fraction of all quantized weights with
  the smallest posterior means ``|mu|``, one threshold for the network (Han et al. 2015). On
  pqnet's default (tempered) posterior this ranking kept more accuracy than ranking by
  ``|mu| / sigma`` (``benchmarks/RESULTS.md``, "Pruning by fraction"), so it is the rule a
  sparsity target uses.
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
    masks = {path: prune_mask(mu, sigma, level) for path, mu, sigma in layer_posteriors(posterior)}
    return _zeroed(qnet, masks, {"level": level})


def _zeroed(qnet: QuantizedNet, masks: dict[str, torch.Tensor], record: dict) -> QuantizedNet:
    """``qnet`` with each layer's weights where ``masks`` is true at width 0;
    ``config["prune"]`` is ``record`` and the fraction of all weights pruned."""
    layers = dict(qnet.layers)
    for path, mask in masks.items():
        layers[path] = layers[path].pruned(mask)
    fraction = sum(int(mask.sum()) for mask in masks.values()) / qnet.num_weights
    config = {**qnet.config, "prune": {**record, "fraction": fraction}}
    return QuantizedNet(layers, qnet.module, qnet.method, config)


def keep_largest(weights: dict[str, torch.Tensor], keep: float) -> dict[str, torch.Tensor]:
    """True at exactly the ``round(keep * n)`` largest ``|w|`` of all ``n`` weights together
    (rounded to nearest, as ``1 - 0.7`` is a hair above 0.3; ties broken by ``topk``), and at
    each layer's largest one (no layer is cut off)."""
    magnitudes = [w.detach().abs().reshape(-1) for w in weights.values()]
    flat = torch.cat(magnitudes)
    kept = torch.zeros(len(flat), dtype=torch.bool, device=flat.device)
    kept[flat.topk(max(1, round(keep * len(flat)))).indices] = True
    masks = {}
    for (path, w), mask, m in zip(weights.items(), kept.split([len(m) for m in magnitudes]),
                                  magnitudes, strict=True):
        mask = mask.clone()
        mask[m.argmax()] = True
        masks[path] = mask.reshape(w.shape)
    return masks


def magnitude_prune(qnet: QuantizedNet, posterior: Posterior, fraction: float) -> QuantizedNet:
    """``qnet`` with the ``fraction`` of its weights of smallest posterior mean ``|mu|`` (over
    the whole network, each layer keeping its largest) set to 0 at width 0;
    ``config["prune"]`` records the fraction asked and the fraction pruned."""
    fraction = _checks.fraction("prune_fraction", fraction, closed_below=True)
    keep = keep_largest({path: mu for path, mu, _ in layer_posteriors(posterior)}, 1 - fraction)
    return _zeroed(qnet, {path: ~mask for path, mask in keep.items()},
                   {"by": "magnitude", "asked": fraction})
