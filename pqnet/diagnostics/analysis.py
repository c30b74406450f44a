"""A quantized network against its posterior: per-layer statistics and predictive checks.

A quantized network is one more setting of the weights, so it can be asked the questions
one asks of a posterior draw. Is each quantized weight where the posterior puts its mass
(inside its 95 % highest-density interval; how many posterior standard deviations away)?
Did the bits go where the posterior is certain? And what did quantization do to the
predictive: agreement and KL with the BNN, calibration, and out-of-distribution detection?
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from scipy.stats import norm, spearmanr
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.utils.data import Dataset

from .._checks import positive_int as _positive_int
from ..inference.batching import batches
from ..inference.posterior import Posterior
from ..inference.predictive import predict
from ..quantize.qnet import QuantizedNet, weight_name
from .metrics import entropy

__all__ = ["analyze", "bits_sigma_correlation", "entropy_auroc", "hdi_coverage", "layer_table",
           "predictive_divergence", "predictive_summary", "reliability", "z_scores"]

Weights = QuantizedNet | Mapping[str, torch.Tensor]
Model = Posterior | nn.Module | QuantizedNet


def _weights(weights: Weights) -> dict[str, torch.Tensor]:
    if isinstance(weights, QuantizedNet):
        return weights.weights()
    if isinstance(weights, Mapping):
        return {k: torch.as_tensor(v).detach().float() for k, v in weights.items()}
    raise TypeError(f"weights: expected a QuantizedNet or a mapping of parameter names to "
                    f"tensors, got {type(weights).__name__}")


def z_scores(posterior: Posterior, weights: Weights) -> dict[str, torch.Tensor]:
    """Each weight's distance from its posterior mean in posterior standard deviations,

    .. math:: z_i = (\\hat w_i - \\mu_i) / \\sigma_i,

    for every parameter of ``weights`` (a :class:`QuantizedNet`: its quantized weights; or
    a mapping ``name -> tensor``, e.g. one posterior draw) that ``posterior`` has. A draw from
    ``q`` has ``z ~ N(0, 1)``; a rounding that stays plausible under the posterior keeps
    ``|z|`` small.
    """
    if not isinstance(posterior, Posterior):
        raise TypeError(f"posterior: expected a pqnet Posterior, got {type(posterior).__name__}")
    out = {}
    for name, w in _weights(weights).items():
        if name not in posterior.loc:
            raise ValueError(f"weights: {name!r} is not a random parameter of the posterior")
        if tuple(w.shape) != tuple(posterior.loc[name].shape):
            raise ValueError(f"weights: {name} has shape {tuple(w.shape)}, the posterior "
                             f"{tuple(posterior.loc[name].shape)}")
        out[name] = (w - posterior.loc[name]) / posterior.scale[name]
    return out


def _check_prob(prob: float) -> float:
    if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0 < prob < 1:
        raise ValueError(f"prob: expected a probability in (0, 1), got {prob!r}")
    return float(prob)


def hdi_coverage(posterior: Posterior, weights: Weights, prob: float = 0.95) -> dict[str, float]:
    """The fraction of each parameter's weights inside its ``prob`` highest-density interval.

    For ``q(w_i) = N(mu_i, sigma_i^2)`` the HDI is ``mu_i +- z* sigma_i`` with
    ``z* = Phi^{-1}((1 + prob) / 2)`` (1.96 for 95 %), so the coverage is
    ``#{i : |z_i| <= z*} / n``. Weights drawn from ``q`` itself cover ``prob`` (up to
    binomial noise ``sqrt(prob (1 - prob) / n)``); a quantization that moves weights out of
    the region the posterior supports covers less.
    """
    half = norm.ppf((1 + _check_prob(prob)) / 2)
    return {name: float((z.abs() <= half).double().mean())
            for name, z in z_scores(posterior, weights).items()}


def bits_sigma_correlation(posterior: Posterior, qnet: QuantizedNet) -> float:
    """Spearman's rank correlation between each quantized weight's code width ``b_i`` and
    its posterior standard deviation ``sigma_i`` relative to its layer's range,
    ``sigma_i / max_layer |mu|``: negative when the bits go where the posterior is certain
    (the premise of the uncertainty-to-bits methods); ``nan`` when all widths are equal."""
    bits, rel = [], []
    for path, layer in qnet.layers.items():
        name = weight_name(path)
        mu, sigma = posterior.loc[name], posterior.scale[name]
        bits.append(layer.bits.reshape(-1).double())
        rel.append((sigma / mu.abs().max().clamp_min(1e-12)).reshape(-1).double())
    bits, rel = torch.cat(bits).numpy(), torch.cat(rel).numpy()
    if np.all(bits == bits[0]):
        return math.nan
    return float(spearmanr(bits, rel).statistic)


def layer_table(posterior: Posterior, qnet: QuantizedNet, prob: float = 0.95) -> list[dict]:
    """One row per quantized layer: ``layer``, ``kind``, ``weights``, ``bits`` (mean width),
    ``unique_values``, ``sigma`` (median posterior sd), ``snr`` (median ``|mu| / sigma``),
    ``hdi_coverage`` (see :func:`hdi_coverage`), ``z_abs_mean``, ``z_rms`` and ``z_abs_max``
    (see :func:`z_scores`). For draws from ``q``: ``E|z| = 0.80``, ``z_rms = 1``."""
    zs = z_scores(posterior, qnet)
    coverage = hdi_coverage(posterior, qnet, prob)
    rows = []
    for path, layer in qnet.layers.items():
        name = weight_name(path)
        mu, sigma, z = posterior.loc[name], posterior.scale[name], zs[name].double()
        info = posterior.layers.get(path)
        rows.append({
            "layer": path, "kind": info.kind if info else "", "weights": layer.numel,
            "bits": layer.code_bits / layer.numel,
            "unique_values": len(layer.values().unique()),
            "sigma": float(sigma.median()), "snr": float((mu.abs() / sigma).median()),
            "hdi_coverage": coverage[name], "z_abs_mean": float(z.abs().mean()),
            "z_rms": float(z.square().mean().sqrt()), "z_abs_max": float(z.abs().max()),
        })
    return rows


# --------------------------------------------------------------------------- predictive


def reliability(probs: torch.Tensor, labels: torch.Tensor, num_bins: int = 15) -> dict:
    """Reliability-diagram data of a classifier (Guo et al. 2017, "On Calibration of Modern
    Neural Networks", ICML): confidences ``max_c p_c`` in ``num_bins`` equal-width bins
    ``((b-1)/M, b/M]`` (the bins of :func:`~pqnet.diagnostics.metrics.
    expected_calibration_error`); per bin ``count``, mean ``confidence`` and ``accuracy``
    (``nan`` for empty bins), and ``ece = sum_b |B_b| / N |acc_b - conf_b|``."""
    num_bins = _positive_int("num_bins", num_bins)
    confidence, predicted = probs.double().max(-1)
    correct = (predicted == labels).double()
    bins = (confidence * num_bins).ceil().long().clamp(1, num_bins) - 1
    count = torch.bincount(bins, minlength=num_bins).double()
    conf_sum = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, bins, confidence)
    acc_sum = torch.zeros(num_bins, dtype=torch.float64).index_add_(0, bins, correct)
    safe = count.clamp_min(1)
    nan = torch.full_like(count, math.nan)
    return {
        "bin_edges": torch.linspace(0, 1, num_bins + 1).tolist(),
        "count": count.long().tolist(),
        "confidence": torch.where(count > 0, conf_sum / safe, nan).tolist(),
        "accuracy": torch.where(count > 0, acc_sum / safe, nan).tolist(),
        "ece": float((acc_sum - conf_sum).abs().sum() / len(labels)),
    }


def predictive_divergence(p: torch.Tensor, q: torch.Tensor) -> dict[str, float]:
    """How far the predictive ``q`` (a quantized net's) is from ``p`` (the BNN's), per input:
    ``agreement``, the fraction of inputs with the same most probable class, and ``kl``,
    ``(1/N) sum_n KL(p_n || q_n) = (1/N) sum_n sum_c p_nc log(p_nc / q_nc)`` in nats."""
    p, q = p.double(), q.double()
    kl = (p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum(-1)
    return {"agreement": float((p.argmax(-1) == q.argmax(-1)).double().mean()),
            "kl": float(kl.mean())}


def entropy_auroc(probs_in: torch.Tensor, probs_ood: torch.Tensor) -> float:
    """AUROC of the predictive entropy ``H(p(y | x))`` as a score that flags
    out-of-distribution inputs (positives) against in-distribution ones (Hendrycks & Gimpel
    2017, "A Baseline for Detecting Misclassified and Out-of-Distribution Examples", ICLR):
    the probability that a random OOD input has a higher entropy than a random
    in-distribution one; 0.5 is chance."""
    scores = torch.cat([entropy(probs_in.double()), entropy(probs_ood.double())]).numpy()
    labels = np.r_[np.zeros(len(probs_in)), np.ones(len(probs_ood))]
    return float(roc_auc_score(labels, scores))


def _inputs(data: Dataset | torch.Tensor,
            argument: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(data, torch.Tensor):
        return data, None
    if isinstance(data, Dataset):
        if len(data) == 0:
            raise ValueError(f"{argument}: the dataset is empty")
        try:
            xs, ys = zip(*batches(data, 1024, shuffle=False), strict=True)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{argument}: expected a dataset of (x, y) pairs: {err}") from err
        return torch.cat(xs), torch.cat(ys)
    raise TypeError(f"{argument}: expected a torch Dataset or a tensor of inputs, "
                    f"got {type(data).__name__}")


def _predict(model: Model, x: torch.Tensor, num_samples: int, seed: int,
             argument: str) -> torch.Tensor:
    if isinstance(model, QuantizedNet):
        model = model.to_module()
    if isinstance(model, Posterior) and model.likelihood["kind"] != "categorical":
        raise ValueError(f"model: predictive checks need a categorical likelihood, got "
                         f"{model.likelihood['kind']!r}")
    try:
        return predict(model, x, num_samples=num_samples, seed=seed)
    except ValueError as err:  # predict names its own argument "x"
        raise ValueError(f"{argument}: {str(err).removeprefix('x: ')}") from err


def predictive_summary(model: Model, data: Dataset, *, ood: Dataset | torch.Tensor | None = None,
                       num_samples: int = 32, seed: int = 0, num_bins: int = 15) -> dict:
    """The predictive of ``model`` (a Posterior with ``num_samples`` draws, a QuantizedNet or
    a plain network) on ``data``: ``accuracy``, ``nll``, ``ece``, ``entropy`` (mean, nats),
    ``reliability`` (:func:`reliability`), ``ood_auroc`` (:func:`entropy_auroc` against the
    inputs ``ood``; ``None`` without them) and ``probs``, the predictive probabilities."""
    x, y = _inputs(data, "data")
    probs = _predict(model, x, num_samples, seed, "data")
    picked = probs.double().gather(-1, y[:, None]).squeeze(-1)
    curve = reliability(probs, y, num_bins)
    out = {"accuracy": float((probs.argmax(-1) == y).double().mean()),
           "nll": float(-picked.clamp_min(1e-12).log().mean()), "ece": curve["ece"],
           "entropy": float(entropy(probs.double()).mean()), "reliability": curve,
           "ood_auroc": None, "probs": probs}
    if ood is not None:
        x_ood, _ = _inputs(ood, "ood")
        out["ood_auroc"] = entropy_auroc(probs, _predict(model, x_ood, num_samples, seed, "ood"))
    return out


def analyze(posterior: Posterior, qnet: QuantizedNet, data: Dataset, *,
            ood: Dataset | torch.Tensor | None = None, reference: dict | None = None,
            num_samples: int = 32, seed: int = 0, prob: float = 0.95,
            num_bins: int = 15) -> dict:
    """Everything above for one quantized network against its posterior.

    Returns a dict with ``layers`` (:func:`layer_table`), ``hdi_coverage`` (over all its
    quantized weights), ``z_abs_mean``, ``bits_sigma_spearman``
    (:func:`bits_sigma_correlation`), ``before`` (the BNN's :func:`predictive_summary`;
    pass it as ``reference`` to reuse it across quantized nets), ``after`` (the quantized
    net's) and ``agreement`` / ``kl`` (:func:`predictive_divergence` of after from before).
    """
    if not isinstance(qnet, QuantizedNet):
        raise TypeError(f"qnet: expected a QuantizedNet, got {type(qnet).__name__}")
    layers = layer_table(posterior, qnet, prob)
    total = sum(r["weights"] for r in layers)
    before = reference if reference is not None else predictive_summary(
        posterior, data, ood=ood, num_samples=num_samples, seed=seed, num_bins=num_bins)
    after = predictive_summary(qnet, data, ood=ood, num_bins=num_bins)
    return {"layers": layers,
            "hdi_coverage": sum(r["hdi_coverage"] * r["weights"] for r in layers) / total,
            "z_abs_mean": sum(r["z_abs_mean"] * r["weights"] for r in layers) / total,
            "bits_sigma_spearman": bits_sigma_correlation(posterior, qnet),
            "before": before, "after": after,
            **predictive_divergence(before["probs"], after["probs"])}
