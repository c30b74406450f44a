"""Quantizers, QuantizedNet accounting and files: budgets, exactness, round trips, errors."""

import inspect
import math

import pytest
import torch
from torch import nn

import pqnet
from pqnet.bnn import LayerInfo
from pqnet.quantize import METHODS, QuantizedLayer, QuantizedNet, budget_keywords
from pqnet.quantize.grids import grid_quantize
from pqnet.quantize.sigma_bits import sigma_bits

# random-bits: see the digits tests; pwfn has no bit budget (tests/test_pwfn.py)
# the data-free methods with an avg_bits budget (sigma-code's is code_bits: its own tests)
DATA_FREE = [m for m in METHODS
             if m not in ("random-bits", "pwfn", "sigma-code", "deep-compression")]


def make_posterior(module: nn.Module, scale: dict[str, torch.Tensor] | None = None,
                   seed: int = 0) -> pqnet.Posterior:
    """A Posterior over the Linear/Conv weights of ``module`` (biases stay point estimates),
    built directly as ``Posterior.from_bnn`` would; scales log-uniform in [1e-3, 1e-1]."""
    gen = torch.Generator().manual_seed(seed)
    layers, loc = {}, {}
    for path, layer in module.named_modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            name = f"{path}.weight" if path else "weight"
            loc[name] = layer.weight.detach().clone()
            layers[path] = LayerInfo(path, type(layer).__name__, tuple(layer.weight.shape),
                                     layer.weight[0].numel(), False)
    if scale is None:
        scale = {k: 10 ** (-3 + 2 * torch.rand(v.shape, generator=gen)) for k, v in loc.items()}
    return pqnet.Posterior(loc, scale, layers, module)


def small_net(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                             nn.Linear(4 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 3))


@pytest.fixture(scope="module")
def small():
    return make_posterior(small_net())


@pytest.fixture(scope="module")
def digits():
    """A BNN fitted to scikit-learn digits in a few seconds (tempered, kl_weight=0.1)."""
    train, test = pqnet.data.load("digits")
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the network's initial weights
        bnn = pqnet.bayesian(pqnet.models.digits_cnn())
    posterior = pqnet.fit(bnn, train, epochs=6, batch_size=128, lr=1e-2, kl_weight=0.1,
                          warm_start=0, seed=0, progress=False)
    float_accuracy = pqnet.evaluate(posterior.mean_module(), test)["accuracy"]
    return posterior, test, float_accuracy, train


# --------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("method", DATA_FREE)
@pytest.mark.parametrize("avg_bits", [1.0, 1.5, 2.0, 3.0, 4.5, 8.0])
def test_every_method_meets_its_budget(small, method, avg_bits):
    qnet = pqnet.quantize(small, method, avg_bits=avg_bits)
    assert 1.0 <= qnet.avg_bits <= avg_bits
    assert qnet.method == method and qnet.config["avg_bits"] == avg_bits
    assert set(qnet.layers) == set(small.layers)
    if method == "uniform":
        assert qnet.avg_bits == math.floor(avg_bits)
    if method == "kmeans":  # a layer of n < k distinct weights needs only ceil(log2 n) bits
        for path, layer in qnet.layers.items():
            clusters = min(2 ** math.floor(avg_bits), layer.numel)
            assert qnet.layer_bits[path] == math.ceil(math.log2(clusters))


def test_sigma_bits_budget_is_met_as_closely_as_k_allows(small):
    for avg_bits in (1.7, 2.5, 3.3):
        qnet = sigma_bits(small, avg_bits=avg_bits)
        k = qnet.config["k"]
        # the solved k is the smallest that meets the budget: a hair less does not
        assert sigma_bits(small, k=k).avg_bits == qnet.avg_bits
        assert sigma_bits(small, k=k * (1 - 1e-6)).avg_bits > avg_bits


def test_budget_solvers_hit_the_best_allocation_below(small):
    # at k -> 0 sigma-bits needs many bits; the budget search returns the richest feasible
    richest = sigma_bits(small, k=0.0).avg_bits
    assert sigma_bits(small, avg_bits=richest).avg_bits == richest
    fewest_bc = pqnet.quantize(small, "bayesian-compression", avg_bits=1.0)
    assert fewest_bc.avg_bits == 1.0


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("method", DATA_FREE)
@pytest.mark.parametrize("per_channel", [False, True])
def test_weights_are_codebook_values_and_the_module_holds_them(small, method, per_channel):
    options = {} if method == "kmeans" else {"per_channel": per_channel}
    qnet = pqnet.quantize(small, method, avg_bits=3.0, **options)
    weights = qnet.weights()
    state = qnet.to_module().state_dict()
    for path, layer in qnet.layers.items():
        w = weights[f"{path}.weight"]
        assert torch.equal(state[f"{path}.weight"], w)
        rows = torch.arange(w.shape[0]).reshape(-1, *[1] * (w.dim() - 1)).expand_as(w)
        for width, levels in layer.codebooks.items():
            mask = layer.bits == width
            book_rows = rows[mask] if levels.shape[0] > 1 else torch.zeros_like(rows[mask])
            # each weight equals an entry of its own row of its own width's codebook
            assert bool((w[mask][:, None] == levels[book_rows]).any(1).all())
            assert levels.shape[1] <= 2 ** width
    for name, value in small.module.state_dict().items():  # biases, BatchNorm untouched
        if name not in weights:
            assert torch.equal(state[name], value)


def test_symmetric_grid_rounds_to_nearest_level_within_half_a_step():
    w = torch.randn(5, 7, generator=torch.Generator().manual_seed(3))
    for bits in range(2, 9):
        codes, values, scale = grid_quantize(w, bits)
        step = 2 * float(scale) / (2 ** bits - 1)
        assert float((values - w).abs().max()) <= step / 2 * (1 + 1e-5)
        assert values.unique().numel() <= 2 ** bits
    _, one_bit, scale = grid_quantize(w, 1)
    assert torch.allclose(scale, w.abs().mean().reshape(1))
    assert torch.equal(one_bit, torch.where(w >= 0, scale, -scale))


def test_kmeans_shares_k_values_per_layer_and_is_seeded(small):
    qnet = pqnet.quantize(small, "kmeans", k=5)
    for layer in qnet.layers.values():
        assert layer.widths == [3] and layer.values().unique().numel() <= 5
    a = pqnet.quantize(small, "kmeans", k=6, init="k-means++", seed=4)
    b = pqnet.quantize(small, "kmeans", k=6, init="k-means++", seed=4)
    for path in a.layers:
        assert torch.equal(a.layers[path].codebooks[3], b.layers[path].codebooks[3])


# --------------------------------------------------------------------------- sigma-bits


def test_sigma_bits_lower_scale_never_gets_fewer_bits(small):
    gen = torch.Generator().manual_seed(1)
    shrink = {k: torch.rand(v.shape, generator=gen) for k, v in small.scale.items()}
    sharper = make_posterior(small.module, {k: v * shrink[k] for k, v in small.scale.items()})
    for k in (0.3, 1.0, 3.0):
        base, sharp = sigma_bits(small, k=k), sigma_bits(sharper, k=k)
        for path in base.layers:
            assert bool((sharp.layers[path].bits >= base.layers[path].bits).all())
    # and a looser tolerance never gives more bits
    loose, tight = sigma_bits(small, k=2.0), sigma_bits(small, k=0.5)
    for path in loose.layers:
        assert bool((tight.layers[path].bits >= loose.layers[path].bits).all())


def test_sigma_bits_rounding_error_is_within_k_sigma(small):
    k = 0.8
    qnet = sigma_bits(small, k=k)
    for path, layer in qnet.layers.items():
        mu, sigma = small.loc[f"{path}.weight"], small.scale[f"{path}.weight"]
        err = (layer.values() - mu).abs()
        below_max = layer.bits < 8  # 8 bits is the fallback, whatever its error
        assert bool((err[below_max] <= k * sigma[below_max]).all())
        assert len(layer.widths) > 1  # the random scales spread the widths


# --------------------------------------------------------------------------- accounting


def test_mixed_widths_decode_by_hand():
    codes = torch.tensor([[1, 0, 3], [0, 5, 2]], dtype=torch.uint8)
    bits = torch.tensor([[1, 1, 2], [2, 3, 3]], dtype=torch.uint8)
    scales = {1: torch.tensor([0.5]), 2: torch.tensor([0.9]), 3: torch.tensor([0.9])}
    qnet = QuantizedNet({"": QuantizedLayer.from_grid(codes, bits, scales)}, nn.Linear(3, 2),
                        "by-hand")
    assert qnet.avg_bits == 2.0 and qnet.layer_bits == {"": 2.0}
    levels_3 = 0.9 * torch.linspace(-1, 1, 8)
    expected = torch.tensor([[0.5, -0.5, 0.9], [-0.9, float(levels_3[5]), float(levels_3[2])]])
    assert torch.equal(qnet.weights()["weight"], expected)
    summary = qnet.summary()[0]
    assert {k: summary[k] for k in ("layer", "weight", "shape", "bits", "widths",
                                    "codebook_size", "unique_values")} == {
        "layer": "", "weight": "weight", "shape": (2, 3), "bits": 2.0, "widths": [1, 2, 3],
        "codebook_size": 2 + 4 + 8, "unique_values": 6}


def test_the_float_rest_is_stored_raw_batchnorm_and_biases_included(small):
    qnet = pqnet.quantize(small, "uniform", bits=4)
    rest = [v for k, v in small.module.state_dict().items()
            if k not in ("0.weight", "4.weight", "6.weight")]
    # float32 biases and BatchNorm, and BatchNorm's int64 step count at 8 bytes
    assert qnet.sizes["float"] == sum(v.numel() * v.element_size() for v in rest)
    assert any(v.dtype == torch.int64 for v in rest)


def test_unique_values_and_entropy_by_hand():
    layer = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 1.0]]))
    posterior = make_posterior(layer)
    # 1 bit: levels +-mean|w| = +-0.875; values (+, -, +, +): p = (3/4, 1/4)
    one = pqnet.quantize(posterior, "uniform", bits=1)
    assert one.unique_values == 2
    expected = -(0.75 * math.log2(0.75) + 0.25 * math.log2(0.25))
    assert one.value_entropy_bits == pytest.approx(expected)
    # 2 bits: levels -1, -1/3, 1/3, 1; values (1, -1, 1/3, 1): p = (1/2, 1/4, 1/4)
    two = pqnet.quantize(posterior, "uniform", bits=2)
    assert two.unique_values == 3 and two.value_entropy_bits == pytest.approx(1.5)
    assert torch.allclose(two.weights()["weight"], torch.tensor([[1.0, -1.0], [1 / 3, 1.0]]))


# --------------------------------------------------------------------------- files


def assert_same(a: QuantizedNet, b: QuantizedNet, x: torch.Tensor) -> None:
    assert (a.method, a.config, a.size_bytes, a.avg_bits) == (b.method, b.config, b.size_bytes,
                                                              b.avg_bits)
    for path, layer in a.layers.items():
        other = b.layers[path]
        assert torch.equal(layer.codes, other.codes) and torch.equal(layer.bits, other.bits)
        assert layer.widths == other.widths
        for width in layer.widths:
            assert torch.equal(layer.codebooks[width], other.codebooks[width])
    for name, value in a.to_module().state_dict().items():
        assert torch.equal(value, b.to_module().state_dict()[name])
    with torch.no_grad():
        assert torch.equal(a.to_module().eval()(x), b.to_module().eval()(x))


# --------------------------------------------------------------------------- bad input


def test_unknown_method_names_the_argument_and_the_known_ones(small):
    with pytest.raises(ValueError, match="method: unknown quantizer 'jpeg'.*uniform.*kmeans"):
        pqnet.quantize(small, "jpeg", avg_bits=3)


@pytest.mark.parametrize("method, budget, argument", [
    ("uniform", {"k": 4}, "k"),
    ("bayesian-compression", {"bits": 4}, "bits"),
    ("uniform", {"bits": 9}, "bits"),
    ("uniform", {"bits": 0}, "bits"),
    ("uniform", {"bits": 2.5}, "bits"),
    ("uniform", {"bits": 2, "avg_bits": 2}, "bits / avg_bits"),
    ("uniform", {}, "bits / avg_bits"),
    ("kmeans", {"k": 1}, "k"),
    ("kmeans", {"k": 300}, "k"),
    ("kmeans", {"k": 4, "init": "random"}, "init"),
    ("sigma-bits", {"k": -1.0}, "k"),
    ("sigma-bits", {"k": float("inf")}, "k"),
    ("quantile-inform", {"avg_bits": 3, "q": 0.0}, "q"),
    ("quantile-inform", {"avg_bits": 3, "per_channel": "yes"}, "per_channel"),
])
def test_bad_budgets_name_the_argument(small, method, budget, argument):
    with pytest.raises(ValueError, match=f"^{argument}:"):
        pqnet.quantize(small, method, **budget)


@pytest.mark.parametrize("method", DATA_FREE)
@pytest.mark.parametrize("avg_bits", [0.5, 0.0, -2.0, float("nan"), float("inf"), "3"])
def test_impossible_or_non_finite_budgets_name_avg_bits(small, method, avg_bits):
    with pytest.raises(ValueError, match="^avg_bits:"):
        pqnet.quantize(small, method, avg_bits=avg_bits)


def test_not_a_posterior_and_bad_seed(small):
    with pytest.raises(TypeError, match="posterior"):
        pqnet.quantize(small_net(), "uniform", bits=2)
    with pytest.raises(ValueError, match="seed"):
        pqnet.quantize(small, "kmeans", k=4, seed="0")


def test_every_method_has_the_common_signature():
    for method, function in METHODS.items():
        params = inspect.signature(function).parameters
        first, data, seed = (params[name] for name in ("posterior", "data", "seed"))
        assert first.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        assert (data.kind, data.default) == (inspect.Parameter.KEYWORD_ONLY, None)
        assert (seed.kind, seed.default) == (inspect.Parameter.KEYWORD_ONLY, 0)
        assert "avg_bits" in budget_keywords(method) or \
            method in ("pwfn", "sigma-code", "deep-compression")


# --------------------------------------------------------------------------- real data


def test_methods_on_the_digits_bnn(digits, tmp_path):
    posterior, test, float_accuracy, train = digits
    assert float_accuracy > 0.95
    for method in DATA_FREE + ["random-bits"]:
        assert pqnet.quantize(posterior, method, data=train, avg_bits=3.0).avg_bits <= 3.0
    # quantile-inform at 4 bits keeps the float mean network's accuracy within 2 pp
    qi = pqnet.quantize(posterior, "quantile-inform", avg_bits=4.0)
    assert qi.avg_bits <= 4.0
    accuracy = pqnet.evaluate(qi.to_module(), test)["accuracy"]
    assert accuracy >= float_accuracy - 0.02
    # and the accuracy is measured on the loaded copy: it is the same
    loaded = QuantizedNet.load(qi.save(tmp_path / "qi.pqn"))
    assert pqnet.evaluate(loaded.to_module(), test)["accuracy"] == accuracy
    assert_same(qi, loaded, test.x[:64])


def test_random_bits_meets_the_budget_is_seeded_and_needs_data(digits):
    posterior, test, float_accuracy, train = digits
    was_training = posterior.module.training
    runs = [pqnet.quantize(posterior, "random-bits", data=train, avg_bits=budget, steps=15,
                           seed=seed) for budget, seed in [(2.0, 0), (2.0, 0), (4.0, 1)]]
    assert all(q.avg_bits <= b for q, b in zip(runs, [2.0, 2.0, 4.0], strict=True))
    assert runs[0].layer_bits == runs[1].layer_bits  # the same seed, the same widths
    assert posterior.module.training == was_training  # the caller's module is left alone
    probabilities = runs[0].config["bit_probabilities"]
    # eight probabilities, each rounded to 1e-6 in the record
    assert all(abs(sum(p) - 1) <= 4e-6 + 1e-12 for p in probabilities.values())
    accuracy = pqnet.evaluate(runs[2].to_module(), test)["accuracy"]
    assert accuracy >= float_accuracy - 0.03
    with pytest.raises(ValueError, match="^data: random-bits needs the training data"):
        pqnet.quantize(posterior, "random-bits", avg_bits=2.0)
    with pytest.raises(ValueError, match="^forgetting:"):
        pqnet.quantize(posterior, "random-bits", data=train, avg_bits=2.0, forgetting=0.2)


def test_random_bits_gives_the_narrow_posterior_more_bits():
    """Two identical layers of a linear classifier, one with a posterior 100x wider: extra
    bits buy the wide one nothing (its draws are noise either way), so it gets fewer."""
    from pqnet.quantize.random_bits import random_bits

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 1, 4, 4, generator=gen)
    teacher = torch.randn(2, 16, generator=gen)
    y = (x.flatten(1) @ teacher.T).argmax(1)
    module = nn.Sequential(nn.Flatten(), nn.Linear(16, 16), nn.Linear(16, 2))
    with torch.no_grad():
        module[1].weight.copy_(torch.eye(16) + 0.1 * torch.randn(16, 16, generator=gen))
        module[2].weight.copy_(teacher)
    posterior = make_posterior(module, scale={"1.weight": torch.full((16, 16), 0.5),
                                              "2.weight": torch.full((2, 16), 0.005)})
    data = torch.utils.data.TensorDataset(x, y)
    qnet = random_bits(posterior, data=data, avg_bits=4.0, steps=20)
    assert qnet.layer_bits["2"] > qnet.layer_bits["1"]


def _greedy_widths(log_q: list[list[float]], sizes: list[int], budget: float) -> list[int]:
    """Random Bits' rule, written out: each layer's mode, then, while over the budget, one
    bit off the layer whose step down loses the least log-probability per weight (the first
    of equals; never below 1 bit)."""
    bits = [max(range(8), key=lambda b, q=q: (q[b], -b)) + 1 for q in log_q]
    while sum(b * n for b, n in zip(bits, sizes, strict=True)) > budget * sum(sizes) + 1e-9:
        costs = [(q[b - 1] - q[b - 2]) / n if b > 1 else math.inf
                 for q, b, n in zip(log_q, bits, sizes, strict=True)]
        bits[costs.index(min(costs))] -= 1
    return bits


def test_random_bits_widths_are_the_modes_lowered_by_the_cheapest_bit():
    from pqnet.quantize.random_bits import most_probable_within

    gen = torch.Generator().manual_seed(0)
    for trial in range(300):
        layers = 1 + trial % 4
        logits = 3 * torch.randn(layers, 8, generator=gen, dtype=torch.float64)
        sizes = torch.randint(1, 6 if trial % 2 else 500, (layers,), generator=gen).double()
        budget = 1 + 7 * float(torch.rand(1, generator=gen))
        got = most_probable_within(logits, sizes, budget)
        expected = _greedy_widths(logits.log_softmax(-1).tolist(), sizes.int().tolist(), budget)
        assert got.tolist() == expected, (logits, sizes, budget)
    # a budget the modes meet exactly keeps them
    logits = torch.zeros(2, 8, dtype=torch.float64)
    logits[0, 2] = logits[1, 4] = 5.0  # modes 3 and 5 bits
    for sizes in ([10.0, 30.0], [1e7, 3e7]):  # the big ones: 1e-9 is below float64's step
        assert most_probable_within(logits, torch.tensor(sizes), 4.5).tolist() == [3, 5]


def test_finetuning_keeps_the_codebooks_and_recovers_accuracy(digits):
    posterior, test, float_accuracy, train = digits
    before = pqnet.quantize(posterior, "uniform", bits=1)
    after = pqnet.quantize(posterior, "uniform", bits=1, data=train, finetune_epochs=2)
    for path, layer in after.layers.items():
        assert torch.equal(layer.bits, before.layers[path].bits)
        for width, levels in layer.codebooks.items():
            assert torch.equal(levels, before.layers[path].codebooks[width])
        assert torch.equal(after.to_module().get_submodule(path).weight, layer.values())
    assert after.config["finetune"]["epochs"] == 2 and after.avg_bits == 1.0
    accuracy = [pqnet.evaluate(q.to_module(), test)["accuracy"] for q in (before, after)]
    assert accuracy[1] > accuracy[0] + 0.1  # 1-bit rounding costs ~30 pp; retraining wins most
    with pytest.raises(ValueError, match="^data: fine-tuning"):
        pqnet.quantize(posterior, "uniform", bits=1, finetune_epochs=1)
    with pytest.raises(ValueError, match="^finetune_epochs:"):
        pqnet.quantize(posterior, "uniform", bits=1, data=train, finetune_epochs=-1)
    with pytest.raises(ValueError, match="^finetune_lr:"):
        pqnet.quantize(posterior, "uniform", bits=1, finetune_lr="fast")


def test_encode_is_nearest_level_rounding(small):
    for method in ("uniform", "kmeans", "sigma-bits"):
        qnet = pqnet.quantize(small, method, avg_bits=2.0)
        for path, layer in qnet.layers.items():
            assert torch.equal(layer.encode(small.loc[f"{path}.weight"]), layer.codes)
