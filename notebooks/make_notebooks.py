"""Write the notebooks of this folder from the cells below (the notebooks are generated:
edit here, then run ``python notebooks/make_notebooks.py --execute [NAME ...]``, which also
runs them (or the named ones) and saves their outputs; without ``--execute`` they are
written empty).

Every notebook reads ``PQNET_SMALL=1`` from the environment to shrink epochs, data and draws
so that the test suite (``tests/test_notebooks.py``) runs all of them in about a minute;
without it they run at settings whose numbers mean something.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = """\
%matplotlib inline
import os

SMALL = os.environ.get("PQNET_SMALL") == "1"  # the test suite's quick settings"""


def md(text: str):
    return new_markdown_cell(text.strip())


def code(text: str):
    return new_code_cell(text.strip())


QUICKSTART = [
    md("""
# pqnet quickstart: fit, evaluate, quantize, diagnose

A small CNN on scikit-learn's digits (8x8 images, always available) becomes a Bayesian
neural network, is fitted by stochastic variational inference, quantized by its weight
uncertainty, and diagnosed with ArviZ.
"""),
    code(SETUP + """

import arviz as az
import torch

import pqnet
from pqnet.diagnostics import format_table

EPOCHS = 2 if SMALL else 30
DRAWS = 20 if SMALL else 200"""),
    md("""
## Fit

`pqnet.bayesian` puts a Normal prior on every Linear/Conv weight and a mean-field Normal
guide `q(w) = prod_i N(mu_i, sigma_i^2)` over them; `pqnet.fit` maximises the ELBO.
"""),
    code("""
train, test = pqnet.data.load("digits")
with torch.random.fork_rng():
    torch.manual_seed(0)  # the network's initial weights
    bnn = pqnet.bayesian(pqnet.models.digits_cnn())
posterior = pqnet.fit(bnn, train, epochs=EPOCHS, lr=1e-2, seed=0, progress=False)
print(f"{posterior.num_weights:,} random weights; last epoch:", posterior.history[-1])"""),
    md("## Evaluate: the posterior predictive and the network of posterior means"),
    code("""
rows = [{"network": "BNN (32 draws)", **pqnet.evaluate(posterior, test, num_samples=32)},
        {"network": "posterior mean", **pqnet.evaluate(posterior.mean_module(), test)}]
print(format_table(rows, ["network", "accuracy", "nll", "ece", "entropy"]))"""),
    md("""
## Quantize

Quantile Inform gives each layer the width that a quantile of its weights' uncertainty asks
for, at an average of at most 3 bits per weight.
"""),
    code("""
qnet = pqnet.quantize(posterior, "quantile-inform", avg_bits=3.0)
print(qnet)
print(format_table(qnet.summary(),
                   ["layer", "shape", "bits", "unique_values", "code_entropy_bits"]))
pqnet.evaluate(qnet.to_module(), test)"""),
    md("""
## Diagnose with ArviZ

`pqnet.to_inference_data` draws weights from the posterior (two chains by default) and
computes, with each draw, the log-likelihood of every *training* observation: an
`az.InferenceData` with named dims, the fit's ELBO history in `sample_stats`, and PSIS-LOO
(valid on the data the posterior was fitted on) with its Pareto k checked by `psis_loo`.
"""),
    code("""
from pqnet.diagnostics.arviz import pareto_k_table, psis_loo

idata = pqnet.to_inference_data(posterior, train, num_samples=DRAWS,
                                max_weights_per_layer=64, seed=0)
loo = psis_loo(idata)
print(loo.elpd_loo, pareto_k_table(loo))
idata"""),
    code("""az.summary(idata, var_names=["fc2.bias"])"""),
    code("""az.plot_forest(idata, var_names=["fc2.bias"], combined=True, figsize=(6, 3));"""),
    md("""
One table ranks the BNN, its mean network and the quantized network by their exact log
predictive density on the test split (`elpd_test`: held out, not LOO).
"""),
    code("""
from pqnet.diagnostics import compare_networks

compare_networks({"BNN": posterior, "mean": posterior.mean_module(), "quantile-inform 3": qnet},
                 test)"""),
    code("""
import tempfile
from pathlib import Path

with tempfile.TemporaryDirectory() as tmp:
    idata.to_netcdf(str(Path(tmp) / "idata.nc"))
    back = az.from_netcdf(Path(tmp) / "idata.nc")
    print(back.log_likelihood["y"].shape, "->", list(back.groups()))"""),
]


ANALYSIS = [
    md("""
# Quantization analysis on MNIST: a quantized LeNet-5 against its posterior

Is each quantized weight still a plausible draw of the posterior? Where did the bits go?
What did quantization do to the predictive: agreement, calibration, out-of-distribution
detection? MNIST is read from `../shared/data/mnist` (set `PQNET_MNIST` to change it).
With `PQNET_SMALL=1` the network sees 1,024 images for one epoch: the plots work, the
numbers do not mean much.
"""),
    code(SETUP + """
from pathlib import Path

import torch
from torch.utils.data import TensorDataset

import pqnet
from pqnet.diagnostics import analysis, plots
from pqnet.diagnostics import format_table

ROOT = Path.cwd().parent if Path.cwd().name == "notebooks" else Path.cwd()
MNIST = Path(os.environ.get("PQNET_MNIST", ROOT / "../shared/data/mnist"))
train, test = pqnet.data.load("mnist", root=MNIST)
print(train.note)
if SMALL:  # random subsets: the files are sorted by class
    keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:1024]
    train = TensorDataset(train.x[keep], train.y[keep])
    keep = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:500]
    test = TensorDataset(test.x[keep], test.y[keep])
EPOCHS, SAMPLES = (1, 8) if SMALL else (20, 32)"""),
    code("""
with torch.random.fork_rng():
    torch.manual_seed(0)
    bnn = pqnet.bayesian(pqnet.models.lenet5())
posterior = pqnet.fit(bnn, train, epochs=EPOCHS, lr=3e-3, seed=0, progress=False)
plots.sigma_plot(posterior, kind="snr")"""),
    md("""
Three quantized versions at 3 average bits: one width everywhere (`uniform`), one width per
layer from the quantiles of the uncertainty (`quantile-inform`), one width per weight from
its own sigma (`sigma-bits`). Out-of-distribution inputs: the test images with their pixels
shuffled.
"""),
    code("""
x_test = test.tensors[0]
ood = x_test.reshape(len(x_test), -1)[:, torch.randperm(x_test[0].numel())].reshape(x_test.shape)
qnets = {m: pqnet.quantize(posterior, m, avg_bits=3.0)
         for m in ("uniform", "quantile-inform", "sigma-bits")}
bnn_summary = analysis.predictive_summary(posterior, test, ood=ood, num_samples=SAMPLES)
mean_summary = analysis.predictive_summary(posterior.mean_module(), test, ood=ood)
results = {m: analysis.analyze(posterior, q, test, ood=ood, reference=bnn_summary,
                               mean_reference=mean_summary)
           for m, q in qnets.items()}
rows = [{"network": "BNN", **bnn_summary}] + [
    {"network": m, "avg_bits": qnets[m].avg_bits, **r["after"], "agreement": r["agreement"],
     "kl": r["kl"], "hdi": r["hdi_coverage"]} for m, r in results.items()]
print(format_table(rows, ["network", "avg_bits", "accuracy", "ece", "ood_auroc", "agreement",
                          "kl", "hdi"]))"""),
    md("""
First what each did to the predictions: paired checks against the network of posterior
means (flagged when worse by more than 2 standard errors and a practical floor). Then per
layer: bits, posterior sd, how far the posterior moved from the prior (`sd_ratio`; a layer
near 1 was not informed by the data, and its HDI coverage and z-scores cannot judge the
quantization), and how far the quantized weights moved in sd units.
"""),
    code("""
for m, r in results.items():
    print(m, "flagged:" if r["flagged"] else "passes", ", ".join(r["flagged"]))
    print(format_table(r["checks"], ["check", "quantized", "mean_network", "posterior",
                                     "difference", "se", "flagged"]))
    print(analysis.bits_sigma_text(r["bits_sigma_spearman"]))
    print(format_table(r["layers"], ["layer", "kind", "bits", "sigma", "snr", "sd_ratio",
                                     "hdi_coverage", "z_abs_mean", "z_abs_max"]), end="\\n\\n")"""),
    code("plots.bits_plot(qnets)"),
    code("plots.zscore_plot(posterior, qnets)"),
    code("""
plots.reliability_plot({"BNN": bnn_summary["reliability"],
                        **{m: r["after"]["reliability"] for m, r in results.items()}})"""),
    code('plots.codebook_plot(qnets["quantile-inform"])'),
]


COMPARISON = [
    md("""
# Method comparison on digits: accuracy against average bits

Every data-free quantizer of `pqnet.quantize.METHODS` at a few average-bit budgets, on one
posterior, with the Pareto plot of the benchmark (`pqnet.diagnostics.plots.pareto_plot`)
and the held-out comparison table of ArviZ.
"""),
    code(SETUP + """

import torch

import pqnet
from pqnet.diagnostics import compare_networks, plots
from pqnet.diagnostics import format_table

EPOCHS = 2 if SMALL else 30
BUDGETS = (2.0, 4.0) if SMALL else (1.5, 2.0, 3.0, 4.0)
METHODS = ("uniform", "kmeans", "bayesian-compression", "sigma-bits", "quantile-inform")"""),
    code("""
train, test = pqnet.data.load("digits")
with torch.random.fork_rng():
    torch.manual_seed(0)
    bnn = pqnet.bayesian(pqnet.models.digits_cnn())
posterior = pqnet.fit(bnn, train, epochs=EPOCHS, lr=1e-2, seed=0, progress=False)"""),
    code("""
results = {"model": "digits_cnn", "data": "digits",
           "float": pqnet.evaluate(posterior, test, num_samples=32),
           "float_mean": pqnet.evaluate(posterior.mean_module(), test), "rows": []}
qnets = {}
for method in METHODS:
    for budget in BUDGETS:
        qnet = qnets[f"{method} @ {budget:g}"] = pqnet.quantize(posterior, method,
                                                                 avg_bits=budget)
        scores = pqnet.evaluate(qnet, test)
        results["rows"].append({"method": method, "budget": budget, "avg_bits": qnet.avg_bits,
                                "size_bytes": qnet.size_bytes,
                                "bits_per_weight": qnet.bits_per_weight,
                                "accuracy": scores["accuracy"], "nll": scores["nll"],
                                "ece": scores["ece"]})
print(format_table(results["rows"], ["method", "budget", "size_bytes", "bits_per_weight",
                                     "avg_bits", "accuracy", "nll", "ece"]))"""),
    code("plots.pareto_plot(results)"),
    md("""
The same networks ranked by their exact held-out log predictive density (higher
`elpd_test` is better; `dse` is the standard error of the difference to the best, paired
over the test observations).
"""),
    code("""
compare_networks({"BNN": posterior, "mean": posterior.mean_module(),
                  **{k: q for k, q in qnets.items() if k.endswith(f"@ {BUDGETS[0]:g}")}}, test)"""),
]


def write(name: str, cells: list) -> Path:
    notebook = new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"}})
    nbformat.validate(notebook)
    path = HERE / name
    nbformat.write(notebook, path)
    return path


def execute(path: Path) -> None:
    """Run ``path`` top to bottom in a fresh kernel and save it with its outputs."""
    import nbclient

    notebook = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(notebook, timeout=3600, kernel_name="python3",
                            resources={"metadata": {"path": str(HERE)}}).execute()
    nbformat.write(notebook, path)


if __name__ == "__main__":
    import sys

    chosen = sys.argv[sys.argv.index("--execute") + 1:] if "--execute" in sys.argv else []
    for name, cells in (("quickstart.ipynb", QUICKSTART),
                        ("quantization_analysis.ipynb", ANALYSIS),
                        ("method_comparison.ipynb", COMPARISON)):
        if chosen and name.removesuffix(".ipynb") not in chosen:
            continue  # --execute NAME ...: only those notebooks
        path = write(name, cells)
        if "--execute" in sys.argv:  # at full settings unless PQNET_SMALL=1
            execute(path)
        print("wrote", path)
