"""Observation models ``p(y | f(x; w))`` for the network output ``f``."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule, PyroParam
from torch.distributions import constraints


def _logits(f: torch.Tensor) -> torch.Tensor:
    if f.dim() != 2:
        raise ValueError("module: a categorical likelihood needs outputs of shape "
                         f"(batch, classes), but the network gives {tuple(f.shape)}")
    return f


class Categorical(PyroModule):
    """Classification: ``y ~ Categorical(softmax(f))``, ``f`` the logits."""

    kind = "categorical"

    def forward(self, f: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return pyro.sample("obs", self.distribution(f), obs=y)

    def distribution(self, f: torch.Tensor) -> dist.Distribution:
        return dist.Categorical(logits=_logits(f))

    def log_prob(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``sum_n log p(y_n | f_n)`` (what the ``obs`` site adds to the ELBO, unscaled)."""
        return -F.cross_entropy(_logits(f), y, reduction="sum")

    def describe(self) -> dict:
        return {"kind": self.kind}


class Gaussian(PyroModule):
    """Regression: ``y ~ Normal(f, noise^2)`` per output; ``noise`` fixed or learned.

    A learned noise is a point estimate (type-II maximum likelihood), kept positive by a
    constraint.
    """

    kind = "normal"

    def __init__(self, noise: float = 1.0, learn_noise: bool = False) -> None:
        super().__init__()
        if not (math.isfinite(noise) and noise > 0):
            raise ValueError(f"noise: must be a positive finite number, got {noise}")
        self.learn_noise = learn_noise
        if learn_noise:
            self.noise = PyroParam(torch.tensor(float(noise)), constraint=constraints.positive)
        else:
            self.register_buffer("noise", torch.tensor(float(noise)))

    def forward(self, f: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is not None:
            y = y.reshape(f.shape).to(f.dtype)
        return pyro.sample("obs", self.distribution(f), obs=y)

    def distribution(self, f: torch.Tensor) -> dist.Distribution:
        return dist.Normal(f, self.noise).to_event(f.dim() - 1)

    def log_prob(self, f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``sum_n log p(y_n | f_n)`` (what the ``obs`` site adds to the ELBO, unscaled)."""
        return self.distribution(f).log_prob(y.reshape(f.shape).to(f.dtype)).sum()

    def describe(self) -> dict:
        return {"kind": self.kind, "noise": float(self.noise.detach())}


LIKELIHOODS = ("categorical", "normal")


def make_likelihood(name: str, noise: float = 1.0, learn_noise: bool = False) -> PyroModule:
    if name == "categorical":
        return Categorical()
    if name in ("normal", "gaussian"):
        return Gaussian(noise, learn_noise)
    raise ValueError(f"likelihood: unknown name {name!r}; expected one of {', '.join(LIKELIHOODS)}")
