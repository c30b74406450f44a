"""The posterior predictive: ``predict`` and ``evaluate`` for a Posterior, a QuantizedNet or
any plain net.

None of them changes the network it is handed: its train/eval modes are restored and it is
not moved to another device (a copy is).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from pyro.infer import Predictive
from torch import nn
from torch.func import functional_call
from torch.utils.data import Dataset

from .._checks import device as check_device
from .._checks import flag as _flag
from .._checks import positive_int as _positive_int
from .._modules import evaluating
from ..bnn.convert import BNN, bayesian
from ..diagnostics.metrics import classification_metrics, entropy
from .batching import batches
from .posterior import Posterior

Model = Posterior | nn.Module  # or a pqnet QuantizedNet (imported lazily: it imports us)
DRAWS_PER_CALL = 8
"""Posterior draws that one :class:`pyro.infer.Predictive` call holds in memory at once."""


def _as_model(model: object) -> Model:
    """A Posterior or a plain network; a QuantizedNet becomes its plain network."""
    from ..quantize.qnet import QuantizedNet

    if isinstance(model, QuantizedNet):
        return model.module
    if isinstance(model, (Posterior, nn.Module)):
        return model
    raise TypeError(f"model: expected a pqnet Posterior, a pqnet QuantizedNet or a "
                    f"torch.nn.Module, got {type(model).__name__}")


@contextlib.contextmanager
def _network(model: Model, device: torch.device) -> Iterator[nn.Module]:
    """The network to run, in eval mode on ``device``; the caller's is left as it was."""
    with evaluating(model.module if isinstance(model, Posterior) else model, device) as net:
        yield net


def _draws(model: Model, num_samples: int, seed: int,
           device: torch.device) -> Iterator[dict[str, torch.Tensor]]:
    """The weights of each of ``num_samples`` posterior draws (one empty dict for a plain
    net, which runs on its own weights)."""
    if not isinstance(model, Posterior):
        yield {}
        return
    gen = torch.Generator().manual_seed(seed)
    for _ in range(num_samples):
        yield {k: w.to(device) for k, w in model.draw(gen).items()}


def _kind(model: Model) -> str:
    return model.likelihood["kind"] if isinstance(model, Posterior) else "categorical"


def _check_x(x: torch.Tensor, argument: str) -> None:
    if not isinstance(x, torch.Tensor) or not torch.is_floating_point(x):
        raise ValueError(f"{argument}: expected a floating-point tensor")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{argument}: contains NaN or inf")


def _run(net: nn.Module, weights: dict, x: torch.Tensor, argument: str) -> torch.Tensor:
    try:
        return functional_call(net, weights, (x,), strict=False)
    except RuntimeError as err:
        raise ValueError(f"{argument}: inputs of shape {tuple(x.shape[1:])} do not fit the "
                         f"model: {err}") from err


def _pyro_model(posterior: Posterior, device: torch.device) -> BNN:
    """The posterior's network as a Pyro model (:func:`pqnet.bayesian` of a copy of its mean
    network), for :class:`pyro.infer.Predictive`. Its priors and guide are never used:
    every weight site is conditioned on a posterior draw."""
    layers = posterior.layers.values()
    bnn = bayesian(posterior.module, likelihood=posterior.likelihood["kind"],
                   bias=any(info.bias for info in layers),
                   embeddings=any(info.kind == "Embedding" for info in layers),
                   local_reparam=False)
    sites = [s.removeprefix("net.") for s in bnn.sites]
    if sorted(sites) != sorted(posterior.names):
        raise ValueError(f"model: the posterior's random weights {posterior.names} are not "
                         f"those of its network as a BNN ({sites})")
    return bnn.to(device).eval()


def _predictive_draws(posterior: Posterior, x: torch.Tensor, num_samples: int, seed: int,
                      device: torch.device) -> torch.Tensor:
    """``f(x; w_s)`` for each posterior draw ``w_s`` (the same draws as :func:`evaluate`'s
    with this ``seed``), by :class:`pyro.infer.Predictive` running the BNN's model
    conditioned on them: shape ``(num_samples, *f.shape)``."""
    bnn = _pyro_model(posterior, device)
    gen = torch.Generator().manual_seed(seed)
    outputs = []
    cuda = [device.index or 0] if device.type == "cuda" else []
    # Predictive's trial runs of the model draw from torch's global generator: not the caller's
    with torch.random.fork_rng(devices=cuda):
        for start in range(0, num_samples, DRAWS_PER_CALL):
            draws = [posterior.draw(gen) for _ in range(min(DRAWS_PER_CALL, num_samples - start))]
            samples = {f"net.{k}": torch.stack([d[k] for d in draws]).to(device)
                       for k in posterior.names}
            predictive = Predictive(bnn, posterior_samples=samples, return_sites=["_RETURN"])
            try:
                outputs.append(predictive(x)["_RETURN"])
            except RuntimeError as err:
                raise ValueError(f"x: inputs of shape {tuple(x.shape[1:])} do not fit the "
                                 f"model: {err}") from err
    return torch.cat(outputs)


@torch.no_grad()
def predict(model: Model, x: torch.Tensor, num_samples: int = 32, seed: int = 0,
            device: str | torch.device = "cpu", return_draws: bool = False) -> torch.Tensor:
    """Posterior predictive mean for inputs ``x``, or with ``return_draws`` each draw's
    prediction.

    Classification: ``p(y | x, D) ~= (1/S) sum_s softmax(f(x; w_s))`` with ``w_s ~ q``;
    regression: ``(1/S) sum_s f(x; w_s)``. A plain ``nn.Module`` or a ``QuantizedNet`` is
    one deterministic network (``S = 1``).

    ``return_draws=True`` gives the ``S`` terms of that mean, shape ``(S, N, classes)``
    (probabilities) or ``(S, *f.shape)`` (regression outputs); for a Posterior they come from
    :class:`pyro.infer.Predictive` running the Pyro model of the BNN conditioned on the
    posterior draws, the same draws as the mean's for the same ``seed``, so
    ``predict(..., return_draws=True).mean(0)`` is ``predict(...)``.
    """
    num_samples = _positive_int("num_samples", num_samples)
    return_draws = _flag("return_draws", return_draws)
    model = _as_model(model)
    _check_x(x, "x")
    device = check_device(device)
    categorical = _kind(model) == "categorical"
    if return_draws and isinstance(model, Posterior):
        f = _predictive_draws(model, x.to(device), num_samples, seed, device)
        return (f.softmax(-1) if categorical else f).cpu()
    outputs = []
    with _network(model, device) as net:
        for weights in _draws(model, num_samples, seed, device):
            f = _run(net, weights, x.to(device), "x")
            outputs.append(f.softmax(-1) if categorical else f)
    if return_draws:
        return torch.stack(outputs).cpu()
    return (sum(outputs) / len(outputs)).cpu()


def _batch_stats(net: nn.Module, weights: dict, dataset: Dataset, batch_size: int,
                 device: torch.device, model: Model) -> dict[str, torch.Tensor]:
    """One draw's per-example statistics over ``dataset``: probabilities and their entropy
    (classification), or the outputs, their squares, the Normal CDF of the targets and the
    log-likelihood (regression)."""
    categorical = _kind(model) == "categorical"
    noise = float(model.likelihood.get("noise", 1.0)) if isinstance(model, Posterior) else 1.0
    parts: dict[str, list] = {}
    for x, y in batches(dataset, batch_size, shuffle=False, device=device):
        _check_x(x, "dataset")
        f = _run(net, weights, x, "dataset")
        if categorical:
            p = f.softmax(-1)
            stats = {"probs": p, "entropy": entropy(p)}
        else:
            f = f.reshape(y.shape).double()
            normal = torch.distributions.Normal(f, noise)
            stats = {"f": f, "f2": f.square(), "cdf": normal.cdf(y.double()),
                     "log_lik": normal.log_prob(y.double()).reshape(len(y), -1).sum(-1)}
        for k, v in stats.items():
            parts.setdefault(k, []).append(v.cpu())
    return {k: torch.cat(v) for k, v in parts.items()}


def _accumulate(sums: dict[str, torch.Tensor], stats: dict[str, torch.Tensor]) -> None:
    """Add one draw's statistics to the running sums (a log-sum-exp for the likelihood)."""
    for k, v in stats.items():
        if k == "log_lik":
            sums[k] = v if k not in sums else torch.logaddexp(sums[k], v)
        else:
            sums[k] = sums.get(k, 0) + v


@torch.no_grad()
def evaluate(model: Model, dataset: Dataset, num_samples: int = 32, seed: int = 0,
             batch_size: int = 1000, device: str | torch.device = "cpu") -> dict[str, float]:
    """Posterior predictive metrics on ``dataset`` with ``num_samples`` weight draws.

    Classification: ``accuracy``, ``nll`` (of the predictive mean), ``ece`` (15 bins),
    ``entropy`` (mean predictive entropy, nats) and ``mutual_information`` (its epistemic
    part). Regression: ``rmse`` of the predictive mean, ``nll`` (of the mixture
    ``(1/S) sum_s N(y | f(x; w_s), noise^2)``), ``epistemic_std`` (the spread of ``f``
    over draws) and ``coverage_90`` (the share of targets inside the mixture's central 90 %
    interval: ``0.05 <= (1/S) sum_s Phi((y - f_s) / noise) <= 0.95``). Each draw is used
    on every batch, so the numbers are those of ``num_samples`` whole networks.
    """
    num_samples = _positive_int("num_samples", num_samples)
    batch_size = _positive_int("batch_size", batch_size)
    model = _as_model(model)
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset: the dataset is empty")
    device = check_device(device)
    categorical = _kind(model) == "categorical"
    ys = torch.cat([y for _, y in batches(dataset, batch_size, shuffle=False)])
    sums: dict[str, torch.Tensor] = {}
    draws = 0
    with _network(model, device) as net:
        for weights in _draws(model, num_samples, seed, device):
            _accumulate(sums, _batch_stats(net, weights, dataset, batch_size, device, model))
            draws += 1
    if categorical:
        if int(ys.min()) < 0 or int(ys.max()) >= sums["probs"].shape[-1]:
            raise ValueError(f"dataset: labels must lie in [0, {sums['probs'].shape[-1]})")
        out = classification_metrics(sums["probs"] / draws, ys, sums["entropy"] / draws)
    else:
        mean, cdf = sums["f"] / draws, sums["cdf"] / draws
        out = {
            "rmse": float((mean - ys.reshape(mean.shape).double()).square().mean().sqrt()),
            "nll": float(-(sums["log_lik"] - math.log(draws)).mean()),
            "epistemic_std": float((sums["f2"] / draws - mean.square()).clamp_min(0)
                                    .sqrt().mean()),
            "coverage_90": float(((cdf >= 0.05) & (cdf <= 0.95)).double().mean()),
        }
    out["num_samples"] = draws
    return out
