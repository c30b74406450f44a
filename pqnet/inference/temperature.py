"""The KL weight (the posterior's temperature) chosen on held-out data, and the initial
posterior scales it implies.

Around the warm start's means ``mu`` the expected negative log-likelihood of ``N`` examples
is, to second order, ``(N / 2) sum_i h_i (w_i - mu_i)^2`` with ``h_i`` the per-example
Fisher information of weight ``i``. The mean-field Normal that minimises the tempered
objective ``E_q[NLL] + beta KL(q || N(m, s^2))`` at fixed means then has

.. math:: \\sigma_i^2(\\beta) = \\frac{\\beta}{N h_i + \\beta / s_i^2},

the Gaussian precision of natural-gradient VI (Khan et al. 2018, "Fast and Scalable
Bayesian Deep Learning by Weight-Perturbation in Adam", eq. 6, with the prior precision
tempered). Each ``beta`` of a grid thus gives a posterior at no training cost, scored by
the negative log-likelihood of its predictive on held-out data, as Wenzel et al. (2020,
"How Good is the Bayes Posterior in Deep Neural Networks Really?") choose the temperature
of a cold posterior.

The rule is the one-standard-error rule (Hastie, Tibshirani & Friedman, "The Elements of
Statistical Learning", 7.10): the warmest ``beta`` whose held-out NLL is within one paired
standard error of the best one's (the same examples and draws score both), so that a
colder posterior is chosen only when the validation data can tell it is better. With the
means held at the warm start this score favours cold posteriors (it cannot see SVI's
regularisation of the means), which the rule tempers. ``h_i`` is the empirical Fisher
from minibatch gradients of the mean NLL ``g_b``,
``B E_b[g_{b,i}^2] = B \bar g_i^2 + Var_n(g_{n,i})``: the per-example Fisher plus the
squared mean gradient, which is not zero before the warm start has converged.
"""

from __future__ import annotations

import math

import torch

from ..bnn.convert import BNN
from ..bnn.guide import _key, softplus_inverse
from ..bnn.layers import Drawn, drawn
from .batching import batches, check_batch
from .elbo import MeansLikelihood, weights_by_layer

KL_WEIGHTS = (1.0, 0.1, 0.01, 1e-3, 1e-4, 1e-5)
"""The KL weights ``fit(kl_weight="auto")`` chooses from: 1 (the exact ELBO) down to 1e-5."""
DRAWS = 16
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
        prior_precision = bnn.prior_parameters(site)[1].square().reciprocal()
        precision = dataset_size * fisher[site] + kl_weight * prior_precision
        scales[site] = (kl_weight / precision).sqrt().expand_as(fisher[site])
    return scales


def set_scales(bnn: BNN, scales: dict[str, torch.Tensor]) -> None:
    """Start the guide's scales at ``scales`` (a fixed weight's scale stays its own: the
    guide masks it)."""
    with torch.no_grad():
        for site in bnn.sites:
            bnn.guide.rho[_key(site)].copy_(softplus_inverse(scales[site].clamp_min(1e-12)))


@torch.no_grad()
def predictive_log_lik(bnn: BNN, scales: dict[str, torch.Tensor], data, batch_size: int,
                       seed: int, device: torch.device, draws: int = DRAWS) -> torch.Tensor:
    """Per held-out example, ``log (1/S) sum_s p(y | x, w_s)``, ``w_s ~ N(mu, scales^2)``,
    with the draws of ``seed`` (whole networks, shared by all examples)."""
    gen = torch.Generator().manual_seed(seed)
    log_lik = []
    for _ in range(draws):
        def draw(site: str) -> Drawn:
            loc = bnn.guide.loc_of(site)
            return Drawn(loc, scales[site], torch.randn(loc.shape, generator=gen).to(device))

        parts = []
        with drawn(weights_by_layer(bnn, draw), local_reparam=False):
            for x, y in batches(data, batch_size, shuffle=False, device=device):
                check_batch(bnn.likelihood.kind, x, y, "train_dataset")
                f = bnn.net(x)
                if bnn.likelihood.kind == "normal":
                    y = y.reshape(f.shape).to(f.dtype)
                parts.append(bnn.likelihood.distribution(f).log_prob(y).double())
        log_lik.append(torch.cat(parts))
    return torch.logsumexp(torch.stack(log_lik), 0) - math.log(draws)


def choose_kl_weight(bnn: BNN, fisher: dict[str, torch.Tensor], fit_size: int, val_part,
                     seed: int, device: torch.device) -> dict:
    """The KL weight of :data:`KL_WEIGHTS` chosen on ``val_part`` by the rule in the module
    docstring, for the tempered posteriors around the current means (``fisher`` estimated
    on ``fit_size`` examples). Returns ``{"kl_weight", "grid", "val_nll",
    "val_nll_se_to_best", "val_size", "draws", "at_grid_floor"}``."""
    scores = [predictive_log_lik(bnn, tempered_scales(bnn, fisher, beta, fit_size), val_part,
                                 1000, seed, device) for beta in KL_WEIGHTS]
    nlls = [float(-score.mean()) for score in scores]
    best = min(range(len(nlls)), key=nlls.__getitem__)
    se = [float((score - scores[best]).std() / math.sqrt(len(score))) for score in scores]
    chosen = next(i for i in range(len(nlls)) if nlls[i] - nlls[best] <= se[i])
    return {"kl_weight": KL_WEIGHTS[chosen], "grid": list(KL_WEIGHTS), "val_nll": nlls,
            "val_nll_se_to_best": se, "val_size": len(val_part), "draws": DRAWS,
            "at_grid_floor": chosen == len(KL_WEIGHTS) - 1}
