"""The posterior predictive: ``predict`` and ``evaluate`` for a Posterior or any plain net."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import Dataset

from .._checks import device as check_device
from .._checks import positive_int as _positive_int
from ..diagnostics.metrics import classification_metrics, entropy
from .batching import batches
from .posterior import Posterior

Model = Posterior | nn.Module


def _networks(model: Model, num_samples: int, seed: int,
              device: torch.device) -> Iterator[tuple[nn.Module, dict]]:
    """``(net, weights)`` for each of ``num_samples`` posterior draws (one for a plain net)."""
    if isinstance(model, Posterior):
        net = model.module.to(device).eval()
        gen = torch.Generator().manual_seed(seed)
        for _ in range(num_samples):
            yield net, {k: w.to(device) for k, w in model.draw(gen).items()}
    elif isinstance(model, nn.Module):
        yield model.to(device).eval(), {}
    else:
        raise TypeError(f"model: expected a pqnet Posterior or a torch.nn.Module, "
                        f"got {type(model).__name__}")


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


@torch.no_grad()
def predict(model: Model, x: torch.Tensor, num_samples: int = 32, seed: int = 0,
            device: str | torch.device = "cpu") -> torch.Tensor:
    """Posterior predictive mean for inputs ``x``.

    Classification: ``p(y | x, D) ~= (1/S) sum_s softmax(f(x; w_s))`` with ``w_s ~ q``;
    regression: ``(1/S) sum_s f(x; w_s)``. A plain ``nn.Module`` is one deterministic
    network (``S = 1``).
    """
    num_samples = _positive_int("num_samples", num_samples)
    _check_x(x, "x")
    device = check_device(device)
    categorical = _kind(model) == "categorical"
    total, count = 0.0, 0
    for net, weights in _networks(model, num_samples, seed, device):
        f = _run(net, weights, x.to(device), "x")
        total = total + (f.softmax(-1) if categorical else f)
        count += 1
    return (total / count).cpu()


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
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset: the dataset is empty")
    device = check_device(device)
    categorical = _kind(model) == "categorical"
    ys = torch.cat([y for _, y in batches(dataset, batch_size, shuffle=False)])
    sums: dict[str, torch.Tensor] = {}
    draws = 0
    for net, weights in _networks(model, num_samples, seed, device):
        parts: dict[str, list] = {}
        for x, y in batches(dataset, batch_size, shuffle=False, device=device):
            _check_x(x, "dataset")
            f = _run(net, weights, x, "dataset")
            if categorical:
                p = f.softmax(-1)
                stats = {"probs": p, "entropy": entropy(p)}
            else:
                f = f.reshape(y.shape).double()
                noise = float(model.likelihood.get("noise", 1.0)) if isinstance(
                    model, Posterior) else 1.0
                normal = torch.distributions.Normal(f, noise)
                stats = {"f": f, "f2": f.square(), "cdf": normal.cdf(y.double()),
                         "log_lik": normal.log_prob(y.double()).reshape(len(y), -1).sum(-1)}
            for k, v in stats.items():
                parts.setdefault(k, []).append(v.cpu())
        for k, v in parts.items():
            v = torch.cat(v)
            if k == "log_lik":  # a running log-sum-exp over draws
                sums[k] = v if k not in sums else torch.logaddexp(sums[k], v)
            else:
                sums[k] = sums.get(k, 0) + v
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
