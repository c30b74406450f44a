"""Diagnostics that catch a broken quantized net (issue 13), and ArviZ used as ArviZ means.

The failure seen on LeNet-5: a layer whose posterior sds stayed at the prior sd got 1 bit,
the predictions collapsed, and HDI coverage / z-scores looked ideal because every value lay
inside its (prior-wide) interval. Here the same failure is built on digits with a small MLP
whose posterior is written by hand: trained means, and in the first layer sds equal to the
prior sd.
"""

import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import pqnet
from pqnet.bnn import LayerInfo
from pqnet.diagnostics import analysis
from pqnet.diagnostics.analysis import DiagnosticWarning
from pqnet.diagnostics.arviz import az, compare_networks, psis_loo
from pqnet.diagnostics.report import write_report


@pytest.fixture(scope="module")
def digits():
    return pqnet.data.load("digits")


@pytest.fixture(scope="module")
def trained_mlp(digits):
    """A 64-32-10 MLP trained by maximum likelihood on digits (full batch, 150 Adam steps)."""
    train, _ = digits
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        for _ in range(150):
            opt.zero_grad()
            nn.functional.cross_entropy(net(train.x), train.y).backward()
            opt.step()
    return net


def hand_posterior(net: nn.Module, uninformed: bool) -> pqnet.Posterior:
    """Means = the trained weights. sds: 1 % of the fan-in prior sd, except the first layer's
    weights at exactly the prior sd ``sqrt(2 / 64)`` when ``uninformed``."""
    prior_sd = {"1": math.sqrt(2 / 64), "3": math.sqrt(2 / 32)}
    loc, scale = {}, {}
    for path in ("1", "3"):
        for param in ("weight", "bias"):
            value = getattr(net[int(path)], param).detach().clone()
            loc[f"{path}.{param}"] = value
            at_prior = uninformed and path == "1" and param == "weight"
            scale[f"{path}.{param}"] = torch.full_like(value, prior_sd[path] * (
                1.0 if at_prior else 0.01))
    layers = {"1": LayerInfo("1", "Linear", (32, 64), 64, True),
              "3": LayerInfo("3", "Linear", (10, 32), 32, True)}
    return pqnet.Posterior(loc, scale, layers, net,
                           config={"prior": "FanInPrior(gain=1.4142135623730951)"})


def test_prior_movement_sees_a_layer_at_its_prior(trained_mlp):
    rows = {r["layer"]: r for r in analysis.prior_movement(hand_posterior(trained_mlp, True))}
    assert rows["1"]["sd_ratio"] == pytest.approx(1.0) and not rows["1"]["informed"]
    assert rows["3"]["sd_ratio"] == pytest.approx(0.01) and rows["3"]["informed"]
    assert rows["1"]["prior_sd"] == pytest.approx(math.sqrt(2 / 64))
    # KL per weight = log(s / sigma) + (sigma^2 + mu^2) / (2 s^2) - 1/2, by hand
    mu, s = trained_mlp[1].weight.detach().double(), math.sqrt(2 / 64)
    assert rows["1"]["kl_per_weight"] == pytest.approx(float((mu ** 2).mean() / (2 * s ** 2)),
                                                       rel=1e-6)
    sigma = 0.01 * math.sqrt(2 / 32)
    mu3, s3 = trained_mlp[3].weight.detach().double(), math.sqrt(2 / 32)
    expected = math.log(s3 / sigma) + (sigma ** 2 + float((mu3 ** 2).mean())) / (2 * s3 ** 2) - .5
    assert rows["3"]["kl_per_weight"] == pytest.approx(expected, rel=1e-6)


def test_analyze_flags_a_coarse_quantization_of_an_uninformed_layer(trained_mlp, digits):
    _, test = digits
    posterior = hand_posterior(trained_mlp, uninformed=True)
    qnet = pqnet.quantize(posterior, "uniform", bits=1)
    with pytest.warns(DiagnosticWarning) as record:
        result = analysis.analyze(posterior, qnet, test, num_samples=4)
    messages = " ".join(str(w.message) for w in record)
    assert "did not inform layer(s) 1 " in messages and "fails predictive checks" in messages
    assert result["uninformed_layers"] == ["1"] and not result["ok"]
    assert "elpd" in result["flagged"] and "nll" in result["flagged"]
    elpd = next(c for c in result["checks"] if c["check"] == "elpd")
    assert elpd["difference"] < -2 * elpd["se"]
    assert elpd["difference"] == pytest.approx(result["after"]["elpd"] - result["mean"]["elpd"])
    # the per-weight check alone is fooled: the uninformed layer looks like a posterior draw
    layer = next(r for r in result["layers"] if r["layer"] == "1")
    assert layer["hdi_coverage"] > 0.9 and not layer["informed"]


def test_a_good_quantization_of_an_informed_posterior_passes(trained_mlp, digits):
    _, test = digits
    posterior = hand_posterior(trained_mlp, uninformed=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagnosticWarning)
        result = analysis.analyze(posterior, pqnet.quantize(posterior, "uniform", bits=8), test,
                                  num_samples=4)
    assert result["ok"] and result["flagged"] == [] and result["uninformed_layers"] == []
    assert {c["check"] for c in result["checks"]} == {"elpd", "nll", "agreement", "kl", "ece"}
    assert abs(result["after"]["elpd"] - result["mean"]["elpd"]) < 4


def test_paired_difference_by_hand():
    a, b = np.array([1.0, 2.0, 4.0]), np.array([1.0, 1.0, 1.0])
    assert analysis.paired_difference(a, b) == pytest.approx((4.0, math.sqrt(3 * np.var(a - b))))
    diff, se = analysis.paired_difference(a, b, total=False)
    assert diff == pytest.approx(4 / 3) and se == pytest.approx(math.sqrt(np.var(a - b) / 3))
    assert "less* certain" in analysis.bits_sigma_text(0.4)
    assert "more certain" in analysis.bits_sigma_text(-0.4)


def test_report_flags_the_broken_version(trained_mlp, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    hand_posterior(trained_mlp, uninformed=True).save(run / "posterior.pt")
    (run / "metrics.json").write_text(json.dumps({"model": "mlp", "data": "digits"}))
    with pytest.warns(DiagnosticWarning):
        path = write_report(run, variants=[("uniform", 1.0), ("uniform", 8.0)], draws=10,
                            num_samples=4, max_weights_per_layer=16)
    text = path.read_text()
    assert "- **uniform @ 1 bits: FLAGGED** (elpd, nll" in text
    assert "- uniform @ 8 bits: passes the predictive checks" in text
    assert "**no: at the prior**" in text and "PSIS-LOO of the training split" in text
    assert "95 % HDI" in text and "94 %" not in text and "elpd_test" in text
    assert "elpd_loo" not in text.split("## 4.")[1]


# --------------------------------------------------------------------------- ArviZ


@pytest.fixture(scope="module")
def fitted_linear(digits):
    """A softmax regression on digits fitted with pqnet.fit's defaults (4 epochs)."""
    train, _ = digits
    with torch.random.fork_rng():
        torch.manual_seed(0)
        bnn = pqnet.bayesian(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)))
    return pqnet.fit(bnn, train, epochs=4, lr=1e-2, seed=0, progress=False)


def _not_pqnets(caught) -> list[str]:
    """Warnings pqnet could avoid: all but matplotlib's deprecations inside ArviZ's plots."""
    return [f"{w.category.__name__}: {w.message}" for w in caught
            if not issubclass(w.category, DeprecationWarning)]


def test_inference_data_works_with_arviz(fitted_linear, digits):
    import matplotlib
    matplotlib.use("Agg")
    train, test = digits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idata = pqnet.to_inference_data(fitted_linear, train, num_samples=100, seed=0)
        assert idata.posterior.sizes["chain"] == 2  # the default
        summary = az.summary(idata, var_names=["1.bias"])
        loo = az.loo(idata, pointwise=True)
        ours = psis_loo(idata)
        az.plot_trace(idata, var_names=["1.bias"], coords={"1.out_feature": [0, 1]})
        az.plot_posterior(idata, var_names=["1.bias"], coords={"1.out_feature": [0]})
        other = pqnet.to_inference_data(fitted_linear, train, num_samples=100, seed=1)
        table = az.compare({"a": idata, "b": other})
    assert _not_pqnets(caught) == []
    assert np.isfinite(summary["r_hat"]).all() and len(summary) == 10
    assert (loo.pareto_k.values <= loo.good_k).all()
    assert ours.elpd_loo == pytest.approx(loo.elpd_loo, rel=1e-3)
    assert set(table.index) == {"a", "b"}
    # every group says who made it; sample_stats holds the ELBO history per epoch
    for group in idata.groups():
        assert idata[group].attrs["inference_library"] == "pyro", group
        assert idata[group].attrs["inference_library_version"], group
    elbo = idata.sample_stats["elbo"]
    assert elbo.dims == ("chain", "epoch")
    history = [h["elbo"] for h in fitted_linear.history]
    np.testing.assert_array_equal(elbo.values, [history, history])
    np.testing.assert_array_equal(elbo["epoch"].values, [h["epoch"] for h in fitted_linear.history])


def test_held_out_data_are_scored_exactly_not_by_loo(fitted_linear, digits):
    train, test = digits
    held_out = pqnet.to_inference_data(fitted_linear, test, num_samples=4, split="test")
    with pytest.raises(ValueError, match="^idata: .*held-out"):
        psis_loo(held_out)
    qnet = pqnet.quantize(fitted_linear, "uniform", bits=2)
    table = compare_networks({"BNN": fitted_linear, "mean": fitted_linear.mean_module(),
                              "2 bits": qnet}, test, num_samples=4)
    assert list(table.columns) == ["rank", "elpd_test", "se", "elpd_diff", "dse", "nll", "n"]
    assert not {"elpd_loo", "p_loo", "pareto_k", "warning"} & set(table.columns)
    mean_nll = pqnet.evaluate(fitted_linear.mean_module(), test)["nll"]
    assert table.loc["mean", "nll"] == pytest.approx(mean_nll, rel=1e-5)
    assert table.loc["mean", "elpd_test"] == pytest.approx(-mean_nll * len(test), rel=1e-5)
    with pytest.raises(ValueError, match="^split: "):
        pqnet.to_inference_data(fitted_linear, test, split="validation")
