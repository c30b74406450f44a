"""Random Bits: each layer's bit-width is a random variable whose distribution SVI fits."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils.data import Dataset

from .. import _checks
from ..inference.batching import batches, check_dataset
from ..inference.posterior import Posterior
from .budget import layer_posteriors
from .grids import MAX_BITS, grid_layer, grid_levels, grid_scale, round_to_grid
from .qnet import QuantizedNet, gather_levels, weight_name

WIDTHS = torch.arange(1, MAX_BITS + 1, dtype=torch.float64)


def most_probable_within(logits: torch.Tensor, sizes: torch.Tensor, budget: float
                         ) -> torch.Tensor:
    """The per-layer widths (1..8) that the distributions ``softmax(logits)`` favour, within
    ``sum_l n_l b_l <= budget * sum_l n_l``: start from each layer's mode and, while over the
    budget, lower by one the layer whose step down costs the least log-probability per bit
    saved, ``(log q_l(b_l) - log q_l(b_l - 1)) / n_l``."""
    log_q = logits.log_softmax(-1)
    bits = log_q.argmax(-1) + 1
    limit = budget * float(sizes.sum())
    while float((bits * sizes).sum()) > limit + 1e-9:
        current = log_q.gather(1, (bits - 1)[:, None]).squeeze(1)
        lower = log_q.gather(1, (bits - 2).clamp_min(0)[:, None]).squeeze(1)
        cost = (current - lower) / sizes
        cost[bits == 1] = math.inf
        bits[cost.argmin()] -= 1
    return bits


def random_bits(posterior: Posterior, *, data: Dataset | None = None, seed: int = 0,
                avg_bits: float = 3.0, steps: int = 40, batch_size: int = 256,
                forgetting: float = 0.7, dual_lr: float = 0.5) -> QuantizedNet:
    r"""Per-layer widths as random variables whose mean-field posterior is fitted by
    stochastic variational inference on the quantized network's likelihood, under a budget.

    Random Bits, from the ICLR 2025 submission "Neural Network Adaptive Quantization based
    on Bayesian Deep Learning" (its text is not public; its reviewers describe bit-widths
    treated as discrete random variables). pqnet's reading: with ``Q_b`` layer ``l``'s
    symmetric ``b``-bit grid (:mod:`pqnet.quantize.grids`) and ``w ~ q(w)`` the fitted
    posterior (held fixed), the widths ``b = (b_1..b_L)`` get a uniform prior on ``1..8`` and
    the likelihood of the *quantized* network plus a cost of ``lambda`` nats per example per
    average bit,

    .. math::

        \log p(D, b) = \mathbb E_{q(w)}\Big[\sum_n \log p\big(y_n \mid x_n, Q_b(w)\big)\Big]
        - \lambda N \frac{\sum_l n_l b_l}{\sum_l n_l} + \text{const},

    and ``q(b) = prod_l Categorical(softmax(alpha_l))`` is fitted by stochastic variational
    inference (Hoffman et al. 2013, JMLR, "Stochastic Variational Inference"). The optimal
    factor is ``alpha_l(b) = E_{q(b_-l) q(w)}[log p(D, b) | b_l = b]``; each step estimates it
    on a minibatch (log-likelihood scaled by ``N / B``) from one posterior draw of ``w`` and
    one draw of the other layers' widths from ``q``, enumerating the 8 widths of every layer
    exactly (Rao-Blackwellised: no relaxation, no score-function variance), and takes the
    natural-gradient step ``alpha <- (1 - rho_t) alpha + rho_t alpha_hat`` with
    ``rho_t = (t + 1)^-forgetting``. A wide posterior blurs what extra bits buy, so its layer
    gets fewer. ``lambda`` follows dual ascent,
    ``lambda <- max(0, lambda + dual_lr (E_q[avg bits] - avg_bits))``. The result is the most
    probable configuration within the budget (:func:`most_probable_within`).

    Parameters
    ----------
    posterior : the fitted posterior (means and scales).
    data : the training data (required): the likelihood is evaluated on it.
    seed : seeds the posterior draws, the width draws and the batch order.
    avg_bits : the budget (average bits per weight, >= 1).
    steps, batch_size : the SVI run: steps on minibatches of ``data`` (``8 L`` forward passes
        each, no backward pass).
    forgetting : ``kappa`` in ``rho_t = (t + 1)^-kappa``, in (0.5, 1] (Robbins-Monro).
    dual_lr : step of the dual ascent on ``lambda``.
    """
    seed = _checks.seed(seed)
    budget = _checks.avg_bits("avg_bits", avg_bits)
    steps = _checks.int_in("steps", steps, 1, 1 << 30)
    batch_size = _checks.int_in("batch_size", batch_size, 1, 1 << 30)
    forgetting = _checks.nonnegative_float("forgetting", forgetting)
    if not 0.5 < forgetting <= 1:
        raise ValueError(f"forgetting: expected a number in (0.5, 1], got {forgetting}")
    dual_lr = _checks.nonnegative_float("dual_lr", dual_lr)
    if data is None:
        raise ValueError("data: random-bits needs the training data (a torch Dataset)")
    if posterior.likelihood.get("kind") != "categorical":
        raise ValueError("posterior: random-bits is for classifiers (a categorical likelihood)")
    n = check_dataset(posterior.module, data, "data")

    layers = layer_posteriors(posterior)
    module = copy.deepcopy(posterior.module).eval()  # the caller's module keeps its mode
    grids = {layer: [grid_scale(mu, b, sigma=sigma) for b in range(1, MAX_BITS + 1)]
             for layer, mu, sigma in layers}
    sizes = torch.tensor([float(mu.numel()) for _, mu, _ in layers], dtype=torch.float64)
    cost_per_width = n * sizes[:, None] / sizes.sum() * WIDTHS  # nats per unit of lambda
    logits = torch.zeros(len(layers), MAX_BITS, dtype=torch.float64)
    penalty, gen = 0.0, torch.Generator().manual_seed(seed)
    history = []
    with torch.no_grad():
        while len(history) < steps:
            for x, y in batches(data, batch_size, generator=gen):
                rounded = {}  # one posterior draw, rounded at every width: (8, *shape)
                for layer, mu, sigma in layers:
                    w = mu + sigma * torch.randn(mu.shape, generator=gen)
                    rounded[layer] = torch.stack([
                        gather_levels(grid_levels(scale, b), round_to_grid(w, scale, b))
                        for b, scale in enumerate(grids[layer], start=1)])
                drawn = torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(1)
                weights = {weight_name(layer): rounded[layer][b]
                           for (layer, _, _), b in zip(layers, drawn.tolist(), strict=True)}
                log_lik = torch.empty(len(layers), MAX_BITS, dtype=torch.float64)
                for i, (layer, _, _) in enumerate(layers):
                    for b in range(MAX_BITS):
                        trial = {**weights, weight_name(layer): rounded[layer][b]}
                        f = functional_call(module, trial, (x,), strict=False)
                        log_lik[i, b] = -n * F.cross_entropy(f, y).double()
                rho = (len(history) + 1) ** -forgetting
                logits = (1 - rho) * logits + rho * (log_lik - penalty * cost_per_width)
                logits -= logits.amax(-1, keepdim=True)
                expected = float((logits.softmax(-1) @ WIDTHS) @ sizes / sizes.sum())
                penalty = max(0.0, penalty + dual_lr * (expected - budget))
                history.append({"penalty": penalty, "expected_avg_bits": expected})
                if len(history) == steps:
                    break
    bits = most_probable_within(logits, sizes, budget)
    quantized = {layer: grid_layer(mu, int(b), sigma=sigma) for (layer, mu, sigma), b in zip(
        layers, bits.tolist(), strict=True)}
    probs = logits.softmax(-1)
    return QuantizedNet(quantized, posterior.module, "random-bits", {
        "avg_bits": avg_bits, "seed": seed, "steps": steps, "batch_size": batch_size,
        "forgetting": forgetting, "dual_lr": dual_lr, "final": history[-1],
        "bit_probabilities": {layer: [round(p, 6) for p in probs[i].tolist()]
                              for i, (layer, _, _) in enumerate(layers)}})
