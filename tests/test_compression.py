"""Compression that uses the posterior: Bayesian pruning, the entropy-constrained quantizer,
the Deep Compression baseline, and the paired test that compares them."""

import logging
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import pqnet
from pqnet.quantize import codec, deep_compression, finetune
from pqnet.quantize.prune import credible_z, keep_largest, magnitude_prune, prune_mask
from pqnet.quantize.sigma_code import _range_argmax, assign, fine_grid, recode
from tests.test_quantize import make_posterior


def linear_posterior(seed: int = 0, n_out: int = 40, n_in: int = 50) -> pqnet.Posterior:
    """A Linear layer's posterior whose sds span three decades, so some weights are pinned
    and others free."""
    gen = torch.Generator().manual_seed(seed)
    module = nn.Linear(n_in, n_out)
    with torch.no_grad():
        module.weight.copy_(0.3 * torch.randn(n_out, n_in, generator=gen))
    scale = {"weight": 10 ** (-3 + 3 * torch.rand(n_out, n_in, generator=gen))}
    return make_posterior(module, scale)


# --------------------------------------------------------------------------- pruning


def test_pruning_zeroes_exactly_the_weights_whose_interval_holds_zero():
    posterior = linear_posterior()
    mu, sigma = posterior.loc["weight"], posterior.scale["weight"]
    assert credible_z(0.95) == pytest.approx(1.959964, abs=1e-5)
    qnet = pqnet.quantize(posterior, "uniform", bits=4, prune=0.95)
    w, bits = qnet.weights()["weight"], qnet.layers[""].bits
    inside = mu.abs() < 1.959964 * sigma
    assert torch.equal(bits == 0, inside) and bool((w[inside] == 0).all())
    # never a weight whose 95 % interval excludes zero: those keep their 4-bit value
    unpruned = pqnet.quantize(posterior, "uniform", bits=4).weights()["weight"]
    assert torch.equal(w[~inside], unpruned[~inside])
    assert qnet.config["prune"] == {"level": 0.95,
                                    "fraction": pytest.approx(float(inside.float().mean()))}
    assert 0.2 < qnet.config["prune"]["fraction"] < 0.9  # the test case prunes some, not all
    # level 0 prunes nothing; a higher level prunes a superset
    assert not bool(prune_mask(mu, sigma, 0.0).any())
    assert bool((prune_mask(mu, sigma, 0.99) >= inside).all())


@pytest.mark.parametrize("rule", ["prune", "prune_fraction"])
def test_pruned_weights_stay_zero_through_finetuning(rule, tmp_path):
    posterior = linear_posterior()
    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(256, 50, generator=gen),
                         torch.randint(0, 40, (256,), generator=gen))
    qnet = pqnet.quantize(posterior, "uniform", bits=3, data=data, finetune_epochs=2,
                          finetune_lr=1e-2, **{rule: 0.9})
    mu, sigma = posterior.loc["weight"], posterior.scale["weight"]
    pruned = prune_mask(mu, sigma, 0.9) if rule == "prune" else \
        mu.abs() < mu.abs().flatten().sort().values[1800]  # the 1800 = 0.9 * 2000 smallest
    assert torch.equal(qnet.layers[""].bits == 0, pruned)
    assert bool((qnet.weights()["weight"][pruned] == 0).all())
    loaded = pqnet.QuantizedNet.load(qnet.save(tmp_path / "p.pqn"), module=posterior.module)
    assert torch.equal(loaded.layers[""].codes, qnet.layers[""].codes)


def test_pruning_by_fraction_zeroes_the_smallest_means_over_the_whole_network():
    from tests.test_core_mutations import mlp_posterior
    posterior = mlp_posterior(hidden=10)  # a 10x4 and a 2x10 weight: 60 in all
    mu = {p: posterior.loc[f"{p}.weight"] for p in ("0", "2")}
    qnet = pqnet.quantize(posterior, "uniform", bits=4, prune_fraction=0.7)
    ranked = torch.cat([m.abs().flatten() for m in mu.values()]).sort().values
    threshold = ranked[60 - 18]  # the 18 = 0.3 * 60 largest are kept
    unpruned = pqnet.quantize(posterior, "uniform", bits=4).weights()
    for path, m in mu.items():
        pruned = m.abs() < threshold
        pruned &= m.abs() != m.abs().max()  # every layer keeps its largest weight
        assert torch.equal(qnet.layers[path].bits == 0, pruned)
        w = qnet.weights()[f"{path}.weight"]
        assert bool((w[pruned] == 0).all())
        assert torch.equal(w[~pruned], unpruned[f"{path}.weight"][~pruned])
    assert qnet.config["prune"] == {"by": "magnitude", "asked": 0.7,
                                    "fraction": pytest.approx(42 / 60)}


def test_keep_largest_keeps_exactly_the_count_asked_whatever_the_ties():
    weights = {"flat": torch.zeros(10),  # all equal: only its largest (one) is kept
               "b": torch.tensor([3.0, -2.0, 1.0, 1.0, -1.0, 1.0, 0.5, 0.5, -0.5, 0.5])}
    for keep in (0.3, 1 - 0.7):  # 6 of 20, not ceil(20 * 0.30000000000000004) = 7
        masks = keep_largest(weights, keep)
        assert int(masks["flat"].sum()) == 1
        assert masks["b"].tolist() == [True] * 6 + [False] * 4
    ties = keep_largest({"a": torch.ones(4), "b": torch.ones(4)}, 0.5)
    assert int(ties["a"].sum() + ties["b"].sum()) in (4, 5)  # 4 asked, + a layer's largest
    assert bool(ties["a"].any() and ties["b"].any())


def test_pruning_by_fraction_keeps_each_layers_largest_weight():
    from tests.test_core_mutations import mlp_posterior
    posterior = mlp_posterior(hidden=10)
    qnet = pqnet.quantize(posterior, "uniform", bits=2, prune_fraction=0.99)
    for layer in qnet.layers.values():
        assert int((layer.bits > 0).sum()) >= 1
    assert qnet.config["prune"]["fraction"] < 0.99


def test_two_pruning_rules_at_once_are_refused():
    with pytest.raises(ValueError, match="prune, prune_fraction: give one pruning rule"):
        pqnet.quantize(linear_posterior(), "uniform", bits=2, prune=0.9, prune_fraction=0.5)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, float("nan")])
def test_a_pruning_fraction_outside_0_1_is_refused(fraction):
    with pytest.raises(ValueError, match=r"prune_fraction: expected a number in \[0, 1\)"):
        pqnet.quantize(linear_posterior(), "uniform", bits=2, prune_fraction=fraction)


@pytest.mark.parametrize("level", [-0.1, 1.0, 1.5, float("nan"), "0.5"])
def test_a_pruning_level_outside_0_1_is_refused(level):
    with pytest.raises(ValueError, match=r"prune: expected a number in \[0, 1\)"):
        pqnet.quantize(linear_posterior(), "uniform", bits=2, prune=level)


# --------------------------------------------------------------------------- sigma-code


def test_range_argmax_matches_brute_force():
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 20, size=255)
    lo = rng.integers(0, 255, size=2000)
    hi = np.minimum(254, lo + rng.integers(0, 100, size=2000))
    got = _range_argmax(counts, lo, hi)
    for i in range(len(lo)):
        window = counts[lo[i]:hi[i] + 1]
        assert counts[got[i]] == window.max() and lo[i] <= got[i] <= hi[i]


def _one_step_by_hand(mu, sigma, grid, k, lam, start=None):
    """The rule of :func:`assign`'s first step, weight by weight: from the counts of
    ``start`` (default: nearest rounding), each weight takes, among the used levels with
    ``|v - mu| <= k sigma``, the most frequent one (``lam = 0``; the leftmost of equals) or
    the one of least ``-log2 p + lam z^2`` (``lam > 0``); with no such level, its nearest."""
    nearest = np.abs(grid[None, :] - mu[:, None]).argmin(1)
    counts = np.bincount(nearest if start is None else start, minlength=len(grid))
    out = nearest.copy()
    for i in range(len(mu)):
        inside = np.flatnonzero(np.abs(grid - mu[i]) <= k * sigma[i])
        used = inside[counts[inside] > 0]
        if len(used) and lam == 0:
            out[i] = used[np.argmax(counts[used])]
        elif len(used):
            z = (grid[used] - mu[i]) / sigma[i]
            out[i] = used[np.argmin(-np.log2(counts[used] / counts.sum()) + lam * z ** 2)]
    return out


@pytest.mark.parametrize("levels", [1, 2, 3, 4, 5, 8, 16, 17])
def test_one_step_of_the_assignment_is_the_rule_weight_by_weight(levels):
    """Integer levels and half-integer means and sds, so many intervals end exactly on a
    level (``|z| <= k`` includes it); grids of a power of two levels, where the interval can
    span them all."""
    rng = np.random.default_rng(levels)
    grid = np.arange(levels, dtype=np.float64) - levels // 2
    mu = rng.integers(-2 * levels, 2 * levels + 1, size=300) / 4.0
    sigma = rng.choice([0.25, 0.5, 1.0, 1.5], size=300)
    nearest = np.abs(grid[None, :] - mu[:, None]).argmin(1)

    def objective(index, lam):  # code entropy + lam * mean z^2, bits per weight
        p = np.bincount(index) / len(index)
        p = p[p > 0]
        return -(p * np.log2(p)).sum() + lam * np.mean(((grid[index] - mu) / sigma) ** 2)

    for k in (0.5, 1.0, 2.0, math.inf):
        for lam in (0.0, 0.3, 2.0):
            index, history = assign(mu, sigma, grid, k=k, lam=lam, steps=1)
            assert np.array_equal(index, _one_step_by_hand(mu, sigma, grid, k, lam)), (k, lam)
            assert history[0] == pytest.approx(objective(nearest, lam), abs=1e-12)
            if not np.array_equal(index, nearest):
                assert history == pytest.approx([objective(nearest, lam),
                                                 objective(index, lam)], abs=1e-12)
            # from another start (as fine-tuning re-rounds): levels nobody uses are no code
            start = rng.integers(0, max(1, levels // 3), size=300)
            index, _ = assign(mu, sigma, grid, k=k, lam=lam, steps=1, start=start)
            assert np.array_equal(index, _one_step_by_hand(mu, sigma, grid, k, lam, start))
            # run to its end, then started there, the assignment takes no step
            index, _ = assign(mu, sigma, grid, k=k, lam=lam)
            again, history = assign(mu, sigma, grid, k=k, lam=lam, start=index)
            assert np.array_equal(again, index) and len(history) == 1


def test_a_weight_whose_interval_holds_one_level_takes_it():
    """A mean within a float32 rounding of the midpoint of levels 2 and 3: the midpoint rule
    puts it nearest to 2, but only level 3 lies within one sd (the interval's search); the
    rule is the interval's."""
    grid = np.array([-0.7979637384414673, -0.2001526653766632, 0.6111598610877991,
                     0.8133851289749146, 1.1433717012405396], dtype=np.float32)
    mu = np.array([0.7122725248336792, 0.8133851289749146], dtype=np.float32)
    sigma = np.array([0.10111261904239655, 1e-4], dtype=np.float32)
    assert np.searchsorted((grid[1:] + grid[:-1]) / 2, mu[0]) == 2  # its nearest
    index, _ = assign(mu, sigma, grid, k=1.0, steps=1)
    assert index[0] == 3


def test_a_code_bits_budget_at_nearest_roundings_entropy_is_nearest_rounding():
    """The budget search counts the bits exactly: a budget equal to the code entropy of
    rounding every weight to its nearest level (what the largest lam gives) is met by that
    rounding, not by a coarser one."""
    posterior = linear_posterior(seed=1)
    mu = posterior.loc["weight"]
    grid = fine_grid(mu)
    nearest = np.abs(grid[None, :] - mu.reshape(-1, 1).numpy()).argmin(1)
    entropy = codec.entropy_bits(np.bincount(nearest))
    qnet = pqnet.quantize(posterior, "sigma-code", code_bits=entropy + 1e-12)
    assert np.array_equal(qnet.weights()["weight"].reshape(-1).numpy(), grid[nearest])


@pytest.mark.parametrize("options", [{"k": 1.0}, {"code_bits": 1.0}, {"k": 2.0, "lam": 0.3}])
def test_re_rounding_the_means_a_layer_was_coded_from_keeps_its_codes(options):
    """Fine-tuning re-rounds new means by the layer's own rule (k and lam); the means it
    started from are already where that rule puts them."""
    posterior = linear_posterior()
    qnet = pqnet.quantize(posterior, "sigma-code", **options)
    layer = qnet.layers[""]
    again = recode(layer, posterior.loc["weight"], posterior.scale["weight"], qnet.config)
    assert torch.equal(again, layer.codes)


def test_every_weight_stays_within_k_sigma_or_at_its_nearest_level():
    posterior = linear_posterior()
    mu, sigma = posterior.loc["weight"], posterior.scale["weight"]
    k = 1.5
    qnet = pqnet.quantize(posterior, "sigma-code", k=k)
    w = qnet.weights()["weight"]
    grid = torch.from_numpy(fine_grid(mu))
    nearest = grid[(grid[None, :] - mu.reshape(-1, 1)).abs().argmin(1)].reshape(mu.shape)
    fits = (grid[None, :] - mu.reshape(-1, 1)).abs().le(k * sigma.reshape(-1, 1)).any(1)
    fits = fits.reshape(mu.shape)
    assert bool(((w - mu).abs()[fits] <= k * sigma[fits] + 1e-7).all())
    assert torch.equal(w[~fits], nearest[~fits])
    assert bool(fits.float().mean() > 0.5)  # the interval constraint is what binds here


def test_code_entropy_never_rises_and_beats_rounding_and_fixed_width():
    posterior = linear_posterior(seed=3)
    mu = posterior.loc["weight"].reshape(-1).numpy()
    sigma = posterior.scale["weight"].reshape(-1).numpy()
    for k in (0.5, 1.0, 3.0):
        _, entropies = assign(mu, sigma, fine_grid(posterior.loc["weight"]), k)
        steps = zip(entropies, entropies[1:], strict=False)
        assert all(b <= a + 1e-12 for a, b in steps), entropies
        assert len(entropies) > 1 and entropies[-1] < entropies[0] < 8
    # and the stored layer codes at that entropy
    qnet = pqnet.quantize(posterior, "sigma-code", k=3.0)
    _, entropies = assign(mu, sigma, fine_grid(posterior.loc["weight"]), 3.0)
    assert qnet.code_entropy_bits == pytest.approx(entropies[-1])
    assert qnet.code_entropy_bits < pqnet.quantize(posterior, "uniform", bits=8).code_entropy_bits


def test_uncertain_weights_pool_on_one_value_and_certain_ones_keep_theirs():
    mu = torch.linspace(-0.5, 0.5, 200).reshape(10, 20)
    scale = torch.full_like(mu, 1e-4)
    scale[:5] = 10.0  # rows 0-4 are not informed by the data
    module = nn.Linear(20, 10, bias=False)
    with torch.no_grad():
        module.weight.copy_(mu)
    qnet = pqnet.quantize(make_posterior(module, {"weight": scale}), "sigma-code", k=1.0)
    w = qnet.weights()["weight"]
    assert len(w[:5].unique()) == 1  # one value, the most popular
    assert bool(((w[5:] - mu[5:]).abs() <= 0.5 / 254 + 1e-7).all())  # nearest level kept


def test_a_code_bits_budget_is_met_from_below():
    posterior = linear_posterior(seed=2)
    for budget in (1.0, 2.5):
        qnet = pqnet.quantize(posterior, "sigma-code", code_bits=budget)
        assert qnet.code_entropy_bits <= budget
        assert qnet.code_entropy_bits > budget - 0.5  # the bisection does not give away bits
        assert qnet.config["code_bits"] == budget and qnet.config["lam"] > 0
        # the largest such lam: a little more buys codes over the budget
        dearer = pqnet.quantize(posterior, "sigma-code", lam=qnet.config["lam"] * 1.001)
        assert dearer.code_entropy_bits > budget


def test_a_code_bits_budget_counts_every_layer():
    posterior, _ = _tiny_task()
    posterior.scale.update({k: torch.full_like(v, 0.05) for k, v in posterior.scale.items()})
    for budget in (1.0, 2.0):
        qnet = pqnet.quantize(posterior, "sigma-code", code_bits=budget)
        assert budget - 0.25 < qnet.code_entropy_bits <= budget


def test_the_code_bits_search_tries_a_fixed_number_of_lams(monkeypatch):
    """Both ends, then :data:`BISECTIONS` halvings of log10 lam; one assignment per layer
    each, and one more per layer for the result."""
    import importlib

    # the module (pqnet.quantize.sigma_code is also the name of the function)
    sigma_code = importlib.import_module("pqnet.quantize.sigma_code")

    calls = []
    real = sigma_code.assign
    monkeypatch.setattr(sigma_code, "assign", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    posterior, _ = _tiny_task()
    pqnet.quantize(posterior, "sigma-code", code_bits=1.0)
    assert len(calls) == 2 * (2 + sigma_code.BISECTIONS + 1)


def test_an_unreachable_code_bits_budget_is_named():
    """With a k interval, even lam -> 0 keeps some bits: a budget below them is refused."""
    with pytest.raises(ValueError, match=r"^code_bits: no allocation reaches 0.001; the fewest"):
        pqnet.quantize(linear_posterior(), "sigma-code", k=0.01, code_bits=1e-3)


def test_sigma_code_records_its_defaults():
    """Called directly with nothing but the posterior: the shortest code within 1 sd."""
    from pqnet.quantize.sigma_code import sigma_code

    posterior = linear_posterior()
    default = sigma_code(posterior)
    assert default.config == {"k": 1.0, "lam": 0.0, "code_bits": None, "seed": 0}
    assert torch.equal(default.layers[""].codes,
                       sigma_code(posterior, k=1.0, lam=0.0, seed=0).layers[""].codes)


def test_a_sigma_code_layer_of_two_values_has_one_bit_codes():
    """The fixed-width code of a layer is as wide as its number of used values needs."""
    module = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([[-0.5, 0.5, 0.5, -0.5]] * 3))
    posterior = make_posterior(module, {"weight": torch.full((3, 4), 1e-3)})
    qnet = pqnet.quantize(posterior, "sigma-code", k=1.0)
    assert qnet.layers[""].widths == [1] and qnet.avg_bits == 1.0
    assert torch.equal(qnet.weights()["weight"], module.weight.detach())


@pytest.mark.parametrize("budget, message", [({"k": 0}, "k: expected a positive"),
                                             ({"k": -1.0}, "k: expected a positive"),
                                             ({"code_bits": 0}, "code_bits: expected a positive"),
                                             ({"lam": -1.0}, "lam: expected a finite non-neg"),
                                             ({"lam": 1, "code_bits": 2}, "give exactly one"),
                                             ({"lam": 0.0}, "k: .* needs a finite k")])
def test_sigma_code_refuses_bad_budgets(budget, message):
    with pytest.raises(ValueError, match=message):
        pqnet.quantize(linear_posterior(), "sigma-code", **budget)


def test_entropy_bits_by_hand():
    assert codec.entropy_bits(np.array([1, 1, 2, 0])) == pytest.approx(1.5)
    assert codec.entropy_bits(np.array([5])) == 0.0


# --------------------------------------------------------------------------- deep compression


def _tiny_task(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 12, generator=gen)
    y = (x[:, :4].sum(1) > 0).long() + (x[:, 4] > 1).long()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        module = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3))
    return make_posterior(module), TensorDataset(x, y)


def test_deep_compression_by_hand_without_training():
    """One round, no retraining or fine-tuning: the smallest 75 % of all weights (one
    threshold for the network) are zero, the rest the linear-initialised k-means centres of
    each layer's survivors."""
    from sklearn.cluster import KMeans

    posterior, data = _tiny_task()
    qnet = pqnet.quantize(posterior, "deep-compression", data=data, sparsity=0.75, k=4,
                          rounds=1, retrain_epochs=0, centre_epochs=0)
    mus = {p: posterior.loc[f"{p}.weight"] for p in qnet.layers}
    flat = torch.cat([m.abs().reshape(-1) for m in mus.values()])
    threshold = flat.sort(descending=True).values[int(np.ceil(0.25 * len(flat))) - 1]
    kept = sum(int((w != 0).sum()) for w in qnet.weights().values())
    assert kept == int(np.ceil(0.25 * len(flat)))  # no ties in random weights
    fractions = []
    for path, layer in qnet.layers.items():
        mu, w = mus[path], qnet.weights()[f"{path}.weight"]
        mask = mu.abs() >= threshold
        assert torch.equal(layer.bits == 0, ~mask) and bool((w[~mask] == 0).all())
        survivors = mu[mask].double().numpy()[:, None]
        k = min(4, len(survivors))
        start = np.linspace(survivors.min(), survivors.max(), k)[:, None]
        centres = np.sort(KMeans(k, init=start, n_init=1).fit(survivors).cluster_centers_[:, 0])
        assert np.allclose(np.sort(w[mask].unique().numpy()), centres, atol=1e-6)
        fractions.append(float(mask.float().mean()))
    assert fractions[0] != fractions[1]  # one threshold: the layers keep different shares


def test_deep_compression_keeps_its_sparsity_and_clusters_through_training(tmp_path):
    posterior, data = _tiny_task()
    qnet = pqnet.quantize(posterior, "deep-compression", data=data, sparsity=0.6, k=3,
                          rounds=3, retrain_epochs=2, centre_epochs=2, lr=1e-2)
    for path, layer in qnet.layers.items():
        w = qnet.weights()[f"{path}.weight"]
        assert len(w[layer.bits > 0].unique()) <= 3  # k shared values, fine-tuned
    total = sum(w.numel() for w in qnet.weights().values())
    zeros = sum(int((w == 0).sum()) for w in qnet.weights().values())
    kept = round(0.4 * total)  # the sparsity, each layer keeping at least its largest
    assert total - kept - len(qnet.layers) <= zeros <= total - kept
    start = pqnet.quantize(posterior, "deep-compression", data=data, sparsity=0.6, k=3,
                           rounds=3, retrain_epochs=2, centre_epochs=0, lr=1e-2)
    assert not torch.equal(qnet.weights()["0.weight"], start.weights()["0.weight"])
    loaded = pqnet.QuantizedNet.load(qnet.save(tmp_path / "dc.pqn"), module=posterior.module)
    assert torch.equal(loaded.weights()["0.weight"], qnet.weights()["0.weight"])


@pytest.mark.parametrize("options, message", [({"sparsity": 1.0}, r"sparsity: .*\[0, 1\)"),
                                              ({"k": 1}, "k:"), ({"rounds": 0}, "rounds:")])
def test_deep_compression_refuses_bad_settings(options, message):
    posterior, data = _tiny_task()
    with pytest.raises(ValueError, match=message):
        pqnet.quantize(posterior, "deep-compression", data=data, **options)
    with pytest.raises(ValueError, match="data: deep-compression retrains"):
        pqnet.quantize(posterior, "deep-compression")


def test_mcnemar_by_hand():
    from pqnet.diagnostics.metrics import mcnemar

    a = torch.tensor([1, 1, 1, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    b = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1, 1], dtype=torch.bool)
    # 5 examples only A gets right, 1 only B: p = 2 * P(X <= 1 | 6, 1/2) = 2 * 7 / 64
    assert mcnemar(a, b) == {"only_a": 5, "only_b": 1, "p_value": pytest.approx(14 / 64)}
    assert mcnemar(a, a)["p_value"] == 1.0
    # a tie, 2 and 2: 2 * P(X <= 2 | 4, 1/2) = 22/16 is more than 1; a p-value stops at 1
    tie = mcnemar(torch.tensor([1, 1, 0, 0, 1], dtype=torch.bool),
                  torch.tensor([0, 0, 1, 1, 1], dtype=torch.bool))
    assert tie == {"only_a": 2, "only_b": 2, "p_value": 1.0}
    with pytest.raises(ValueError, match="correct_b"):
        mcnemar(a, b[:5])


def test_fine_tuning_re_rounds_sigma_code_by_its_own_rule():
    """Fine-tuned means are re-rounded to the shortest code within k sds, not to the nearest
    level, so the entropy the budget bought survives the fine-tuning."""
    posterior, data = _tiny_task()
    posterior.scale.update({k: torch.full_like(v, 0.05) for k, v in posterior.scale.items()})
    before = pqnet.quantize(posterior, "sigma-code", code_bits=1.0)
    after = pqnet.quantize(posterior, "sigma-code", code_bits=1.0, data=data,
                           finetune_epochs=2, finetune_lr=1e-2)
    assert after.config["finetune"]["epochs"] == 2
    assert after.code_entropy_bits <= before.code_entropy_bits + 0.25
    for path, layer in after.layers.items():
        assert torch.equal(layer.codebooks[layer.widths[-1]], before.layers[path].codebooks[
            before.layers[path].widths[-1]])


def test_the_priced_rule_lowers_its_objective_and_moves_uncertain_weights_first():
    """With lam > 0 each step lowers entropy + lam * mean z^2; the weights that move to the
    popular value are the uncertain ones, and a sure weight keeps its precise value."""
    posterior = linear_posterior(seed=4)
    mu = posterior.loc["weight"].reshape(-1).numpy()
    sigma = posterior.scale["weight"].reshape(-1).numpy()
    grid = fine_grid(posterior.loc["weight"])
    index, history = assign(mu, sigma, grid, lam=2.0)
    assert len(history) > 2 and all(b <= a + 1e-9 for a, b in zip(history, history[1:],
                                                                    strict=False))
    moved = index != np.searchsorted((grid[1:] + grid[:-1]) / 2, mu)  # off its nearest level
    sure, unsure = sigma < np.quantile(sigma, 0.2), sigma > np.quantile(sigma, 0.8)
    assert moved[sure].mean() < 0.1 < 0.9 < moved[unsure].mean()
    # with an interval too: every weight within it, or at its nearest level
    index, _ = assign(mu, sigma, grid, k=1.0, lam=2.0)
    nearest = np.searchsorted((grid[1:] + grid[:-1]) / 2, mu)
    inside = np.abs(grid[index] - mu) <= sigma + 1e-7
    assert np.all(inside | (index == nearest)) and inside.mean() > 0.5
    # and a code-bits budget is met through lam, with any level allowed
    qnet = pqnet.quantize(posterior, "sigma-code", code_bits=1.0)
    assert qnet.code_entropy_bits <= 1.0 and qnet.config["k"] is None
    assert qnet.config["lam"] > 0


def test_a_budget_left_unused_is_said_and_the_result_logged(caplog):
    posterior = linear_posterior()
    with pytest.warns(UserWarning, match=r"avg_bits: uniform uses 2.000 of the 2.9 bits"):
        pqnet.quantize(posterior, "uniform", avg_bits=2.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # 3 of 3 bits: nothing to say
        with caplog.at_level(logging.INFO, logger="pqnet"):
            qnet = pqnet.quantize(posterior, "uniform", avg_bits=3.0)
    assert f"uniform: {qnet.size_bytes} bytes" in caplog.text


def test_sigma_code_with_pruning_survives_fine_tuning():
    posterior, data = _tiny_task()
    posterior.scale.update({k: torch.full_like(v, 0.05) for k, v in posterior.scale.items()})
    qnet = pqnet.quantize(posterior, "sigma-code", k=1.0, prune=0.9, data=data,
                          finetune_epochs=1, finetune_lr=1e-2)
    for path, layer in qnet.layers.items():
        pruned = prune_mask(posterior.loc[f"{path}.weight"], posterior.scale[f"{path}.weight"],
                            0.9)
        assert torch.equal(layer.bits == 0, pruned)


@pytest.mark.parametrize("method", ["deep-compression", "pwfn"])
@pytest.mark.parametrize("after", [{"finetune_epochs": 1}, {"prune": 0.9},
                                   {"prune_fraction": 0.5}])
def test_pruning_or_fine_tuning_a_method_that_trains_its_own_net_is_refused(method, after):
    """The posterior describes the weights these methods started from, not the ones they
    trained: pruning or fine-tuning by it would judge weights the network no longer has."""
    posterior, data = _tiny_task()
    name = next(iter(after))
    with pytest.raises(ValueError, match=f"{name}: {method} retrains its own network"):
        pqnet.quantize(posterior, method, data=data, **after)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_code_bits_is_met_from_below_on_other_layers(seed):
    posterior = linear_posterior(seed=seed, n_out=60, n_in=80)
    for budget in (0.5, 2.0):
        assert pqnet.quantize(posterior, "sigma-code", code_bits=budget).code_entropy_bits \
            <= budget


def test_bayesian_prune_by_itself_on_a_two_layer_net():
    """Called directly: the level is checked (0 allowed), the fraction counts every layer,
    the method is kept, and a weight whose mean is exactly 0 is not pruned at level 0 (its
    interval is the point 0: zero is not strictly inside it)."""
    from pqnet.quantize import bayesian_prune

    module = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        module[0].weight.copy_(torch.tensor([[0.0, 0.1, -0.2, 0.3]] * 3))
        module[1].weight.copy_(torch.tensor([[0.05, 1.0, -0.01]] * 2))
    scale = {"0.weight": torch.full((3, 4), 0.1), "1.weight": torch.full((2, 3), 0.1)}
    posterior = make_posterior(module, scale)
    qnet = pqnet.quantize(posterior, "uniform", bits=3)
    assert bayesian_prune(qnet, posterior, 0.0).config["prune"]["fraction"] == 0.0
    pruned = bayesian_prune(qnet, posterior, 0.5)  # z = 0.674: |mu| < 0.0674 goes
    assert pruned.method == "uniform"
    assert pruned.config["prune"]["fraction"] == pytest.approx((3 + 4) / 18)
    for level in (1.0, -0.5):
        with pytest.raises(ValueError, match=r"^prune: expected a number in \[0, 1\)"):
            bayesian_prune(qnet, posterior, level)


# ------------------------------------------- the settings fine-tuning and Deep Compression keep


def test_deep_compression_records_its_defaults_and_is_the_same_for_the_same_seed():
    posterior, data = _tiny_task()
    torch.manual_seed(123)  # the global generator must not matter
    qnet = pqnet.quantize(posterior, "deep-compression", data=data)
    assert qnet.method == "deep-compression"
    assert qnet.config == {"sparsity": 0.8, "k": 16, "rounds": 3, "retrain_epochs": 1,
                           "centre_epochs": 1, "lr": 1e-3, "batch_size": 128, "seed": 0}
    torch.manual_seed(7)
    again = pqnet.quantize(posterior, "deep-compression", data=data)
    for name, w in qnet.weights().items():
        assert torch.equal(w, again.weights()[name])
    other = pqnet.quantize(posterior, "deep-compression", data=data, seed=1)
    assert not torch.equal(other.weights()["0.weight"], qnet.weights()["0.weight"])
    direct = deep_compression(posterior, data=data, rounds=1, retrain_epochs=0, centre_epochs=0)
    assert direct.config["seed"] == 0  # its own default, when called by itself


@pytest.mark.parametrize("options, name", [
    ({"retrain_epochs": -1}, "retrain_epochs"), ({"centre_epochs": -1}, "centre_epochs"),
    ({"lr": 0.0}, "lr"), ({"batch_size": 0}, "batch_size"), ({"k": 257}, "k")])
def test_deep_compression_names_a_bad_setting(options, name):
    posterior, data = _tiny_task()
    with pytest.raises(ValueError, match=f"^{name}: "):
        pqnet.quantize(posterior, "deep-compression", data=data, **options)


def test_deep_compression_takes_the_extreme_k_and_names_wrong_data():
    posterior, data = _tiny_task()
    for k in (2, 256):
        qnet = pqnet.quantize(posterior, "deep-compression", data=data, k=k, rounds=1,
                              retrain_epochs=0, centre_epochs=0)
        assert all(len(w[w != 0].unique()) <= k for w in qnet.weights().values())
    wrong = TensorDataset(torch.randn(8, 5), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="^data: "):
        pqnet.quantize(posterior, "deep-compression", data=wrong)


def _finetuned(posterior, data, method="uniform", **options):
    qnet = pqnet.quantize(posterior, method, **({"k": 1.0} if method == "sigma-code"
                                                else {"bits": 3}))
    return qnet, finetune(qnet, posterior, data, **options)


def test_straight_through_rounding_is_the_quantized_value_with_an_identity_gradient():
    from pqnet.quantize.finetune import _rounded
    qnet = pqnet.quantize(linear_posterior(), "uniform", bits=2)
    w = (0.3 * torch.randn(40, 50)).requires_grad_(True)
    out = _rounded(qnet.layers[""], w)
    assert torch.allclose(out, qnet.layers[""].decode(qnet.layers[""].encode(w)), atol=1e-6)
    out.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


@pytest.mark.parametrize("method", ["uniform", "sigma-code"])
def test_fine_tuning_at_lr_zero_keeps_the_codes_and_records_its_settings(method):
    """No step moves a mean, so re-rounding by the method's own rule gives its own codes back:
    nearest level for uniform, shortest code within k sds for sigma-code."""
    posterior, data = _tiny_task()
    qnet, tuned = _finetuned(posterior, data, method, epochs=1, lr=0.0)
    for path, layer in qnet.layers.items():
        assert torch.equal(tuned.layers[path].codes, layer.codes)
    assert tuned.method == method
    assert tuned.config["finetune"] == {"epochs": 1, "lr": 0.0, "batch_size": 64, "seed": 0}
    _, default = _finetuned(posterior, data, method, epochs=1)
    assert default.config["finetune"] == {"epochs": 1, "lr": 1e-3, "batch_size": 64,
                                          "seed": 0}


def test_fine_tuning_is_the_same_for_the_same_seed_and_leaves_the_posterior_alone():
    posterior, data = _tiny_task()
    before = {k: v.clone() for k, v in posterior.module.state_dict().items()}
    torch.manual_seed(5)
    _, one = _finetuned(posterior, data, epochs=2, lr=1e-2)
    torch.manual_seed(6)
    _, two = _finetuned(posterior, data, epochs=2, lr=1e-2)
    for path in one.layers:
        assert torch.equal(one.layers[path].codes, two.layers[path].codes)
    assert torch.equal(one.to_module()[0].bias, two.to_module()[0].bias)
    after = posterior.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in posterior.module.parameters())


@pytest.mark.parametrize("options, name", [
    ({"epochs": 0}, "finetune_epochs"), ({"epochs": 10_001}, "finetune_epochs"),
    ({"epochs": 1, "lr": -1.0}, "finetune_lr"), ({"epochs": 1, "batch_size": 0}, "batch_size"),
    ({"epochs": 1, "batch_size": (1 << 30) + 1}, "batch_size")])
def test_fine_tuning_called_by_itself_names_a_bad_setting(options, name):
    posterior, data = _tiny_task()
    qnet = pqnet.quantize(posterior, "uniform", bits=3)
    with pytest.raises(ValueError, match=f"^{name}: "):
        finetune(qnet, posterior, data, **options)


def test_fine_tuning_called_by_itself_takes_batches_of_one_and_names_wrong_data():
    posterior, data = _tiny_task()
    small = TensorDataset(*(t[:4] for t in data.tensors))
    qnet = pqnet.quantize(posterior, "uniform", bits=3)
    assert finetune(qnet, posterior, small, epochs=1, batch_size=1).config["finetune"][
        "batch_size"] == 1
    wrong = TensorDataset(torch.randn(8, 5), torch.zeros(8, dtype=torch.long))
    with pytest.raises(ValueError, match="^data: "):
        finetune(qnet, posterior, wrong, epochs=1)


def test_magnitude_prune_by_itself_checks_its_fraction_and_keeps_the_method():
    posterior = linear_posterior()
    qnet = pqnet.quantize(posterior, "uniform", bits=2)
    with pytest.raises(ValueError, match=r"^prune_fraction: expected a number in \[0, 1\)"):
        magnitude_prune(qnet, posterior, 1.0)
    none = magnitude_prune(qnet, posterior, 0.0)
    assert none.method == "uniform" and int((none.layers[""].bits == 0).sum()) == 0
    assert keep_largest({"a": torch.arange(20.0)}, 0.01)["a"].sum() == 1  # at least one kept


def test_deep_compression_retrains_with_the_zeros_held():
    """One round with enough centres to keep every survivor (k-means keeps <= k distinct
    values exactly): the result is the mean net, pruned, retrained one epoch with the zeros
    held after every step, the same batches drawn from the seed."""
    from pqnet.inference.plain import train_plain
    posterior, data = _tiny_task()
    qnet = deep_compression(posterior, data=data, sparsity=0.6, k=256, rounds=1,
                            retrain_epochs=1, centre_epochs=0, lr=1e-2)
    net = posterior.mean_module()
    masks = keep_largest({p: net.get_submodule(p).weight for p in posterior.layers}, 0.4)

    def hold():
        with torch.no_grad():
            for p, mask in masks.items():
                net.get_submodule(p).weight.mul_(mask)
    hold()
    train_plain(net, data, epochs=1, batch_size=128, lr=1e-2,
                generator=torch.Generator().manual_seed(0), after_step=hold)
    for p in posterior.layers:
        assert torch.equal(qnet.weights()[f"{p}.weight"], net.get_submodule(p).weight)


def test_deep_compression_centre_fine_tuning_trains_the_centres_and_the_rest():
    posterior, data = _tiny_task()
    options = {"sparsity": 0.6, "k": 4, "rounds": 1, "retrain_epochs": 0}
    start = deep_compression(posterior, data=data, centre_epochs=0, **options)
    tuned = deep_compression(posterior, data=data, centre_epochs=3, lr=1e-2, **options)
    slow = deep_compression(posterior, data=data, centre_epochs=3, lr=1e-4, **options)
    x, y = data.tensors
    with torch.no_grad():
        loss = {name: float(torch.nn.functional.cross_entropy(q.to_module()(x), y))
                for name, q in (("start", start), ("tuned", tuned))}
    assert loss["tuned"] < loss["start"] - 0.01  # the centres fit the data better
    for p in posterior.layers:  # the zeros stay, the shared values move, at lr's pace
        assert torch.equal(tuned.layers[p].bits == 0, start.layers[p].bits == 0)
    assert not torch.equal(tuned.to_module()[0].bias, start.to_module()[0].bias)
    assert not torch.allclose(tuned.weights()["0.weight"], slow.weights()["0.weight"])


def test_deep_compression_at_sparsity_zero_keeps_every_weight():
    posterior, data = _tiny_task()
    qnet = deep_compression(posterior, data=data, sparsity=0.0, k=4, rounds=1,
                            retrain_epochs=0, centre_epochs=0)
    for layer in qnet.layers.values():
        assert set(layer.codebooks) == {2} and bool((layer.bits == 2).all())


def test_deep_compression_trains_the_network_its_layers_decode_to():
    """Centre fine-tuning's forward pass is the quantized net: survivors at their centres,
    pruned weights at 0."""
    from pqnet.quantize.deep_compression import _decode
    posterior, data = _tiny_task()
    qnet = deep_compression(posterior, data=data, sparsity=0.6, k=4, rounds=1,
                            retrain_epochs=0, centre_epochs=0)
    for path, layer in qnet.layers.items():
        decoded = _decode(layer, layer.codebooks[max(layer.widths)])
        assert torch.equal(decoded, qnet.weights()[f"{path}.weight"])
        assert bool((decoded[layer.bits == 0] == 0).all()) and bool((layer.bits == 0).any())


def test_fine_tuning_draws_from_the_posterior():
    """Fine-tuning keeps the posterior's noise: its draws have the posterior's means and sds."""
    from pqnet.quantize.finetune import _draw
    mu, sigma = torch.tensor([0.5, -1.0, 0.0]), torch.tensor([0.1, 2.0, 0.5])
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([_draw(mu, sigma, gen) for _ in range(20_000)])
    assert torch.allclose(draws.mean(0), mu, atol=4 * sigma.max() / 20_000 ** 0.5)
    assert torch.allclose(draws.std(0), sigma, rtol=0.03)
