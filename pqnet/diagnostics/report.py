"""``pqnet report RUN_DIR``: a run folder's posterior diagnosed, quantized and compared.

:func:`write_report` reads what ``pqnet fit --out RUN_DIR`` wrote (``posterior.pt``,
``metrics.json``), reloads the test split of the data named there, and writes
``RUN_DIR/report/``:

- ``idata.nc``: the posterior as ArviZ InferenceData (:func:`~pqnet.diagnostics.arviz.
  to_inference_data`) with the log-likelihood of the *training* split (for PSIS-LOO) and
  the fit's ELBO history in ``sample_stats``, readable with ``az.from_netcdf``;
- PNG figures: posterior sd and SNR per layer, bits per layer, z-scores of the quantization
  errors, reliability diagrams, codebook usage, accuracy against average bits (Pareto);
- ``report.md``, to read top to bottom: what was fitted; the posterior and its diagnostics;
  each quantized version's bits, size, accuracy, calibration and its statistics against the
  posterior, led by what it did to the predictions (paired checks against the mean network,
  flagged when they fail); one held-out comparison table of them all (``elpd_test``); the
  benchmark, when the folder has a ``bench.json`` (:func:`pqnet.bench.run_benchmark`'s
  result). Every HDI is at :data:`~pqnet.diagnostics.analysis.HDI_PROB`.

Further fits of the same network saved in the folder as ``posterior*.pt`` (e.g. other
seeds) become further chains, which makes R-hat and ESS meaningful.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from .. import __version__
from .. import data as datasets
from .._checks import positive_int as _positive_int
from .._io import atomic_write
from ..inference.posterior import Posterior
from ..quantize import QuantizedNet, quantize
from ..quantize.codec import raw_bytes
from .analysis import HDI_PROB, analyze, bits_sigma_text, predictive_summary, prior_movement
from .arviz import az, compare_networks, pareto_k_table, psis_loo, to_inference_data
from .plots import (
    bits_plot,
    codebook_plot,
    pareto_plot,
    reliability_plot,
    save_figure,
    sigma_plot,
    zscore_plot,
)
from .table import markdown_table

__all__ = ["VARIANTS", "markdown_table", "write_report"]

#: the quantized versions a report makes: (method, average-bit budget)
VARIANTS: tuple[tuple[str, float], ...] = (("quantile-inform", 2.0), ("quantile-inform", 4.0),
                                           ("uniform", 2.0), ("uniform", 4.0))


def _frame_table(frame, index_name: str, formats: dict[str, str] | None = None) -> str:
    rows = frame.reset_index(names=index_name).to_dict("records")
    return markdown_table(rows, [index_name, *map(str, frame.columns)], formats)


# --------------------------------------------------------------------------- inputs


def _run_files(run_dir: str | os.PathLike) -> tuple[Path, list[Path], dict]:
    if not isinstance(run_dir, (str, os.PathLike)):
        raise TypeError(f"run_dir: expected a folder path, got {type(run_dir).__name__}")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run_dir: no run folder at {run_dir}; write one with "
                                "`pqnet fit --out RUN_DIR`")
    main = run_dir / "posterior.pt"
    if not main.is_file():
        raise FileNotFoundError(f"run_dir: {run_dir} has no posterior.pt; write one with "
                                "`pqnet fit --out RUN_DIR`")
    metrics_file = run_dir / "metrics.json"
    try:
        metrics = json.loads(metrics_file.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"run_dir: {metrics_file} is missing or unreadable: {err}") from err
    if not isinstance(metrics, dict) or not {"model", "data"} <= set(metrics):
        raise ValueError(f"run_dir: {metrics_file} is not the metrics.json of `pqnet fit` "
                         "(it needs 'model' and 'data')")
    others = sorted(p for p in run_dir.glob("posterior*.pt") if p != main)
    return run_dir, [main, *others], metrics


def _bench(run_dir: Path) -> dict | None:
    path = run_dir / "bench.json"
    if not path.is_file():
        return None
    try:
        bench = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"run_dir: {path} is unreadable: {err}") from err
    needed = {"method", "budget", "bits_per_weight", "accuracy"}
    if not isinstance(bench, dict) or not isinstance(bench.get("rows"), list) or not all(
            isinstance(row, dict) and needed <= set(row) for row in bench["rows"]):
        raise ValueError(f"run_dir: {path} is not a benchmark result: it needs 'rows', each "
                         f"with {', '.join(sorted(needed))}")
    return bench


def _ood(ood: Dataset | torch.Tensor | str | None, ood_dir: str | None, x: torch.Tensor,
         seed: int) -> tuple[Dataset | torch.Tensor, str]:
    if ood is None:
        gen = torch.Generator().manual_seed(seed)
        perm = torch.randperm(x[0].numel(), generator=gen)
        shuffled = x.reshape(len(x), -1)[:, perm].reshape(x.shape)
        return shuffled, (f"the test inputs with their pixels shuffled by one fixed permutation "
                          f"(seed {seed}): the same pixel values, no image structure")
    if isinstance(ood, str):
        try:
            data = datasets.load(ood, root=ood_dir, split="test")
        except (ValueError, FileNotFoundError) as err:
            raise ValueError(f"ood: cannot load data set {ood!r}: {err}") from err
        return data, f"the test split of {ood!r}: {data.note}"
    return ood, "the out-of-distribution inputs given to the report"


# --------------------------------------------------------------------------- sections


def _few_weights(idata, per_variable: int = 2) -> dict[str, np.ndarray]:
    """``{label: draws (chain, draw)}`` for the stored entries of each weight with the
    lowest and the highest SNR ``|mean| / sd`` over the draws."""
    picks = {}
    for name, draws in idata.posterior.data_vars.items():
        if not str(name).endswith("weight"):
            continue
        flat = draws.stack(__w__=[d for d in draws.dims if d not in ("chain", "draw")])
        snr = abs(flat.mean(("chain", "draw"))) / flat.std(("chain", "draw"))
        order = np.argsort(snr.values)
        for i in sorted({int(order[0]), int(order[-1])})[:per_variable]:
            where = flat["__w__"].values[i]
            where = where if isinstance(where, tuple) else (where,)
            picks[f"{name}[{','.join(str(int(c)) for c in where)}]"] = \
                flat.isel(__w__=i).values.astype(np.float64)
    return picks


def _convergence(idata) -> list[dict]:
    rhat, ess = az.rhat(idata.posterior), az.ess(idata.posterior)
    rows = [{"quantity": f"posterior {name}", "rhat_median": float(rhat[name].median()),
             "rhat_max": float(rhat[name].max()), "ess_bulk_min": float(ess[name].min())}
            for name in idata.posterior.data_vars]
    rhat_ll, ess_ll = az.rhat(idata.log_likelihood)["y"], az.ess(idata.log_likelihood)["y"]
    rows.append({"quantity": "log-likelihood per observation",
                 "rhat_median": float(rhat_ll.median()), "rhat_max": float(rhat_ll.max()),
                 "ess_bulk_min": float(ess_ll.min())})
    return rows


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", label).strip("-")


def _prior_section(posterior: Posterior) -> list[str]:
    """How far each layer's posterior moved from its prior; uninformed layers in bold."""
    rows = prior_movement(posterior)
    for row in rows:
        row["informed"] = "yes" if row["informed"] else "**no: at the prior**"
    return ["How far the data moved each layer's posterior from its prior: the median "
            "posterior sd over the prior sd (`sd_ratio`, 1 = unmoved) and the mean "
            "KL(q || p) per weight. A layer the data did not inform keeps sds at the prior's; "
            "its weights' HDIs then cover any value near the prior, so HDI coverage and "
            "z-scores cannot judge its quantization.", "",
            markdown_table(rows, ["layer", "kind", "weights", "prior_sd", "sd_ratio",
                                  "kl_per_weight", "informed"],
                           {"sd_ratio": ".3f", "kl_per_weight": ".3g", "prior_sd": ".3g"}), ""]


def _loo_section(loo) -> list[str]:
    """PSIS-LOO of the training split with its Pareto k diagnostics."""
    bad = sum(r["count"] for r in pareto_k_table(loo)[1:])
    verdict = (f"**{bad} observations have k above {loo.good_k:.2f}: their LOO estimates are "
               "unreliable.**" if bad else f"Every k is at most {loo.good_k:.2f}: reliable.")
    return ["PSIS-LOO of the training split (Vehtari, Gelman & Gabry 2017; `psis_loo`): "
            f"elpd_loo {loo.elpd_loo:,.1f} (se {loo.se:,.1f}), p_loo {loo.p_loo:,.1f}, over "
            f"{loo.n_data_points:,} observations and {loo.n_samples} draws. Pareto k "
            f"diagnostics: {verdict}", "",
            markdown_table(pareto_k_table(loo), ["pareto_k", "count", "share"],
                           {"share": ".1%"}), ""]


def _checks_overview(results: dict) -> list[str]:
    """One line per quantized version: passed, or which checks failed."""
    lines = [f"- **{label}: FLAGGED** ({', '.join(r['flagged'])} worse than the mean network)"
             if r["flagged"] else f"- {label}: passes the predictive checks"
             for label, r in results.items()]
    return [*lines, ""]


def _checks_section(result: dict) -> list[str]:
    """The predictive checks of one quantized version against the mean network."""
    rows = [{**c, "verdict": "**FLAGGED**" if c["flagged"] else "ok"} for c in result["checks"]]
    return ["Predictive checks on the test split, against the network of posterior means "
            "(`difference` = quantized - mean, `se` paired over the examples; flagged when "
            "worse by more than 2 se and a practical floor):", "",
            markdown_table(rows, ["check", "quantized", "mean_network", "posterior",
                                  "difference", "se", "verdict"],
                           {"quantized": ".4g", "mean_network": ".4g", "posterior": ".4g",
                            "difference": "+.4g", "se": ".2g"}), ""]


@dataclass
class _Run:
    """What the report's sections read: the run's inputs and everything measured on them."""

    run_dir: Path
    out: Path
    metrics: dict
    bench: dict | None
    fits: list[Posterior]
    num_samples: int
    draws: int
    max_weights_per_layer: int
    ood_note: str
    idata: object = None
    loo: object = None
    bnn: dict = field(default_factory=dict)
    mean: dict = field(default_factory=dict)
    mean_module: nn.Module | None = None
    qnets: dict[str, QuantizedNet] = field(default_factory=dict)
    results: dict[str, dict] = field(default_factory=dict)
    variants: Sequence[tuple[str, float]] = ()
    table: object = None

    @property
    def posterior(self) -> Posterior:
        return self.fits[0]

    @property
    def float_size(self) -> int:
        return raw_bytes(self.mean_module.state_dict().values())

    def figure(self, name: str, fig) -> str:
        """Save ``fig`` as ``out/name.png``; its Markdown image link."""
        save_figure(fig, self.out / f"{name}.png")
        return f"![{name}]({name}.png)"


def write_report(
    run_dir: str | os.PathLike,
    *,
    out: str | os.PathLike | None = None,
    variants: Sequence[tuple[str, float]] = VARIANTS,
    num_samples: int = 32,
    draws: int = 100,
    max_weights_per_layer: int = 256,
    seed: int = 0,
    data_dir: str | None = None,
    ood: Dataset | torch.Tensor | str | None = None,
    ood_dir: str | None = None,
) -> Path:
    """Diagnose the run in ``run_dir`` and write ``report.md``, ``idata.nc`` and PNG figures
    to ``out`` (default ``run_dir/report``); return the path of ``report.md``.

    Parameters
    ----------
    run_dir : a folder written by ``pqnet fit --out`` (``posterior.pt``, ``metrics.json``);
        further ``posterior*.pt`` fits are further chains; a ``bench.json`` is rendered too.
    variants : ``(method, avg_bits)`` pairs quantized here with :func:`pqnet.quantize`
        (data-free methods; the nets are saved, loaded back and measured as loaded).
    num_samples : posterior draws for the BNN's predictive metrics.
    draws : posterior draws per chain stored in ``idata.nc``.
    max_weights_per_layer : weights stored per layer in ``idata.nc`` (the log-likelihood uses
        all of them).
    seed : seeds the draws, the quantizers and the default OOD permutation.
    data_dir : folder of the data set, when it is not the ``data_dir`` in ``metrics.json``.
    ood : out-of-distribution inputs for the entropy AUROC: a dataset, a tensor of inputs,
        or the name of a data set whose test split is used (from ``ood_dir``). Default: the
        test inputs with their pixels shuffled by one fixed permutation.
    """
    run_dir, posterior_files, metrics = _run_files(run_dir)
    num_samples = _positive_int("num_samples", num_samples)
    draws = _positive_int("draws", draws)
    max_weights_per_layer = _positive_int("max_weights_per_layer", max_weights_per_layer)
    if not variants or any(not isinstance(v, (tuple, list)) or len(v) != 2 for v in variants):
        raise ValueError(f"variants: expected (method, avg_bits) pairs, got {variants!r}")
    bench = _bench(run_dir)
    fits = [Posterior.load(p) for p in posterior_files]
    train, test = _splits(metrics, data_dir)
    ood_x, ood_note = _ood(ood, ood_dir, test.x, seed)
    run = _Run(run_dir, run_dir / "report" if out is None else Path(out), metrics, bench, fits,
               num_samples, draws, max_weights_per_layer, ood_note, variants=variants)
    run.out.mkdir(parents=True, exist_ok=True)
    _measure_posterior(run, train, seed)
    _measure_quantized(run, test, ood_x, seed)
    md = [*_title(run), *_fitted_section(run), *_posterior_section(run),
          *_quantized_section(run), *_comparison_section(run), *_bench_section(run)]
    return atomic_write(run.out / "report.md", lambda tmp: tmp.write_text("\n".join(md)))


def _splits(metrics: dict, data_dir: str | None) -> tuple[Dataset, Dataset]:
    """The training and test splits of the data set ``metrics.json`` names."""
    root = data_dir if data_dir is not None else metrics.get("data_dir")
    try:
        return (datasets.load(metrics["data"], root=root, split="train"),
                datasets.load(metrics["data"], root=root, split="test"))
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"data_dir: cannot load the data set {metrics['data']!r} that "
                         f"metrics.json names (from {root}); pass its folder: {err}") from err


# --------------------------------------------------------------------------- measurements


def _measure_posterior(run: _Run, train: Dataset, seed: int) -> None:
    """The posterior as ArviZ data on the training split (the data PSIS-LOO is valid for),
    written to ``idata.nc``, and its PSIS-LOO."""
    run.idata = to_inference_data(run.fits, train, num_samples=run.draws, seed=seed,
                                  split="train", max_weights_per_layer=run.max_weights_per_layer)
    run.loo = psis_loo(run.idata)
    atomic_write(run.out / "idata.nc", lambda tmp: run.idata.to_netcdf(str(tmp)))


def _measure_quantized(run: _Run, test: Dataset, ood_x, seed: int) -> None:
    """The float references and the quantized versions on the test split, each version
    measured as loaded from its file, and the held-out table of them all."""
    posterior, num_samples = run.posterior, run.num_samples
    run.bnn = predictive_summary(posterior, test, ood=ood_x, num_samples=num_samples, seed=seed)
    run.mean_module = posterior.mean_module()
    run.mean = predictive_summary(run.mean_module, test, ood=ood_x)
    with tempfile.TemporaryDirectory() as tmp:
        for method, budget in run.variants:
            label = f"{method} @ {float(budget):g} bits"
            qnet = quantize(posterior, method, avg_bits=budget, seed=seed)
            path = qnet.save(Path(tmp) / "q.pqn")  # measured as it is stored
            run.qnets[label] = QuantizedNet.load(path, module=posterior.module)
            run.results[label] = analyze(posterior, run.qnets[label], test, ood=ood_x,
                                         reference=run.bnn, mean_reference=run.mean,
                                         num_samples=num_samples, seed=seed)
    run.table = compare_networks({"BNN": posterior, "mean": run.mean_module, **run.qnets},
                                 test, num_samples=num_samples, seed=seed)


# --------------------------------------------------------------------------- report.md


def _title(run: _Run) -> list[str]:
    return [f"# pqnet report: {run.metrics['model']} on {run.metrics['data']}", "",
            f"Run folder `{run.run_dir}`; written {datetime.date.today().isoformat()} by pqnet "
            f"{__version__}. The sections follow the data: what was fitted, the posterior, "
            "its quantized versions against it, one table that ranks them all"
            + (", and the benchmark." if run.bench else "."), ""]


def _fitted_section(run: _Run) -> list[str]:
    """Section 1: the network, the data, the fit's settings and its test metrics."""
    posterior, metrics = run.posterior, run.metrics
    layers = ", ".join(f"`{path}` {info.kind}" for path, info in posterior.layers.items())
    md = ["## 1. What was fitted", "",
          f"- **Network**: `{metrics['model']}` with {posterior.num_weights:,} random "
          f"weights in {len(posterior.layers)} layers ({layers}); "
          f"{run.float_size / 1024:,.1f} KiB in float32.",
          f"- **Data**: {metrics.get('data_note', metrics['data'])}.",
          f"- **Posterior**: mean-field Normal `q(w) = prod_i N(mu_i, sigma_i^2)`, fitted by "
          f"SVI (Pyro `TraceMeanField_ELBO`); {len(run.fits)} fit(s).", ""]
    config = metrics.get("config", posterior.config)
    if config:
        md += [markdown_table([{"setting": k, "value": json.dumps(v) if isinstance(
            v, (dict, list)) else str(v)} for k, v in config.items()], ["setting", "value"]), ""]
        if float(config.get("kl_weight", 1.0)) != 1.0:
            md += [f"Note: `kl_weight = {config['kl_weight']}`: a tempered posterior, not the "
                   "Bayesian one.", ""]
    if posterior.history:
        history, last = posterior.history, posterior.history[-1]
        md += [f"After {len(history)} epochs ({sum(h['seconds'] for h in history):.1f} s): "
               f"ELBO {last['elbo']:,.1f} nats, expected NLL {last['nll']:.4f} per example, "
               f"KL {last['kl']:,.1f} nats.", ""]
    return md + [
        "Test split, recomputed here: the BNN's posterior predictive "
        f"({run.num_samples} draws) and the network of posterior means.", "",
        markdown_table([{"network": f"BNN ({run.num_samples} draws)", **run.bnn},
                        {"network": "posterior mean", **run.mean}],
                       ["network", "accuracy", "nll", "ece", "entropy", "ood_auroc"]), "",
        f"`ood_auroc`: how well the predictive entropy separates {run.ood_note} from the test "
        "inputs (0.5 is chance).", ""]


def _posterior_section(run: _Run) -> list[str]:
    """Section 2: the posterior's sds and SNRs, its prior movement, a few weights' summaries,
    PSIS-LOO and the chains' agreement."""
    idata, posterior = run.idata, run.posterior
    chains = len(idata.posterior.chain)
    md = ["## 2. The posterior", "",
          f"`idata.nc` (ArviZ InferenceData, `az.from_netcdf`) holds {run.draws} draws x "
          f"{chains} chain(s) of the weights (at most "
          f"{run.max_weights_per_layer} per layer, evenly spaced; dims `out_channel`, "
          "`in_channel`, `kh`, `kw` / `out_feature`, `in_feature`, prefixed by the layer), "
          "the per-observation log-likelihood of the training split, posterior-predictive "
          "replicates, the observed labels and the fit's ELBO history per epoch "
          f"(`sample_stats`); groups: {', '.join(idata.groups())}.", "",
          run.figure("sigma", sigma_plot(posterior, "sigma")),
          run.figure("snr", sigma_plot(posterior, "snr")), "",
          "Posterior sd (dashed: each layer's prior sd) and signal-to-noise ratio "
          "`|mu| / sigma` per layer: the uncertainty that decides the bits.", "",
          *_prior_section(posterior),
          f"`az.summary` ({100 * HDI_PROB:g} % HDI) of a few weights (per layer, the stored "
          "weights with the lowest and the highest SNR):", "",
          _frame_table(az.summary(_few_weights(idata), kind="all" if chains > 1 else "stats",
                                  hdi_prob=HDI_PROB),
                       "weight", {"ess_bulk": ".0f", "ess_tail": ".0f"}), "",
          *_loo_section(run.loo)]
    if len(run.fits) > 1:
        return md + [
            "R-hat and bulk ESS across the chains (independent fits):", "",
            markdown_table(_convergence(idata),
                           ["quantity", "rhat_median", "rhat_max", "ess_bulk_min"],
                           {"ess_bulk_min": ".0f"}), "",
            "Hidden units can be permuted without changing the network, so weights of "
            "independent fits need not agree (large R-hat) even when the fits do; the "
            "per-observation log-likelihood is free of that symmetry: its R-hat near 1 says "
            "the fits make the same predictions.", ""]
    return md + [
        f"One fit: its {chains} chains are independent draws from `q`, so R-hat and ESS "
        "only measure Monte Carlo noise. Save further fits (other seeds) in the run "
        "folder as `posterior-<seed>.pt` to get chains whose R-hat means something.", ""]


def _quantized_section(run: _Run) -> list[str]:
    """Section 3: the quantized versions' checks, one table of them all, their figures and
    one subsection each."""
    md = ["## 3. Quantized versions", "",
          "Each version is made from the posterior by `pqnet.quantize(posterior, method, "
          "avg_bits=...)`, saved, loaded back and measured as loaded. `size` is the length of "
          "its file (codes entropy-coded, codebooks, code model, header and the float rest), "
          "`bits/weight` that length in bits per quantized weight. First what each did to the "
          "predictions on the test split (the checks below, per version); then "
          "`agreement` and `kl`, its predictive against the BNN's; `hdi`, the fraction of its "
          f"quantized weights inside their {100 * HDI_PROB:g} % posterior HDI (a posterior "
          f"draw: {HDI_PROB:g}); `|z|`, the mean quantization error in posterior sds (a "
          "posterior draw: 0.80). `hdi` and `|z|` cannot see a layer whose posterior stayed "
          "at the prior (section 2): there any value near the prior passes.", "",
          *_checks_overview(run.results),
          markdown_table(_versions_rows(run),
                         ["network", "bits/weight", "size_kib", "compression", "unique",
                          "accuracy", "nll", "ece", "ood_auroc", "agreement", "kl", "hdi", "|z|"],
                         {"bits/weight": ".2f", "size_kib": ".1f", "compression": ".1f",
                          "hdi": ".3f", "|z|": ".2f"}), "",
          "The BNN's size counts a mean and an sd per random weight.", "",
          run.figure("bits", bits_plot(run.qnets)), "",
          run.figure("zscores", zscore_plot(run.posterior, run.qnets)), "",
          "Quantization errors in posterior sds, per layer: a version that stays a plausible "
          f"posterior draw keeps its mass inside the shaded {100 * HDI_PROB:g} % band (blind "
          "in layers the data did not inform).", "",
          run.figure("reliability", reliability_plot(
              {"BNN": run.bnn["reliability"], "posterior mean": run.mean["reliability"],
               **{k: r["after"]["reliability"] for k, r in run.results.items()}})), ""]
    for label in run.qnets:
        md += _version_section(run, label)
    return md


def _versions_rows(run: _Run) -> list[dict]:
    """One row per network: the BNN, the mean network and each quantized version."""
    float_size = run.float_size
    sd_bytes = raw_bytes(run.posterior.scale.values())
    rows = [{"network": f"BNN ({run.num_samples} draws)", "bits/weight": 64.0,
             "size_kib": (float_size + sd_bytes) / 1024, **run.bnn},
            {"network": "posterior mean", "bits/weight": 32.0, "size_kib": float_size / 1024,
             "compression": 1.0, **run.mean}]
    for label, qnet in run.qnets.items():
        r = run.results[label]
        rows.append({"network": label, "bits/weight": qnet.bits_per_weight,
                     "size_kib": qnet.size_bytes / 1024,
                     "compression": float_size / qnet.size_bytes,
                     "unique": qnet.unique_values, **r["after"], "agreement": r["agreement"],
                     "kl": r["kl"], "hdi": r["hdi_coverage"], "|z|": r["z_abs_mean"]})
    return rows


def _version_section(run: _Run, label: str) -> list[str]:
    """One quantized version: its checks, its file, and its layers."""
    qnet, r = run.qnets[label], run.results[label]
    return [f"### {label}", "",
            *_checks_section(r),
            f"{qnet.size_bytes:,} bytes ({qnet.bits_per_weight:.2f} bits per weight, all in; "
            f"fixed-width codes {qnet.avg_bits:.2f} bits, their entropy "
            f"{qnet.code_entropy_bits:.2f} bits), {qnet.unique_values} distinct values; "
            f"accuracy {r['after']['accuracy']:.4f} (BNN {run.bnn['accuracy']:.4f}), "
            f"{100 * r['agreement']:.1f} % agreement with the BNN; "
            f"{100 * r['hdi_coverage']:.1f} % of its weights inside their "
            f"{100 * HDI_PROB:g} % HDI. {bits_sigma_text(r['bits_sigma_spearman'])}", "",
            markdown_table(r["layers"], ["layer", "kind", "weights", "bits", "unique_values",
                                         "sigma", "snr", "sd_ratio", "hdi_coverage",
                                         "z_abs_mean", "z_abs_max"],
                           {"bits": ".2f", "snr": ".2f", "sd_ratio": ".2f",
                            "hdi_coverage": ".3f", "z_abs_mean": ".2f", "z_abs_max": ".1f"}),
            "", run.figure(f"codebooks-{_slug(label)}", codebook_plot(qnet)), ""]


def _comparison_section(run: _Run) -> list[str]:
    """Section 4: every network's exact held-out log predictive density."""
    return ["## 4. One table for all: held-out comparison", "",
            "Every network scored by its exact log predictive density on the test split, which "
            "none was fitted on (`compare_networks`): the BNN by the log of its mean predictive "
            f"over {run.num_samples} draws, a deterministic network (the mean, each quantized "
            "version) by `log p(y | x, w)`. `elpd_test` is their sum (higher is better); "
            "`elpd_diff` and `dse`, the difference to the best and its standard error, are "
            "paired over the same observations. This is not LOO: nothing is left out or "
            "importance-sampled (PSIS-LOO of the training data is in section 2).", "",
            _frame_table(run.table, "network", {"n": ","}), ""]


def _bench_section(run: _Run) -> list[str]:
    """Section 5: accuracy against bits, of the benchmark when the folder has one, else of
    the quantized versions above."""
    bench = run.bench
    md = ["## 5. Accuracy against bits" + (": the benchmark (`bench.json`)" if bench else ""),
          "", run.figure("pareto", pareto_plot(bench or _versions_pareto(run))), ""]
    if bench is None:
        return md + ["The quantized versions above; a `bench.json` in the run folder (`pqnet "
                     "bench --json RUN_DIR/bench.json`) puts every method here.", ""]
    refs = [{"network": name, **bench[key]} for key, name in (
        ("float", "BNN posterior predictive"), ("float_mean", "BNN mean network"),
        ("deterministic", "deterministic net")) if isinstance(bench.get(key), dict)]
    if refs:
        md += [markdown_table(refs, ["network", "accuracy", "nll", "ece"]), ""]
    from ..bench import row_label  # here: pqnet.bench imports the diagnostics

    rows = [{**row, "method": row_label(row)} for row in bench["rows"]]
    columns = [c for c in ("method", "budget", "size_bytes", "bits_per_weight", "accuracy",
                           "nll", "ece", "code_entropy_bits", "avg_bits", "seconds")
               if any(c in row for row in rows)]
    return md + [f"{bench.get('model', '?')} on {bench.get('data', '?')}, seed "
                 f"{bench.get('seed', '?')}:", "",
                 markdown_table(rows, columns, {"budget": "g", "avg_bits": ".2f",
                                                "bits_per_weight": ".2f",
                                                "code_entropy_bits": ".2f", "seconds": ".1f"}),
                 ""]


def _versions_pareto(run: _Run) -> dict:
    """The quantized versions in :func:`~pqnet.diagnostics.plots.pareto_plot`'s input."""
    return {"model": run.metrics["model"], "data": run.metrics["data"],
            "float": {"accuracy": run.bnn["accuracy"]},
            "float_mean": {"accuracy": run.mean["accuracy"]},
            "rows": [{"method": m, "budget": float(b), "avg_bits": run.qnets[k].avg_bits,
                      "bits_per_weight": run.qnets[k].bits_per_weight,
                      "accuracy": run.results[k]["after"]["accuracy"]}
                     for (m, b), k in zip(run.variants, run.qnets, strict=True)]}
