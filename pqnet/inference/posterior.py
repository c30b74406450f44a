"""The fitted posterior: a mean and a standard deviation for every random weight."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .._io import load_torch, save_torch
from ..bnn.convert import BNN, LayerInfo, layer_lines

FORMAT = "pqnet.posterior"
VERSION = 1


@dataclass
class Posterior:
    """``q(w) = prod_i Normal(w_i | loc_i, scale_i^2)`` over a network's random weights.

    ``loc`` and ``scale`` are keyed by the parameter names of the original network
    (``"features.0.weight"``); ``layers`` by module path. ``module`` is the original network
    holding the posterior means and the point estimates of everything that is not random
    (BatchNorm, point-estimate biases). ``history`` is the per-epoch record of the fit.
    """

    loc: dict[str, torch.Tensor]
    scale: dict[str, torch.Tensor]
    layers: dict[str, LayerInfo]
    module: nn.Module
    likelihood: dict = field(default_factory=lambda: {"kind": "categorical"})
    history: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if set(self.loc) != set(self.scale):
            raise ValueError("scale: must have the same names as loc")
        for name, s in self.scale.items():
            if s.shape != self.loc[name].shape:
                raise ValueError(f"scale: {name} has shape {tuple(s.shape)}, "
                                 f"loc has {tuple(self.loc[name].shape)}")
            if not bool((s > 0).all()) or not bool(torch.isfinite(s).all()):
                raise ValueError(f"scale: {name} must be positive and finite everywhere")

    def __repr__(self) -> str:
        # the dataclass repr would print every tensor (tens of thousands of characters)
        config = self.config
        fitted = (f", epochs={config['epochs']}, kl_weight={config['kl_weight']:g}"
                  if "epochs" in config and "kl_weight" in config else "")
        head = (f"Posterior({len(self.layers)} random layers, {self.num_weights:,} random "
                f"weights, likelihood={self.likelihood.get('kind')!r}{fitted})")
        sigma = {}
        for path in self.layers:
            scale = self.scale.get(f"{path}.weight" if path else "weight")
            if scale is not None:
                sigma[path] = f"mean sigma {float(scale.double().mean()):.3g}"
        return "\n".join([head, *layer_lines(self.layers, sigma)])

    @classmethod
    def from_bnn(cls, bnn: BNN, history: list[dict] | None = None,
                 config: dict | None = None) -> Posterior:
        """Read the guide's current means and scales (and the point estimates) off ``bnn``."""
        guide = bnn.guide
        loc, scale = {}, {}
        for site in bnn.sites:
            name = site.removeprefix("net.")
            loc[name] = guide.loc_of(site).detach().cpu().clone()
            scale[name] = guide.scale_of(site).detach().cpu().clone()
        module = copy.deepcopy(bnn.template)
        fitted = {k: v.detach().cpu() for k, v in bnn.net.state_dict().items()}
        state = {k: loc.get(k, fitted.get(k, v)) for k, v in module.state_dict().items()}
        module.load_state_dict(state)
        return cls(loc, scale, dict(bnn.layers), module, bnn.likelihood.describe(),
                   list(history or []), dict(config or {}))

    @property
    def names(self) -> list[str]:
        return list(self.loc)

    @property
    def num_weights(self) -> int:
        return sum(v.numel() for v in self.loc.values())

    def sample(self, n: int = 1, seed: int | None = None) -> dict[str, torch.Tensor]:
        """``n`` joint draws: a dict of tensors of shape ``(n, *weight_shape)``."""
        if not (isinstance(n, int) and n > 0):
            raise ValueError(f"n: expected a positive int, got {n!r}")
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        return {
            k: self.loc[k] + self.scale[k] * torch.randn((n, *self.loc[k].shape), generator=gen)
            for k in self.loc
        }

    def draw(self, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One joint draw ``w = loc + scale * eps``, ``eps ~ N(0, I)`` from ``generator``: a
        dict of tensors of the weights' shapes, ready for ``torch.func.functional_call``."""
        return {k: self.loc[k] + self.scale[k] * torch.randn(self.loc[k].shape,
                                                             generator=generator)
                for k in self.loc}

    def mean_module(self) -> nn.Module:
        """A plain ``nn.Module`` (a copy of the original network) holding the posterior means."""
        return copy.deepcopy(self.module)

    def state(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "loc": self.loc,
            "scale": self.scale,
            "layers": {k: v.to_dict() for k, v in self.layers.items()},
            "likelihood": self.likelihood,
            "history": self.history,
            "config": self.config,
            "module": self.module,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` (``torch.save``), atomically: an old file is replaced whole or kept.

        The network itself is pickled with it, so its class must be importable on load.
        """
        return save_torch(self.state(), path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> Posterior:
        """Read a posterior written by :meth:`save`; a clear error for anything else."""
        state = load_torch(path, "posterior", FORMAT, VERSION, map_location)
        layers = {k: LayerInfo.from_dict(v) for k, v in state["layers"].items()}
        return cls(state["loc"], state["scale"], layers, state["module"], state["likelihood"],
                   state["history"], state["config"])
