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

Two ways to run a layer: through Pyro (its weights are ``PyroSample`` sites, read by the
model under the guide's trace), or handed its weights' Normals directly (:func:`drawn`),
which is how :class:`pqnet.inference.elbo.MeanFieldELBO` computes the same loss without
Pyro's traces.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
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


class Drawn(NamedTuple):
    """A weight handed to a layer directly: ``loc + eps * scale`` (a reparameterised draw;
    ``eps ~ N(0, I)`` drawn when the layer asks, unless given), or ``loc`` alone when
    ``scale`` is ``None`` (no noise)."""

    loc: torch.Tensor
    scale: torch.Tensor | None = None
    eps: torch.Tensor | None = None
    var: torch.Tensor | None = None  # scale ** 2, when the caller has it

    def variance(self) -> torch.Tensor:
        return self.scale.square() if self.var is None else self.var

    def value(self) -> torch.Tensor:
        if self.scale is None:
            return self.loc
        eps = torch.randn_like(self.loc) if self.eps is None else self.eps
        return self.loc + eps * self.scale


@contextlib.contextmanager
def drawn(layers: dict[nn.Module, dict[str, Drawn]], local_reparam: bool) -> Iterator[None]:
    """Run Bayesian ``layers`` on the given weights instead of their Pyro sample sites.

    ``layers`` maps each layer to ``{"weight": Drawn, "bias": Drawn}`` (``bias`` only when
    it is random). A ``Linear`` layer with noisy weights and 2-d inputs samples its
    pre-activations when ``local_reparam`` (the same rule as under Pyro).
    """
    for layer, params in layers.items():
        object.__setattr__(layer, "pqnet_drawn", (params, local_reparam))
    try:
        yield
    finally:
        for layer in layers:
            object.__delattr__(layer, "pqnet_drawn")


def _drawn_bias(layer: nn.Module, params: dict[str, Drawn]) -> Drawn | torch.Tensor | None:
    """The layer's random bias, or its point-estimate bias (``None`` when it has none)."""
    return params["bias"] if layer.bias_is_random else layer.bias


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
        if "pqnet_drawn" in self.__dict__:
            return self._forward_drawn(x, *self.__dict__["pqnet_drawn"])
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
        return _sampled_preactivation(x, qw.loc, qw.scale.square(), b_loc, b_var)

    def _forward_drawn(self, x: torch.Tensor, params: dict[str, Drawn],
                       local_reparam: bool) -> torch.Tensor:
        w, b = params["weight"], _drawn_bias(self, params)
        if not local_reparam or w.scale is None or x.dim() > 2:
            return F.linear(x, w.value(), b.value() if isinstance(b, Drawn) else b)
        if isinstance(b, Drawn):
            b_loc, b_var = b.loc, None if b.scale is None else b.variance()
        else:
            b_loc, b_var = b, None
        return _sampled_preactivation(x, w.loc, w.variance(), b_loc, b_var)


def _sampled_preactivation(x: torch.Tensor, loc: torch.Tensor, w_var: torch.Tensor,
                           b_loc: torch.Tensor | None, b_var: torch.Tensor | None) -> torch.Tensor:
    """``x W^T + b`` for ``W ~ N(loc, w_var)``, ``b ~ N(b_loc, b_var)``, sampled per example
    (the local reparameterisation)."""
    mean = F.linear(x, loc, b_loc)
    var = F.linear(x.square(), w_var, b_var)
    # clamp: zero inputs (ReLU) give zero variance and an infinite sqrt gradient
    return mean + var.clamp_min(1e-16).sqrt() * torch.randn_like(mean)


class _DrawnWeights:
    """Forward pass of a Bayesian Conv / Embedding (a mixin over ``PyroModule[cls]``): the
    layer's own forward, or, when weights were handed to it (:func:`drawn`), the same
    computation on those."""

    bias_is_random: bool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "pqnet_drawn" not in self.__dict__:
            return super().forward(x)
        params, _ = self.__dict__["pqnet_drawn"]
        w = params["weight"].value()
        if isinstance(self, nn.Embedding):
            return F.embedding(x, w, self.padding_idx, self.max_norm, self.norm_type,
                               self.scale_grad_by_freq, self.sparse)
        b = _drawn_bias(self, params)
        return self._conv_forward(x, w, b.value() if isinstance(b, Drawn) else b)


_CLASSES: dict[type, type] = {}


def bayesian_class(cls: type[nn.Module]) -> type:
    """The Bayesian version of a layer class (cached, so pickling sees one class): a
    ``PyroModule[cls]`` whose sampled weights are used as they are, plus local
    reparameterisation for ``Linear``; each can also run on weights handed to it
    (:func:`drawn`)."""
    if cls not in _CLASSES:
        mixin = _LocalReparamLinear if issubclass(cls, nn.Linear) else _DrawnWeights
        _CLASSES[cls] = type(f"Bayesian{cls.__name__}", (mixin, PyroModule[cls]), {})
    return _CLASSES[cls]
