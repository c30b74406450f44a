"""Behaviours no test covered before: posterior draws and their spread, what a saved posterior
keeps, what the reported ELBO and the KL warm-up contain, fitted point estimates (BatchNorm
statistics, non-random biases) in the posterior, ``bayesian(bias=False)``, ``embeddings=True``,
Conv3d, ``prior="normal"``, and regression ``predict`` / ``evaluate`` / ArviZ conversion.

Expected values are closed forms (a Normal's moments, the KL between Normals, the spread of
``w x`` for ``w ~ N(m, s^2)``), not the outputs of the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import pqnet
from pqnet.bnn import LayerInfo


def linear_posterior(m: float = 2.0, s: float = 0.5, likelihood: dict | None = None
                     ) -> pqnet.Posterior:
    """``f(x) = w x`` (one input, one output, no bias) with ``w ~ N(m, s^2)``."""
    module = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        module.weight.fill_(m)
    return pqnet.Posterior({"weight": torch.full((1, 1), m)}, {"weight": torch.full((1, 1), s)},
                           {"": LayerInfo("", "Linear", (1, 1), 1, False)}, module,
                           likelihood or {"kind": "normal", "noise": 0.25})


# --------------------------------------------------------------------------- draws


def test_sample_and_draw_have_the_posterior_mean_and_spread():
    post = pqnet.Posterior({"w": torch.tensor([3.0, -1.0])}, {"w": torch.tensor([0.5, 2.0])},
                           {}, nn.Identity())
    n = 40_000
    draws = post.sample(n, seed=1)["w"]
    assert draws.shape == (n, 2)
    # the standard error of the mean is s / sqrt(n) (0.0025, 0.01): 5 of them
    assert draws.mean(0).tolist() == pytest.approx([3.0, -1.0], abs=5 * 2.0 / math.sqrt(n))
    # the sd of the sample sd is ~ s / sqrt(2n) (0.0018, 0.007)
    assert draws.std(0).tolist() == pytest.approx([0.5, 2.0], rel=0.02)
    assert torch.equal(post.sample(3, seed=7)["w"], post.sample(3, seed=7)["w"])
    assert not torch.equal(post.sample(3, seed=7)["w"], post.sample(3, seed=8)["w"])
    gen = torch.Generator().manual_seed(0)
    one = torch.stack([post.draw(gen)["w"] for _ in range(20_000)])
    assert one.mean(0).tolist() == pytest.approx([3.0, -1.0], abs=0.05)
    assert one.std(0).tolist() == pytest.approx([0.5, 2.0], rel=0.03)
    # draws are independent across weights: the correlation of the two is ~ N(0, 1/n)
    assert abs(float(torch.corrcoef(draws.T)[0, 1])) < 5 / math.sqrt(n)
    with pytest.raises(ValueError, match="n: expected a positive int"):
        post.sample(0)


# --------------------------------------------------------------------------- regression


def test_regression_predict_evaluate_by_closed_form():
    """``f = w x``, ``w ~ N(2, 0.5^2)``: the predictive mean is ``2x`` and the spread of
    ``f`` over draws is ``0.5 |x|``; with a tiny ``s`` the NLL is the Normal's at noise 0.25."""
    post = linear_posterior()
    x = torch.tensor([[1.0], [3.0], [-2.0]])
    mean = pqnet.predict(post, x, num_samples=4000, seed=0)
    assert mean.shape == (3, 1)
    assert mean[:, 0].tolist() == pytest.approx([2.0, 6.0, -4.0], abs=0.05)
    y = torch.tensor([[2.5], [6.0], [-4.0]])
    out = pqnet.evaluate(post, TensorDataset(x, y), num_samples=4000, seed=0)
    assert out["num_samples"] == 4000
    assert out["epistemic_std"] == pytest.approx(0.5 * (1 + 3 + 2) / 3, rel=0.03)
    sharp = linear_posterior(s=1e-6)
    out = pqnet.evaluate(sharp, TensorDataset(x, y), num_samples=4)
    assert out["rmse"] == pytest.approx(math.sqrt(0.25 / 3), rel=1e-4)
    # -log N(y | f, 0.25^2) = log(0.25 sqrt(2 pi)) + (y - f)^2 / (2 * 0.0625)
    nll = math.log(0.25 * math.sqrt(2 * math.pi)) + (0.25 / 3) / (2 * 0.0625)
    assert out["nll"] == pytest.approx(nll, rel=1e-4)
    assert out["epistemic_std"] < 1e-4


def test_regression_posterior_keeps_likelihood_and_config_across_save_and_load(tmp_path):
    post = linear_posterior(likelihood={"kind": "normal", "noise": 0.25})
    post.config = {"epochs": 3, "kl_weight": 0.1}
    post.history = [{"epoch": 1, "elbo": -1.5}]
    post.save(tmp_path / "p.pt")
    back = pqnet.Posterior.load(tmp_path / "p.pt")
    assert back.likelihood == {"kind": "normal", "noise": 0.25}
    assert back.config == {"epochs": 3, "kl_weight": 0.1}
    assert back.history == [{"epoch": 1, "elbo": -1.5}]
    assert back.layers == post.layers
    x = torch.tensor([[1.0], [2.0]])
    data = TensorDataset(x, torch.tensor([[2.0], [4.5]]))
    assert pqnet.evaluate(back, data, num_samples=8) == pqnet.evaluate(post, data, num_samples=8)
    assert torch.equal(pqnet.predict(back, x, num_samples=8), pqnet.predict(post, x, num_samples=8))


def test_regression_to_inference_data_holds_the_normal_log_likelihood():
    post = linear_posterior(s=1e-6)
    x, y = torch.tensor([[1.0], [2.0]]), torch.tensor([[2.0], [4.5]])
    idata = pqnet.to_inference_data(post, TensorDataset(x, y), num_samples=5, seed=0,
                                    chains=1)
    ll = idata.log_likelihood["y"].values  # (chain, draw, obs)
    assert ll.shape == (1, 5, 2)
    const = -math.log(0.25 * math.sqrt(2 * math.pi))
    assert ll[0, 0].tolist() == pytest.approx([const, const - 0.25 / (2 * 0.0625)], rel=1e-4)
    draws = idata.posterior["weight"].values.reshape(-1)
    assert draws == pytest.approx([2.0] * 5, abs=1e-4)
    rep = idata.posterior_predictive["y"].values.reshape(5, 2)
    assert float(rep.std()) > 0.05  # replicates carry the observation noise, 0.25


# --------------------------------------------------------------------------- fits on digits


def bn_net() -> nn.Module:
    """digits (1x8x8): a convolution with BatchNorm, then a Linear with a bias."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 4 * 4, 10))


@pytest.fixture(scope="module")
def digits():
    return pqnet.data.load("digits")


def normal_kl(loc: torch.Tensor, scale: torch.Tensor, prior_scale: torch.Tensor | float) -> float:
    """``sum_i KL(N(loc_i, scale_i^2) || N(0, prior_scale^2))`` in closed form."""
    p = torch.as_tensor(prior_scale, dtype=torch.float64)
    loc, scale = loc.double(), scale.double()
    return float((torch.log(p / scale) + (scale ** 2 + loc ** 2) / (2 * p ** 2) - 0.5).sum())


def test_fit_reports_the_true_elbo_and_warms_the_kl_up(digits):
    """bias=False: the random sites are the two weights. The last epoch's KL is the closed
    form KL of the returned posterior against the fan-in prior N(0, 2 / fan_in); the ELBO
    is minus the whole data set's expected NLL minus that KL; the warm-up weights the KL
    by kl_weight * min(1, epoch / warmup_epochs)."""
    train, _ = digits
    torch.manual_seed(0)
    bnn = pqnet.bayesian(bn_net(), bias=False)
    post = pqnet.fit(bnn, train, epochs=3, batch_size=256, lr=1e-2, kl_weight=0.5,
                     warm_start=0, warmup_epochs=2, seed=0, progress=False)
    assert sorted(post.names) == ["0.weight", "5.weight"]
    assert {k: v.bias for k, v in post.layers.items()} == {"0": False, "5": False}
    assert [h["kl_weight"] for h in post.history] == [0.25, 0.5, 0.5]
    kl = sum(normal_kl(post.loc[k], post.scale[k], math.sqrt(2 / post.layers[k[0]].fan_in))
             for k in post.names)
    last = post.history[-1]
    assert last["kl"] == pytest.approx(kl, rel=1e-4)
    n = len(train)
    assert last["elbo"] == pytest.approx(-(n * last["nll"] + kl), rel=1e-6)
    assert 0.05 < last["nll"] < 2.5  # per example, a categorical over 10 classes
    # fitted point estimates reach the posterior: the BatchNorm statistics and the
    # non-random biases are the trained network's, not the initial ones
    module = post.module
    fitted = bnn.net.state_dict()
    for key in ("1.running_mean", "1.running_var", "1.weight", "1.bias", "0.bias", "5.bias"):
        assert torch.equal(module.state_dict()[key], fitted[key].cpu()), key
    assert float(module[1].running_mean.abs().max()) > 0  # the template's are zeros
    # without a warm start the statistics are re-estimated on the means: one pass
    assert post.config["batchnorm"] == "re-estimated"
    assert int(module[1].num_batches_tracked) == math.ceil(n / 256)
    torch.manual_seed(0)
    initial = bn_net()
    assert not torch.equal(module[5].bias, initial[5].bias)  # trained, not the initial bias
    assert torch.equal(module[5].weight, post.loc["5.weight"])  # the mean is the weight


def test_saved_fitted_posterior_predicts_the_same_after_load(digits, tmp_path):
    train, test = digits
    torch.manual_seed(0)
    post = pqnet.fit(pqnet.bayesian(bn_net()), train, epochs=1, batch_size=256, lr=1e-2,
                     seed=0, progress=False)
    post.save(tmp_path / "post.pt")
    back = pqnet.Posterior.load(tmp_path / "post.pt")
    assert back.config == post.config and back.config["epochs"] == 1
    assert back.likelihood == {"kind": "categorical"} == post.likelihood
    assert back.history == post.history and len(back.history) == 1
    x = test.tensors[0][:200] if hasattr(test, "tensors") else torch.stack(
        [test[i][0] for i in range(200)])
    assert torch.equal(pqnet.predict(back, x, num_samples=4, seed=3),
                       pqnet.predict(post, x, num_samples=4, seed=3))
    assert torch.equal(back.mean_module()(x), post.mean_module()(x))
    assert sorted(post.names) == ["0.bias", "0.weight", "5.bias", "5.weight"]  # bias=True


def test_prior_normal_is_the_unit_normal():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    bnn = pqnet.bayesian(net, prior="normal", init_scale=0.1)
    post = pqnet.Posterior.from_bnn(bnn)
    kl = sum(normal_kl(post.loc[k], post.scale[k], 1.0) for k in post.names)
    assert float(bnn.kl().detach()) == pytest.approx(kl, rel=1e-5)
    # initial means are the network's weights, initial scales the constant 0.1
    assert torch.equal(post.loc["0.weight"], net[0].weight.detach())
    assert torch.allclose(post.scale["2.bias"], torch.full((2,), 0.1))
    fan_in = pqnet.Posterior.from_bnn(pqnet.bayesian(net, init_scale=0.1))
    assert float(pqnet.bayesian(net, init_scale=0.1).kl().detach()) == pytest.approx(
        normal_kl(fan_in.loc["0.weight"], fan_in.scale["0.weight"], math.sqrt(2 / 4))
        + normal_kl(fan_in.loc["0.bias"], fan_in.scale["0.bias"], math.sqrt(2 / 4))
        + normal_kl(fan_in.loc["2.weight"], fan_in.scale["2.weight"], math.sqrt(2 / 3))
        + normal_kl(fan_in.loc["2.bias"], fan_in.scale["2.bias"], math.sqrt(2 / 3)), rel=1e-5)


class Tokens(nn.Module):
    """Float token ids to long: ``fit`` takes floating-point inputs only (found here: an
    ``nn.Embedding`` net cannot be fitted on integer inputs directly)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.long()


def test_embeddings_become_random_and_conv3d_fits(digits):
    torch.manual_seed(0)
    net = nn.Sequential(Tokens(), nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 2))
    plain = pqnet.bayesian(net)
    with_emb = pqnet.bayesian(net, embeddings=True, init_scale=0.2)
    assert "1.weight" not in pqnet.Posterior.from_bnn(plain).names
    post = pqnet.Posterior.from_bnn(with_emb)
    assert post.loc["1.weight"].shape == (5, 3) and post.layers["1"].kind == "Embedding"
    tokens = torch.tensor([[0, 1], [2, 4], [3, 3], [1, 0]] * 8)
    labels = (tokens[:, 0] > 1).long()
    fitted = pqnet.fit(with_emb, TensorDataset(tokens.float(), labels), epochs=30,
                       batch_size=8, lr=3e-2, seed=0, progress=False)
    assert fitted.scale["1.weight"].shape == (5, 3)
    # the table is learned: tokens 2..4 in the first place mean class 1
    probs = pqnet.predict(fitted, torch.tensor([[0.0, 1.0], [3.0, 3.0]]), num_samples=16)
    assert probs.argmax(-1).tolist() == [0, 1]
    # each draw's prediction, through Pyro's Predictive on the model rebuilt with its table
    # (and with a fixed table, rebuilt without it)
    for model in (fitted, pqnet.Posterior.from_bnn(plain)):
        per_draw = pqnet.predict(model, tokens[:6].float(), num_samples=8, return_draws=True)
        mean = pqnet.predict(model, tokens[:6].float(), num_samples=8)
        assert torch.allclose(per_draw.mean(0), mean, atol=1e-6)
    # and random: draws of the table differ, with the posterior's spread
    draws = fitted.sample(2000, seed=0)["1.weight"]
    assert torch.allclose(draws.std(0), fitted.scale["1.weight"], rtol=0.1)

    # Conv3d: digits as 1x1x8x8 volumes
    train, test = digits
    x = train.tensors[0][:512].unsqueeze(2)
    y = train.tensors[1][:512]
    torch.manual_seed(0)
    net3 = nn.Sequential(nn.Conv3d(1, 4, (1, 3, 3), padding=(0, 1, 1)), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 64, 10))
    post3 = pqnet.fit(pqnet.bayesian(net3), TensorDataset(x, y), epochs=3, batch_size=64,
                      lr=1e-2, seed=0, progress=False)
    assert post3.layers["0"].kind == "Conv3d" and post3.loc["0.weight"].shape == (4, 1, 1, 3, 3)
    xt = test.tensors[0][:300].unsqueeze(2)
    acc = pqnet.evaluate(post3, TensorDataset(xt, test.tensors[1][:300]), num_samples=4)
    assert acc["accuracy"] > 0.5  # chance is 0.1
