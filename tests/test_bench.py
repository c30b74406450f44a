"""The quantization benchmark (pqnet.bench) on digits, shrunk to a few methods and budgets."""

from __future__ import annotations

import json
from functools import cache

import pytest
import torch

import pqnet
from pqnet.bench import brevitas_available, run_benchmark
from pqnet.cli import main
from pqnet.diagnostics.plots import pareto_front, pareto_plot, save_figure

ROW_KEYS = {"method", "budget", "size_bytes", "bits_per_weight", "accuracy", "nll", "ece",
            "code_entropy_bits", "avg_bits", "unique_values", "seconds", "layer_bits", "sizes",
            "file"}
METRIC_KEYS = {"accuracy", "nll", "ece"}


@cache
def has_brevitas() -> bool:
    """Asked when a test needs it, not at collection: importing brevitas takes seconds."""
    return brevitas_available() is None


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One small run: 2 epochs, three fast methods at two budgets, k-means at k=4, PWFN at
    one threshold, brevitas QAT at 2 bits (when brevitas imports); the quantized files are kept."""
    folder = tmp_path_factory.mktemp("bench")
    results = run_benchmark(
        "digits_cnn", "digits", epochs=2, lr=1e-2, seed=0, num_samples=4,
        methods=["uniform", "kmeans", "quantile-inform", "pwfn"], budgets=[1.5, 3],
        kmeans_ks=[4], brevitas_bits=[2], pwfn_epochs=1, pwfn_thresholds=[1.0],
        pwfn_retrain_epochs=1, json_path=folder / "out.json", plot_path=folder / "out.png",
        save_dir=folder / "q", log=lambda _: None)
    return results, folder


def test_json_schema(bench):
    results, folder = bench
    written = json.loads((folder / "out.json").read_text())
    assert written == json.loads(json.dumps(results))  # the JSON is the returned result
    assert {"model", "data", "seed", "epochs", "data_note", "float", "float_mean",
            "deterministic", "rows"} <= set(written)
    assert (written["model"], written["data"], written["seed"], written["epochs"]) == \
        ("digits_cnn", "digits", 0, 2)
    assert set(written["float"]) == METRIC_KEYS == set(written["float_mean"])
    assert set(written["deterministic"]) == METRIC_KEYS | {"seconds"}
    # nothing is skipped, but brevitas where it is not installed (make test installs it)
    assert [s.split(":")[0] for s in written["skipped"]] == ([] if has_brevitas() else
                                                             ["brevitas-qat"])
    rows = written["rows"]
    expected = [("uniform", 1.5), ("uniform", 3.0), ("kmeans", 2.0),
                ("quantile-inform", 1.5), ("quantile-inform", 3.0)]
    pwfn = rows[len(expected)]  # no bit budget: its budget is the bits it took
    expected.append(("pwfn", pwfn["avg_bits"]))
    assert pwfn["threshold"] == 1.0 and pwfn["unique_values"] <= 431  # order-4 centres
    assert set(written["pwfn_float_mean"]) == METRIC_KEYS
    if has_brevitas():
        expected.append(("brevitas-qat", 2.0))
    assert [(r["method"], r["budget"]) for r in rows] == expected
    for row in rows:
        assert ROW_KEYS <= set(row), row["method"]
        assert 0 <= row["accuracy"] <= 1 and row["nll"] > 0 and 0 <= row["ece"] <= 1
        assert row["size_bytes"] < written["float_size_bytes"]
        assert row["seconds"] >= 0 and row["unique_values"] >= 2
        assert set(row["layer_bits"]) == {"conv1", "conv2", "fc1", "fc2"}


def test_avg_bits_within_budget(bench):
    for row in bench[0]["rows"]:
        if row["method"] == "brevitas-qat":
            assert row["avg_bits"] == row["budget"] == 2
        else:
            assert row["avg_bits"] <= row["budget"] + 1e-9, row
    uniform = [r for r in bench[0]["rows"] if r["method"] == "uniform"]
    assert [r["avg_bits"] for r in uniform] == [1.0, 3.0]  # floor(budget) bits


def test_rows_measure_the_loaded_copy(bench):
    results, folder = bench
    _, test = pqnet.data.load("digits")
    for row in results["rows"]:
        loaded = pqnet.QuantizedNet.load(folder / "q" / row["file"])
        assert pqnet.evaluate(loaded.to_module(), test)["accuracy"] == row["accuracy"]
        assert (loaded.avg_bits, loaded.unique_values) == (row["avg_bits"], row["unique_values"])
        # every row, brevitas's too: the size is the saved file's length
        assert (folder / "q" / row["file"]).stat().st_size == row["size_bytes"]
        assert row["bits_per_weight"] == 8 * row["size_bytes"] / loaded.num_weights


def test_brevitas_export_matches_brevitas(bench):
    if not has_brevitas():
        pytest.skip("brevitas is not importable")
    row = next(r for r in bench[0]["rows"] if r["method"] == "brevitas-qat")
    assert row["accuracy"] == row["qat_module_accuracy"]
    assert row["unique_values"] <= 4 * 3 + 1  # 4 layers of ternary weights sharing 0
    # per-tensor scale: one codebook row of 4 float32 values (scale * -2..1) per layer
    loaded = pqnet.QuantizedNet.load(bench[1] / "q" / row["file"])
    assert loaded.sizes["codebooks"] == 4 * 4 * 4


def test_pareto_plot_from_json(bench, tmp_path):
    _, folder = bench
    assert (folder / "out.png").read_bytes().startswith(b"\x89PNG")
    results = json.loads((folder / "out.json").read_text())
    path = save_figure(pareto_plot(results), tmp_path / "again.png")
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(b"\x89PNG")
    assert pareto_front([(1, 0.5), (2, 0.4), (2, 0.9), (3, 0.8), (4, 0.95)]) == \
        [(1, 0.5), (2, 0.9), (4, 0.95)]


def test_cli_bad_model(tmp_path, capsys):
    status = main(["bench", "--model", "nope", "--data", "digits",
                   "--json", str(tmp_path / "out.json")])
    assert status == 2
    assert "model" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def test_bad_arguments():
    with pytest.raises(ValueError, match="methods"):
        run_benchmark("digits_cnn", "digits", methods=["nope"])
    with pytest.raises(ValueError, match="budgets"):
        run_benchmark("digits_cnn", "digits", budgets=[0.5])
    with pytest.raises(ValueError, match="data"):
        run_benchmark("digits_cnn", "nope")
    for bad, name in (({"epochs": 0}, "epochs"), ({"num_samples": 0}, "num_samples"),
                      ({"finetune_epochs": -1}, "finetune_epochs"),
                      ({"pwfn_retrain_epochs": -1}, "pwfn_retrain_epochs"),
                      ({"bnn_init": "pretrained"}, "bnn_init"), ({"bnn_epochs": 0}, "bnn_epochs")):
        with pytest.raises(ValueError, match=f"^{name}: "):
            run_benchmark("digits_cnn", "digits", **bad)


def test_rows_name_the_pruning_and_fine_tuning_they_got(tmp_path):
    """Options reach every method but the ones that retrain their own weights, and each row
    and file says what was done to it."""
    from pqnet.bench import quantized_rows, row_label
    from tests.test_quantize import make_posterior

    torch.manual_seed(0)
    data = pqnet.data.load("digits", split="test")  # small: 450 images
    posterior = make_posterior(pqnet.models.for_data("digits_cnn", data.input_shape,
                                                     data.num_classes))
    rows = quantized_rows(posterior, data, data, methods=["deep-compression", "uniform"],
                          budgets=[2.0], kmeans_ks=[], folder=tmp_path, log=lambda _: None,
                          prune_fraction=0.5, finetune_epochs=1)
    deep, uniform = rows
    assert "prune_fraction" not in deep and "finetune_epochs" not in deep
    assert row_label(deep) == "deep-compression" and deep["file"] == "deep-compression.pqn"
    assert (uniform["prune_fraction"], uniform["finetune_epochs"]) == (0.5, 1)
    assert row_label(uniform) == "uniform, pruned 0.5, fine-tuned 1"
    assert uniform["file"] == "uniform_b2_p0.5.pqn" and (tmp_path / uniform["file"]).is_file()
