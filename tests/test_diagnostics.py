"""Diagnostics (issue 4): the ArviZ converter, held-out comparison, the analysis of a quantized
net against its posterior, the figures and ``pqnet report``."""

import json
import math
import shutil
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import TensorDataset

import pqnet
from pqnet.cli import main
from pqnet.diagnostics import analysis, plots
from pqnet.diagnostics.arviz import (
    az,
    compare_networks,
    held_out_log_density,
    psis_loo,
    weight_subset,
)
from pqnet.diagnostics.metrics import expected_calibration_error
from pqnet.diagnostics.report import markdown_table, write_report

PNG = b"\x89PNG\r\n\x1a\n"


def tiny_posterior(seed: int = 0, scale: float | None = None) -> pqnet.Posterior:
    """A Conv2d(1, 3, 3) -> Linear(48, 4) posterior on 1x6x6 inputs, built without fitting;
    with ``scale``, every posterior sd is log-uniform in [scale / 10, scale]."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4))
        posterior = pqnet.Posterior.from_bnn(pqnet.bayesian(net, init_scale=0.05))
    if scale is not None:
        gen = torch.Generator().manual_seed(seed)
        posterior.scale = {k: scale * 10 ** -torch.rand(v.shape, generator=gen)
                           for k, v in posterior.loc.items()}
    return posterior


def tiny_data(n: int = 20, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 6, 6, generator=gen),
                         torch.randint(0, 4, (n,), generator=gen))


@pytest.fixture(scope="module")
def tiny():
    return tiny_posterior(), tiny_data()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder written by ``pqnet fit`` on digits (2 epochs), and its test split."""
    out = tmp_path_factory.mktemp("run")
    assert main(["fit", "--model", "digits_cnn", "--data", "digits", "--epochs", "2",
                 "--lr", "1e-2", "--num-samples", "4", "--no-progress", "--out", str(out)]) == 0
    return out, pqnet.Posterior.load(out / "posterior.pt"), pqnet.data.load("digits", split="test")


# --------------------------------------------------------------------------- the converter


def test_groups_dims_and_shapes(tiny):
    posterior, data = tiny
    idata = pqnet.to_inference_data(posterior, data, num_samples=5, chains=2, seed=3)
    assert set(idata.groups()) == {"posterior", "posterior_predictive", "log_likelihood",
                                   "observed_data", "constant_data"}
    post = idata.posterior
    assert post["0.weight"].dims == ("chain", "draw", "0.out_channel", "0.in_channel", "0.kh",
                                     "0.kw")
    assert post["0.weight"].shape == (2, 5, 3, 1, 3, 3)
    assert post["0.bias"].dims == ("chain", "draw", "0.out_channel")
    assert post["3.weight"].dims == ("chain", "draw", "3.out_feature", "3.in_feature")
    assert post["3.weight"].shape == (2, 5, 4, 48)
    assert list(post["3.in_feature"].values) == list(range(48))
    assert idata.log_likelihood["y"].shape == (2, 5, 20)
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "obs")
    y_rep = idata.posterior_predictive["y"].values
    assert y_rep.shape == (2, 5, 20) and y_rep.min() >= 0 and y_rep.max() < 4
    np.testing.assert_array_equal(idata.observed_data["y"].values, data.tensors[1].numpy())
    assert idata.constant_data["x"].dims == ("obs", "channel", "height", "width")
    assert post.attrs["inference_library"] == "pyro"


def test_log_likelihood_is_that_of_the_stored_draws(tiny):
    posterior, data = tiny
    idata = pqnet.to_inference_data(posterior, data, num_samples=3, chains=2)
    x, y = data.tensors
    for chain, draw in [(0, 0), (1, 2)]:
        weights = {k: torch.as_tensor(idata.posterior[k].values[chain, draw])
                   for k in posterior.names}
        with torch.no_grad():
            f = functional_call(posterior.module, weights, (x,), strict=False)
        expected = f.double().log_softmax(-1)[torch.arange(len(y)), y].numpy()
        np.testing.assert_allclose(idata.log_likelihood["y"].values[chain, draw], expected,
                                   rtol=1e-5)


def test_same_seed_same_draws(tiny):
    posterior, data = tiny
    a, b = (pqnet.to_inference_data(posterior, data, num_samples=3, seed=7) for _ in range(2))
    np.testing.assert_array_equal(a.posterior["0.weight"].values, b.posterior["0.weight"].values)
    np.testing.assert_array_equal(a.posterior_predictive["y"].values,
                                  b.posterior_predictive["y"].values)


def test_subset_of_weights_keeps_coordinates(tiny):
    posterior, data = tiny
    idata = pqnet.to_inference_data(posterior, data, num_samples=2, max_weights_per_layer=10,
                                    var_names=["3.weight", "3.bias"], store_inputs=False)
    assert set(idata.posterior.data_vars) == {"3.weight", "3.bias"}
    assert "constant_data" not in idata.groups()
    w = idata.posterior["3.weight"]
    assert w[0, 0].size <= 10
    rows, cols = w["3.out_feature"].values, w["3.in_feature"].values
    assert cols[0] == 0 and cols[-1] == 47 and np.all(np.diff(cols) > 0)
    np.testing.assert_array_equal(idata.posterior["3.bias"]["3.out_feature"].values, rows)
    # the stored entries are the named entries of the full draw
    full = pqnet.to_inference_data(posterior, data, num_samples=2, var_names=["3.weight"])
    np.testing.assert_array_equal(full.posterior["3.weight"].sel({"3.out_feature": rows,
                                                                  "3.in_feature": cols}), w)
    np.testing.assert_array_equal(rows, np.arange(4))  # every output unit, so every bias
    assert [len(i) for i in weight_subset((32, 16, 3, 3), 256)] == [32, 2, 2, 2]
    assert [len(i) for i in weight_subset((4096, 64), 256)] == [256, 1]
    assert [len(i) for i in weight_subset((3, 4), None)] == [3, 4]


def test_independent_fits_are_chains(tiny):
    _, data = tiny
    fits = [tiny_posterior(seed) for seed in (0, 1, 2)]
    idata = pqnet.to_inference_data(fits, data, num_samples=4)
    assert idata.posterior.sizes["chain"] == 3
    assert "independent fits" in idata.posterior.attrs["chains_are"]
    rhat = az.rhat(idata.log_likelihood)["y"]
    assert rhat.shape == (20,) and np.isfinite(rhat.values).all()
    with pytest.raises(ValueError, match="^chains: "):
        pqnet.to_inference_data(fits, data, num_samples=4, chains=2)


def test_netcdf_round_trip(tiny, tmp_path):
    posterior, data = tiny
    idata = pqnet.to_inference_data(posterior, data, num_samples=4, chains=2)
    idata.to_netcdf(str(tmp_path / "idata.nc"))
    back = az.from_netcdf(tmp_path / "idata.nc")
    assert set(back.groups()) == set(idata.groups())
    for group in idata.groups():
        for name, var in idata[group].data_vars.items():
            assert back[group][name].dims == var.dims
            np.testing.assert_array_equal(back[group][name].values, var.values)
    assert back.posterior.attrs["likelihood"] == "categorical"


def test_summary_and_loo_run(tiny):
    posterior, data = tiny
    idata = pqnet.to_inference_data(posterior, data, num_samples=10, chains=2)
    summary = az.summary(idata, var_names=["3.bias"])
    assert list(summary.index) == [f"3.bias[{i}]" for i in range(4)]
    assert {"mean", "sd", "ess_bulk", "r_hat"} <= set(summary.columns)
    with pytest.warns(analysis.DiagnosticWarning, match="Pareto k"):  # 20 draws, random data
        loo = psis_loo(idata)
    assert loo["loo_i"].shape == (20,)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        psis_loo(idata, warn=False)


# --------------------------------------------------------------------------- held-out comparison


def test_held_out_density_of_a_point_mass_and_a_bnn(tiny):
    posterior, data = tiny
    x, y = data.tensors
    net = posterior.mean_module()
    lpd = held_out_log_density(net, data)
    assert lpd.shape == (20,) and lpd.dtype == np.float64
    with torch.no_grad():
        expected = net(x).double().log_softmax(-1)[torch.arange(len(y)), y].numpy()
    np.testing.assert_allclose(lpd, expected, rtol=1e-6)
    # the BNN: the log of its mean predictive, which evaluate's nll is the negative mean of
    bnn = held_out_log_density(posterior, data, num_samples=6, seed=2)
    nll = pqnet.evaluate(posterior, data, num_samples=6, seed=2)["nll"]
    assert -bnn.mean() == pytest.approx(nll, rel=1e-5)


def test_compare_ranks_bnn_mean_and_quantized(tiny):
    posterior, data = tiny
    qnet = pqnet.quantize(posterior, "uniform", bits=1)
    table = compare_networks({"BNN": posterior, "mean": posterior.mean_module(), "1 bit": qnet},
                             data, num_samples=4)
    assert set(table.index) == {"BNN", "mean", "1 bit"}
    assert list(table["rank"]) == [0, 1, 2] and table["elpd_diff"].iloc[0] == 0
    assert (table["elpd_diff"] >= 0).all() and table["elpd_test"].is_monotonic_decreasing
    lpd = {"BNN": held_out_log_density(posterior, data, num_samples=4),
           "mean": held_out_log_density(posterior.mean_module(), data),
           "1 bit": held_out_log_density(qnet, data)}
    best = table.index[0]
    for name, values in lpd.items():  # paired: the se of the summed pointwise differences
        diff = lpd[best] - values
        assert table.loc[name, "elpd_test"] == pytest.approx(values.sum())
        assert table.loc[name, "dse"] == pytest.approx(math.sqrt(20 * diff.var()), abs=1e-9)
    with pytest.raises(ValueError, match="^models: "):
        compare_networks({"BNN": posterior}, data)
    with pytest.raises(TypeError, match="^model: "):
        compare_networks({"a": posterior, "b": "not a net"}, data)


# --------------------------------------------------------------------------- analysis


def test_hdi_coverage_of_draws_and_of_coarse_quantization():
    posterior = tiny_posterior(scale=1e-2)  # confident: sd well below the weights' spread
    draw = {k: v[0] for k, v in posterior.sample(1, seed=0).items()}
    pooled = analysis.hdi_coverage(posterior, draw)
    n = {k: v.numel() for k, v in draw.items()}
    total = sum(pooled[k] * n[k] for k in n) / sum(n.values())
    assert abs(total - 0.95) < 4 * math.sqrt(0.95 * 0.05 / sum(n.values()))
    one_bit = analysis.hdi_coverage(posterior, pqnet.quantize(posterior, "uniform", bits=1))
    eight_bit = analysis.hdi_coverage(posterior, pqnet.quantize(posterior, "uniform", bits=8))
    assert set(one_bit) == {"0.weight", "3.weight"}  # biases are not quantized
    assert all(one_bit[k] < 0.5 for k in one_bit)
    assert all(eight_bit[k] > one_bit[k] for k in one_bit)
    assert analysis.hdi_coverage(posterior, posterior.loc, prob=0.5) == {k: 1.0 for k in n}


def test_hdi_coverage_of_draws_from_a_fitted_posterior(run):
    _, posterior, _ = run
    draw = {k: v[0] for k, v in posterior.sample(1, seed=1).items()}
    for name, coverage in analysis.hdi_coverage(posterior, draw).items():
        n = posterior.loc[name].numel()
        assert abs(coverage - 0.95) < 4 * math.sqrt(0.95 * 0.05 / n) + 1 / n, name


def test_z_scores_and_layer_table(tiny):
    posterior, _ = tiny
    zs = analysis.z_scores(posterior, posterior.loc)
    assert all(float(z.abs().max()) == 0 for z in zs.values())
    qnet = pqnet.quantize(posterior, "uniform", bits=2)
    rows = analysis.layer_table(posterior, qnet)
    assert [r["layer"] for r in rows] == ["0", "3"]
    assert rows[1]["kind"] == "Linear" and rows[1]["weights"] == 4 * 48 and rows[1]["bits"] == 2
    assert rows[1]["unique_values"] <= 4 and 0 <= rows[1]["hdi_coverage"] <= 1
    with pytest.raises(ValueError, match="^weights: "):
        analysis.z_scores(posterior, {"0.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match="^prob: "):
        analysis.hdi_coverage(posterior, qnet, prob=1.5)


def test_bits_follow_sigma_for_an_uncertainty_method():
    posterior = tiny_posterior(scale=1e-1)
    rho = analysis.bits_sigma_correlation(posterior, pqnet.quantize(posterior, "sigma-bits",
                                                                    avg_bits=3.0))
    assert rho < 0
    assert math.isnan(analysis.bits_sigma_correlation(
        posterior, pqnet.quantize(posterior, "uniform", bits=3)))


def test_reliability_and_predictive_checks():
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(200, 5, generator=gen), -1)
    labels = torch.randint(0, 5, (200,), generator=gen)
    curve = analysis.reliability(probs, labels, num_bins=10)
    assert sum(curve["count"]) == 200 and len(curve["bin_edges"]) == 11
    assert curve["ece"] == pytest.approx(expected_calibration_error(probs, labels, 10))
    assert analysis.predictive_divergence(probs, probs) == {"agreement": 1.0, "kl": 0.0}
    uniform = torch.full((50, 5), 0.2)
    confident = torch.nn.functional.one_hot(torch.arange(50) % 5, 5).float()
    assert analysis.entropy_auroc(confident, uniform) == 1.0


def test_analyze_a_quantized_net(run):
    _, posterior, test = run
    qnet = pqnet.quantize(posterior, "uniform", bits=4)
    ood = test.x.flip(-1).flip(-2)
    result = analysis.analyze(posterior, qnet, test, ood=ood, num_samples=4)
    assert result["after"]["accuracy"] == pytest.approx(
        pqnet.evaluate(qnet.to_module(), test)["accuracy"])
    assert result["before"]["accuracy"] == pytest.approx(
        pqnet.evaluate(posterior, test, num_samples=4)["accuracy"])
    assert 0 <= result["agreement"] <= 1 and result["kl"] >= 0
    assert 0 <= result["before"]["ood_auroc"] <= 1 and 0 <= result["after"]["ood_auroc"] <= 1
    assert len(result["layers"]) == 4 and 0 <= result["hdi_coverage"] <= 1
    with pytest.raises(ValueError, match="^ood: "):
        analysis.predictive_summary(qnet, test, ood=torch.zeros(3, 1, 5, 5))


# --------------------------------------------------------------------------- figures


def test_plots_write_png(run, tmp_path):
    _, posterior, test = run
    qnets = {"uniform 2": pqnet.quantize(posterior, "uniform", bits=2),
             "qi 3": pqnet.quantize(posterior, "quantile-inform", avg_bits=3.0)}
    probs = pqnet.predict(posterior.mean_module(), test.x)
    figures = {
        "sigma": plots.sigma_plot(posterior),
        "snr": plots.sigma_plot(posterior, kind="snr"),
        "bits": plots.bits_plot(qnets),
        "reliability": plots.reliability_plot({"mean": analysis.reliability(probs, test.y)}),
        "z": plots.zscore_plot(posterior, qnets),
        "codebook": plots.codebook_plot(qnets["qi 3"]),
    }
    for name, fig in figures.items():
        path = plots.save_figure(fig, tmp_path / f"{name}.png")
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000, name
    with pytest.raises(ValueError, match="^kind: "):
        plots.sigma_plot(posterior, kind="variance")
    with pytest.raises(ValueError, match="^qnets: "):
        plots.bits_plot({})


# --------------------------------------------------------------------------- report

BENCH = {"model": "digits_cnn", "data": "digits", "seed": 0,
         "float": {"accuracy": 0.9, "nll": 0.3, "ece": 0.05},
         "float_mean": {"accuracy": 0.91, "nll": 0.3, "ece": 0.04},
         "rows": [{"method": m, "budget": b, "avg_bits": b - 0.1, "accuracy": acc, "nll": 0.4,
                   "ece": 0.05, "unique_values": 7, "code_entropy_bits": 1.5, "size_bytes": 4096,
                   "bits_per_weight": b + 0.4,
                   "seconds": 0.2}
                  for m, b, acc in [("uniform", 2.0, 0.7), ("uniform", 4.0, 0.88),
                                    ("sigma-bits", 2.0, 0.85), ("sigma-bits", 4.0, 0.9)]]}


def test_report_from_a_run_folder(run, capsys):
    out, _, _ = run
    assert json.loads((out / "metrics.json").read_text())["data_dir"] is None
    (out / "bench.json").write_text(json.dumps(BENCH))
    shutil.copy(out / "posterior.pt", out / "posterior-copy.pt")  # a second fit: two chains
    assert main(["report", str(out), "--draws", "8", "--num-samples", "4"]) == 0
    report = out / "report"
    text = (report / "report.md").read_text()
    for heading in ("## 1. What was fitted", "## 2. The posterior", "## 3. Quantized versions",
                    "## 4. One table for all", "## 5. Accuracy against bits"):
        assert heading in text
    assert "quantile-inform @ 2 bits" in text and "uniform @ 4 bits" in text
    assert "sigma-bits" in text and "0.8800" in text  # the benchmark's rows
    assert "R-hat and bulk ESS across the chains" in text
    for png in ("sigma", "snr", "bits", "zscores", "reliability", "pareto",
                "codebooks-uniform-2-bits"):
        assert (report / f"{png}.png").read_bytes()[:8] == PNG
        assert f"({png}.png)" in text
    idata = az.from_netcdf(report / "idata.nc")
    assert idata.posterior.sizes["draw"] == 8
    assert idata.log_likelihood["y"].shape == (2, 8, 1347)  # the training split, for LOO
    assert "PSIS-LOO of the training split" in text and "Predictive checks" in text


def test_report_bad_input(run, tmp_path, capsys):
    out, _, _ = run
    with pytest.raises(FileNotFoundError, match="^run_dir: "):
        write_report(tmp_path / "missing")
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "RUN_DIR: " in capsys.readouterr().err  # the CLI names what the user typed
    with pytest.raises(FileNotFoundError, match="^run_dir: .*posterior.pt"):
        write_report(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "posterior.pt").write_bytes((out / "posterior.pt").read_bytes())
    with pytest.raises(ValueError, match="^run_dir: .*metrics.json"):
        write_report(bad)
    (bad / "metrics.json").write_text((out / "metrics.json").read_text())
    (bad / "bench.json").write_text(json.dumps({"rows": [{"method": "uniform"}]}))
    with pytest.raises(ValueError, match="^run_dir: .*benchmark"):
        write_report(bad)
    with pytest.raises(ValueError, match="^num_samples: "):
        write_report(out, num_samples=0)
    (bad / "bench.json").unlink()
    metrics = json.loads((bad / "metrics.json").read_text())
    (bad / "metrics.json").write_text(json.dumps({**metrics, "data": "mnist"}))
    with pytest.raises(ValueError, match="^data_dir: "):
        write_report(bad)
    with pytest.raises(ValueError, match="^ood: "):
        write_report(out, ood="nope")


def test_markdown_table():
    text = markdown_table([{"a": "x|y", "b": 1.5, "c": math.nan}, {"a": "z", "b": 2000}],
                          ["a", "b", "c"], {"b": ".1f"})
    assert text.splitlines() == ["| a | b | c |", "|:---|---:|---:|", "| x\\|y | 1.5 | – |",
                                 "| z | 2000.0 |  |"]


# --------------------------------------------------------------------------- bad input


def test_converter_bad_input(tiny):
    posterior, data = tiny
    with pytest.raises(ValueError, match="^data: inputs of shape"):
        pqnet.to_inference_data(posterior, TensorDataset(torch.randn(5, 1, 9, 9),
                                                         torch.zeros(5, dtype=torch.long)))
    with pytest.raises(ValueError, match="^data: "):
        pqnet.to_inference_data(posterior, TensorDataset(torch.randn(0, 1, 6, 6),
                                                         torch.zeros(0, dtype=torch.long)))
    with pytest.raises(ValueError, match="^num_samples: "):
        pqnet.to_inference_data(posterior, data, num_samples=0)
    with pytest.raises(ValueError, match="^chains: "):
        pqnet.to_inference_data(posterior, data, chains=0)
    with pytest.raises(ValueError, match="^var_names: "):
        pqnet.to_inference_data(posterior, data, var_names=["nope"])
    with pytest.raises(ValueError, match="^max_weights_per_layer: "):
        pqnet.to_inference_data(posterior, data, max_weights_per_layer=-1)
    with pytest.raises(TypeError, match="^posterior: "):
        pqnet.to_inference_data(posterior.mean_module(), data)
    with pytest.raises(ValueError, match="^posterior: "):
        pqnet.to_inference_data([posterior, pqnet.Posterior.from_bnn(pqnet.bayesian(
            nn.Sequential(nn.Flatten(), nn.Linear(36, 4))))], data)
