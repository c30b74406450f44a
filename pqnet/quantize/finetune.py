"""Straight-through fine-tuning of the posterior means under a quantized forward pass."""

from __future__ import annotations

import copy
import dataclasses

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.data import Dataset

from .. import _checks
from ..inference.batching import batches, check_dataset
from ..inference.posterior import Posterior
from .qnet import QuantizedLayer, QuantizedNet, weight_name
from .sigma_code import recode


def _rounded(layer: QuantizedLayer, w: torch.Tensor) -> torch.Tensor:
    """``w`` rounded to ``layer``'s codebooks, with the straight-through gradient of
    Bengio et al. 2013 (``d round(w) / dw := 1``)."""
    return w + (layer.decode(layer.encode(w)) - w).detach()


def _draw(mu: torch.Tensor, sigma: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A draw ``mu + sigma * eps``, ``eps ~ N(0, 1)``, of the posterior (its noise is kept)."""
    return mu + sigma * torch.randn(mu.shape, generator=generator)


def _recoded(qnet: QuantizedNet, layer, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """New codes for trained means by the method's own rule: nearest level, or for
    ``sigma-code`` the shortest code within its ``k`` sds."""
    if qnet.method == "sigma-code":
        return recode(layer, mu, sigma, qnet.config)
    return layer.encode(mu)


def finetune(qnet: QuantizedNet, posterior: Posterior, data: Dataset, *, epochs: int,
             lr: float = 1e-3, batch_size: int = 64, seed: int = 0) -> QuantizedNet:
    """Retrain the posterior means under ``qnet``'s quantized forward pass; re-round them.

    Each step draws ``w = mu + sigma * eps`` from the posterior (its noise kept, so the means
    move only where the posterior lets them), rounds every weight to the nearest level of its
    own codebook (``qnet``'s widths and codebooks stay fixed), and takes an Adam step on the
    minibatch cross-entropy with the straight-through estimator ``dL/dmu = dL/dQ(w)``
    (Bengio, Leonard & Courville 2013), as quantization-aware training does (Jacob et al.
    2018). Biases and other float parameters train as point estimates; BatchNorm statistics
    stay frozen (eval mode). The result re-rounds the new means (by the method's rule: the
    nearest level, or sigma-code's shortest code within ``k`` sds): the same method, widths
    and codebooks, new codes, with ``config["finetune"]`` recording the run.
    """
    epochs = _checks.int_in("finetune_epochs", epochs, 1, 10_000)
    lr = _checks.nonnegative_float("finetune_lr", lr)
    batch_size = _checks.int_in("batch_size", batch_size, 1, 1 << 30)
    seed = _checks.seed(seed)
    if data is None:
        raise ValueError("data: fine-tuning (finetune_epochs > 0) needs the training data")
    if posterior.likelihood.get("kind") != "categorical":
        raise ValueError("posterior: fine-tuning is for classifiers (a categorical likelihood)")
    check_dataset(posterior.module, data, "data")

    module = copy.deepcopy(posterior.module).eval()
    means = {path: torch.nn.Parameter(posterior.loc[weight_name(path)].detach().clone())
             for path in qnet.layers}
    scales = {path: posterior.scale[weight_name(path)] for path in qnet.layers}
    for path in qnet.layers:  # the means above replace these weights
        module.get_submodule(path).weight.requires_grad_(False)
    trained = [p for p in module.parameters() if p.requires_grad] + list(means.values())
    optimizer = torch.optim.Adam(trained, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for x, y in batches(data, batch_size, generator=gen):
            weights = {weight_name(path): _rounded(layer, _draw(means[path], scales[path], gen))
                       for path, layer in qnet.layers.items()}
            loss = F.cross_entropy(functional_call(module, weights, (x,), strict=False), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    layers = {path: dataclasses.replace(layer, codes=_recoded(qnet, layer, means[path],
                                                              scales[path]))
              for path, layer in qnet.layers.items()}
    config = {**qnet.config, "finetune": {"epochs": epochs, "lr": lr, "batch_size": batch_size,
                                          "seed": seed}}
    return QuantizedNet(layers, module, qnet.method, config)
