"""Bayesian Linear / Conv layers and the local reparameterisation effect handler.

A layer's ``weight`` (and ``bias``) are :class:`~pyro.nn.PyroSample` sites. Run plainly, the
layer uses the sampled weights. Run under :class:`LocalReparameterization`, and when the
weight was drawn from a Normal guide ``w_ij ~ N(m_ij, s_ij^2)``, it samples the
pre-activations instead (Kingma, Salimans & Welling 2015, "Variational Dropout and the
Local Reparameterization Trick"): for a linear map ``b = W a``,

.. math::

    b_j \\sim \\mathcal{N}\\Big(\\sum_i m_{ji} a_i,\\; \\sum_i s_{ji}^2 a_i^2\\Big),

which is the same per-example distribution as drawing ``W`` per example, with far lower
gradient variance.

Only ``Linear`` layers do this. A convolution's output positions share one kernel, so its
pre-activations are correlated across positions; sampling each position independently
(the "LRT for convolutions" often used) is a different model, and the ELBO gradient it
gives is biased: a sum over positions loses the covariance terms of the shared kernel.
Convolutions therefore draw their kernel once per minibatch: exact, and no slower than
the deterministic layer. So does a ``Linear`` applied to a sequence (input of more than two
dimensions, e.g. a transformer's tokens): its tokens share one weight as a conv's positions
share one kernel.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from pyro.poutine.messenger import Messenger
from pyro.poutine.runtime import _PYRO_STACK
from torch import nn

BAYESIAN_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Layers whose weights (and biases) become random."""


class _Normal(NamedTuple):
    value: weakref.ref
    loc: torch.Tensor
    scale: torch.Tensor


class LocalReparameterization(Messenger):
    """Effect handler: Bayesian layers sample pre-activations, not weights.

    It remembers the Normal that each weight sample came from (the guide's, since the guide
    runs first and the model replays its values) and lets a layer ask for it. Use the same
    instance around the guide and the model::

        lrt = LocalReparameterization()
        with lrt:
            guide_trace = poutine.trace(guide).get_trace()
        with lrt:
            poutine.replay(model, trace=guide_trace)(x)
    """

    def __init__(self) -> None:
        super().__init__()
        self._normals: dict[str, _Normal] = {}

    def _pyro_post_sample(self, msg: dict) -> None:
        value = msg["value"]
        seen = self._normals.get(msg["name"])
        if seen is not None and seen.value() is value:
            return  # the model replaying the guide's draw: keep the guide's Normal
        fn = msg["fn"]
        while isinstance(fn, dist.Independent):
            fn = fn.base_dist
        if isinstance(fn, dist.Normal) and not msg["is_observed"]:
            self._normals[msg["name"]] = _Normal(weakref.ref(value), fn.loc, fn.scale)
        else:
            self._normals.pop(msg["name"], None)

    def normal_of(self, name: str, value: torch.Tensor) -> _Normal | None:
        """The Normal that ``value`` was drawn from at site ``name``, if known."""
        seen = self._normals.get(name)
        return seen if seen is not None and seen.value() is value else None


def _active_lrt() -> LocalReparameterization | None:
    for handler in reversed(_PYRO_STACK):
        if isinstance(handler, LocalReparameterization):
            return handler
    return None


class _LocalReparamLinear:
    """Forward pass of a Bayesian ``Linear`` (a mixin over ``PyroModule[nn.Linear]``)."""

    bias_is_random: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        lrt = _active_lrt()
        qw = lrt.normal_of(self._pyro_get_fullname("weight"), w) if lrt else None
        if qw is None or x.dim() > 2:  # tokens share the weight, as a conv's positions do
            return F.linear(x, w, b)
        b_loc, b_var = b, None
        if b is not None and self.bias_is_random:
            qb = lrt.normal_of(self._pyro_get_fullname("bias"), b)
            if qb is None:
                return F.linear(x, w, b)
            b_loc, b_var = qb.loc, qb.scale.square()
        mean = F.linear(x, qw.loc, b_loc)
        var = F.linear(x.square(), qw.scale.square(), b_var)
        # clamp: zero inputs (ReLU) give zero variance and an infinite sqrt gradient
        return mean + var.clamp_min(1e-16).sqrt() * torch.randn_like(mean)


_CLASSES: dict[type, type] = {}


def bayesian_class(cls: type[nn.Module]) -> type:
    """The Bayesian version of a layer class (cached, so pickling sees one class): a
    ``PyroModule[cls]`` whose sampled weights are used as they are, plus local
    reparameterisation for ``Linear``."""
    if cls not in _CLASSES:
        if issubclass(cls, nn.Linear):
            _CLASSES[cls] = type(f"Bayesian{cls.__name__}", (_LocalReparamLinear, PyroModule[cls]),
                                 {})
        else:
            _CLASSES[cls] = PyroModule[cls]
    return _CLASSES[cls]
