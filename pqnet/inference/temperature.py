"""The KL weight (the posterior's temperature) chosen on held-out data, and the initial
posterior scales it implies.

Around the warm start's means ``mu`` the expected negative log-likelihood of ``N`` examples
is, to second order, ``(N / 2) sum_i h_i (w_i - mu_i)^2`` with ``h_i`` the per-example
Fisher information of weight ``i``. The mean-field Normal that minimises the tempered
objective ``E_q[NLL] + beta KL(q || N(m, s^2))`` at fixed means then has

.. math:: \\sigma_i^2(\\beta) = \\frac{\\beta}{N h_i + \\beta / s_i^2},

the Gaussian precision of natural-gradient VI (Khan et al. 2018, "Fast and Scalable
Bayesian Deep Learning by Weight-Perturbation in Adam", eq. 6, with the prior precision
tempered). Each ``beta`` of a grid thus gives a posterior at no training cost; the one whose
predictive has the lowest negative log-likelihood on held-out data is chosen, as
Wenzel et al. (2020, "How Good is the Bayes Posterior in Deep Neural Networks Really?")
choose the temperature of a cold posterior. ``h_i`` is the empirical Fisher, estimated from
minibatch gradients of the mean NLL ``g_b`` as ``B E_b[g_{b,i}^2]`` (at a mode the squared
mean gradient is small next to the per-example variance ``B Var(g_b)``).
"""

from __future__ import annotations

import math

import torch

from ..bnn.convert import BNN
from ..bnn.guide import _key, softplus_inverse
from ..bnn.layers import Drawn, drawn
from .batching import batches, check_batch
from .elbo import MeansLikelihood

KL_WEIGHTS = (1.0, 0.1, 0.01, 1e-3, 1e-4, 1e-5)
"""The KL weights ``fit(kl_weight="auto")`` chooses from: 1 (the exact ELBO) down to 1e-5."""
DRAWS = 8
"""Posterior draws per temperature on the validation data (the same draws for each)."""


def fisher_diagonal(bnn: BNN, data, batch_size: int,
                    device: torch.device) -> dict[str, torch.Tensor]:
    """``h_i = B E_b[g_{b,i}^2]``: the per-example empirical Fisher of every random weight at
    the guide's means, from one pass over ``data`` in batches of ``B = batch_size``."""
    loss = MeansLikelihood(bnn)
    locs = [bnn.guide.loc[_key(site)] for site in bnn.sites]
    sums = [torch.zeros_like(p) for p in locs]
    count = 0
    for x, y in batches(data, batch_size, shuffle=False, device=device):
        check_batch(bnn.likelihood.kind, x, y, "train_dataset")
        grads = torch.autograd.grad(loss(x, y) / len(x), locs, allow_unused=True)
        for total, g in zip(sums, grads, strict=True):
            if g is not None:
                total.add_(len(x) * g.square())
        count += 1
    return {site: total / count for site, total in zip(bnn.sites, sums, strict=True)}


def tempered_scales(bnn: BNN, fisher: dict[str, torch.Tensor], kl_weight: float,
                    dataset_size: int) -> dict[str, torch.Tensor]:
    """``sigma_i(beta) = sqrt(beta / (N h_i + beta / s_i^2))`` for every random weight."""
    scales = {}
    for site in bnn.sites:
        layer, param = bnn.site_layer(site)
        prior_precision = getattr(layer, f"{param}_prior_scale").square().reciprocal()
        precision = dataset_size * fisher[site] + kl_weight * prior_precision
        scales[site] = (kl_weight / precision).sqrt().expand_as(fisher[site])
    return scales


def set_scales(bnn: BNN, scales: dict[str, torch.Tensor]) -> None:
    """Start the guide's scales at ``scales`` (fixed weights keep theirs)."""
    with torch.no_grad():
        for site in bnn.sites:
            bnn.guide.rho[_key(site)].copy_(softplus_inverse(scales[site].clamp_min(1e-12)))


@torch.no_grad()
def predictive_nll(bnn: BNN, scales: dict[str, torch.Tensor], data, batch_size: int,
                   seed: int, device: torch.device, draws: int = DRAWS) -> float:
    """Held-out NLL per example of the predictive ``(1/S) sum_s p(y | x, w_s)``, ``w_s ~
    N(mu, scales^2)``, with the draws of ``seed`` (whole networks, shared by all examples)."""
    gen = torch.Generator().manual_seed(seed)
    log_lik = []
    for _ in range(draws):
        layers = {}
        for site in bnn.sites:
            layer, param = bnn.site_layer(site)
            loc = bnn.guide.loc_of(site)
            eps = torch.randn(loc.shape, generator=gen).to(device)
            layers.setdefault(layer, {})[param] = Drawn(loc, scales[site], eps)
        parts = []
        with drawn(layers, local_reparam=False):
            for x, y in batches(data, batch_size, shuffle=False, device=device):
                f = bnn.net(x)
                if bnn.likelihood.kind == "normal":
                    y = y.reshape(f.shape).to(f.dtype)
                parts.append(bnn.likelihood.distribution(f).log_prob(y).double())
        log_lik.append(torch.cat(parts))
    mixture = torch.logsumexp(torch.stack(log_lik), 0) - math.log(draws)
    return float(-mixture.mean())


def choose_kl_weight(bnn: BNN, fisher: dict[str, torch.Tensor], fit_size: int, val_part,
                     seed: int, device: torch.device) -> dict:
    """The KL weight of :data:`KL_WEIGHTS` whose tempered posterior around the current means
    (``fisher`` estimated on ``fit_size`` examples) predicts ``val_part`` best; returns
    ``{"kl_weight", "grid", "val_nll", "val_size", "draws"}``."""
    nlls = [predictive_nll(bnn, tempered_scales(bnn, fisher, beta, fit_size), val_part,
                           1000, seed, device) for beta in KL_WEIGHTS]
    best = min(range(len(KL_WEIGHTS)), key=lambda i: (nlls[i], -KL_WEIGHTS[i]))
    return {"kl_weight": KL_WEIGHTS[best], "grid": list(KL_WEIGHTS), "val_nll": nlls,
            "val_size": len(val_part), "draws": DRAWS}
