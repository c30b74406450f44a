"""The losses ``fit`` minimises, as ``nn.Module``s: the mean-field ELBO and the likelihood of
the means (the warm start).

:class:`MeanFieldELBO` is the loss of Pyro's :class:`~pyro.infer.TraceMeanField_ELBO` on a
:class:`~pqnet.bnn.BNN`, computed without Pyro's traces: the guide's Normals are handed to
the layers directly (:func:`pqnet.bnn.layers.drawn`) and the KL is one closed-form sum.
Pyro stays the model's language and the reference: the same seed gives Pyro's loss and
gradients (``tests/test_fit.py`` compares them), because the noise is drawn in Pyro's order
(every site's ``eps`` in the guide's order, then the layers' local-reparameterisation
noise in the forward order).
"""

from __future__ import annotations

import torch
from torch import nn

from ..bnn.convert import BNN
from ..bnn.layers import Drawn, drawn


class _BNNLoss(nn.Module):
    """A loss over a BNN's parameters: ``forward(x, y, dataset_size)``, the scale ``N / B``
    of a minibatch's log-likelihood as in Pyro's subsampled ``plate``."""

    def __init__(self, bnn: BNN) -> None:
        super().__init__()
        self.bnn = bnn
        self._sites = [(site, *bnn.site_layer(site)) for site in bnn.sites]

    def _weights(self, noisy: bool) -> dict[nn.Module, dict[str, Drawn]]:
        guide, layers = self.bnn.guide, {}
        for site, layer, param in self._sites:
            loc = guide.loc_of(site)
            if noisy:
                scale = guide.scale_of(site)
                weight = Drawn(loc, scale, torch.randn(loc.shape, dtype=loc.dtype,
                                                       device=loc.device))
            else:
                weight = Drawn(loc)
            layers.setdefault(layer, {})[param] = weight
        return layers

    def nll(self, x: torch.Tensor, y: torch.Tensor, dataset_size: int | None,
            noisy: bool) -> torch.Tensor:
        """``-(N / B) sum_n log p(y_n | x_n, w)`` for one draw ``w`` (the means when not
        ``noisy``)."""
        with drawn(self._weights(noisy), self.bnn.local_reparam):
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
    (:meth:`~pqnet.bnn.BNN.kl`). Linear layers sample their pre-activations (local
    reparameterisation) when ``bnn.local_reparam``.
    """

    def __init__(self, bnn: BNN, num_particles: int = 1) -> None:
        super().__init__(bnn)
        self.num_particles = num_particles

    def forward(self, x: torch.Tensor, y: torch.Tensor,
                dataset_size: int | None = None) -> torch.Tensor:
        nll = sum(self.nll(x, y, dataset_size, noisy=True) for _ in range(self.num_particles))
        return nll / self.num_particles + self.bnn.kl_weight * self.bnn.kl()


class MeansLikelihood(_BNNLoss):
    """``-(N / B) sum_n log p(y_n | x_n, mu)``: the negative log-likelihood of the network of
    the guide's means, the warm start's loss (maximum likelihood, as plain training with the
    same network and data would minimise: cross-entropy for a categorical likelihood)."""

    def forward(self, x: torch.Tensor, y: torch.Tensor,
                dataset_size: int | None = None) -> torch.Tensor:
        return self.nll(x, y, dataset_size, noisy=False)
