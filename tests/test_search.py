"""Bit-width search: spaces, the GP loop on a known optimum, budgets, seeds, resume, errors."""

import json
import math

import pytest
import torch

import pqnet
from pqnet.search import (
    BitSpace,
    QuantizedAccuracy,
    SearchResult,
    Trace,
    bayes_opt,
    objective_value,
    random_search,
    search,
    split_validation,
)
from pqnet.search.bo import candidates

EIGHT = tuple(range(1, 9))


# --------------------------------------------------------------------------- spaces


@pytest.mark.parametrize("kind", ["bezier", "chebyshev"])
@pytest.mark.parametrize("degree", [0, 1, 2, 3])
def test_curves_map_to_valid_per_layer_bits(kind, degree):
    space = BitSpace(tuple(f"l{i}" for i in range(7)), (10,) * 7, kind, degree)
    params, bits = space.grid()
    assert bits.shape == (len(params), 7) and bits.dtype == torch.int64
    assert int(bits.min()) >= 1 and int(bits.max()) <= 8
    assert len(torch.unique(bits, dim=0)) == len(bits)  # one parameter per allocation
    assert torch.equal(space.bits(params), bits)
    # any parameter, on the grid or not (a Chebyshev series may leave [1, 8]), is valid
    wild = torch.empty(200, space.dim, dtype=torch.float64).uniform_(-20, 20)
    assert set(space.bits(wild).unique().tolist()) <= set(EIGHT)
    if degree == 0:  # a constant curve: every allocation is uniform
        assert len(bits) == 8 and bool((bits == bits[:, :1]).all())


def test_curve_values_and_restricted_widths():
    line = BitSpace(("a", "b", "c", "d", "e"), (1,) * 5, "bezier", degree=1)
    assert line.bits(torch.tensor([8.0, 2.0])).tolist() == [8, 6, 5, 3, 2]  # ties to the smaller
    quad = BitSpace(("a", "b", "c"), (1,) * 3, "bezier", degree=2)
    assert quad.bits(torch.tensor([2.0, 8.0, 2.0])).tolist() == [2, 5, 2]  # B(1/2) = 5
    cheb = BitSpace(("a", "b", "c"), (1,) * 3, "chebyshev", degree=2)
    # 4 + 2 T_1(x) + 1 T_2(x) at x = -1, 0, 1: 4 - 2 + 1, 4 - 1, 4 + 2 + 1
    assert cheb.bits(torch.tensor([4.0, 2.0, 1.0])).tolist() == [3, 3, 7]
    sparse = BitSpace(("a", "b", "c", "d"), (1,) * 4, "bezier", degree=2, widths=[8, 2, 4])
    _, bits = sparse.grid()
    assert sparse.widths == (2, 4, 8) and set(bits.unique().tolist()) == {2, 4, 8}
    layers = BitSpace(("a", "b", "c"), (100, 300, 50))
    _, bits = layers.grid()
    assert len(bits) == 8 ** 3
    assert layers.avg_bits(torch.tensor([8, 2, 1])).item() == pytest.approx(
        (800 + 600 + 50) / 450)


def test_budget_filter_and_nearest_allocation():
    space = BitSpace(("a", "b", "c"), (100, 300, 50))
    _, bits = candidates(space, 2.0)
    assert len(bits) and bool((space.avg_bits(bits) <= 2.0 + 1e-9).all())
    row = space.nearest([9, 2, 1], bits)  # projected into the budget: the nearest in bits
    assert space.avg_bits(bits[row]) <= 2.0 and bits[row][1] <= 2


# --------------------------------------------------------------------------- the GP loop


OPTIMUM = (6, 2, 5)


def synthetic(bits: list[int], epochs: int) -> float:
    """A known optimum at OPTIMUM (avg 3.33 bits) at the top fidelity (3 epochs); the cheap
    fidelity (0 epochs) sees the same bowl lower and tilted along the first layer."""
    b = torch.tensor(bits, dtype=torch.float64)
    bowl = float(((b - torch.tensor(OPTIMUM)) ** 2 * torch.tensor([1.0, 2.0, 1.0])).sum())
    return 0.9 - bowl / 100 - (0.05 + 0.004 * bits[0]) * (epochs == 0)


def test_gp_prediction_finds_a_known_optimum(tmp_path):
    space = BitSpace(("a", "b", "c"), (100, 300, 50))  # 214 allocations within 4 bits
    trace = bayes_opt(synthetic, space, Trace("gp", {"top_fidelity": 3}, tmp_path / "t.json"),
                      fidelities=(0, 3), budget_epochs=13, max_avg_bits=4.0, n_init=4,
                      overhead_epochs=0.1, seed=0)
    assert trace.result["predicted"]["bits"] == list(OPTIMUM)  # the model's argmax
    assert trace.result["best"]["bits"] == list(OPTIMUM)  # and it was evaluated
    assert trace.total_cost <= 13 + 1e-9
    fidelities = [r["fidelity"] for r in trace.records]
    assert fidelities.count(0) > fidelities.count(3) > 1  # cheap queries inform the top one
    assert json.loads((tmp_path / "t.json").read_text())["evaluations"] == trace.records


# --------------------------------------------------------------------------- on digits


@pytest.fixture(scope="module")
def digits():
    """A tempered digits BNN (a few seconds) and its train / validation / test splits."""
    train, test = pqnet.data.load("digits")
    train, val = split_validation(train, 300, seed=0)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        bnn = pqnet.bayesian(pqnet.models.digits_cnn())
    posterior = pqnet.fit(bnn, train, epochs=4, batch_size=128, lr=1e-2, kl_weight=0.1,
                          warm_start=0, seed=0, progress=False)
    return posterior, train, val, test


SMALL = {"avg_bits": 2.0, "fidelities": (0, 1), "budget_epochs": 3.0, "n_init": 3,
         "top_every": 2, "seed": 3}


def _without_seconds(trace: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "search_seconds")}
            for r in trace["evaluations"]]


@pytest.fixture(scope="module")
def run(digits, tmp_path_factory):
    posterior, train, val, _ = digits
    path = tmp_path_factory.mktemp("search") / "trace.json"
    return search(posterior, train, val, trace_path=path, **SMALL), path


def test_search_meets_the_budget_and_returns_its_network(run, digits):
    result, path = run
    posterior, _, val, test = digits
    assert result.qnet.avg_bits <= 2.0
    assert all(r["avg_bits"] <= 2.0 for r in result.evaluations)
    assert result.cost <= 3.0 + 1e-9
    assert {p: round(b) for p, b in result.qnet.layer_bits.items()} == result.best_bits
    assert pqnet.evaluate(result.qnet.to_module(), val)["accuracy"] == result.best["accuracy"]
    assert pqnet.evaluate(result.qnet.to_module(), test)["accuracy"] > 0.5
    warm = pqnet.quantize(posterior, "quantile-inform", avg_bits=2.0)
    first = result.evaluations[0]  # the warm start: quantile-inform at the same budget
    assert first["source"] == "warm-start"
    assert first["bits"] == [round(b) for b in warm.layer_bits.values()]
    state = json.loads(path.read_text())
    assert state["format"] == "pqnet.search" and state["version"] == 1
    assert {"bits", "fidelity", "accuracy", "avg_bits", "cost", "params"} <= set(first)
    assert SearchResult.load(path).best == result.best


def test_same_seed_same_trace_and_resume_continues(run, digits, tmp_path):
    """An interrupted run (the file holds all but the last evaluation) resumed with the same
    seed: every stored decision is taken again (``Trace.evaluate`` refuses a different
    allocation or fidelity) and the last evaluation, run afresh, gives the same record."""
    result, path = run
    posterior, train, val, _ = digits
    state = json.loads(path.read_text())
    kept = len(state["evaluations"]) - 1
    assert kept > 5  # past the initial design: the GP's decisions are replayed too
    state["evaluations"], state["result"] = state["evaluations"][:kept], None
    cut = tmp_path / "cut.json"
    cut.write_text(json.dumps(state))
    resumed = search(posterior, train, val, trace_path=cut, resume=True, **SMALL)
    assert resumed.evaluations[:kept] == state["evaluations"]  # read, not re-run
    assert _without_seconds(resumed.trace) == _without_seconds(result.trace)
    assert torch.equal(resumed.qnet.weights()["conv1.weight"],
                       result.qnet.weights()["conv1.weight"])
    # a file whose settings match but whose decisions do not is another search: refused
    state["evaluations"][1]["fidelity"] += 1
    cut.write_text(json.dumps(state))
    with pytest.raises(ValueError, match="^trace_path: evaluation 1 .* not the same search"):
        search(posterior, train, val, trace_path=cut, resume=True, **SMALL)


def test_random_search_and_effective_objective(digits, tmp_path):
    posterior, train, val, _ = digits
    rand = random_search(posterior, train, val, avg_bits=2.0, fidelity=1, budget_epochs=3.5,
                         seed=0, trace_path=tmp_path / "random.json")
    assert len(rand.evaluations) == 3 and rand.cost == pytest.approx(3.3)
    assert all(r["fidelity"] == 1 and r["avg_bits"] <= 2.0 for r in rand.evaluations)
    assert rand.best_value == max(r["value"] for r in rand.evaluations)
    rand.plot(tmp_path / "plot.png", others={"again": rand})
    assert (tmp_path / "plot.png").stat().st_size > 0
    f = QuantizedAccuracy(posterior, train, val, avg_bits=2.0, objective="effective",
                          cost_per_bit=0.05)
    out = f([8, 8, 2, 8], 0)
    assert out["avg_bits"] > 2.0
    assert out["value"] == pytest.approx(out["accuracy"] - 0.05 * (out["avg_bits"] - 2.0))
    assert objective_value(0.9, 1.5, "effective", 2.0, 0.05) == 0.9
    assert objective_value(0.9, 3.0, "accuracy", 2.0, 0.05) == 0.9


# --------------------------------------------------------------------------- bad input


def test_bad_spaces_and_budgets():
    with pytest.raises(ValueError, match=r"^widths: the search space is empty"):
        BitSpace(("a",), (1,), widths=[])
    with pytest.raises(ValueError, match=r"^posterior: no quantized layers"):
        BitSpace((), ())
    with pytest.raises(ValueError, match=r"^widths: "):
        BitSpace(("a",), (1,), widths=[0, 9])
    with pytest.raises(ValueError, match=r"^space: unknown"):
        BitSpace(("a",), (1,), "spline")
    with pytest.raises(ValueError, match=r"^space: .* more than"):
        BitSpace(tuple("abcdefghij"), (1,) * 10)
    with pytest.raises(ValueError, match=r"^degree: "):
        BitSpace(("a",), (1,), "bezier", degree=-1)
    space = BitSpace(("a", "b"), (10, 30), widths=range(3, 9))
    with pytest.raises(ValueError, match=r"^avg_bits: no allocation .* fewest are 3\.0"):
        candidates(space, 2.5)
    with pytest.raises(ValueError, match=r"^avg_bits: no allocation"):
        bayes_opt(synthetic, space, Trace("gp", {}), budget_epochs=10, max_avg_bits=2.0)


@pytest.mark.parametrize("fidelities", [(0, 2, 1), (1, 1), (), (-1, 2), (0, 1.5), "012"])
def test_fidelities_must_increase(fidelities):
    space = BitSpace(("a", "b"), (10, 30))
    with pytest.raises(ValueError, match=r"^fidelities: "):
        bayes_opt(synthetic, space, Trace("gp", {}), fidelities=fidelities, budget_epochs=10)


def test_bad_search_arguments(digits, tmp_path):
    posterior, train, val, _ = digits
    space = BitSpace(("a", "b"), (10, 30))
    with pytest.raises(ValueError, match=r"^budget_epochs: the initial design"):
        bayes_opt(synthetic, space, Trace("gp", {}), fidelities=(0, 4), budget_epochs=3)
    for bad in (0, -1, math.inf, "10"):
        with pytest.raises(ValueError, match=r"^budget_epochs: "):
            bayes_opt(synthetic, space, Trace("gp", {}), budget_epochs=bad)
    with pytest.raises(ValueError, match=r"^objective: "):
        search(posterior, train, val, avg_bits=2.0, objective="loss")
    with pytest.raises(ValueError, match=r"^avg_bits: "):
        search(posterior, train, val, avg_bits=0.5)
    with pytest.raises(ValueError, match=r"^val_size: "):
        split_validation(train, len(train))
    with pytest.raises(ValueError, match=r"^trace_path: resume=True needs"):
        search(posterior, train, val, avg_bits=2.0, resume=True)


def test_bad_trace_files(digits, run, tmp_path):
    posterior, train, val, _ = digits
    _, good = run
    files = {"corrupt": "{not json", "foreign": json.dumps({"format": "other", "version": 1}),
             "version": json.dumps({**json.loads(good.read_text()), "version": 99})}
    for name, text in files.items():
        path = tmp_path / f"{name}.json"
        path.write_text(text)
        with pytest.raises(ValueError, match=r"^trace_path: "):
            search(posterior, train, val, trace_path=path, resume=True, **SMALL)
    with pytest.raises(ValueError, match=r"^trace_path: .*other settings \(seed differ"):
        search(posterior, train, val, trace_path=good, resume=True, **{**SMALL, "seed": 4})
    with pytest.raises(ValueError, match=r"^path: "):
        SearchResult.load(tmp_path / "corrupt.json")


# --------------------------------------------------------------------------- command line


def test_cli_search(digits, tmp_path, capsys):
    from pqnet.cli import main

    posterior, *_ = digits
    posterior.save(tmp_path / "posterior.pt")
    out = tmp_path / "search"
    argv = ["search", "--posterior", str(tmp_path / "posterior.pt"), "--data", "digits",
            "--avg-bits", "2", "--fidelities", "0,1", "--budget-epochs", "2.5",
            "--val-size", "300", "--random-budget", "2.3", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "gp" in printed and "random" in printed
    found = SearchResult.load(out / "trace.json").best_bits  # widths by layer name
    assert ("bits per layer: " + ", ".join(f"{k} {v}" for k, v in found.items())) in printed
    assert "bits per layer: conv1 " in printed
    for name in ("trace.json", "random_trace.json", "search.png", "gp_qnet.pqn",
                 "random_qnet.pqn"):
        assert (out / name).is_file(), name
    trace = SearchResult.load(out / "trace.json")
    assert trace.cost <= 2.5 and pqnet.QuantizedNet.load(out / "gp_qnet.pqn").avg_bits <= 2.0
    assert main([*argv[:8], "0,2,1", *argv[9:]]) == 2
    assert capsys.readouterr().err.startswith("pqnet search: error: --fidelities: ")
