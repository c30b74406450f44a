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
from pathlib import Path

import numpy as np
import torch
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
    out = run_dir / "report" if out is None else Path(out)
    bench = _bench(run_dir)
    fits = [Posterior.load(p) for p in posterior_files]
    posterior = fits[0]
    root = data_dir if data_dir is not None else metrics.get("data_dir")
    try:
        train = datasets.load(metrics["data"], root=root, split="train")
        test = datasets.load(metrics["data"], root=root, split="test")
    except (ValueError, FileNotFoundError) as err:
        raise ValueError(f"data_dir: cannot load the data set {metrics['data']!r} that "
                         f"metrics.json names (from {root}); pass its folder: {err}") from err
    ood_x, ood_note = _ood(ood, ood_dir, test.x, seed)
    out.mkdir(parents=True, exist_ok=True)

    def figure(name: str, fig) -> str:
        save_figure(fig, out / f"{name}.png")
        return f"![{name}]({name}.png)"

    # the posterior as ArviZ data, on the training split: the data PSIS-LOO is valid for
    idata = to_inference_data(fits, train, num_samples=draws, seed=seed, split="train",
                              max_weights_per_layer=max_weights_per_layer)
    loo = psis_loo(idata)
    atomic_write(out / "idata.nc", lambda tmp: idata.to_netcdf(str(tmp)))

    # the float references and the quantized versions, measured as loaded from their files
    bnn = predictive_summary(posterior, test, ood=ood_x, num_samples=num_samples, seed=seed)
    mean_module = posterior.mean_module()
    mean = predictive_summary(mean_module, test, ood=ood_x)
    qnets: dict[str, QuantizedNet] = {}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for method, budget in variants:
            label = f"{method} @ {float(budget):g} bits"
            qnet = quantize(posterior, method, avg_bits=budget, seed=seed)
            path = qnet.save(Path(tmp) / "q.pqn")  # measured as it is stored
            qnets[label] = QuantizedNet.load(path, module=posterior.module)
            results[label] = analyze(posterior, qnets[label], test, ood=ood_x, reference=bnn,
                                     mean_reference=mean, num_samples=num_samples, seed=seed)
    table = compare_networks({"BNN": posterior, "mean": mean_module, **qnets}, test,
                             num_samples=num_samples, seed=seed)

    # ---- report.md, top to bottom
    chains = len(idata.posterior.chain)
    float_size = raw_bytes(mean_module.state_dict().values())
    config = metrics.get("config", posterior.config)
    history = posterior.history
    md = [f"# pqnet report: {metrics['model']} on {metrics['data']}", "",
          f"Run folder `{run_dir}`; written {datetime.date.today().isoformat()} by pqnet "
          f"{__version__}. The sections follow the data: what was fitted, the posterior, "
          "its quantized versions against it, one table that ranks them all"
          + (", and the benchmark." if bench else "."), ""]

    layers = ", ".join(f"`{path}` {info.kind}" for path, info in posterior.layers.items())
    md += ["## 1. What was fitted", "",
           f"- **Network**: `{metrics['model']}` with {posterior.num_weights:,} random "
           f"weights in {len(posterior.layers)} layers ({layers}); "
           f"{float_size / 1024:,.1f} KiB in float32.",
           f"- **Data**: {metrics.get('data_note', metrics['data'])}.",
           f"- **Posterior**: mean-field Normal `q(w) = prod_i N(mu_i, sigma_i^2)`, fitted by "
           f"SVI (Pyro `TraceMeanField_ELBO`); {len(fits)} fit(s).", ""]
    if config:
        md += [markdown_table([{"setting": k, "value": json.dumps(v) if isinstance(
            v, (dict, list)) else str(v)} for k, v in config.items()], ["setting", "value"]), ""]
        if float(config.get("kl_weight", 1.0)) != 1.0:
            md += [f"Note: `kl_weight = {config['kl_weight']}`: a tempered posterior, not the "
                   "Bayesian one.", ""]
    if history:
        last = history[-1]
        md += [f"After {len(history)} epochs ({sum(h['seconds'] for h in history):.1f} s): "
               f"ELBO {last['elbo']:,.1f} nats, expected NLL {last['nll']:.4f} per example, "
               f"KL {last['kl']:,.1f} nats.", ""]
    md += ["Test split, recomputed here: the BNN's posterior predictive "
           f"({num_samples} draws) and the network of posterior means.", "",
           markdown_table([{"network": f"BNN ({num_samples} draws)", **bnn},
                           {"network": "posterior mean", **mean}],
                          ["network", "accuracy", "nll", "ece", "entropy", "ood_auroc"]), "",
           f"`ood_auroc`: how well the predictive entropy separates {ood_note} from the test "
           "inputs (0.5 is chance).", ""]

    md += ["## 2. The posterior", "",
           f"`idata.nc` (ArviZ InferenceData, `az.from_netcdf`) holds {draws} draws x "
           f"{chains} chain(s) of the weights (at most "
           f"{max_weights_per_layer} per layer, evenly spaced; dims `out_channel`, "
           "`in_channel`, `kh`, `kw` / `out_feature`, `in_feature`, prefixed by the layer), "
           "the per-observation log-likelihood of the training split, posterior-predictive "
           "replicates, the observed labels and the fit's ELBO history per epoch "
           f"(`sample_stats`); groups: {', '.join(idata.groups())}.", "",
           figure("sigma", sigma_plot(posterior, "sigma")),
           figure("snr", sigma_plot(posterior, "snr")), "",
           "Posterior sd (dashed: each layer's prior sd) and signal-to-noise ratio "
           "`|mu| / sigma` per layer: the uncertainty that decides the bits.", "",
           *_prior_section(posterior),
           f"`az.summary` ({100 * HDI_PROB:g} % HDI) of a few weights (per layer, the stored "
           "weights with the lowest and the highest SNR):", "",
           _frame_table(az.summary(_few_weights(idata), kind="all" if chains > 1 else "stats",
                                   hdi_prob=HDI_PROB),
                        "weight", {"ess_bulk": ".0f", "ess_tail": ".0f"}), "",
           *_loo_section(loo)]
    if len(fits) > 1:
        md += ["R-hat and bulk ESS across the chains (independent fits):", "",
               markdown_table(_convergence(idata),
                              ["quantity", "rhat_median", "rhat_max", "ess_bulk_min"],
                              {"ess_bulk_min": ".0f"}), "",
               "Hidden units can be permuted without changing the network, so weights of "
               "independent fits need not agree (large R-hat) even when the fits do; the "
               "per-observation log-likelihood is free of that symmetry: its R-hat near 1 says "
               "the fits make the same predictions.", ""]
    else:
        md += [f"One fit: its {chains} chains are independent draws from `q`, so R-hat and ESS "
               "only measure Monte Carlo noise. Save further fits (other seeds) in the run "
               "folder as `posterior-<seed>.pt` to get chains whose R-hat means something.", ""]

    md += ["## 3. Quantized versions", "",
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
           *_checks_overview(results)]
    sd_bytes = raw_bytes(posterior.scale.values())
    rows = [{"network": f"BNN ({num_samples} draws)", "bits/weight": 64.0,
             "size_kib": (float_size + sd_bytes) / 1024, **bnn},
            {"network": "posterior mean", "bits/weight": 32.0,
             "size_kib": float_size / 1024,
             "compression": 1.0, **mean}]
    for label, qnet in qnets.items():
        r = results[label]
        rows.append({"network": label, "bits/weight": qnet.bits_per_weight,
                     "size_kib": qnet.size_bytes / 1024,
                     "compression": float_size / qnet.size_bytes,
                     "unique": qnet.unique_values, **r["after"], "agreement": r["agreement"],
                     "kl": r["kl"], "hdi": r["hdi_coverage"], "|z|": r["z_abs_mean"]})
    md += [markdown_table(rows, ["network", "bits/weight", "size_kib", "compression", "unique",
                                 "accuracy", "nll", "ece", "ood_auroc", "agreement", "kl", "hdi",
                                 "|z|"],
                          {"bits/weight": ".2f", "size_kib": ".1f", "compression": ".1f",
                           "hdi": ".3f", "|z|": ".2f"}), "",
           "The BNN's size counts a mean and an sd per random weight.", "",
           figure("bits", bits_plot(qnets)), "",
           figure("zscores", zscore_plot(posterior, qnets)), "",
           "Quantization errors in posterior sds, per layer: a version that stays a plausible "
           f"posterior draw keeps its mass inside the shaded {100 * HDI_PROB:g} % band (blind "
           "in layers the data did not inform).", "",
           figure("reliability", reliability_plot(
               {"BNN": bnn["reliability"], "posterior mean": mean["reliability"],
                **{k: r["after"]["reliability"] for k, r in results.items()}})), ""]
    for label, qnet in qnets.items():
        r = results[label]
        rho = r["bits_sigma_spearman"]
        md += [f"### {label}", "",
               *_checks_section(r),
               f"{qnet.size_bytes:,} bytes ({qnet.bits_per_weight:.2f} bits per weight, all in; "
               f"fixed-width codes {qnet.avg_bits:.2f} bits, their entropy "
               f"{qnet.code_entropy_bits:.2f} bits), {qnet.unique_values} distinct values; "
               f"accuracy {r['after']['accuracy']:.4f} (BNN {bnn['accuracy']:.4f}), "
               f"{100 * r['agreement']:.1f} % agreement with the BNN; "
               f"{100 * r['hdi_coverage']:.1f} % of its weights inside their "
               f"{100 * HDI_PROB:g} % HDI. {bits_sigma_text(rho)}", "",
               markdown_table(r["layers"], ["layer", "kind", "weights", "bits", "unique_values",
                                            "sigma", "snr", "sd_ratio", "hdi_coverage",
                                            "z_abs_mean", "z_abs_max"],
                              {"bits": ".2f", "snr": ".2f", "sd_ratio": ".2f",
                               "hdi_coverage": ".3f", "z_abs_mean": ".2f",
                               "z_abs_max": ".1f"}), "",
               figure(f"codebooks-{_slug(label)}", codebook_plot(qnet)), ""]

    md += ["## 4. One table for all: held-out comparison", "",
           "Every network scored by its exact log predictive density on the test split, which "
           f"none was fitted on (`compare_networks`): the BNN by the log of its mean predictive "
           f"over {num_samples} draws, a deterministic network (the mean, each quantized "
           "version) by `log p(y | x, w)`. `elpd_test` is their sum (higher is better); "
           "`elpd_diff` and `dse`, the difference to the best and its standard error, are "
           "paired over the same observations. This is not LOO: nothing is left out or "
           "importance-sampled (PSIS-LOO of the training data is in section 2).", "",
           _frame_table(table, "network", {"n": ","}), ""]

    pareto = bench if bench is not None else {
        "model": metrics["model"], "data": metrics["data"],
        "float": {"accuracy": bnn["accuracy"]}, "float_mean": {"accuracy": mean["accuracy"]},
        "rows": [{"method": m, "budget": float(b), "avg_bits": qnets[k].avg_bits,
                  "bits_per_weight": qnets[k].bits_per_weight,
                  "accuracy": results[k]["after"]["accuracy"]}
                 for (m, b), k in zip(variants, qnets, strict=True)]}
    md += ["## 5. Accuracy against bits" + (": the benchmark (`bench.json`)" if bench else ""),
           "", figure("pareto", pareto_plot(pareto)), ""]
    if bench is not None:
        refs = [{"network": name, **bench[key]} for key, name in (
            ("float", "BNN posterior predictive"), ("float_mean", "BNN mean network"),
            ("deterministic", "deterministic net")) if isinstance(bench.get(key), dict)]
        if refs:
            md += [markdown_table(refs, ["network", "accuracy", "nll", "ece"]), ""]
        rows = [{**row, "method": f"{row['method']} k={row['k']}" if "k" in row else
                 row["method"]} for row in bench["rows"]]
        columns = [c for c in ("method", "budget", "size_bytes", "bits_per_weight", "accuracy",
                               "nll", "ece", "code_entropy_bits", "avg_bits", "seconds")
                   if any(c in row for row in rows)]
        md += [f"{bench.get('model', '?')} on {bench.get('data', '?')}, seed "
               f"{bench.get('seed', '?')}:", "",
               markdown_table(rows, columns, {"budget": "g", "avg_bits": ".2f",
                                              "bits_per_weight": ".2f",
                                              "code_entropy_bits": ".2f", "seconds": ".1f"}), ""]
    else:
        md += ["The quantized versions above; a `bench.json` in the run folder (`pqnet bench "
               "--json RUN_DIR/bench.json`) puts every method here.", ""]

    path = atomic_write(out / "report.md", lambda tmp: tmp.write_text("\n".join(md)))
    return path
