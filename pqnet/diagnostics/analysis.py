"""A quantized network against its posterior: predictive checks first, then per-layer
statistics.

What matters is what quantization did to the predictions, so :func:`analyze` leads with
paired per-example checks of the quantized net against the network of posterior means (the
float net it replaces) and the posterior predictive: held-out elpd and NLL, agreement and KL
with the BNN, calibration. Each has a verdict.

A quantized network is also one more setting of the weights, so it can be asked the
questions one asks of a posterior draw: is each quantized weight inside its
:data:`HDI_PROB` highest-density interval, how many posterior sds away? These per-weight
checks are blind where the posterior never left the prior: a layer whose sds sit at the
prior sd accepts any value within about two prior sds, however coarse. So the analysis also
measures per layer how far the posterior moved from the prior (:func:`prior_movement`) and
warns about layers the data did not inform.
"""

from __future__ import annotations

import copy
import math
import re
import warnings
from collections.abc import Mapping

import numpy as np
import torch
from scipy.stats import norm, spearmanr
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.func import functional_call
from torch.utils.data import Dataset

from .._checks import fraction, probability_rows
from .._checks import positive_int as _positive_int
from ..bnn.convert import normal_kl
from ..bnn.priors import FanInPrior, NormalPrior, Prior, PWFNPrior, make_prior
from ..inference.batching import batches
from ..inference.posterior import Posterior
from ..quantize.qnet import QuantizedNet, weight_name
from .metrics import entropy, expected_calibration_error

__all__ = ["HDI_PROB", "DiagnosticWarning", "analyze", "bits_sigma_correlation",
           "bits_sigma_text", "entropy_auroc", "hdi_coverage", "layer_table", "log_predictive",
           "paired_difference", "prediction_checks", "predictive_divergence",
           "predictive_summary", "prior_movement", "recorded_prior", "reliability", "z_scores"]

#: the one interval level of every HDI pqnet reports: coverage, the z-score plot's band and
#: ``az.summary`` in the report (pass ``prob=`` / ``hdi_prob=`` to change it)
HDI_PROB = 0.95
#: a layer whose median posterior sd is above this fraction of its prior sd was not informed
#: by the data: its posterior is (nearly) its prior
UNINFORMED_SD_RATIO = 0.9
#: a check is flagged when the quantized net is worse than the mean network by more than
#: this many paired standard errors ...
SE_FACTOR = 2.0
#: ... and by more than a practical floor: 4 nats of summed elpd (Sivula, Magnusson, Matamoros
#: & Vehtari 2020, "Uncertainty in Bayesian leave-one-out cross-validation based model
#: comparison": smaller elpd differences are small), 1 point of agreement, 0.01 nats of
#: mean KL, 0.01 of ECE
FLOORS = {"elpd": 4.0, "agreement": 0.01, "kl": 0.01, "ece": 0.01}


class DiagnosticWarning(UserWarning):
    """A diagnostic found a problem: a quantized net that fails a predictive check, or a
    layer whose posterior did not move from its prior."""

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


def hdi_coverage(posterior: Posterior, weights: Weights,
                 prob: float = HDI_PROB) -> dict[str, float]:
    """The fraction of each parameter's weights inside its ``prob`` highest-density interval.

    For ``q(w_i) = N(mu_i, sigma_i^2)`` the HDI is ``mu_i +- z* sigma_i`` with
    ``z* = Phi^{-1}((1 + prob) / 2)`` (1.96 for 95 %), so the coverage is
    ``#{i : |z_i| <= z*} / n``. Weights drawn from ``q`` itself cover ``prob`` (up to
    binomial noise ``sqrt(prob (1 - prob) / n)``); a quantization that moves weights out of
    the region the posterior supports covers less.

    Limit: the check is only as sharp as the posterior. Where ``sigma_i`` stayed at the prior
    sd (a layer the data did not inform, :func:`prior_movement`), every value within about
    two prior sds is "covered", so a 1-bit rounding of such a layer can cover 100 % and still
    ruin the predictions. Read it with :func:`prior_movement` and the predictive checks.
    """
    half = norm.ppf((1 + fraction("prob", prob)) / 2)
    return {name: float((z.abs() <= half).double().mean())
            for name, z in z_scores(posterior, weights).items()}


def bits_sigma_correlation(posterior: Posterior, qnet: QuantizedNet) -> float:
    """Spearman's rank correlation between each quantized weight's code width ``b_i`` and
    its posterior standard deviation ``sigma_i`` relative to its layer's range,
    ``sigma_i / max_layer |mu|``: negative when more bits went to weights whose posterior is
    certain, positive when more went to uncertain ones; ``nan`` when all widths are equal
    (:func:`bits_sigma_text` says so in words)."""
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


def bits_sigma_text(rho: float) -> str:
    """:func:`bits_sigma_correlation` in words: what its sign means for this network. The
    uncertainty-to-bits methods are built on the premise that certain weights need more bits;
    a positive value says this allocation did the opposite, which for such a method deserves a
    look (per-layer widths follow the layers' sd quantiles, not each weight's)."""
    if math.isnan(rho):
        return "All weights have the same width: no correlation of bits with posterior sd."
    head = f"Spearman correlation of code width with relative posterior sd: {rho:+.2f}"
    if rho < 0:
        return f"{head}: more bits went to weights whose posterior is more certain."
    if rho > 0:
        return (f"{head}: more bits went to weights whose posterior is *less* certain, the "
                "opposite of the uncertainty-to-bits premise.")
    return f"{head}: widths do not follow the posterior sd."


# --------------------------------------------------------------------------- prior movement

_PRIOR_REPR = re.compile(r"^(NormalPrior|FanInPrior|PWFNPrior)\((\w+)=([^,()]+)\)$")
_PRIOR_CLASSES = {"NormalPrior": NormalPrior, "FanInPrior": FanInPrior, "PWFNPrior": PWFNPrior}


def recorded_prior(posterior: Posterior, prior: str | float | Prior | None = None
                   ) -> tuple[Prior, str]:
    """The prior ``posterior`` was fitted under, and where that was read.

    ``prior`` when given (anything :func:`pqnet.bayesian` takes); else the prior that
    ``posterior.config["prior"]`` records (:func:`pqnet.fit` writes its ``repr``); else
    :func:`pqnet.bayesian`'s default, ``"fan-in"``, with a note saying it was assumed.
    """
    if prior is not None:
        return make_prior(prior), "given"
    text = str(posterior.config.get("prior", ""))
    match = _PRIOR_REPR.match(text)
    if match:
        cls, field, value = match.groups()
        return _PRIOR_CLASSES[cls](**{field: float(value)}), "recorded by the fit"
    return FanInPrior(), "assumed: the posterior records none (pqnet.bayesian's default)"


def prior_movement(posterior: Posterior,
                   prior: str | float | Prior | None = None) -> list[dict]:
    """How far the posterior moved from the prior, per layer (its weight tensor).

    Per layer ``l`` with prior ``N(m, s_l^2)`` (:func:`recorded_prior`; ``s_l`` from the
    layer's fan-in): ``prior_sd = s_l``; ``sd_ratio``, the median of ``sigma_i / s_l``; and
    ``kl_per_weight``, the mean ``KL(N(mu_i, sigma_i^2) || N(m, s_l^2))`` in nats
    (:func:`pqnet.bnn.convert.normal_kl`; ``nan`` for an anchored prior such as PWFN's,
    whose mean ``w_0`` the posterior does not store). ``informed`` is ``sd_ratio <=``
    :data:`UNINFORMED_SD_RATIO`: above it the data left the layer at its prior, and its
    HDI coverage and z-scores cannot judge a quantization (Blundell et al. 2015, "Weight
    Uncertainty in Neural Networks", read weights of low ``|mu| / sigma`` the same way).
    """
    if not isinstance(posterior, Posterior):
        raise TypeError(f"posterior: expected a pqnet Posterior, got {type(posterior).__name__}")
    prior, _ = recorded_prior(posterior, prior)
    rows = []
    for path, info in posterior.layers.items():
        name = weight_name(path)
        loc, sigma = posterior.loc[name].double(), posterior.scale[name].double()
        s = prior.scale_for(info.fan_in)
        kl = math.nan if prior.anchored else float(normal_kl(
            loc, sigma.square(), torch.tensor(0.0, dtype=torch.float64),
            torch.tensor(s, dtype=torch.float64))) / loc.numel()
        ratio = float((sigma / s).median())
        rows.append({"layer": path, "kind": info.kind, "weights": loc.numel(), "prior_sd": s,
                     "sd_ratio": ratio, "kl_per_weight": kl,
                     "informed": ratio <= UNINFORMED_SD_RATIO})
    return rows


def _warn_uninformed(movement: list[dict]) -> list[str]:
    layers = [r for r in movement if not r["informed"]]
    if layers:
        which = ", ".join(f"{r['layer']} (sd ratio {r['sd_ratio']:.2f})" for r in layers)
        warnings.warn(
            f"the data did not inform layer(s) {which}: their posterior sd is (nearly) the "
            f"prior sd, so HDI coverage and z-scores accept any value near the prior and "
            "cannot judge their quantization; judge it by the predictive checks",
            DiagnosticWarning, stacklevel=3)
    return [r["layer"] for r in layers]


def layer_table(posterior: Posterior, qnet: QuantizedNet, prob: float = HDI_PROB,
                prior: str | float | Prior | None = None) -> list[dict]:
    """One row per quantized layer: ``layer``, ``kind``, ``weights``, ``bits`` (mean width),
    ``unique_values``, ``sigma`` (median posterior sd), ``snr`` (median ``|mu| / sigma``),
    ``sd_ratio``, ``kl_per_weight`` and ``informed`` (:func:`prior_movement`),
    ``hdi_coverage`` (see :func:`hdi_coverage`), ``z_abs_mean``, ``z_rms`` and ``z_abs_max``
    (see :func:`z_scores`). For draws from ``q``: ``E|z| = 0.80``, ``z_rms = 1``; in a layer
    that is not ``informed`` these are uninformative (see :func:`hdi_coverage`)."""
    zs = z_scores(posterior, qnet)
    coverage = hdi_coverage(posterior, qnet, prob)
    movement = {r["layer"]: r for r in prior_movement(posterior, prior)}
    rows = []
    for path, layer in qnet.layers.items():
        name = weight_name(path)
        mu, sigma, z = posterior.loc[name], posterior.scale[name], zs[name].double()
        info = posterior.layers.get(path)
        moved = movement.get(path, {})
        rows.append({
            "layer": path, "kind": info.kind if info else "", "weights": layer.numel,
            "bits": layer.code_bits / layer.numel,
            "unique_values": len(layer.values().unique()),
            "sigma": float(sigma.median()), "snr": float((mu.abs() / sigma).median()),
            "sd_ratio": moved.get("sd_ratio", math.nan),
            "kl_per_weight": moved.get("kl_per_weight", math.nan),
            "informed": moved.get("informed"),
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
    confidence, predicted = probability_rows("probs", probs).double().max(-1)
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
        "ece": expected_calibration_error(probs.double(), labels, num_bins),  # the one ECE
    }


def predictive_divergence(p: torch.Tensor, q: torch.Tensor) -> dict[str, float]:
    """How far the predictive ``q`` (a quantized net's) is from ``p`` (the BNN's), per input:
    ``agreement``, the fraction of inputs with the same most probable class, and ``kl``,
    ``(1/N) sum_n KL(p_n || q_n) = (1/N) sum_n sum_c p_nc log(p_nc / q_nc)`` in nats;
    ``p`` and ``q`` are ``(N, C)``."""
    p = probability_rows("p", p).double()
    q = probability_rows("q", q, like=p).double()
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


def _forward(net: nn.Module, weights: dict, x: torch.Tensor, batch_size: int,
             argument: str) -> torch.Tensor:
    try:
        return torch.cat([functional_call(net, weights, (x[i:i + batch_size],), strict=False)
                          for i in range(0, len(x), batch_size)])
    except RuntimeError as err:
        raise ValueError(f"{argument}: inputs of shape {tuple(x.shape[1:])} do not fit the "
                         f"model: {err}") from err


@torch.no_grad()
def log_predictive(model: Model, x: torch.Tensor, *, num_samples: int = 32, seed: int = 0,
                   batch_size: int = 1000, argument: str = "x") -> torch.Tensor:
    """Log predictive probabilities ``log p(c | x_n)``, shape ``(N, C)``, float64:

    .. math:: \\log p(c \\mid x_n, \\mathcal D) \\approx \\log \\frac1S \\sum_{s=1}^S
        \\mathrm{softmax}(f(x_n; w_s))_c, \\quad w_s \\sim q,

    taken by log-sum-exp over the draws (exact where a softmax underflows), for a Posterior
    (the draws of :func:`pqnet.predict` with the same ``seed``); ``log softmax(f(x_n))`` for
    a QuantizedNet or a plain network (a point mass, ``S = 1``)."""
    num_samples = _positive_int("num_samples", num_samples)
    if isinstance(model, QuantizedNet):
        model = model.to_module()
    if isinstance(model, Posterior):
        if model.likelihood["kind"] != "categorical":
            raise ValueError(f"model: predictive checks need a categorical likelihood, got "
                             f"{model.likelihood['kind']!r}")
        net, gen = copy.deepcopy(model.module).eval(), torch.Generator().manual_seed(seed)
        total = None
        for _ in range(num_samples):
            logp = _forward(net, model.draw(gen), x, batch_size, argument).double().log_softmax(-1)
            total = logp if total is None else torch.logaddexp(total, logp)
        return total - math.log(num_samples)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a pqnet Posterior, QuantizedNet or torch.nn.Module, "
                        f"got {type(model).__name__}")
    net = copy.deepcopy(model).eval()  # the caller's module keeps its mode
    return _forward(net, {}, x, batch_size, argument).double().log_softmax(-1)


def predictive_summary(model: Model, data: Dataset, *, ood: Dataset | torch.Tensor | None = None,
                       num_samples: int = 32, seed: int = 0, num_bins: int = 15) -> dict:
    """The predictive of ``model`` (a Posterior with ``num_samples`` draws, a QuantizedNet or
    a plain network) on ``data``: ``accuracy``, ``nll`` (mean), ``elpd`` (the summed log
    predictive density ``sum_n log p(y_n | x_n)``, held out when ``data`` is), ``ece``,
    ``entropy`` (mean, nats), ``reliability`` (:func:`reliability`), ``ood_auroc``
    (:func:`entropy_auroc` against the inputs ``ood``; ``None`` without them), ``probs``,
    the predictive probabilities, and ``log_density``, ``log p(y_n | x_n)`` per example
    (float64), for the paired checks of :func:`prediction_checks`."""
    x, y = _inputs(data, "data")
    logp = log_predictive(model, x, num_samples=num_samples, seed=seed, argument="data")
    if int(y.min()) < 0 or int(y.max()) >= logp.shape[-1]:
        raise ValueError(f"data: labels must lie in [0, {logp.shape[-1]})")
    probs = logp.exp().float()
    log_density = logp.gather(-1, y[:, None]).squeeze(-1)
    curve = reliability(probs, y, num_bins)
    out = {"accuracy": float((logp.argmax(-1) == y).double().mean()),
           "nll": float(-log_density.mean()), "elpd": float(log_density.sum()),
           "ece": curve["ece"], "entropy": float(entropy(logp.exp()).mean()),
           "reliability": curve, "ood_auroc": None, "probs": probs,
           "log_density": log_density, "labels": y}
    if ood is not None:
        x_ood, _ = _inputs(ood, "ood")
        probs_ood = log_predictive(model, x_ood, num_samples=num_samples, seed=seed,
                                   argument="ood").exp()
        out["ood_auroc"] = entropy_auroc(probs, probs_ood)
    return out


# --------------------------------------------------------------------------- verdicts


def paired_difference(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, *,
                      total: bool = True) -> tuple[float, float]:
    """The difference of two models' per-example scores on the same examples and its
    standard error, from the paired differences ``d_n = a_n - b_n``:

    .. math:: \\Delta = \\sum_n d_n, \\quad \\mathrm{se} = \\sqrt{N \\operatorname{Var}_n d_n}
        \\qquad (\\text{or the mean } \\bar d \\text{ with } \\sqrt{\\operatorname{Var}_n d_n / N}
        \\text{ when } ``total=False``),

    as for elpd differences in Vehtari, Gelman & Gabry 2017 ("Practical Bayesian model
    evaluation using leave-one-out cross-validation and WAIC", Stat. Comput. 27), eq. 24."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(d)
    if total:
        return float(d.sum()), float(math.sqrt(n * d.var()))
    return float(d.mean()), float(math.sqrt(d.var() / n))


def _verdict(check: str, quantized: float, mean: float, posterior: float, diff: float,
             se: float, worse: float, floor: float) -> dict:
    """One check's row; flagged when the quantized net is worse than the mean network by more
    than ``SE_FACTOR`` paired standard errors and more than the practical ``floor``."""
    return {"check": check, "quantized": quantized, "mean_network": mean,
            "posterior": posterior, "difference": diff, "se": se,
            "flagged": bool(worse > max(SE_FACTOR * se, floor))}


def _bootstrap_ece_difference(after: dict, mean: dict, num_bins: int, seed: int,
                              resamples: int = 200) -> float:
    """The standard error of ECE(quantized) - ECE(mean network) by a paired bootstrap over
    the examples (ECE is not a sum over examples, so it has no per-example difference)."""
    gen = torch.Generator().manual_seed(seed)
    y, n = after["labels"], len(after["labels"])
    diffs = []
    for _ in range(resamples):
        i = torch.randint(0, n, (n,), generator=gen)
        diffs.append(expected_calibration_error(after["probs"][i].double(), y[i], num_bins)
                     - expected_calibration_error(mean["probs"][i].double(), y[i], num_bins))
    return float(np.std(diffs))


def _kl_per_example(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    p, q = p.double(), q.double()
    return (p * (p.clamp_min(1e-12).log() - q.clamp_min(1e-12).log())).sum(-1)


def prediction_checks(after: dict, mean: dict, before: dict, *, num_bins: int = 15,
                      seed: int = 0) -> list[dict]:
    """What quantization did to the predictions: the quantized net (``after``) against the
    network of posterior means (``mean``, the float net it replaces) and the posterior
    predictive (``before``), each a :func:`predictive_summary` on the same examples.

    Rows ``elpd`` (summed held-out log density, higher is better), ``nll`` (its negative
    mean), ``agreement`` (share of inputs whose top class is the BNN's), ``kl``
    (``(1/N) sum_n KL(p_BNN(.|x_n) || p(.|x_n))``, nats) and ``ece``. Each has the three
    values, ``difference`` (quantized minus mean network) and its paired ``se``
    (:func:`paired_difference`; ECE: paired bootstrap) and ``flagged``: worse than the mean
    network by more than :data:`SE_FACTOR` standard errors and more than the practical floor
    of :data:`FLOORS`. The posterior predictive is context, not the yardstick: no single
    network is expected to match it."""
    lq, lm = after["log_density"], mean["log_density"]
    n = len(lq)
    elpd, elpd_se = paired_difference(lq, lm)
    top = before["probs"].argmax(-1)
    agree_q = (after["probs"].argmax(-1) == top).double()
    agree_m = (mean["probs"].argmax(-1) == top).double()
    agree, agree_se = paired_difference(agree_q, agree_m, total=False)
    kl_q, kl_m = (_kl_per_example(before["probs"], s["probs"]) for s in (after, mean))
    kl, kl_se = paired_difference(kl_q, kl_m, total=False)
    ece = after["ece"] - mean["ece"]
    ece_se = _bootstrap_ece_difference(after, mean, num_bins, seed)
    return [
        _verdict("elpd", after["elpd"], mean["elpd"], before["elpd"], elpd, elpd_se,
                 -elpd, FLOORS["elpd"]),
        _verdict("nll", after["nll"], mean["nll"], before["nll"], -elpd / n, elpd_se / n,
                 -elpd / n, FLOORS["elpd"] / n),
        _verdict("agreement", float(agree_q.mean()), float(agree_m.mean()), 1.0, agree,
                 agree_se, -agree, FLOORS["agreement"]),
        _verdict("kl", float(kl_q.mean()), float(kl_m.mean()), 0.0, kl, kl_se, kl,
                 FLOORS["kl"]),
        _verdict("ece", after["ece"], mean["ece"], before["ece"], ece, ece_se, ece,
                 FLOORS["ece"]),
    ]


def _warn_flagged(checks: list[dict], qnet: QuantizedNet) -> None:
    flagged = [c for c in checks if c["flagged"]]
    if flagged:
        what = "; ".join(f"{c['check']} {c['quantized']:.4g} against the mean network's "
                         f"{c['mean_network']:.4g} (difference {c['difference']:+.4g} +- "
                         f"{c['se']:.2g} se)" for c in flagged)
        warnings.warn(f"the quantized net ({qnet.method}, {qnet.avg_bits:.2f} avg bits) "
                      f"fails predictive checks: {what}", DiagnosticWarning, stacklevel=3)


def analyze(posterior: Posterior, qnet: QuantizedNet, data: Dataset, *,
            ood: Dataset | torch.Tensor | None = None, reference: dict | None = None,
            mean_reference: dict | None = None, prior: str | float | Prior | None = None,
            num_samples: int = 32, seed: int = 0, prob: float = HDI_PROB,
            num_bins: int = 15) -> dict:
    """One quantized network against its posterior, predictions first.

    Returns a dict with

    - ``checks`` (:func:`prediction_checks`: elpd, NLL, agreement, KL, ECE of the quantized
      net against the mean network and the posterior predictive, each with a verdict),
      ``flagged`` (the names of the failed checks) and ``ok`` (none failed); a
      :class:`DiagnosticWarning` names the failed ones;
    - ``prior_movement`` (:func:`prior_movement`) and ``uninformed_layers``, the layers the
      data did not inform (a :class:`DiagnosticWarning` too), and ``prior`` (what was used);
    - ``layers`` (:func:`layer_table`), ``hdi_coverage`` (over all quantized weights, at
      ``prob``), ``z_abs_mean``: per-weight checks, blind in uninformed layers;
    - ``bits_sigma_spearman`` (:func:`bits_sigma_correlation`);
    - ``before`` (the BNN's :func:`predictive_summary`), ``mean`` (the mean network's) and
      ``after`` (the quantized net's); pass the first two as ``reference`` /
      ``mean_reference`` to reuse them across quantized nets; ``agreement`` / ``kl``
      (:func:`predictive_divergence` of after from before).
    """
    if not isinstance(qnet, QuantizedNet):
        raise TypeError(f"qnet: expected a QuantizedNet, got {type(qnet).__name__}")
    used_prior, source = recorded_prior(posterior, prior)
    layers = layer_table(posterior, qnet, prob, used_prior)
    movement = prior_movement(posterior, used_prior)
    total = sum(r["weights"] for r in layers)
    before = reference if reference is not None else predictive_summary(
        posterior, data, ood=ood, num_samples=num_samples, seed=seed, num_bins=num_bins)
    mean = mean_reference if mean_reference is not None else predictive_summary(
        posterior.mean_module(), data, ood=ood, num_bins=num_bins)
    after = predictive_summary(qnet, data, ood=ood, num_bins=num_bins)
    checks = prediction_checks(after, mean, before, num_bins=num_bins, seed=seed)
    _warn_flagged(checks, qnet)
    return {"checks": checks, "flagged": [c["check"] for c in checks if c["flagged"]],
            "ok": not any(c["flagged"] for c in checks),
            "prior_movement": movement, "uninformed_layers": _warn_uninformed(movement),
            "prior": f"{used_prior!r} ({source})", "hdi_prob": prob, "layers": layers,
            "hdi_coverage": sum(r["hdi_coverage"] * r["weights"] for r in layers) / total,
            "z_abs_mean": sum(r["z_abs_mean"] * r["weights"] for r in layers) / total,
            "bits_sigma_spearman": bits_sigma_correlation(posterior, qnet),
            "before": before, "mean": mean, "after": after,
            **predictive_divergence(before["probs"], after["probs"])}
