"""Module → BNN: conversion, priors, guide initialisation, local reparameterisation."""

import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO
from torch import nn

import pqnet
from pqnet.bnn import FanInPrior, NormalPrior, pwfn_scale


def odd_convnet() -> nn.Module:
    """Grouped, dilated, strided convolutions, with and without bias, then a Linear."""
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=2, groups=2),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, bias=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 7 * 7, 3),
    )


def draw_outputs(bnn: pqnet.BNN, x: torch.Tensor) -> torch.Tensor:
    """One forward pass of the model with weights from the guide, the Pyro way."""
    guide_trace = poutine.trace(bnn.guide).get_trace()
    return poutine.replay(bnn, trace=guide_trace)(x)


def test_conversion_names_layers_and_keeps_point_estimates():
    bnn = pqnet.bayesian(odd_convnet())
    assert bnn.sites == ["net.0.weight", "net.0.bias", "net.3.weight", "net.6.weight",
                         "net.6.bias"]
    info = bnn.layers["3"]
    assert (info.kind, info.weight_shape, info.fan_in, info.bias) == (
        "Conv2d", (6, 2, 3, 3), 18, False)
    # BatchNorm stays a learned point estimate
    assert isinstance(bnn.net[1].weight, nn.Parameter)
    assert bnn.guide.loc_of("net.0.weight").shape == (4, 1, 3, 3)


def test_guide_starts_at_the_module_weights():
    module = odd_convnet()
    bnn = pqnet.bayesian(module, init_scale=0.02)
    assert torch.equal(bnn.guide.loc_of("net.6.weight"), module[6].weight)
    assert torch.allclose(bnn.guide.scale_of("net.6.weight"), torch.tensor(0.02))


def test_initial_scale_rules():
    module = nn.Linear(50, 20)
    relative = pqnet.bayesian(module, init_scale="relative", init_relative_scale=0.2)
    w = module.weight.detach()
    assert torch.allclose(relative.guide.scale_of("net.weight"), (0.2 * w.abs()).clamp_min(1e-6),
                          rtol=1e-4)
    pwfn = pqnet.bayesian(module, init_scale="pwfn")
    assert torch.allclose(pwfn.guide.scale_of("net.weight"), pwfn_scale(w), rtol=1e-4)


def test_pwfn_scale_follows_the_distance_to_both_neighbouring_powers_of_two():
    w = torch.tensor([0.25, -0.5, 0.375, 0.3, 0.26, 1e-12, 4.0, 0.7])
    s = pwfn_scale(w)
    d = torch.tensor([0, 0, 0.125 * 0.125, 0.05 * 0.2, 0.01 * 0.24, 0, 0, 0.2 * 0.3]) / w.square()
    q75 = d.quantile(0.75)
    assert s[0] == s[1] == s[6] == 2.0**-30  # exactly a power of two: nothing to gain by moving
    assert torch.allclose(s[2:5], (0.0025 * d[2:5] / q75).clamp(max=0.05), rtol=1e-5)
    assert s[2] > s[4]  # halfway between powers of two is less representable than near one
    assert s.max() <= 0.05 and s.min() >= 2.0**-30


def test_priors():
    bnn = pqnet.bayesian(nn.Linear(8, 2), prior="fan-in")
    assert math.isclose(float(bnn.prior_distribution("net.weight").base_dist.scale[0, 0]),
                        math.sqrt(2 / 8), rel_tol=1e-6)
    bnn = pqnet.bayesian(nn.Linear(8, 2), prior=0.3)
    assert bnn.prior == NormalPrior(0.3)
    assert FanInPrior(gain=1.0).scale_for(100) == 0.1


def test_kl_is_the_closed_form_one():
    bnn = pqnet.bayesian(nn.Linear(3, 2), prior=1.0, init_scale=0.5)
    loc = bnn.guide.loc_of("net.weight").detach()
    expected = (math.log(1 / 0.5) + (0.25 + loc**2) / 2 - 0.5).sum()
    loc_b = bnn.guide.loc_of("net.bias").detach()
    expected += (math.log(1 / 0.5) + (0.25 + loc_b**2) / 2 - 0.5).sum()
    assert torch.isclose(bnn.kl().detach(), expected, rtol=1e-5)


def test_minibatch_likelihood_is_scaled_to_the_dataset():
    bnn = pqnet.bayesian(nn.Linear(4, 3))
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    trace = poutine.trace(bnn).get_trace(x, y, dataset_size=1000)
    trace.compute_log_prob()
    obs = trace.nodes["obs"]
    assert obs["scale"] == pytest.approx(100.0)


def test_elbo_module_runs_and_has_gradients():
    bnn = pqnet.bayesian(odd_convnet())
    elbo = TraceMeanField_ELBO()(bnn, bnn.guide)
    loss = elbo(torch.randn(5, 2, 16, 16), torch.randint(0, 3, (5,)), dataset_size=50)
    loss.backward()
    assert torch.isfinite(loss)
    assert bnn.guide.rho["net/3/weight"].grad.abs().sum() > 0


def sample_outputs(bnn: pqnet.BNN, x: torch.Tensor, draws: int, local_reparam: bool):
    bnn.local_reparam = local_reparam
    with torch.no_grad():
        return torch.stack([draw_outputs(bnn, x) for _ in range(draws)])


def test_local_reparameterisation_matches_explicit_weight_sampling():
    """Per example, sampling Linear pre-activations gives the output distribution of sampling
    the weights: compare the predictive mean (z-test) and variance (ratio) over 2000 draws."""
    pyro.set_rng_seed(0)
    module = nn.Sequential(odd_convnet()[:-1], nn.Linear(6 * 7 * 7, 16), nn.Tanh(),
                           nn.Linear(16, 3))
    bnn = pqnet.bayesian(module.eval(), init_scale="relative", init_relative_scale=0.5).eval()
    x = torch.randn(3, 2, 16, 16)
    lrt = sample_outputs(bnn, x, 2000, local_reparam=True)
    explicit = sample_outputs(bnn, x, 2000, local_reparam=False)
    mean_a, mean_b = lrt.mean(0), explicit.mean(0)
    var_a, var_b = lrt.var(0), explicit.var(0)
    z = (mean_a - mean_b) / ((var_a + var_b) / 2000).sqrt()
    assert z.abs().max() < 4.0, z
    # the ratio of two sample variances over 2000 draws has a standard deviation of ~4.5 %
    ratio = var_a / var_b
    assert ((ratio - 1).abs() < 0.2).all(), ratio
    assert var_b.min() > 1e-4  # not vacuous: the outputs really vary


def test_convolutions_draw_one_kernel_per_minibatch():
    """Conv outputs are correlated across positions through the shared kernel, so pqnet
    samples the kernel (exact) rather than independent positions (a different model)."""
    bnn = pqnet.bayesian(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), init_scale=0.5)
    with torch.no_grad():
        out = draw_outputs(bnn, torch.ones(2, 1, 5, 5))
    assert torch.equal(out[0], out[1])
    # every position of a channel saw the same kernel: equal up to float32 summation order
    # (independent draws per position would spread them by ~ 0.5 * 3 = 1.5)
    assert out[0, :9].std() <= 1e-6 * out[0, :9].abs().max()


def test_conv1d_is_bayesian_too():
    bnn = pqnet.bayesian(nn.Sequential(nn.Conv1d(3, 4, 3, stride=2, dilation=2), nn.Flatten()))
    assert bnn.layers["0"].kind == "Conv1d"
    assert draw_outputs(bnn, torch.randn(2, 3, 11)).shape == (2, 4 * 4)


def test_lrt_draws_differ_per_example_but_explicit_draws_do_not():
    bnn = pqnet.bayesian(nn.Linear(4, 2), init_scale=0.5)
    x = torch.ones(2, 4)
    with torch.no_grad():
        out = draw_outputs(bnn, x)
        assert not torch.allclose(out[0], out[1])
        bnn.local_reparam = False
        out = draw_outputs(bnn, x)
        assert torch.allclose(out[0], out[1])


def test_a_linear_over_tokens_draws_one_weight_per_minibatch():
    """A transformer's tokens share one weight matrix, like a conv's positions: per-token
    local reparameterisation would be a different model, so the weight is drawn."""
    bnn = pqnet.bayesian(nn.Sequential(nn.Linear(4, 3), nn.Flatten()), init_scale=0.5)
    with torch.no_grad():
        out = draw_outputs(bnn, torch.ones(2, 5, 4)).reshape(2, 5, 3)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0, 0], out[0, 4])


def test_pwfn_prior_is_anchored_at_the_starting_weights():
    module = nn.Linear(6, 3)
    bnn = pqnet.bayesian(module, prior="pwfn", init_scale="pwfn")
    prior = bnn.prior_distribution("net.weight").base_dist
    assert torch.equal(prior.loc, module.weight.detach())
    assert torch.equal(prior.scale, torch.full((3, 6), 0.05))
    # the KL's sigma part is smallest at the cap: it pushes sigma up to 0.05 and no further
    sigma = torch.tensor([0.01, 0.05, 0.2], requires_grad=True)
    kl = torch.distributions.kl_divergence(torch.distributions.Normal(0.0, sigma),
                                           torch.distributions.Normal(0.0, 0.05)).sum()
    kl.backward()
    assert sigma.grad[0] < 0 and abs(float(sigma.grad[1])) < 1e-5 and sigma.grad[2] > 0


def test_fixed_weights_are_point_masses_with_no_kl_and_no_gradient():
    bnn = pqnet.bayesian(nn.Linear(4, 3), prior="pwfn", init_scale=0.02)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0] = True
    bnn.fix("net.weight", mask, torch.full((3, 4), 0.25))
    guide = bnn.guide
    assert torch.equal(guide.loc_of("net.weight")[0], torch.full((4,), 0.25))
    assert float(guide.scale_of("net.weight")[0].max()) == 2.0**-30
    kl = torch.distributions.kl_divergence(guide.distribution("net.weight").base_dist,
                                           bnn.prior_distribution("net.weight").base_dist)
    assert torch.equal(kl[0], torch.zeros(4)) and bool((kl[1:] > 0).all())
    loss = TraceMeanField_ELBO()(bnn, guide)(torch.randn(8, 4), torch.randint(0, 3, (8,)))
    loss.backward()
    for param in (guide.loc["net/weight"], guide.rho["net/weight"]):
        assert torch.equal(param.grad[0], torch.zeros(4)) and bool(param.grad[1:].ne(0).any())
    with pytest.raises(ValueError, match="mask: would free weights"):
        bnn.fix("net.weight", torch.zeros(3, 4, dtype=torch.bool), 0.0)
    with pytest.raises(ValueError, match=r"mask: expected booleans of shape \(3, 4\)"):
        bnn.fix("net.weight", torch.ones(4, dtype=torch.bool), 0.0)


@pytest.mark.parametrize(("site", "mask", "value", "match"), [
    ("net.nope", [[True] * 4] * 3, 0.0, r"^site: expected one of \['net.weight', 'net.bias'\]"),
    ("net.weight", [True] * 4, 0.0, r"^mask: expected booleans of shape \(3, 4\)"),
    ("net.weight", [[True] * 4, [True] * 3], 0.0, r"^mask: expected booleans of shape \(3, 4\)"),
    ("net.weight", [[0.3] * 4] * 3, 0.0, r"^mask: expected booleans .* got torch.float32"),
    ("net.weight", [[True] * 4] * 3, None, "^value: expected a number or a real tensor"),
    ("net.weight", [[True] * 4] * 3, "0.5", "^value: expected a number or a real tensor"),
    ("net.weight", [[True] * 4] * 3, 1 + 2j, "^value: expected real numbers .*complex64"),
    ("net.weight", [[True] * 4] * 3, torch.zeros(5),
     r"^value: .* broadcasts to \(3, 4\), got shape \(5,\)"),
    ("net.weight", [[True] * 4] * 3, torch.zeros(1, 3, 4), r"^value: .* got shape \(1, 3, 4\)"),
    ("net.weight", [[False] * 4, [True] * 4, [False] * 4], torch.tensor([[0.0], [math.nan], [0.0]]),
     "^value: the fixed weights of net.weight must be finite"),
    ("net.weight", [[False] * 4] * 3, 0.0, "^mask: would free weights of net.weight"),
])
def test_a_refused_fix_names_the_argument_and_changes_nothing(site, mask, value, match):
    bnn = pqnet.bayesian(nn.Linear(4, 3), prior="pwfn", init_scale=0.02)
    first = torch.zeros(3, 4, dtype=torch.bool)
    first[0, 0] = True
    bnn.fix("net.weight", first, 0.5)
    before = {k: v.clone() for k, v in bnn.state_dict().items()}
    priors = [p.clone() for p in bnn.prior_parameters("net.weight")]
    with pytest.raises(ValueError, match=match):
        bnn.fix(site, mask, value)
    after = bnn.state_dict()
    assert after.keys() == before.keys() and bnn.guide.fixed == {"net.weight"}
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert all(torch.equal(p, q) for p, q in zip(bnn.prior_parameters("net.weight"), priors,
                                                  strict=True))
    value = torch.full((3, 4), math.nan)
    value[0, 0] = 0.5  # a value outside the mask is never used: NaN there is accepted
    bnn.fix("net.weight", first.tolist(), value)  # as is a nested list for the mask
    assert not bool(bnn.guide.loc_of("net.weight").isnan().any())
    assert not bool(bnn.prior_parameters("net.weight")[0].isnan().any())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prior": "laplace"}, "prior: unknown prior"),
        ({"prior": -1.0}, "prior: scale must be a positive"),
        ({"likelihood": "poisson"}, "likelihood: unknown name"),
        ({"init_scale": 0.0}, "init_scale: must be positive"),
        ({"init_scale": "huge"}, "init_scale: expected"),
        ({"likelihood": "normal", "noise": 0.0}, "noise: must be a positive"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pqnet.bayesian(nn.Linear(2, 2), **kwargs)


def test_module_without_layers_or_not_a_module():
    with pytest.raises(ValueError, match="module: found no Linear/Conv"):
        pqnet.bayesian(nn.Sequential(nn.ReLU()))
    with pytest.raises(TypeError, match="module: expected a torch.nn.Module"):
        pqnet.bayesian("lenet5")
