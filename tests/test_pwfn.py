"""Probabilistic Weight Fixing: centres, the greedy assignment, rounds, resume, bad input."""

import math
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

import pqnet
from pqnet.bnn import LayerInfo
from pqnet.quantize import QuantizedNet
from pqnet.quantize.pwfn import SCHEDULE, WeightFixer, centres

PWFN_MODULE = sys.modules["pqnet.quantize.pwfn"]  # pqnet.quantize.pwfn is the function


def posterior_of(means: dict[str, torch.Tensor], sigma: float, module: nn.Module
                 ) -> pqnet.Posterior:
    layers = {name.removesuffix(".weight"): LayerInfo(name.removesuffix(".weight"), "Linear",
                                                      tuple(m.shape), m.shape[1], False)
              for name, m in means.items()}
    scale = {name: torch.full(m.shape, sigma) for name, m in means.items()}
    return pqnet.Posterior(means, scale, layers, module)


def one_layer(weight: torch.Tensor, sigma: float) -> pqnet.Posterior:
    """A bias-free Linear layer's posterior: means ``weight`` (out x in), sd ``sigma``."""
    out_features, in_features = weight.shape
    return posterior_of({"0.weight": weight}, sigma,
                        nn.Sequential(nn.Linear(in_features, out_features, bias=False)))


@pytest.fixture(scope="module")
def digits():
    """A small MLP's posterior on scikit-learn digits, fitted under PWFN's prior."""
    train, test = pqnet.data.load("digits")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    bnn = pqnet.bayesian(net, prior="pwfn", init_scale="pwfn")
    posterior = pqnet.fit(bnn, train, epochs=4, lr=1e-2, scale_lr=0.1, kl_weight=1,
                          warm_start=0, seed=0, progress=False)
    return posterior, train, test


# --------------------------------------------------------------------------- centres


def test_centres_are_zero_and_signed_sums_of_distinct_powers_of_two():
    assert centres(1).tolist() == sorted([0.0] + [s * 2.0**e for s in (-1, 1)
                                                  for e in range(-7, 1)])
    # exponents -7 and -6 only: order 2 adds 1/64 + 1/128 = 3/128 (1/64 - 1/128 is 1/128)
    small = [k / 128 for k in (-2, -1, 0, 1, 2)]
    assert centres(1, largest_exponent=-6).tolist() == small
    assert centres(2, largest_exponent=-6).tolist() == [k / 128 for k in range(-3, 4)]
    assert centres(2, largest_exponent=-5).tolist() == sorted(
        {0.0} | {s * k / 128 for s in (-1, 1) for k in (1, 2, 4, 3, 5, 6)})
    for order in (1, 2, 3, 4):
        c = centres(order)
        assert torch.equal(c, c.unique()) and bool((c * 128 == (c * 128).round()).all())
        assert set(centres(order - 1).tolist()) < set(c.tolist()) if order > 1 else True
    # with 8 exponents every multiple of 2^-7 below 2 needs at most... more than 4 terms
    assert len(centres(4)) < 2 * 255 + 1


def test_centres_check_their_order_and_are_float32_whatever_the_default_dtype():
    for bad in (0, 5):
        with pytest.raises(ValueError, match="^max_order: "):
            centres(bad)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        assert centres(1).dtype == torch.float32  # searchsorted needs the means' dtype
    finally:
        torch.set_default_dtype(previous)


# --------------------------------------------------------------------------- assignment


def test_the_centre_reaching_most_weights_takes_them_closest_first():
    mu = torch.tensor([0.10, 0.11, 0.12, 0.5, 0.13])
    sigma = torch.full((5,), 0.02)
    fixer = WeightFixer()
    index, value = fixer.fix(mu, sigma, 2)
    # 0.125 reaches 0.11, 0.12, 0.13 (within 0.02); 0.12 and 0.13 are closest
    assert sorted(index.tolist()) == [2, 4] and value.tolist() == [0.125, 0.125]
    assert fixer.order == 1
    index, value = fixer.fix(mu, sigma, 5)
    # no power of two lies within 0.02 of 0.10: order 2 brings 3/32 = 1/16 + 1/32
    assert dict(zip(index.tolist(), value.tolist(), strict=True)) == {
        1: 0.125, 2: 0.125, 4: 0.125, 3: 0.5, 0: 0.09375}
    assert fixer.order == 2


def test_ties_go_to_the_centre_closest_to_its_weights_then_to_the_smallest():
    """Among centres that reach equally many weights, the closest in summed sds wins, not
    the most negative: a lone weight of mean 0 goes to 0, one of mean 0.1 to 1/8; of
    centres equally close, the smallest in magnitude, on either side of zero."""
    fixer = WeightFixer()
    assert fixer.fix(torch.tensor([0.0]), torch.tensor([0.3]), 1)[1].tolist() == [0.0]
    assert fixer.fix(torch.tensor([0.1]), torch.tensor([0.3]), 1)[1].tolist() == [0.125]
    assert fixer.fix(torch.tensor([-0.1]), torch.tensor([0.3]), 1)[1].tolist() == [-0.125]
    # 1/4 and 1/2 each reach both weights; 1/4 is 0.55 + 0.95 sds away, 1/2 is 0.7 + 0.3
    index, value = fixer.fix(torch.tensor([0.36, 0.44]), torch.tensor([0.2, 0.2]), 2)
    assert value.tolist() == [0.5, 0.5] and fixer.order == 1
    # between the two weights the summed distance is flat: 1/4 and 1/2 are both 0.8 sds
    for sign in (1.0, -1.0):
        value = fixer.fix(sign * torch.tensor([0.2, 0.6]), torch.tensor([0.5, 0.5]), 2)[1]
        assert value.tolist() == [sign * 0.25] * 2
    # 1/2 and -1/8 each reach 2 weights and sit on one of them, 0 sds away, but the
    # difference arrays leave 1/2 at -1.8e-15: ties are taken up to rounding
    mu = torch.tensor([0.5, -0.9375, -0.125, 0.16497957706451416])
    sigma = torch.tensor([0.125, 0.5, 0.25, 0.034841138869524])
    index, value = WeightFixer(max_order=2).fix(mu, sigma, 1)
    assert index.tolist() == [2] and value.tolist() == [-0.125]


def test_equally_close_weights_are_taken_in_index_order():
    """The closest-first order is a stable sort: of 2,000 identical weights, the first 500
    are taken (torch's unstable CPU sort reorders ties from about a thousand elements)."""
    index, value = WeightFixer().fix(torch.full((2000,), 0.3), torch.full((2000,), 0.1), 500)
    assert index.tolist() == list(range(500)) and value.tolist() == [0.25] * 500


def test_summed_distances_within_the_tolerance_count_as_tied():
    """TIE_TOLERANCE (1e-6) is relative and absolute: gaps below 1e-6 (1 + d) sds are ties.
    A weight just above 3/8, sd 0.2, reaches 1/4 and 1/2 (order 1) at about 0.625 sds each."""
    ulp = 2.0**-25  # float32's spacing at 3/8
    for steps, centre in ((5, 0.25), (7, 0.5)):  # gaps 1.49e-6 (tied), 2.09e-6 sds
        mu = torch.tensor([0.375 + steps * ulp])
        assert WeightFixer().fix(mu, torch.tensor([0.2]), 1)[1].tolist() == [centre]


def dense_fix(fixer: WeightFixer, mu: torch.Tensor, sigma: torch.Tensor, count: int):
    """The greedy rule on the full ``weights x centres`` matrix, in float64 (the oracle)."""
    free, taken = list(range(len(mu))), {}
    while len(taken) < count:
        c = fixer.centres.double()
        distance = (mu[free].double()[:, None] - c).abs() / sigma[free].double()[:, None]
        reach = distance <= fixer.threshold
        if not bool(reach.any()):
            fixer._loosen()
            continue
        counts = reach.sum(0)
        tied = (counts == counts.max()).nonzero().squeeze(1)
        summed = (distance * reach)[:, tied].sum(0)
        tied = tied[(summed - summed.min()).abs() < 1e-9]
        best = tied[c[tied].abs().argmin()]
        order = distance[:, best].argsort(stable=True)
        chosen = [free[i] for i in order.tolist() if reach[i, best]][:count - len(taken)]
        taken.update({i: float(fixer.centres[best]) for i in chosen})
        free = [i for i in free if i not in taken]
    return taken


def random_problems(gen: torch.Generator, trials: int, grid: bool):
    """Small problems; on a grid (means k/64, sds 1/16 to 1/2) distances tie exactly."""
    for trial in range(trials):
        n = int(torch.randint(1, 12, (1,), generator=gen))
        if grid:
            mu = torch.randint(-80, 81, (n,), generator=gen) / 64
            sigma = 2.0 ** -torch.randint(1, 5, (n,), generator=gen).float()
        else:
            mu = 0.3 * torch.randn(n, generator=gen)
            sigma = 10 ** (-2.5 + 2 * torch.rand(n, generator=gen))
        yield trial, mu, sigma, int(torch.randint(1, n + 1, (1,), generator=gen))


@pytest.mark.parametrize("grid", [False, True])
def test_the_assignment_matches_a_dense_oracle(grid):
    for trial, mu, sigma, count in random_problems(torch.Generator().manual_seed(5), 40, grid):
        index, value = WeightFixer(max_order=2).fix(mu, sigma, count)
        got = dict(zip(index.tolist(), value.tolist(), strict=True))
        exponent = max(0, math.ceil(math.log2(float(mu.abs().max())))) if mu.any() else 0
        oracle = WeightFixer(max_order=2, largest_exponent=exponent)
        assert got == dense_fix(oracle, mu, sigma, count), trial


def test_off_exact_ties_the_assignment_is_symmetric_in_sign():
    for trial, mu, sigma, count in random_problems(torch.Generator().manual_seed(6), 40, False):
        index, value = WeightFixer(max_order=2).fix(mu, sigma, count)
        mirrored = WeightFixer(max_order=2).fix(-mu, sigma, count)
        assert torch.equal(mirrored[0], index) and torch.equal(-mirrored[1], value), trial


def test_the_centres_grow_to_a_mean_beyond_them_and_never_shrink():
    """A mean that retraining moved past the largest centre gets its own power of two, not
    a threshold widened for every later round."""
    fixer = WeightFixer()
    assert fixer.fix(torch.tensor([1.98]), torch.tensor([0.05]), 1)[1].tolist() == [2.0]
    assert (fixer.order, fixer.threshold, fixer.largest_exponent) == (1, 1.0, 1)
    assert fixer.state() == {"order": 1, "threshold": 1.0, "largest_exponent": 1}
    assert fixer.fix(torch.tensor([-2.9]), torch.tensor([0.2]), 1)[1].tolist() == [-3.0]
    assert (fixer.order, fixer.largest_exponent) == (2, 2)  # 3 = 2 + 1 needs order 2
    fixer.fix(torch.tensor([0.5]), torch.tensor([0.1]), 1)
    assert fixer.largest_exponent == 2 and float(fixer.centres.max()) == 6.0  # 4 + 2
    small = WeightFixer(largest_exponent=-3)  # no free weight asks for more
    assert small.fix(torch.zeros(0), torch.zeros(0), 0)[0].tolist() == []
    assert small.largest_exponent == -3 and float(small.centres.max()) == 0.125


@pytest.mark.parametrize("mu, sigma", [([0.1, math.nan], [0.1, 0.1]),
                                       ([0.1, 0.2], [0.1, 0.0]), ([0.1], [math.inf])])
def test_non_finite_means_and_non_positive_sds_are_refused(mu, sigma):
    with pytest.raises(ValueError, match="^mu, sigma: expected finite means and positive"):
        WeightFixer().fix(torch.tensor(mu), torch.tensor(sigma), 1)


def test_order_rises_then_threshold_widens_when_nothing_is_within_reach():
    fixer = WeightFixer(max_order=2, threshold=1.0, widen=2.0)
    index, value = fixer.fix(torch.tensor([0.375]), torch.tensor([1e-4]), 1)
    assert value.tolist() == [0.375] and fixer.order == 2 and fixer.threshold == 1.0
    # 0.3 is 0.0125 from 0.3125 = 1/4 + 1/16: 125 sds at sigma 1e-4, so 7 doublings
    index, value = fixer.fix(torch.tensor([0.3]), torch.tensor([1e-4]), 1)
    assert value.tolist() == [0.3125] and fixer.threshold == 128.0


def test_the_reach_is_closed_at_both_ends():
    """A centre exactly ``threshold`` sds away is within reach, above and below: 1/2 is
    one sd of 1/16 above 7/16 and below 9/16 (all exact in floats)."""
    fixer = WeightFixer()
    index, value = fixer.fix(torch.tensor([0.4375, 0.5625]), torch.full((2,), 0.0625), 2)
    assert sorted(index.tolist()) == [0, 1] and value.tolist() == [0.5, 0.5]
    assert fixer.order == 1 and fixer.threshold == 1.0
    last = WeightFixer(max_order=1)  # the largest centre, 2^0, is reached like the others
    assert last.fix(torch.tensor([1.0]), torch.tensor([1e-3]), 1)[1].tolist() == [1.0]
    assert last.threshold == 1.0
    index, value = last.fix(torch.tensor([0.3]), torch.tensor([1e-3]), 0)  # none asked
    assert index.tolist() == [] and value.tolist() == []


def test_no_weight_is_fixed_farther_than_the_threshold():
    gen = torch.Generator().manual_seed(0)
    mu = 0.1 * torch.randn(20_000, generator=gen)
    sigma = 10 ** (-4 + 2.5 * torch.rand(20_000, generator=gen))
    fixer = WeightFixer()
    free = torch.arange(len(mu))
    for fraction in SCHEDULE:
        count = math.ceil(fraction * len(mu) - 1e-9) - (len(mu) - len(free))
        index, value = fixer.fix(mu[free], sigma[free], count)
        assert len(index) == count == len(index.unique())
        distance = (mu[free][index] - value).abs() / sigma[free][index]
        assert float(distance.max()) <= fixer.threshold * (1 + 1e-6)
        keep = torch.ones(len(free), dtype=torch.bool)
        keep[index] = False
        free = free[keep]
    assert len(free) == 0 and fixer.order == 4


# --------------------------------------------------------------------------- rounds


def test_unique_values_and_accounting_by_hand():
    means = {"0.weight": torch.tensor([[0.25, -0.5, 0.25], [0.0, 0.25, 0.1249]]),
             "1.weight": torch.tensor([[0.0, 0.0]])}
    module = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(2, 1, bias=False))
    qnet = pqnet.quantize(posterior_of(means, 1e-3, module), "pwfn", schedule=[1.0],
                          retrain_epochs=0)
    # values: 0.25 x3, 0.125 x1, -0.5 x1, 0 x3 (two in the second layer)
    assert qnet.unique_values == 4
    p = torch.tensor([3, 1, 1, 3]) / 8
    assert qnet.value_entropy_bits == pytest.approx(float(-(p * p.log2()).sum()))
    assert qnet.weights()["0.weight"].tolist() == [[0.25, -0.5, 0.25], [0.0, 0.25, 0.125]]
    # 4 values in the first layer (2 bits), one in the second (1 bit, the minimum)
    assert qnet.layer_bits == {"0": 2.0, "1": 1.0}
    assert qnet.avg_bits == (6 * 2 + 2 * 1) / 8
    assert qnet.sizes["codebooks"] == 4 * (4 + 1) and qnet.sizes["float"] == 0


def test_rounds_follow_the_schedule_and_end_in_codebook_values(digits, tmp_path):
    posterior, train, test = digits
    qnet = pqnet.quantize(posterior, "pwfn", data=train, retrain_epochs=1, lr=1e-2)
    total = posterior.num_weights - sum(v.numel() for k, v in posterior.loc.items()
                                        if k.endswith("bias"))
    rounds = qnet.config["rounds"]
    assert [r["fixed"] for r in rounds] == [math.ceil(f * total - 1e-9) / total
                                            for f in SCHEDULE]
    allowed = set(centres(4).tolist())
    for path, layer in qnet.layers.items():
        w = qnet.weights()[f"{path}.weight"]
        assert set(w.unique().tolist()) <= allowed
        assert set(w.unique().tolist()) == set(layer.codebooks[layer.widths[0]][0].tolist())
    assert qnet.unique_values == len(torch.cat([w.flatten() for w in qnet.weights().values()])
                                     .unique())
    loaded = QuantizedNet.load(qnet.save(tmp_path / "pwfn.pqn"), module=posterior.module)
    accuracy = pqnet.evaluate(loaded.to_module(), test)["accuracy"]
    assert accuracy > 0.85 and qnet.unique_values <= 64, (accuracy, qnet.unique_values)


def test_fixed_weights_do_not_move_while_the_rest_retrain(digits):
    posterior, train, _ = digits
    bnn = pqnet.bayesian(posterior.mean_module(), prior="pwfn")
    mask = torch.rand(32, 64, generator=torch.Generator().manual_seed(0)) < 0.5
    value = torch.where(torch.rand(32, 64) < 0.5, 0.125, -0.0625)
    bnn.fix("net.1.weight", mask, value)
    before = bnn.guide.loc_of("net.1.weight").detach().clone()
    after = pqnet.fit(bnn, train, epochs=1, lr=1e-2, kl_weight=1, seed=0, progress=False)
    assert torch.equal(after.loc["1.weight"][mask], value[mask])
    assert float(after.scale["1.weight"][mask].max()) == 2.0**-30
    assert float((after.loc["1.weight"][~mask] != before[~mask]).float().mean()) > 0.5


def test_resume_after_sigkill_ends_where_an_uninterrupted_run_ends(digits, tmp_path):
    """A run killed (SIGKILL) at the start of round 4's retraining resumes from the
    checkpoint of round 3 and ends bit-identical to a run that was never stopped."""
    posterior, train, _ = digits
    train = torch.utils.data.TensorDataset(*(t[:300] for t in train.tensors))
    posterior.save(tmp_path / "posterior.pt")
    torch.save(train.tensors, tmp_path / "train.pt")
    script = textwrap.dedent(f"""
        import os, signal, torch, pqnet
        from torch.utils.data import Dataset

        class KilledInRound4(Dataset):  # SIGKILLs its own process once round 3 is saved
            saved = None
            def __len__(self): return len(x)
            def __getitem__(self, i):
                if os.path.exists(CKPT) and os.stat(CKPT).st_mtime_ns != self.saved:
                    self.saved = os.stat(CKPT).st_mtime_ns
                    if len(torch.load(CKPT, weights_only=False)["rounds"]) == 3:
                        os.kill(os.getpid(), signal.SIGKILL)
                return x[i], y[i]

        CKPT = "{tmp_path}/ckpt/pwfn.pt"
        x, y = torch.load("{tmp_path}/train.pt")
        posterior = pqnet.Posterior.load("{tmp_path}/posterior.pt")
        pqnet.quantize(posterior, "pwfn", data=KilledInRound4(),
                       retrain_epochs=1, lr=1e-2, checkpoint_dir="{tmp_path}/ckpt")
    """)
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert child.returncode == -9, child.stderr
    state = torch.load(tmp_path / "ckpt" / "pwfn.pt", weights_only=False)
    assert len(state["rounds"]) == 3  # rounds 1-3 done: at most one round of work lost

    class Plain(torch.utils.data.Dataset):  # the same data through the same loader
        def __len__(self):
            return len(train)

        def __getitem__(self, i):
            return train[i]

    options = dict(data=Plain(), retrain_epochs=1, lr=1e-2)
    resumed = pqnet.quantize(posterior, "pwfn", checkpoint_dir=tmp_path / "ckpt", resume=True,
                             **options)
    fresh = pqnet.quantize(posterior, "pwfn", **options)
    for name, w in fresh.weights().items():
        assert torch.equal(resumed.weights()[name], w)
    for name, value in fresh.to_module().state_dict().items():
        assert torch.equal(resumed.to_module().state_dict()[name], value)
    assert [r["fixed"] for r in resumed.config["rounds"]] == \
        [r["fixed"] for r in fresh.config["rounds"]]
    with pytest.raises(ValueError, match="checkpoint_dir: .* already holds a PWFN checkpoint"):
        pqnet.quantize(posterior, "pwfn", checkpoint_dir=tmp_path / "ckpt", **options)
    with pytest.raises(ValueError, match="resume: .* other options"):
        pqnet.quantize(posterior, "pwfn", checkpoint_dir=tmp_path / "ckpt", resume=True,
                       **{**options, "threshold": 2.0})


def test_vit_tiny_weights_are_fixed_too():
    """Attention, MLP and patch-embedding weights are all Linear: PWFN fixes every one."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        vit = pqnet.models.vit_tiny(depth=1)
    posterior = pqnet.fit(pqnet.bayesian(vit, prior="pwfn", init_scale="pwfn"),
                          torch.utils.data.TensorDataset(torch.randn(32, 1, 28, 28),
                                                         torch.randint(0, 10, (32,))),
                          epochs=1, kl_weight=1, seed=0, progress=False)
    qnet = pqnet.quantize(posterior, "pwfn", retrain_epochs=0)
    assert set(qnet.layers) == {"embed", "blocks.0.attn.qkv", "blocks.0.attn.proj",
                                "blocks.0.mlp.0", "blocks.0.mlp.2", "head"}
    assert qnet.config["rounds"][-1]["fixed"] == 1.0


def test_the_retrained_bnn_starts_at_the_posterior_under_pwfns_prior():
    """Retraining starts from the posterior (means, scales, random biases, the likelihood
    and its noise) under PWFN's prior, anchored at the means with scale ``sigma_cap``."""
    from pqnet.bnn import PWFNPrior
    from pqnet.quantize.pwfn import _bnn_from
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    posterior = pqnet.Posterior.from_bnn(pqnet.bayesian(module, likelihood="normal",
                                                        noise=0.3, init_scale=0.02))
    bnn = _bnn_from(posterior, 0.07)
    assert bnn.prior == PWFNPrior(0.07)
    start = pqnet.Posterior.from_bnn(bnn)
    assert start.likelihood == posterior.likelihood
    assert start.likelihood["noise"] == pytest.approx(0.3)
    assert start.loc.keys() == posterior.loc.keys() == {"0.weight", "0.bias", "2.weight",
                                                        "2.bias"}
    for name in posterior.loc:
        assert torch.equal(start.loc[name], posterior.loc[name])
        assert torch.allclose(start.scale[name], posterior.scale[name], rtol=1e-5)
    unrecorded = pqnet.Posterior(posterior.loc, posterior.scale, posterior.layers, module, {})
    categorical = pqnet.Posterior.from_bnn(_bnn_from(unrecorded, 0.07))  # no record
    assert categorical.likelihood == {"kind": "categorical"}
    fixed_bias = pqnet.Posterior.from_bnn(pqnet.bayesian(module, bias=False))
    assert set(pqnet.Posterior.from_bnn(_bnn_from(fixed_bias, 0.07)).loc) \
        == {"0.weight", "2.weight"}  # biases that were not random stay so
    fixed_noise = pqnet.Posterior(posterior.loc, posterior.scale, posterior.layers, module,
                                  {"kind": "normal"})  # no noise recorded: 1
    assert pqnet.Posterior.from_bnn(_bnn_from(fixed_noise, 0.07)).likelihood["noise"] \
        == pytest.approx(1.0)


def test_a_round_whose_target_is_met_fixes_nothing_and_layers_keep_their_weights():
    """Three layers chosen from at once: each fixed weight is its own layer's (within the
    threshold of its own mean), and a round whose target is already met fixes no more."""
    from pqnet.quantize.pwfn import _bnn_from, _fix_round
    gen = torch.Generator().manual_seed(0)
    means = {f"{i}.weight": torch.randn(3, 3, generator=gen) for i in (0, 1, 2)}
    module = nn.Sequential(*(nn.Linear(3, 3, bias=False) for _ in range(3)))
    posterior = posterior_of(means, 0.05, module)
    bnn = _bnn_from(posterior, 0.05)
    fixer = WeightFixer(threshold=1.0)
    masks = {la: torch.zeros(3, 3, dtype=torch.bool) for la in ("0", "1", "2")}
    values = {la: torch.zeros(3, 3) for la in masks}
    _fix_round(fixer, bnn, masks, values, 20)
    assert sum(int(m.sum()) for m in masks.values()) == 20
    for la in masks:
        mu = means[f"{la}.weight"][masks[la]]
        assert bool(((mu - values[la][masks[la]]).abs() <= fixer.threshold * 0.05).all()), la
        fixed = pqnet.Posterior.from_bnn(bnn).loc[f"{la}.weight"]
        assert torch.equal(fixed[masks[la]], values[la][masks[la]])
    before = {la: m.clone() for la, m in masks.items()}
    _fix_round(fixer, bnn, masks, values, 15)  # already 20 fixed
    assert all(torch.equal(masks[la], before[la]) for la in masks)


def test_a_layer_holds_up_to_256_shared_values():
    from pqnet.quantize.pwfn import _shared_codebook_layer
    layer = _shared_codebook_layer(torch.arange(256.0).reshape(16, 16) / 128)
    assert layer.widths == [8] and torch.equal(layer.values(),
                                               torch.arange(256.0).reshape(16, 16) / 128)
    with pytest.raises(ValueError, match="^max_order: a layer uses 257 distinct values"):
        _shared_codebook_layer(torch.arange(257.0) / 128)


def test_pwfn_records_its_defaults(monkeypatch):
    import io

    from pqnet.quantize.pwfn import pwfn

    class Terminal(io.StringIO):  # progress bars show on a terminal only
        def isatty(self):
            return True

    posterior = one_layer(torch.tensor([[0.25, -0.5, 0.3], [0.1, 0.0, -0.2]]), 1e-2)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3), torch.tensor([0, 1] * 4))
    monkeypatch.setattr(sys, "stderr", Terminal())
    qnet = pwfn(posterior, data=data)  # quantize passes a seed
    assert sys.stderr.getvalue() == ""  # no progress bars unless asked
    pwfn(posterior, data=data, schedule=[0.5, 1.0], progress=True)
    assert "epoch" in sys.stderr.getvalue()
    assert {k: v for k, v in qnet.config.items() if k != "rounds"} == {
        "schedule": list(SCHEDULE), "max_order": 4, "threshold": 1.0, "widen": 2.0,
        "zero_below": None, "retrain_epochs": 1, "lr": 1e-3, "scale_lr": None,
        "batch_size": 64, "kl_weight": 1.0, "sigma_cap": 0.05, "seed": 0}
    assert len(qnet.config["rounds"]) == len(SCHEDULE)
    assert qnet.method == "pwfn"
    # retrained after every round but the last
    assert ["elbo" in r for r in qnet.config["rounds"]] == [True] * 9 + [False]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("options, argument", [
    ({"schedule": [0.5, 0.4, 1.0]}, "schedule: fractions must increase"),
    ({"schedule": [0.2, 0.9]}, "schedule: must end at 1"),
    ({"schedule": []}, "schedule: expected a non-empty"),
    ({"schedule": [0.0, 1.0]}, r"schedule: every fraction must lie in \(0, 1\]"),
    ({"schedule": [0.5, 1.5, 1.0]}, r"schedule: every fraction must lie in \(0, 1\]"),
    ({"schedule": [0.5, 0.5, 1.0]}, "schedule: fractions must increase strictly"),
    ({"schedule": {1.0}}, "schedule: expected a non-empty sequence"),
    ({"max_order": 0}, "max_order"),
    ({"max_order": 5}, "max_order"),
    ({"threshold": 0.0}, "threshold"),
    ({"widen": 1.0}, "widen"),
    ({"zero_below": -1.0}, "zero_below"),
    ({"retrain_epochs": 1}, "data: PWFN retrains"),
    ({"retrain_epochs": 1, "schedule": [0.5, 1.0]}, "data: PWFN retrains"),
    ({"resume": True}, "resume: needs checkpoint_dir"),
    ({"resume": "yes"}, "resume: expected True or False"),
    ({"kl_weight": 0.0}, "kl_weight: "),
    ({"lr": 0.0}, "lr: "),
    ({"scale_lr": 0.0}, "scale_lr: "),
    ({"sigma_cap": 0.0}, "sigma_cap: "),
    ({"batch_size": 0}, "batch_size: "),
    ({"batch_size": (1 << 30) + 1}, r"batch_size: .* 1\.\.1073741824"),
    ({"retrain_epochs": -1}, "retrain_epochs: "),
    ({"retrain_epochs": 10_001}, r"retrain_epochs: .* 0\.\.10000"),
    ({"avg_bits": 2.0}, "avg_bits: not a keyword of method 'pwfn'"),
])
def test_bad_options_name_the_argument(options, argument):
    posterior = one_layer(torch.tensor([[0.25, -0.5]]), 1e-2)
    options = {"retrain_epochs": 0, **options}
    with pytest.raises(ValueError, match=f"^{argument}"):
        pqnet.quantize(posterior, "pwfn", **options)


def test_zero_below_fixes_small_means_to_zero_before_the_first_round():
    """|mu| < zero_below (strictly) is fixed to 0 first and counts toward round 1, which
    then fixes no more; each round's record by hand."""
    posterior = one_layer(torch.tensor([[0.01, -0.02, 0.0625, 0.75]]), 1e-4)
    start = time.perf_counter()
    qnet = pqnet.quantize(posterior, "pwfn", schedule=[0.5, 1.0], retrain_epochs=0,
                          zero_below=0.0625)
    elapsed = time.perf_counter() - start
    assert qnet.weights()["0.weight"].tolist() == [[0.0, 0.0, 0.0625, 0.75]]
    rounds = [{k: v for k, v in r.items() if k != "seconds"} for r in qnet.config["rounds"]]
    assert rounds == [  # 0.75 = 1/2 + 1/4 needs order 2
        {"round": 1, "target": 0.5, "fixed": 0.5, "order": 1, "threshold": 1.0,
         "unique_values": 1},
        {"round": 2, "target": 1.0, "fixed": 1.0, "order": 2, "threshold": 1.0,
         "unique_values": 3}]
    assert all(0 <= r["seconds"] <= elapsed for r in qnet.config["rounds"])


def test_a_rounds_target_is_the_ceiling_of_its_fraction():
    """0.7 of 10 weights is 7 (0.7 * 10 is 7.000000000000001 in floats), 0.5 of 4 is 2,
    0.25 of 10 is 3."""
    for n, fraction, fixed in ((10, 0.7, 0.7), (4, 0.5, 0.5), (10, 0.25, 0.3)):
        posterior = one_layer(torch.arange(1.0, n + 1)[None] / 16, 1e-3)
        qnet = pqnet.quantize(posterior, "pwfn", schedule=[fraction, 1.0], retrain_epochs=0)
        assert qnet.config["rounds"][0]["fixed"] == fixed


@pytest.mark.parametrize("retrain, stop", [(False, 2), (True, 3), (True, 2)])
def test_a_run_stopped_between_rounds_resumes_with_the_rule_it_had_reached(tmp_path,
                                                                          monkeypatch, retrain,
                                                                          stop):
    """The fixer's order and threshold, its max_order, widen and largest centre come back
    on resume: an interrupted run ends where an uninterrupted one does. Without retraining
    the last round must loosen the rule further; with it, the retrained means could be
    reached by a rule tighter than the one the rounds had reached. Stopped in round 2 of
    3, the resumed run also retrains (seeded by its round) before its last round."""
    gen = torch.Generator().manual_seed(0)
    posterior = one_layer((3 * torch.rand(2, 6, generator=gen) - 1.5) * torch.tensor(2.0), 1e-3)
    data = torch.utils.data.TensorDataset(torch.randn(32, 6, generator=gen),
                                          torch.randint(0, 2, (32,), generator=gen))
    options = dict(schedule=[0.5, 1.0], max_order=2, widen=3.0, retrain_epochs=0)
    if retrain:
        options.update(schedule=[0.5, 0.75, 1.0], data=data, retrain_epochs=1, lr=0.05,
                       batch_size=8)
    whole = pqnet.quantize(posterior, "pwfn", checkpoint_dir=tmp_path / "whole", **options)
    real = PWFN_MODULE._fix_round

    started = []

    def stop_in_round(*args):
        started.append(1)
        if len(started) == stop:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(PWFN_MODULE, "_fix_round", stop_in_round)
    with pytest.raises(KeyboardInterrupt):
        pqnet.quantize(posterior, "pwfn", checkpoint_dir=tmp_path / "cut", **options)
    monkeypatch.setattr(PWFN_MODULE, "_fix_round", real)
    resumed = pqnet.quantize(posterior, "pwfn", checkpoint_dir=tmp_path / "cut", resume=True,
                             **options)
    assert torch.equal(resumed.weights()["0.weight"], whole.weights()["0.weight"])
    rounds = [{k: v for k, v in r.items() if k != "seconds"} for r in whole.config["rounds"]]
    assert [{k: v for k, v in r.items() if k != "seconds"}
            for r in resumed.config["rounds"]] == rounds
    assert rounds[0]["order"] == 2
    assert retrain or rounds[-1]["threshold"] > rounds[-2]["threshold"]


def test_each_retraining_runs_on_the_device_asked_for(monkeypatch):
    """Without a GPU the device cannot be seen in the result, so the fits are watched."""
    devices, real_fit = [], PWFN_MODULE.fit

    def watched(*args, **kwargs):
        devices.append(kwargs["device"])
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(PWFN_MODULE, "fit", watched)
    posterior = one_layer(torch.tensor([[0.25, -0.5], [0.3, 0.1]]), 1e-2)
    data = torch.utils.data.TensorDataset(torch.randn(8, 2), torch.tensor([0, 1] * 4))
    pqnet.quantize(posterior, "pwfn", data=data, schedule=[0.25, 0.5, 1.0], device="cpu")
    assert devices == [torch.device("cpu")] * 2  # after every round but the last


def test_each_retraining_is_pqnets_fit_with_pwfns_settings():
    """Between rounds the BNN is fitted by pqnet.fit for ``retrain_epochs`` epochs at a
    constant ``lr`` (``scale_lr`` for the scales), no warm start, seeded ``seed + r``:
    round 1's recorded ELBO and the final weights are those of that fit, written out."""
    from pqnet.quantize.pwfn import _bnn_from, _fix_round
    gen = torch.Generator().manual_seed(1)
    means = {"0.weight": torch.randn(3, 4, generator=gen), "1.weight": torch.randn(2, 3,
                                                                                  generator=gen)}
    with torch.random.fork_rng():
        torch.manual_seed(1)
        module = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Tanh(),
                               nn.Linear(3, 2, bias=False))
    posterior = posterior_of({"0.weight": means["0.weight"], "2.weight": means["1.weight"]},
                             0.05, module)
    data = torch.utils.data.TensorDataset(torch.randn(40, 4, generator=gen),
                                          torch.randint(0, 2, (40,), generator=gen))
    settings = dict(epochs=2, batch_size=8, lr=0.05, scale_lr=0.2, kl_weight=0.5)
    got = pqnet.quantize(posterior, "pwfn", data=data, schedule=[0.5, 1.0], seed=3,
                         retrain_epochs=2, sigma_cap=0.1,
                         **{k: v for k, v in settings.items() if k != "epochs"})
    bnn = _bnn_from(posterior, 0.1)
    fixer = WeightFixer(largest_exponent=1)  # the largest |mu| lies in (1, 2]
    assert 1 < float(max(m.abs().max() for m in means.values())) <= 2
    masks = {la: torch.zeros(posterior.loc[f"{la}.weight"].shape, dtype=torch.bool)
             for la in ("0", "2")}
    values = {la: torch.zeros(m.shape) for la, m in masks.items()}
    _fix_round(fixer, bnn, masks, values, math.ceil(0.5 * 18))
    fitted = pqnet.fit(bnn, data, seed=3, warm_start=0, lr_schedule="constant",
                       progress=False, **settings)
    assert got.config["rounds"][0]["elbo"] == fitted.history[-1]["elbo"]
    _fix_round(fixer, bnn, masks, values, 18)
    for la in masks:
        assert torch.equal(got.weights()[f"{la}.weight"], values[la])


def test_a_bad_device_is_named_before_any_round(monkeypatch):
    """Even where no retraining would run (one round, or none asked for)."""
    posterior = one_layer(torch.tensor([[0.25, -0.5]]), 1e-2)
    data = torch.utils.data.TensorDataset(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]))
    monkeypatch.setattr(PWFN_MODULE, "_fix_round", lambda *a: pytest.fail("a round ran"))
    for options in ({"schedule": [0.5, 1.0]}, {"schedule": [1.0]}, {"retrain_epochs": 0}):
        with pytest.raises(ValueError, match="^device: 'nonsense' is not a torch device"):
            pqnet.quantize(posterior, "pwfn", data=data, device="nonsense", **options)


def test_the_ends_of_each_range_are_accepted_and_recorded():
    posterior = one_layer(torch.tensor([[0.25, -0.5]]), 1e-2)
    ends = {"max_order": 1, "zero_below": 0.5, "scale_lr": 0.5, "batch_size": 1,
            "sigma_cap": 0.5, "kl_weight": 0.5, "lr": 0.5}
    for options in (ends, {"batch_size": 1 << 30, "retrain_epochs": 10_000}):
        qnet = pqnet.quantize(posterior, "pwfn", schedule=[1.0], **{"retrain_epochs": 0,
                                                                    **options})
        assert {k: qnet.config[k] for k in options} == options


def test_a_corrupt_checkpoint_names_the_folder(tmp_path):
    posterior = one_layer(torch.tensor([[0.25, -0.5]]), 1e-2)
    (tmp_path / "pwfn.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="^checkpoint_dir: "):
        pqnet.quantize(posterior, "pwfn", retrain_epochs=0, checkpoint_dir=tmp_path,
                       resume=True)


def test_the_centres_reach_the_largest_mean_and_no_further():
    """The powers of two go up to the one that covers the largest |mu| (here 4 for 3.0):
    means on centres are kept exactly; an all-zero posterior is all zeros; a weight at -1
    whose interval holds -2 stays at -1, its own mean, when |mu| <= 1 everywhere."""
    def fixed_at_once(weight, sigma, **options):  # one round, no retraining
        return pqnet.quantize(one_layer(weight, sigma), "pwfn", schedule=[1.0],
                              retrain_epochs=0, **options).weights()["0.weight"].tolist()

    assert fixed_at_once(torch.tensor([[3.0, -2.0, 0.5]]), 1e-3) == [[3.0, -2.0, 0.5]]
    assert fixed_at_once(torch.zeros(1, 3), 1e-3) == [[0.0, 0.0, 0.0]]
    assert fixed_at_once(torch.tensor([[2.0, -0.5]]), 1e-3, max_order=1) == [[2.0, -0.5]]
    assert fixed_at_once(torch.tensor([[-1.0]]), 1.5) == [[-1.0]]


def test_non_positive_scales_are_refused():
    posterior = one_layer(torch.tensor([[0.25, -0.5]]), 1e-2)
    posterior.scale["0.weight"][0, 1] = 0.0
    with pytest.raises(ValueError, match=r"^posterior: the scales of 0.weight must be positive"):
        pqnet.quantize(posterior, "pwfn", retrain_epochs=0)
