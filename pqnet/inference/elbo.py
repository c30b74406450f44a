"""The losses ``fit`` minimises, as ``nn.Module``s: the mean-field ELBO and the likelihood of
the means (the warm start).

:class:`MeanFieldELBO` is the loss of Pyro's :class:`~pyro.infer.TraceMeanField_ELBO` on a
:class:`~pqnet.bnn.BNN`, computed without Pyro's traces: the guide's Normals are handed to
the layers directly (:func:`pqnet.bnn.layers.drawn`) and the KL is one closed-form sum.
Pyro stays the model's language and the reference (``tests/test_fit.py`` compares them):
without local reparameterisation the same seed gives Pyro's loss and gradients when the
layers ask for their weights in the guide's order (a sequential network's); with it,
where Pyro also draws the weights its Linear layers never use, the two agree in
distribution (their mean loss and gradients over many seeds). A layer called twice in one
forward pass draws its weights twice here, where Pyro reuses one draw; pqnet's models call
each layer once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..bnn.convert import BNN
from ..bnn.layers import Drawn, drawn


def weights_by_layer(bnn: BNN, make: Callable[[str], Drawn]
                     ) -> dict[nn.Module, dict[str, Drawn]]:
    """``{layer: {"weight": make(site), "bias": ...}}`` over the BNN's random sites, as
    :func:`pqnet.bnn.layers.drawn` takes them."""
    layers: dict[nn.Module, dict[str, Drawn]] = {}
    for site in bnn.sites:
        layer, param = bnn.site_layer(site)
        layers.setdefault(layer, {})[param] = make(site)
    return layers


def means(bnn: BNN) -> dict[nn.Module, dict[str, Drawn]]:
    """The guide's means as the weights of every layer (no noise)."""
    return weights_by_layer(bnn, lambda site: Drawn(bnn.guide.loc_of(site)))


class _BNNLoss(nn.Module):
    """A loss over a BNN's parameters: ``forward(x, y, dataset_size)``, the scale ``N / B``
    of a minibatch's log-likelihood as in Pyro's subsampled ``plate``."""

    def __init__(self, bnn: BNN) -> None:
        super().__init__()
        self.bnn = bnn

    def nll(self, x: torch.Tensor, y: torch.Tensor, dataset_size: int | None,
            weights: dict[nn.Module, dict[str, Drawn]]) -> torch.Tensor:
        """``-(N / B) sum_n log p(y_n | x_n, w)`` for the network on ``weights``."""
        with drawn(weights, self.bnn.local_reparam):
            f = self.bnn.net(x)
        scale = (len(x) if dataset_size is None else dataset_size) / len(x)
        return -scale * self.bnn.likelihood.log_prob(f, y)


class MeanFieldELBO(_BNNLoss):
    """``-ELBO`` of a BNN with its mean-field Normal guide, as
    :class:`~pyro.infer.TraceMeanField_ELBO` computes it:

    .. math::

        -\\mathcal L = \\frac1S\\sum_{s=1}^S \\frac{N}{B}\\sum_{n \\in \\text{batch}}
            -\\log p(y_n \\mid x_n, w_s) + \\beta\\,\\mathrm{KL}(q \\,\\|\\, p),
        \\qquad w_s \\sim q,

    ``S = num_particles``, ``beta = bnn.kl_weight``, the KL in closed form
    (:func:`~pqnet.bnn.convert.normal_kl`, from the same means and variances the draws
    use).
    Linear layers sample their pre-activations (local reparameterisation) when
    ``bnn.local_reparam``; a weight is drawn only where a layer uses it, in the order the
    forward pass asks for it.
    """

    def __init__(self, bnn: BNN, num_particles: int = 1) -> None:
        super().__init__(bnn)
        self.num_particles = num_particles

    def forward(self, x: torch.Tensor, y: torch.Tensor,
                dataset_size: int | None = None) -> torch.Tensor:
        guide = self.bnn.guide
        locs = {site: guide.loc_of(site) for site in self.bnn.sites}
        scales = {site: guide.scale_of(site) for site in self.bnn.sites}
        variances = {site: scale.square() for site, scale in scales.items()}
        weights = weights_by_layer(self.bnn,
                                   lambda s: Drawn(locs[s], scales[s], var=variances[s]))
        nll = sum(self.nll(x, y, dataset_size, weights) for _ in range(self.num_particles))
        return nll / self.num_particles + self.bnn.kl_weight * self.bnn.kl(locs, variances)


class MeansLikelihood(_BNNLoss):
    """``-(N / B) sum_n log p(y_n | x_n, mu)``: the negative log-likelihood of the network of
    the guide's means, the warm start's loss (maximum likelihood, as plain training with the
    same network and data would minimise: cross-entropy for a categorical likelihood)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor,
                dataset_size: int | None = None) -> torch.Tensor:
        return self.nll(x, y, dataset_size, means(self.bnn))
