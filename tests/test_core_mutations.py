"""Known answers for pqnet's core arithmetic: the tests that kill the mutants `make mutation`
found alive (see TESTING.md).

Every expected value here is computed by hand or in closed form, never by the code under
test: the atomic write keeps the old file when the serialiser fails mid-write; each budget
rule at its boundary; each byte of a layer's accounting; HDI coverage and z-scores weighted
by the number of weights; the mutual information, ECE, KL and AUROC of cases small enough to
work out on paper.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import stat
import warnings

import numpy as np
import pyro
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import pqnet
from pqnet import _checks
from pqnet._io import atomic_write, load_json, load_torch, save_json, save_torch
from pqnet.bnn import LayerInfo
from pqnet.diagnostics.analysis import (
    DiagnosticWarning,
    analyze,
    bits_sigma_correlation,
    entropy_auroc,
    hdi_coverage,
    layer_table,
    predictive_divergence,
    prior_movement,
    reliability,
    z_scores,
)
from pqnet.diagnostics.metrics import classification_metrics, entropy, expected_calibration_error
from pqnet.quantize import QuantizedLayer, QuantizedNet
from pqnet.quantize.budget import layer_posteriors, meet_budget, one_of
from tests.test_compression import linear_posterior
from tests.test_quantize import make_posterior

# --------------------------------------------------------------------------- atomic writes


class FailsMidWrite:
    """Pickles as a few bytes, then raises: a serialiser that dies half-way through."""

    def __reduce__(self):
        raise RuntimeError("serialiser failed")


def test_failed_write_keeps_the_old_file_whole_and_leaves_no_litter(tmp_path):
    path = tmp_path / "result.pt"
    save_torch({"format": "t", "version": 1, "x": torch.arange(5)}, path)
    before = path.read_bytes()

    def write(tmp):
        # the temporary file is hidden, beside the target (same file system: the rename is
        # atomic) and named after it, so a reader or a cleaner can tell it apart
        assert tmp.parent == path.parent
        assert tmp.name.startswith(".result.pt.") and tmp.name.endswith(".tmp")
        with open(tmp, "wb") as f:
            f.write(b"half a file")  # bytes reach the temporary file ...
            f.flush()
            raise OSError("disk full")  # ... then the write fails

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, write)
    assert path.read_bytes() == before
    with pytest.raises(RuntimeError, match="serialiser failed"):
        save_torch({"format": "t", "version": 1, "x": [1, 2, FailsMidWrite()]}, path)
    assert path.read_bytes() == before
    assert torch.equal(load_torch(path, "test", "t", 1)["x"], torch.arange(5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.pt"]  # no .tmp left


def test_interrupt_during_write_also_keeps_the_old_file(tmp_path):
    """KeyboardInterrupt is a BaseException, not an Exception: it must not leave litter."""
    path = tmp_path / "a.json"
    save_json({"a": 1}, path)

    def write(tmp):
        tmp.write_text('{"a": ')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, write)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_the_writers_own_error_propagates_even_when_it_removed_the_temporary_file(tmp_path):
    def write(tmp):
        tmp.unlink()
        raise OSError("the serialiser's own error")

    with pytest.raises(OSError, match="^the serialiser's own error$"):
        atomic_write(tmp_path / "x.bin", write)
    assert not list(tmp_path.iterdir())


def test_atomic_write_creates_folders_and_an_ordinary_file(tmp_path):
    path = tmp_path / "deep" / "er" / "x.json"
    old = os.umask(0o022)
    try:
        assert save_json([1, 2], path) == path
    finally:
        os.umask(old)
    assert json.loads(path.read_text()) == [1, 2]
    assert path.read_text().endswith("]\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o644  # 0666 less the umask, not mkstemp's 0600
    with pytest.raises(IsADirectoryError, match="is a directory"):
        save_json([1], tmp_path / "deep")


def test_versioned_json_header_and_errors(tmp_path):
    path = tmp_path / "v.json"
    save_json({"x": 1}, path, file_format="pqnet.thing", version=3)
    assert path.read_text() == '{\n  "format": "pqnet.thing",\n  "version": 3,\n  "x": 1\n}\n'
    save_json({"b": [1], "a": 2}, tmp_path / "order.json")  # indented, keys in their order
    assert (tmp_path / "order.json").read_text() == '{\n  "b": [\n    1\n  ],\n  "a": 2\n}\n'
    assert load_json(path, "thing", "pqnet.thing", 3) == {"format": "pqnet.thing",
                                                          "version": 3, "x": 1}
    with pytest.raises(ValueError, match=r"^where: .* version 3; this pqnet reads version 4"):
        load_json(path, "thing", "pqnet.thing", 4, argument="where")
    with pytest.raises(ValueError, match=f"^path: {re.escape(str(path))} is not a pqnet thing "
                                         "file$"):
        load_json(path, "thing", "pqnet.other", 3)
    with pytest.raises(ValueError, match="^file_format: needs a dict obj and a version$"):
        save_json([1], path, file_format="pqnet.thing", version=1)
    with pytest.raises(ValueError, match="^file_format: needs a dict obj and a version$"):
        save_json({"x": 1}, path, file_format="pqnet.thing")
    with pytest.raises(FileNotFoundError, match=r"^here: no thing file at"):
        load_json(tmp_path / "none.json", "thing", "pqnet.thing", 3, argument="here")
    (tmp_path / "bad.json").write_text('{"format": ')
    with pytest.raises(ValueError, match=r"^path: .* is not a readable pqnet thing"):
        load_json(tmp_path / "bad.json", "thing", "pqnet.thing", 3)
    assert json.loads(path.read_text())["x"] == 1  # the refused saves left it alone


def test_torch_file_errors_name_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^ckpt: no model file at"):
        load_torch(tmp_path / "none.pt", "model", "f", 1, argument="ckpt")
    (tmp_path / "junk.pt").write_bytes(b"\x00not a pickle")
    with pytest.raises(ValueError, match=r"^path: .* is not a readable pqnet model") as err:
        load_torch(tmp_path / "junk.pt", "model", "f", 1)
    cause = err.value.__cause__  # the unpickler's own error, named in the message
    assert cause is not None and f"{type(cause).__name__}: {cause}" in str(err.value)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="is not a pqnet model file"):
        load_torch(tmp_path / "list.pt", "model", "f", 1)
    save_torch({"format": "f", "version": 2}, tmp_path / "v2.pt")
    with pytest.raises(ValueError, match="has model format version 2; this pqnet reads version 1"):
        load_torch(tmp_path / "v2.pt", "model", "f", 1)
    assert load_torch(tmp_path / "v2.pt", "model", "f", 2) == {"format": "f", "version": 2}
    # map_location reaches torch.load: tensors come back on the device asked for
    save_torch({"format": "f", "version": 1, "t": torch.ones(3)}, tmp_path / "t.pt")
    assert load_torch(tmp_path / "t.pt", "model", "f", 1, map_location="meta")["t"].is_meta
    assert load_torch(tmp_path / "t.pt", "model", "f", 1)["t"].device.type == "cpu"


# --------------------------------------------------------------------------- budget rules


@pytest.mark.parametrize("bits, ok", [(1, True), (8, True), (np.int64(4), True), (0, False),
                                      (9, False), (-1, False), (True, False), (2.0, False),
                                      ("4", False)])
def test_check_bits_accepts_exactly_the_integers_1_to_8(bits, ok):
    if ok:
        assert _checks.bits("bits", bits, 8) == int(bits)
        assert type(_checks.bits("bits", bits, 8)) is int
    else:
        with pytest.raises(ValueError, match=r"^width: expected an integer bit-width in 1..8"):
            _checks.bits("width", bits, 8)


@pytest.mark.parametrize("avg, ok", [(1, True), (1.0, True), (3.25, True), (100, True),
                                     (0.999, False), (0, False), (math.inf, False),
                                     (math.nan, False), (True, False), ("3", False)])
def test_check_avg_bits_is_a_finite_number_of_at_least_one(avg, ok):
    if ok:
        assert _checks.avg_bits("avg_bits", avg) == float(avg)
        assert type(_checks.avg_bits("avg_bits", avg)) is float
    else:
        with pytest.raises(ValueError, match=r"^budget: expected a finite number of bits"):
            _checks.avg_bits("budget", avg)


@pytest.mark.parametrize("value, ok", [(0, True), (0.0, True), (2.5, True), (-1e-12, False),
                                       (math.inf, False), (math.nan, False), (False, False),
                                       (None, False)])
def test_check_nonnegative(value, ok):
    if ok:
        assert _checks.nonnegative_float("lr", value) == float(value)
        assert type(_checks.nonnegative_float("lr", value)) is float
    else:
        with pytest.raises(ValueError, match=r"^lr: expected a finite non-negative number"):
            _checks.nonnegative_float("lr", value)


@pytest.mark.parametrize("value, ok", [(2, True), (5, True), (1, False), (6, False),
                                       (3.0, False), (True, False), (np.int32(3), True)])
def test_check_int_bounds_are_inclusive(value, ok):
    if ok:
        assert _checks.int_in("epochs", value, 2, 5) == int(value)
        assert type(_checks.int_in("epochs", value, 2, 5)) is int
    else:
        with pytest.raises(ValueError, match=r"^epochs: expected an integer in 2..5"):
            _checks.int_in("epochs", value, 2, 5)


def test_check_flag_and_seed():
    assert _checks.flag("f", True) is True and _checks.flag("f", False) is False
    for bad in (1, 0, "yes", None):
        with pytest.raises(ValueError, match=r"^per_channel: expected True or False"):
            _checks.flag("per_channel", bad)
    assert _checks.seed(7) == 7 and type(_checks.seed(np.int64(7))) is int
    for bad in (True, 1.0, "7", None):
        with pytest.raises(ValueError, match=r"^seed: expected an int"):
            _checks.seed(bad)


def test_one_of_names_the_single_given_argument():
    assert one_of(bits=4, avg_bits=None) == "bits"
    assert one_of(bits=None, avg_bits=0) == "avg_bits"  # 0 is given, only None is not
    with pytest.raises(ValueError, match=r"^bits / avg_bits: give exactly one of them, got none$"):
        one_of(bits=None, avg_bits=None)
    with pytest.raises(ValueError, match=r"got bits, avg_bits$"):
        one_of(bits=4, avg_bits=3.0)


def test_layer_posteriors_reads_each_weight_as_float32():
    loc = {"0.weight": torch.ones(2, 3, dtype=torch.float64), "2.weight": torch.zeros(1, 2)}
    scale = {k: torch.full_like(v, 0.5) for k, v in loc.items()}
    layers = {"0": LayerInfo("0", "Linear", (2, 3), 3, False),
              "2": LayerInfo("2", "Linear", (1, 2), 2, False)}
    module = nn.Sequential(nn.Linear(3, 2), nn.ReLU(), nn.Linear(2, 1))
    out = layer_posteriors(pqnet.Posterior(loc, scale, layers, module))
    assert [name for name, _, _ in out] == ["0", "2"]
    assert all(mu.dtype == torch.float32 and s.dtype == torch.float32 for _, mu, s in out)
    assert torch.equal(out[0][1], torch.ones(2, 3))
    assert torch.equal(out[0][2], torch.full((2, 3), .5))
    with pytest.raises(TypeError, match="posterior: expected a pqnet Posterior, got dict"):
        layer_posteriors({})
    missing = pqnet.Posterior({"0.weight": loc["0.weight"]}, {"0.weight": scale["0.weight"]},
                              layers, module)
    with pytest.raises(ValueError, match="layer '2' has no random weight '2.weight'"):
        layer_posteriors(missing)


def test_meet_budget_reaches_the_budget_from_below():
    # a continuous family: the parameter itself is the average; the answer is the budget
    t = meet_budget(lambda p: p, 3.3, 1.0, 8.0)
    assert t <= 3.3 and 3.3 - t < 1e-12
    # a step family: floor(p) <= 3.5 up to (not including) p = 4, as close to 4 as float64 goes
    t = meet_budget(math.floor, 3.5, 1.0, 8.0)
    assert t < 4 and 4 - t < 1e-12
    # a decreasing family works the same way, between its feasible and infeasible ends
    t = meet_budget(lambda p: 10 - p, 4.0, 9.0, 0.0)
    assert 10 - t <= 4 and abs(t - 6) < 1e-12
    assert meet_budget(lambda p: p, 8.0, 1.0, 8.0) == 8.0  # even the most meets it
    calls = []
    assert meet_budget(lambda p: calls.append(p) or p, 9.0, 1.0, 8.0) == 8.0 and calls == [8.0]
    with pytest.raises(ValueError, match=r"^avg_bits: no allocation reaches 0.5; the fewest "
                                         r"bits are 1.0000"):
        meet_budget(lambda p: p, 0.5, 1.0, 8.0)
    with pytest.raises(ValueError, match=r"^code_bits: no allocation"):
        meet_budget(lambda p: p, 0.5, 1.0, 8.0, argument="code_bits")
    # steps bounds the bisection: one step from [0, 8] for budget 3 stops at 0 (4 > 3)
    assert meet_budget(lambda p: p, 3.0, 0.0, 8.0, steps=1) == 0.0
    assert meet_budget(lambda p: p, 5.0, 0.0, 8.0, steps=1) == 4.0


# --------------------------------------------------------------------------- metrics


def test_mutual_information_of_two_confident_disagreeing_draws_is_log_2():
    """Draws p1 = (1, 0), p2 = (0, 1): the mean (1/2, 1/2) has entropy log 2, each draw 0, so
    the mutual information (BALD) is log 2 nats; two identical draws have none."""
    draws = torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])  # (samples, examples, classes)
    mean = draws.mean(0)
    sample_entropy = entropy(draws).mean(0)
    labels = torch.tensor([0])
    m = classification_metrics(mean, labels, sample_entropy)
    assert m["mutual_information"] == pytest.approx(math.log(2), abs=1e-6)
    assert m["entropy"] == pytest.approx(math.log(2), abs=1e-6)
    assert m["nll"] == pytest.approx(math.log(2), abs=1e-6)
    same = torch.tensor([[0.7, 0.3]])
    h = -(0.7 * math.log(0.7) + 0.3 * math.log(0.3))
    m = classification_metrics(same, labels, torch.tensor([h]))
    assert m["mutual_information"] == pytest.approx(0.0, abs=1e-6)
    assert m["entropy"] == pytest.approx(h, abs=1e-6)
    # averaged over examples: MI 0.2 and 0.6 -> 0.4
    probs = torch.tensor([[0.5, 0.5], [0.5, 0.5]])
    m = classification_metrics(probs, torch.tensor([0, 1]),
                               torch.tensor([math.log(2) - 0.2, math.log(2) - 0.6]))
    assert m["mutual_information"] == pytest.approx(0.4, abs=1e-6)


def test_classification_metrics_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.8, 0.2], [0.3, 0.7]])
    labels = torch.tensor([0, 0, 1, 1])
    m = classification_metrics(probs, labels, entropy(probs))
    assert m["accuracy"] == 0.5
    assert m["nll"] == pytest.approx(-(math.log(.9) + math.log(.4) + math.log(.2)
                                       + math.log(.7)) / 4, abs=1e-6)
    # 15 bins: 0.9 -> (13/15, 14/15] correct; 0.6 -> (8/15, 9/15] wrong; 0.8 -> (11/15, 12/15]
    # wrong; 0.7 -> (10/15, 11/15] correct: |1-.9| + |0-.6| + |0-.8| + |1-.7| over 4
    assert m["ece"] == pytest.approx((0.1 + 0.6 + 0.8 + 0.3) / 4, abs=1e-6)
    assert m["mutual_information"] == 0.0
    # the default is 15 bins: 0.935 and 0.99 share (14/15, 1] (with 16 they would not):
    # |1/2 - (0.935 + 0.99) / 2|
    near = torch.tensor([[0.935, 0.065], [0.99, 0.01]])
    assert classification_metrics(near, torch.tensor([1, 0]), entropy(near))["ece"] == \
        pytest.approx(0.4625, abs=1e-6)
    assert expected_calibration_error(near, torch.tensor([1, 0])) == pytest.approx(0.4625,
                                                                                   abs=1e-6)
    # num_bins reaches the ECE: with 2 bins a wrong 0.6 and a right 0.9 pool, |1/2 - 0.75|
    pooled = torch.tensor([[0.6, 0.4], [0.9, 0.1]])
    assert classification_metrics(pooled, torch.tensor([1, 0]), entropy(pooled),
                                  num_bins=2)["ece"] == pytest.approx(0.25, abs=1e-6)
    # with 20 classes a confidence can be below 1/15: 0.05 falls in the first bin, (0, 1/15],
    # 0.1 in the second; a wrong 0.05 and a right 0.1 give (0.05 + 0.9) / 2
    low = torch.full((2, 20), 0.9 / 19)
    low[0] = 0.05
    low[1] = torch.where(torch.arange(20) == 3, 0.1, 0.9 / 19)
    assert expected_calibration_error(low, torch.tensor([1, 3])) == pytest.approx(0.475, abs=1e-6)
    # the bin is the confidence's: two predictions in one bin average before the |gap|
    both = torch.tensor([[0.75, 0.25], [0.75, 0.25]])
    assert expected_calibration_error(both, torch.tensor([0, 1])) == pytest.approx(0.25)
    # 2 bins: 0.5 goes to the first, (0, 1/2]; 0.75 to the second
    two = torch.tensor([[0.5, 0.5], [0.75, 0.25]])
    assert expected_calibration_error(two, torch.tensor([0, 0]), num_bins=2) == \
        pytest.approx((0.5 + 0.25) / 2)
    assert entropy(torch.full((3, 4), 0.25)).tolist() == pytest.approx([math.log(4)] * 3)
    assert entropy(torch.tensor([1.0, 0.0])).item() == 0.0  # 0 log 0 = 0, not nan


# --------------------------------------------------------------------------- analysis


def two_layer_posterior() -> pqnet.Posterior:
    """Two layers, loc 0 and scale 1 (so z = w): a 2x5 and a 6x5 weight, no biases."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(5, 2, bias=False), nn.Linear(2, 6, bias=False),
                           nn.Flatten())
    loc = {"0.weight": torch.zeros(2, 5), "1.weight": torch.zeros(6, 2)}
    scale = {"0.weight": torch.ones(2, 5), "1.weight": torch.full((6, 2), 2.0)}
    layers = {"0": LayerInfo("0", "Linear", (2, 5), 5, False),
              "1": LayerInfo("1", "Linear", (6, 2), 2, False)}
    with torch.no_grad():
        module[0].weight.zero_()
        module[1].weight.zero_()
    return pqnet.Posterior(loc, scale, layers, module)


def test_z_scores_and_hdi_coverage_by_hand():
    post = two_layer_posterior()
    w = {"0.weight": torch.tensor([[0.0, 1.0, -1.95, 1.97, 3.0]] * 2),
         "1.weight": torch.full((6, 2), 3.0)}
    z = z_scores(post, w)
    assert torch.equal(z["0.weight"][0], torch.tensor([0.0, 1.0, -1.95, 1.97, 3.0]))
    assert torch.equal(z["1.weight"], torch.full((6, 2), 1.5))  # (3 - 0) / 2
    cov = hdi_coverage(post, w)
    assert cov == {"0.weight": 0.6, "1.weight": 1.0}  # |z| <= 1.959964
    assert hdi_coverage(post, w, prob=0.5) == {"0.weight": 0.2, "1.weight": 0.0}  # z* = 0.674
    # a prob whose z* is 1.0 exactly (found near erf(1/sqrt 2), as the platform's erf and
    # ppf round): the interval is closed, so z = 1 is inside
    from scipy.stats import norm
    down = up = [math.erf(1 / math.sqrt(2))]
    for _ in range(8):
        down, up = down + [math.nextafter(down[-1], 0)], up + [math.nextafter(up[-1], 1)]
    exact = [q for q in down + up if norm.ppf((1 + q) / 2) == 1.0]
    assert exact
    assert hdi_coverage(post, w, prob=exact[0]) == {"0.weight": 0.4, "1.weight": 0.0}
    for bad in (1.0, 0.0, 0, True, "0.9", None, float("nan")):
        with pytest.raises(ValueError, match=r"^prob: expected a number in \(0, 1\)"):
            hdi_coverage(post, w, prob=bad)
    with pytest.raises(ValueError, match="'2.weight' is not a random parameter"):
        z_scores(post, {"2.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="0.weight has shape"):
        z_scores(post, {"0.weight": torch.zeros(5, 2)})


def hand_qnet() -> QuantizedNet:
    """Layer 0 (10 weights) all at 0, inside the HDI; layer 1 (12 weights) all at +-5 with
    sigma 2, |z| = 2.5, outside. Widths 8 and 2."""
    post = two_layer_posterior()
    zero = QuantizedLayer(torch.zeros(2, 5, dtype=torch.uint8),
                          torch.full((2, 5), 8, dtype=torch.uint8), {8: torch.tensor([[0.0]])})
    codes = torch.tensor([[0, 1]] * 6, dtype=torch.uint8)
    five = QuantizedLayer(codes, torch.full((6, 2), 2, dtype=torch.uint8),
                          {2: torch.tensor([[-5.0, 5.0]])})
    return QuantizedNet({"0": zero, "1": five}, post.module, "hand"), post


def test_layer_table_and_analyze_weight_the_layers_by_their_number_of_weights():
    qnet, post = hand_qnet()
    rows = layer_table(post, qnet)
    assert [(r["layer"], r["kind"], r["weights"], r["bits"], r["unique_values"]) for r in rows] \
        == [("0", "Linear", 10, 8.0, 1), ("1", "Linear", 12, 2.0, 2)]
    assert rows[0]["hdi_coverage"] == 1.0 and rows[1]["hdi_coverage"] == 0.0
    assert rows[1]["z_abs_mean"] == 2.5 and rows[1]["z_rms"] == 2.5 and rows[1]["z_abs_max"] == 2.5
    assert rows[0]["sigma"] == 1.0 and rows[1]["sigma"] == 2.0 and rows[0]["snr"] == 0.0
    x = torch.randn(8, 5, generator=torch.Generator().manual_seed(0))
    data = TensorDataset(x, torch.arange(8) % 6)
    out = analyze(post, qnet, data, num_samples=2)
    # coverage and |z| pooled over the 22 weights, not the mean of the two layers' values
    assert out["hdi_coverage"] == pytest.approx(10 / 22)
    assert out["z_abs_mean"] == pytest.approx(12 * 2.5 / 22)
    # all-zero quantized first layer: the net outputs zeros, a uniform predictive over 6
    assert out["after"]["entropy"] == pytest.approx(math.log(6))
    assert out["after"]["accuracy"] == pytest.approx(2 / 8)  # argmax of a tie: class 0
    # the posterior net is zero-mean as well, with unit-scale noise: it disagrees somewhere
    assert out["before"]["probs"].shape == (8, 6)


def test_prior_movement_by_hand():
    """Per layer: the prior's sd for its fan-in, the median sigma / s, the mean KL per weight
    ``log(s / sigma) + (sigma^2 + mu^2) / (2 s^2) - 1/2`` in float64, and ``informed`` at
    sd ratio <= 0.9; an anchored prior's KL is nan; a given prior wins over the default."""
    from pqnet.bnn.priors import FanInPrior, PWFNPrior
    base = two_layer_posterior()  # sigma 1 in layer 0 (fan-in 5), 2 in layer 1 (fan-in 2)
    loc = {"0.weight": torch.zeros(2, 5), "1.weight": torch.full((6, 2), 0.25)}
    scale = {"0.weight": torch.full((2, 5), 0.5), "1.weight": base.scale["1.weight"]}
    post = pqnet.Posterior(loc, scale, base.layers, base.module)

    def row(path, kind, n, mu, sigma, s):
        kl = math.log(s / sigma) + (sigma ** 2 + mu ** 2) / (2 * s ** 2) - 0.5
        return {"layer": path, "kind": kind, "weights": n, "prior_sd": s,
                "sd_ratio": sigma / s, "kl_per_weight": kl, "informed": sigma / s <= 0.9}

    s0, s1 = FanInPrior().scale_for(5), FanInPrior().scale_for(2)  # sqrt(2 / fan-in)
    assert (s0, s1) == pytest.approx((math.sqrt(2 / 5), 1.0), rel=1e-15)
    for prior in (None, "fan-in", FanInPrior()):
        got = prior_movement(post, prior)
        want = [row("0", "Linear", 10, 0.0, 0.5, s0), row("1", "Linear", 12, 0.25, 2.0, s1)]
        assert got[0].keys() == want[0].keys()
        for g, w in zip(got, want, strict=True):
            assert g == {**w, "sd_ratio": pytest.approx(w["sd_ratio"], rel=1e-7),
                         "kl_per_weight": pytest.approx(w["kl_per_weight"], rel=1e-12)}
    assert [r["informed"] for r in got] == [True, False]
    given = prior_movement(post, 0.5)  # a Normal of scale 0.5 for every layer
    assert [r["prior_sd"] for r in given] == [0.5, 0.5]
    assert [r["sd_ratio"] for r in given] == [1.0, 4.0]
    assert [r["informed"] for r in given] == [False, False]
    assert given[1]["kl_per_weight"] == pytest.approx(
        math.log(0.25) + (4 + 0.0625) / 0.5 - 0.5, rel=1e-12)
    edge = pqnet.Posterior(loc, {"0.weight": torch.full((2, 5), 0.5625),  # 0.9 of 0.625
                                 "1.weight": torch.full((6, 2), 0.625)}, base.layers, base.module)
    assert [(r["sd_ratio"], r["informed"]) for r in prior_movement(edge, 0.625)] \
        == [(0.9, True), (1.0, False)]
    anchored = prior_movement(post, PWFNPrior(0.05))
    assert all(math.isnan(r["kl_per_weight"]) for r in anchored)
    assert [r["sd_ratio"] for r in anchored] == [10.0, 40.0]


def test_recorded_prior_reads_the_fits_record_or_says_it_assumed():
    from pqnet.bnn.priors import FanInPrior, NormalPrior, PWFNPrior
    from pqnet.diagnostics.analysis import recorded_prior
    base = two_layer_posterior()

    def recorded(text):
        return pqnet.Posterior(base.loc, base.scale, base.layers, base.module,
                               config={"prior": text})

    assumed = "assumed: the posterior records none (pqnet.bayesian's default)"
    assert recorded_prior(base) == (FanInPrior(), assumed)
    for text, prior in (("NormalPrior(scale=0.3)", NormalPrior(0.3)),
                        ("FanInPrior(gain=2.5)", FanInPrior(2.5)),
                        ("PWFNPrior(scale=0.05)", PWFNPrior(0.05)),
                        (repr(FanInPrior()), FanInPrior())):
        got, source = recorded_prior(recorded(text))
        assert (got, type(got), source) == (prior, type(prior), "recorded by the fit")
        assert recorded_prior(recorded(text), 0.7) == (NormalPrior(0.7), "given")
    for text in ("NormalPrior(scale=0.3) ", "xNormalPrior(scale=0.3)", "Normal(scale=0.3)",
                 "NormalPrior(scale=0.3, loc=1)", "", None):
        assert recorded_prior(recorded(text)) == (FanInPrior(), assumed)
    assert recorded_prior(base, "normal") == (NormalPrior(), "given")


def test_layer_table_passes_its_prior_and_probability_on():
    """The HDI probability reaches the coverage (|z| = 2.5 is outside the 95 % HDI, inside
    the 99.5 %); a given prior reaches the prior columns; snr is the median |mu| / sigma; a
    quantized layer the posterior does not describe gets empty prior columns, not an error."""
    qnet, base = hand_qnet()
    loc = {"0.weight": torch.zeros(2, 5), "1.weight": torch.full((6, 2), 3.0)}
    post = pqnet.Posterior(loc, base.scale, base.layers, base.module)
    assert [r["hdi_coverage"] for r in layer_table(base, qnet, 0.995)] == [1.0, 1.0]
    rows = layer_table(post, qnet, prior=0.5)
    assert [r["snr"] for r in rows] == [0.0, 1.5]
    movement = prior_movement(post, 0.5)
    for row, moved in zip(rows, movement, strict=True):
        assert {k: row[k] for k in ("sd_ratio", "kl_per_weight", "informed")} \
            == {k: moved[k] for k in ("sd_ratio", "kl_per_weight", "informed")}
    assert [r["sd_ratio"] for r in rows] == [2.0, 4.0]
    partial = pqnet.Posterior(loc, base.scale, {"0": base.layers["0"]}, base.module)
    rows = layer_table(partial, qnet)
    assert rows[0]["kind"] == "Linear"
    assert rows[0]["sd_ratio"] == pytest.approx(1 / math.sqrt(2 / 5), rel=1e-15)
    assert rows[1]["kind"] == "" and rows[1]["informed"] is None
    assert math.isnan(rows[1]["sd_ratio"]) and math.isnan(rows[1]["kl_per_weight"])


def test_bits_sigma_correlation_by_hand():
    qnet, post = hand_qnet()
    # layer 0: 8 bits at relative sigma 1 / max|mu| -> 1 / 1e-12 (mu = 0): larger sigma ...
    # make it finite: give layer 0 mu of max 1 and layer 1 mu of max 1
    post.loc["0.weight"] = torch.full((2, 5), 1.0)
    post.loc["1.weight"] = torch.full((6, 2), 1.0)
    # relative sigma: layer 0 -> 1, layer 1 -> 2; bits 8 and 2: perfectly anti-monotone
    assert bits_sigma_correlation(post, qnet) == pytest.approx(-1.0)
    # relative to the layer's range: sigma 1 of max |mu| 10 (8 bits) is surer than sigma
    # 0.05 of max |mu| 0.1 (2 bits), though its sigma is larger
    post.loc["0.weight"] = torch.full((2, 5), 10.0)
    post.loc["1.weight"] = torch.full((6, 2), 0.1)
    post.scale["1.weight"] = torch.full((6, 2), 0.05)
    assert bits_sigma_correlation(post, qnet) == pytest.approx(-1.0)
    from scipy.stats import ConstantInputWarning
    uniform = pqnet.quantize(post, "uniform", bits=4)
    one = make_posterior(nn.Linear(1, 1, bias=False))  # a network of one weight
    two_bits = pqnet.quantize(one, "uniform", bits=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConstantInputWarning)  # equal widths: nan, unwarned
        assert math.isnan(bits_sigma_correlation(post, uniform))
        assert math.isnan(bits_sigma_correlation(one, two_bits))


def test_reliability_divergence_and_auroc_by_hand():
    # confidences .9, .65, .55, .85 (away from bin edges, which float32 would blur)
    probs = torch.tensor([[0.9, 0.1], [0.65, 0.35], [0.55, 0.45], [0.15, 0.85]])
    labels = torch.tensor([0, 1, 0, 1])
    r = reliability(probs, labels, num_bins=2)
    assert r["bin_edges"] == [0.0, 0.5, 1.0] and r["count"] == [0, 4]
    assert math.isnan(r["confidence"][0]) and math.isnan(r["accuracy"][0])
    assert r["confidence"][1] == pytest.approx((0.9 + 0.65 + 0.55 + 0.85) / 4)
    assert r["accuracy"][1] == 0.75
    assert r["ece"] == pytest.approx(abs(3 - 2.95) / 4)
    r = reliability(probs, labels, num_bins=5)  # (.4,.6]: .55; (.6,.8]: .65; (.8,1]: .9, .85
    assert r["count"] == [0, 0, 1, 1, 2]
    assert r["accuracy"][2:] == [1.0, 0.0, 1.0]
    assert r["ece"] == pytest.approx((abs(1 - .55) + abs(0 - .65) + abs(2 - 1.75)) / 4)
    # a confidence a rounding above 1 (exp(2e-16), of a log-probability a rounding above 0)
    # is in the top bin
    over = torch.tensor([[1 + 2 ** -52, 0.0], [0.3, 0.7]], dtype=torch.float64)
    r = reliability(over, torch.tensor([0, 0]), num_bins=4)
    assert r["count"] == [0, 0, 1, 1] and r["accuracy"][2:] == [0.0, 1.0]
    assert r["confidence"][2:] == [0.7, 1 + 2 ** -52]  # bins of one example have a mean
    # the least confident possible, 1 / C, lands in the first bin (0, 1/M] when C = M
    assert reliability(torch.full((1, 4), 0.25), torch.tensor([2]), 4)["count"] == [1, 0, 0, 0]
    with pytest.raises(ValueError, match="^num_bins: "):
        reliability(probs, labels, num_bins=0)
    with pytest.raises(ValueError, match=r"^probs: expected an \(N, C\) tensor of class "
                                         r"probabilities, got \(2,\)"):
        reliability(probs[0], labels[:1])
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    q = torch.tensor([[0.25, 0.75], [0.9, 0.1]])
    d = predictive_divergence(p, q)
    assert d["agreement"] == 0.5  # argmax of (.5, .5) is 0, of (.25, .75) is 1
    assert d["kl"] == pytest.approx((0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)) / 2)
    p3 = torch.tensor([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1], [0.1, 0.1, 0.8], [0.3, 0.4, 0.3]])
    q3 = torch.tensor([[0.4, 0.4, 0.2], [0.2, 0.2, 0.6], [0.1, 0.2, 0.7], [0.5, 0.3, 0.2]])
    kl3 = [sum(a * math.log(a / b) for a, b in zip(pr, qr, strict=True))
           for pr, qr in zip(p3.double().tolist(), q3.double().tolist(), strict=True)]
    assert predictive_divergence(p3, q3) == pytest.approx({"agreement": 1 / 4,  # 4 inputs
                                                           "kl": sum(kl3) / 4}, rel=1e-12)
    for bad_p, bad_q, message in (
            (p3[0], q3[0], r"^p: expected an \(N, C\) tensor of class probabilities, got \(3,\)"),
            (p3[None], q3[None], r"^p: .* got \(1, 4, 3\)"),
            (p3, q3[0], r"^q: expected an \(N, C\) tensor .* got \(3,\)"),
            (p3, q3[:2], r"^q: expected the shape \(4, 3\) of the other predictive, got \(2, 3\)"),
            (p3.tolist(), q3, r"^p: .* got list")):
        with pytest.raises(ValueError, match=message):
            predictive_divergence(bad_p, bad_q)
    confident, unsure = torch.tensor([[0.99, 0.01]]), torch.tensor([[0.5, 0.5]])
    assert entropy_auroc(confident.repeat(3, 1), unsure.repeat(2, 1)) == 1.0
    assert entropy_auroc(unsure.repeat(3, 1), confident.repeat(2, 1)) == 0.0
    mixed_in = torch.cat([confident, unsure])  # in: one low, one high; ood: one middle
    middle = torch.tensor([[0.8, 0.2]])
    assert entropy_auroc(mixed_in, middle) == 0.5


# --------------------------------------------------------------------------- pqnet._checks


@pytest.mark.parametrize(("check", "good", "bad"), [
    (lambda v: _checks.positive_int("n", v), [1, 7], [0, -1, 1.0, True, "1"]),
    (lambda v: _checks.nonnegative_int("n", v), [0, 3], [-1, 0.0, False, None]),
    (lambda v: _checks.positive_float("n", v), [1e-300, 2, 0.5], [0, 0.0, -1e-9, math.inf,
                                                                   math.nan, True, "1"]),
    (lambda v: _checks.nonnegative_float("n", v), [0, 0.0, 3.5], [-1e-9, math.inf, math.nan,
                                                                   False]),
    (lambda v: _checks.fraction("n", v), [1e-9, 0.5, 1 - 1e-9], [0, 0.0, 1, 1.0, -0.5, 2,
                                                                  math.nan, True]),
    (lambda v: _checks.above("n", v, 1.0), [1.0001, 5], [1.0, 0.5, math.inf, math.nan]),
    (lambda v: _checks.int_in("n", v, 1, 8), [1, 8], [0, 9, 2.0, True]),
    (lambda v: _checks.flag("n", v), [True, False], [1, 0, None, "yes"]),
    (lambda v: _checks.seed(v, "n"), [0, -3, 2**40], [1.5, True, None, "0"]),
    (lambda v: _checks.one_of("n", v, ("a", "b")), ["a", "b"], ["c", None]),
])
def test_argument_checks_take_the_boundary_right(check, good, bad):
    """Each rule of pqnet._checks on its boundary values: the good pass through unchanged
    (as the canonical type), the bad raise a ValueError naming the argument."""
    for value in good:
        assert check(value) == value
    for value in bad:
        with pytest.raises(ValueError, match=r"^n: expected"):
            check(value)


def test_device_check():
    assert _checks.device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"^device: 'tpu:7' is not a torch device"):
        _checks.device("tpu:7")
    if torch.cuda.is_available():
        assert _checks.device("cuda").type == "cuda"
    else:
        with pytest.raises(ValueError, match=r"^device: CUDA was asked for"):
            _checks.device("cuda")
        with pytest.raises(ValueError, match=r"^gpu: CUDA was asked for"):
            _checks.device("cuda:0", name="gpu")


# --------------------------------------------------------------------------- the model's parts
# (survivors of the second mutation run: likelihood, prior, guide, the warm start's loss)


def test_gaussian_likelihood_is_the_normal_density():
    """``log p(y | f) = sum -log(s sqrt(2 pi)) - (y - f)^2 / (2 s^2)``, what SVI maximises."""
    from pqnet.bnn.likelihoods import Gaussian

    f, y = torch.tensor([[0.0], [1.0], [3.0]]), torch.tensor([0.5, 1.0, 2.0])
    for noise in (0.5, 2.0):  # a noise below 1 is as valid as one above
        lik = Gaussian(noise)
        by_hand = sum(-math.log(noise * math.sqrt(2 * math.pi)) - (b - a) ** 2 / (2 * noise ** 2)
                      for a, b in [(0.0, 0.5), (1.0, 1.0), (3.0, 2.0)])
        assert float(lik.log_prob(f, y)) == pytest.approx(by_hand, rel=1e-6)
        assert lik.describe() == {"kind": "normal", "noise": noise}
        # the obs site of the model: the same density, y reshaped to f's shape
        trace = pyro.poutine.trace(lik).get_trace(f, y)
        assert float(trace.nodes["obs"]["fn"].log_prob(trace.nodes["obs"]["value"]).sum()) == \
            pytest.approx(by_hand, rel=1e-6)
        assert trace.nodes["obs"]["value"].shape == f.shape
        # one density per example (the data plate's dimension), an event per output row
        assert lik.distribution(f).batch_shape == (3,)
        assert lik.distribution(f).event_shape == (1,)
        # targets of another dtype are read in the network's: the loss stays float32
        assert lik.log_prob(f, y.double()).dtype == torch.float32
        assert pyro.poutine.trace(lik).get_trace(f, y.double()).nodes["obs"]["value"].dtype == \
            torch.float32
    assert float(Gaussian().noise) == 1.0 and not Gaussian().learn_noise  # the defaults
    learned = Gaussian(0.5, learn_noise=True)
    assert learned.learn_noise is True
    assert [n for n, _ in learned.named_parameters()] == ["noise_unconstrained"]
    assert float(learned.noise.detach()) == pytest.approx(0.5)
    with torch.no_grad():  # wherever the optimiser takes the raw parameter, noise stays > 0
        learned.noise_unconstrained.fill_(-1.0)
    assert float(learned.noise.detach()) == pytest.approx(math.exp(-1.0))
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="^noise: "):
            Gaussian(bad)


def test_a_normal_prior_needs_a_positive_scale():
    from pqnet.bnn.priors import NormalPrior

    assert NormalPrior(1e-3).scale_for(10) == 1e-3
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="^prior: scale must be a positive"):
            NormalPrior(bad)


def test_the_warm_start_loss_is_the_mean_networks_scaled_cross_entropy():
    """``-(N / B) sum_n log p(y_n | x_n, mu)`` with the guide's means as the weights."""
    from pqnet.inference.elbo import MeansLikelihood

    torch.manual_seed(0)
    module = nn.Linear(4, 3)
    bnn = pqnet.bayesian(module, init_scale=0.5)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    ce = float(nn.functional.cross_entropy(module(x), y, reduction="sum"))
    loss = MeansLikelihood(bnn)
    assert float(loss(x, y)) == pytest.approx(ce, rel=1e-6)
    assert float(loss(x, y, 50)) == pytest.approx(50 / 5 * ce, rel=1e-6)


def test_fixing_weights_is_cumulative_and_takes_any_mask_and_value_type():
    """PWFN fixes weights round after round: a later mask must hold every fixed weight; an
    integer mask or a float64 value act as their bool and float32 equivalents."""
    bnn = pqnet.bayesian(nn.Linear(3, 2), init_scale=0.5)
    guide, site = bnn.guide, "net.weight"
    assert guide.fixed_mask(site) is None
    loc = guide.loc_of(site).detach().clone()
    first = torch.tensor([[1, 0, 0], [0, 0, 0]])  # integers, not bools
    guide.fix(site, first, np.float64(0.25))
    assert torch.equal(guide.fixed_mask(site), first.bool())
    assert guide.loc_of(site).dtype == torch.float32
    expected = torch.where(first.bool(), 0.25, loc)
    assert torch.equal(guide.loc_of(site), expected)
    second = torch.tensor([[1, 1, 0], [0, 0, 1]])
    guide.fix(site, second, torch.tensor(-0.5, dtype=torch.float64))
    assert torch.equal(guide.fixed_mask(site), second.bool())
    expected = torch.where(second.bool(), -0.5, loc)
    assert torch.equal(guide.loc_of(site), expected)
    assert guide.loc_of(site).dtype == torch.float32
    with pytest.raises(ValueError, match="^mask: would free weights"):
        guide.fix(site, first, 0.0)
    # through the BNN: the prior of a fixed weight is the same point, in the prior's dtype
    from pqnet.bnn.guide import FIXED_SCALE

    free_loc, free_scale = (t.expand(2, 3).clone() for t in bnn.prior_parameters(site))
    bnn.fix(site, second, torch.full((2, 3), -0.5, dtype=torch.float64))
    prior_loc, prior_scale = bnn.prior_parameters(site)
    assert prior_loc.dtype == prior_scale.dtype == torch.float32
    fixed = second.bool()
    assert torch.equal(prior_loc[fixed], torch.full((3,), -0.5))
    assert torch.equal(prior_scale[fixed], torch.full((3,), FIXED_SCALE))
    assert torch.equal(prior_loc[~fixed], free_loc[~fixed])
    assert torch.equal(prior_scale[~fixed], free_scale[~fixed])


def test_pwfn_scale_is_clamped_to_its_range_and_keeps_the_dtype():
    from pqnet.bnn.guide import PWFN_MAX_SCALE, PWFN_MIN_SCALE, pwfn_scale

    w = torch.tensor([1.0, 0.75, 0.3, 0.6, 1.5, 2.0 ** -40], dtype=torch.float64)
    a = w.abs().clamp_min(PWFN_MIN_SCALE)
    below = torch.exp2(torch.floor(torch.log2(a)))
    d = (a - below) * (2 * below - a) / a ** 2  # 0 at a power of two, largest between
    for base in (0.0025, 1.0):  # 1.0 sends the far ones past the cap
        s = pwfn_scale(w, base)
        assert s.dtype == torch.float64
        raw = base * d / torch.quantile(d, 0.75)
        assert torch.allclose(s, raw.clamp(PWFN_MIN_SCALE, PWFN_MAX_SCALE), rtol=1e-5)
    assert bool(((pwfn_scale(w, 1.0) - PWFN_MAX_SCALE).abs() < 1e-8).any())  # capped


# --------------------------------------------------------------------------- codes and bytes


def test_encode_finds_the_nearest_level_of_each_rows_own_codebook():
    """Per-row codebooks (one per output channel), unsorted, two widths: every code is the
    nearest level of its row's codebook of its width, found here by brute force."""
    gen = torch.Generator().manual_seed(0)
    for rows, cols in [(2, 41), (3, 41)]:  # an odd count of weights
        codebooks = {1: torch.randn(rows, 2, generator=gen),
                     2: torch.randn(rows, 4, generator=gen)}
        shared = {1: codebooks[1][:1], 2: codebooks[2][:1]}  # one codebook for every row
        bits = torch.randint(1, 3, (rows, cols), generator=gen).to(torch.uint8)
        w = torch.randn(rows, cols, generator=gen)
        for books, row_of in [(codebooks, lambda r: r), (shared, lambda r: 0)]:
            layer = QuantizedLayer(torch.zeros(rows, cols, dtype=torch.uint8), bits, books)
            codes = layer.encode(w)
            for r in range(rows):
                for c in range(cols):
                    levels = books[int(bits[r, c])][row_of(r)]
                    assert int(codes[r, c]) == int((levels - w[r, c]).abs().argmin())


def test_a_pruned_grid_layer_keeps_its_scales_not_a_table():
    """A grid quantizer's codebook is written as its scale (4 bytes); pruning adds width 0 and
    must not turn the grid into a 16-entry table."""
    posterior = linear_posterior(n_out=20, n_in=30)
    plain = pqnet.quantize(posterior, "uniform", bits=4)
    pruned = pqnet.quantize(posterior, "uniform", bits=4, prune=0.95)
    layer = pruned.layers[""]
    assert 0 < int((layer.bits == 0).sum()) < 600
    assert set(layer.scales) == {0, 4}
    assert torch.equal(layer.scales[4], plain.layers[""].scales[4])
    assert pruned.sizes["codebooks"] == plain.sizes["codebooks"] == 4


def mlp_posterior(hidden: int = 6) -> pqnet.Posterior:
    """A 4-hidden-2 MLP's posterior: its weights as means, sd 0.1."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 2))
    return pqnet.Posterior(
        {f"{i}.weight": net[i].weight.detach().clone() for i in (0, 2)},
        {f"{i}.weight": torch.full_like(net[i].weight, 0.1) for i in (0, 2)},
        {str(i): LayerInfo(str(i), "Linear", tuple(net[i].weight.shape), net[i].in_features,
                           True) for i in (0, 2)}, net)


def test_summary_names_each_layers_weight():
    rows = pqnet.quantize(mlp_posterior(), "uniform", bits=2).summary()
    assert [(r["layer"], r["weight"]) for r in rows] == [("0", "0.weight"), ("2", "2.weight")]


def test_kmeans_k_bounds_and_default_seed():
    posterior = linear_posterior(n_out=20, n_in=30)
    assert pqnet.quantize(posterior, "kmeans", k=2).layers[""].codebooks[1].numel() == 2
    assert pqnet.quantize(posterior, "kmeans", k=256).layers[""].codebooks[8].numel() == 256
    for bad in (1, 257):
        with pytest.raises(ValueError, match="^k: "):
            pqnet.quantize(posterior, "kmeans", k=bad)
    assert pqnet.quantize(posterior, "kmeans", k=4).config == {
        "k": 4, "avg_bits": None, "init": "linear", "seed": 0}  # the defaults, recorded
    from pqnet.quantize.kmeans import kmeans

    assert kmeans(posterior, k=4).config["seed"] == 0  # the function's own default too
    # k-means++ is honoured (from its own start Lloyd ends in another local optimum)
    plus = pqnet.quantize(posterior, "kmeans", k=16, init="k-means++", seed=1)
    assert plus.config["init"] == "k-means++"
    from sklearn.cluster import KMeans  # one k-means++ run (n_init=1), as documented

    # (seed 1: here a second restart would end elsewhere, so the check can tell)
    x = posterior.loc["weight"].reshape(-1, 1).double().numpy()
    one_run = KMeans(16, init="k-means++", n_init=1, random_state=1).fit(x).cluster_centers_
    assert torch.allclose(plus.layers[""].codebooks[4][0],
                          torch.from_numpy(np.sort(one_run[:, 0])).float())
    assert not torch.equal(plus.weights()["weight"],
                           pqnet.quantize(posterior, "kmeans", k=16).weights()["weight"])
    # a layer with fewer distinct means than k: one centre per value, and the bits that need
    few = linear_posterior(n_out=20, n_in=30)
    few.loc["weight"] = torch.tensor([-0.5, 0.0, 0.25]).repeat(200).reshape(20, 30)
    layer = pqnet.quantize(few, "kmeans", k=16).layers[""]
    assert layer.widths == [2]
    assert sorted(layer.values().unique().tolist()) == [-0.5, 0.0, 0.25]


def test_load_names_a_module_of_another_layout(tmp_path):
    path = pqnet.quantize(mlp_posterior(), "uniform", bits=2).save(tmp_path / "q.pqn")
    with pytest.raises(ValueError, match="^module: does not fit the network stored in"):
        QuantizedNet.load(path, module=mlp_posterior(hidden=5).module)
    assert QuantizedNet.load(path, module=mlp_posterior().module).size_bytes == \
        path.stat().st_size


def test_uniform_per_channel_grids_by_hand():
    """``q(mu) = m (-1 + 2j / (2^b - 1))``, ``m = max|mu|`` of the row with ``per_channel``."""
    from pqnet.quantize.uniform import uniform

    posterior = mlp_posterior()
    mu = posterior.loc["0.weight"]
    for per_channel in (False, True):
        qnet = uniform(posterior, bits=2, per_channel=per_channel)
        assert qnet.config == {"bits": 2, "avg_bits": None, "per_channel": per_channel,
                               "seed": 0}
        m = mu.abs().amax(1, keepdim=True) if per_channel else mu.abs().max()
        j = torch.round((mu / m + 1) * 3 / 2)
        assert torch.allclose(qnet.weights()["0.weight"], m * (-1 + 2 * j / 3), atol=1e-6)
    with pytest.raises(ValueError, match="^per_channel: "):
        uniform(posterior, bits=2, per_channel="yes")


# --------------------------------------------------------------------------- drawn weights


def test_a_drawn_weight_is_loc_plus_eps_times_scale():
    from pqnet.bnn.layers import Drawn

    loc, scale = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 3.0])
    eps = torch.tensor([2.0, -1.0])
    assert torch.equal(Drawn(loc, scale, eps).value(), torch.tensor([2.0, -5.0]))
    assert torch.equal(Drawn(loc).value(), loc)  # no scale: no noise
    assert torch.equal(Drawn(loc, scale).variance(), torch.tensor([0.25, 9.0]))
    var = torch.tensor([7.0, 8.0])  # a caller's own variance is used as given
    assert Drawn(loc, scale, var=var).variance() is var


def test_linear_samples_preactivations_only_for_2d_inputs():
    """Local reparameterisation draws each example's pre-activations independently: right for
    a batch of vectors, wrong for a sequence, whose tokens share one weight draw. So tokens
    that are equal give equal outputs; a (B, d) batch of equal rows does not."""
    from pqnet.bnn.layers import Drawn, drawn

    torch.manual_seed(0)
    bnn = pqnet.bayesian(nn.Linear(3, 4), init_scale=0.5)
    layer = bnn.net
    weights = {layer: {"weight": Drawn(torch.ones(4, 3), torch.full((4, 3), 0.5)),
                       "bias": Drawn(torch.zeros(4), torch.full((4,), 0.5))}}
    with drawn(weights, local_reparam=True), torch.no_grad():
        tokens = layer(torch.ones(2, 5, 3))  # two sequences of five equal tokens
        rows = layer(torch.ones(5, 3))  # five equal examples
    assert torch.equal(tokens[:, :1].expand(-1, 5, -1), tokens)
    assert not torch.equal(rows[:1].expand(5, -1), rows)
    # a bias given without noise (a mean) next to a noisy weight: the pre-activation's mean
    # is loc x + bias and its variance sum_i x_i^2 s_i^2 = 3 * 0.25
    weights[layer]["bias"] = Drawn(torch.full((4,), 2.0))
    with drawn(weights, local_reparam=True), torch.no_grad():
        out = layer(torch.ones(20_000, 3))
    assert float(out.mean()) == pytest.approx(5.0, abs=0.02)
    assert float(out.var()) == pytest.approx(0.75, rel=0.03)


def test_the_elbo_averages_its_particles():
    """``num_particles`` draws average the likelihood term, not add it up: with (near)
    noiseless weights every particle gives the same NLL, so the loss does not depend on it."""
    from pqnet.inference.elbo import MeanFieldELBO

    torch.manual_seed(0)
    bnn = pqnet.bayesian(nn.Linear(4, 3), init_scale=1e-8)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    one = float(MeanFieldELBO(bnn, num_particles=1)(x, y, 60))
    three = float(MeanFieldELBO(bnn, num_particles=3)(x, y, 60))
    assert three == pytest.approx(one, rel=1e-5)


def test_the_model_conditioned_on_weights_uses_exactly_those():
    """``poutine.condition`` (as Pyro's ``Predictive`` does with posterior samples) makes the
    weight sites observed: the layer must use the given weights, not a pre-activation draw."""
    torch.manual_seed(0)
    bnn = pqnet.bayesian(nn.Linear(3, 2), init_scale=0.5)
    assert bnn.local_reparam
    w, b = torch.randn(2, 3), torch.randn(2)
    x = torch.randn(4, 3)
    with torch.no_grad():
        out = pyro.poutine.condition(bnn, data={"net.weight": w, "net.bias": b})(x)
    assert torch.allclose(out, nn.functional.linear(x, w, b), atol=1e-6)


def test_drawn_weights_keep_every_option_of_embeddings_and_convolutions():
    """On handed-in weights a Bayesian Embedding / Conv computes what the plain layer computes
    with them: padding row, max_norm (in norm_type), per-frequency gradient scaling, sparse
    gradients; the convolution's bias."""
    from pqnet.bnn.layers import Drawn, drawn

    torch.manual_seed(0)
    x = torch.tensor([[0, 2, 2, 4]])
    for sparse in (False, True):  # torch has no sparse gradient scaled by frequency
        options = {"padding_idx": 0, "max_norm": 1.0, "norm_type": 1.0,
                   "scale_grad_by_freq": not sparse, "sparse": sparse}
        layer = pqnet.bayesian(nn.Sequential(nn.Embedding(5, 3, **options)),
                               embeddings=True).net[0]
        loc = 3 * torch.randn(5, 3)
        mine, ref = loc.clone().requires_grad_(), loc.clone().requires_grad_()
        with drawn({layer: {"weight": Drawn(mine)}}, local_reparam=True):
            out = layer(x)
        expected = nn.functional.embedding(x, ref, **options)
        assert torch.equal(out, expected)
        assert torch.equal(mine.detach(), ref.detach())  # max_norm renormalised both alike
        assert float(ref.detach()[2].abs().sum()) == pytest.approx(1.0)  # to L1 norm 1
        (out * torch.arange(3.0)).sum().backward()
        (expected * torch.arange(3.0)).sum().backward()
        assert mine.grad.is_sparse == ref.grad.is_sparse == sparse
        grad = ref.grad.to_dense()
        assert torch.equal(mine.grad.to_dense(), grad)
        assert torch.equal(grad[0], torch.zeros(3))  # the padding row learns nothing
        # index 2 is seen twice: its gradient is summed, or averaged when scaled by frequency
        assert torch.equal(grad[2], torch.arange(3.0) * (2 if sparse else 1))

    conv = pqnet.bayesian(nn.Sequential(nn.Conv2d(2, 3, 3, padding=1))).net[0]
    w, b = torch.randn(3, 2, 3, 3), torch.randn(3)
    x = torch.randn(1, 2, 5, 5)
    with drawn({conv: {"weight": Drawn(w), "bias": Drawn(b)}}, local_reparam=True):
        out = conv(x)
    assert torch.allclose(out, nn.functional.conv2d(x, w, b, padding=1), atol=1e-6)


def test_the_model_samples_preactivations_per_example_and_honours_a_given_bias():
    """Under Pyro (the model run by itself, or conditioned as ``Predictive`` does) a Bayesian
    Linear with 2-d inputs draws each example's pre-activation on its own, the random bias's
    noise included; a bias that is given (observed) is used as it is."""
    torch.manual_seed(0)
    for random_bias in (True, False):
        bnn = pqnet.bayesian(nn.Linear(3, 2), init_scale=0.5, bias=random_bias)
        x = torch.zeros(8, 3) if random_bias else torch.ones(8, 3)  # eight equal examples
        with torch.no_grad():
            out = bnn(x)
        assert float((out - out[:1]).abs().max()) > 1e-3  # not one draw shared by all
    bnn = pqnet.bayesian(nn.Linear(3, 2), init_scale=0.5)
    b, x = torch.tensor([5.0, -5.0]), torch.randn(4, 3)
    with torch.no_grad():
        trace = pyro.poutine.trace(pyro.poutine.condition(bnn, data={"net.bias": b})).get_trace(x)
    w = trace.nodes["net.weight"]["value"]
    assert torch.allclose(trace.nodes["_RETURN"]["value"], nn.functional.linear(x, w, b),
                          atol=1e-6)


def test_a_guide_by_itself_and_the_relative_initial_scale():
    """The guide is a Pyro guide on its own (no BNN around it): unit KL weight, no handler;
    ``init_scale="relative"`` starts each sd at 0.1 |w| (at least 1e-6)."""
    from pqnet.bnn.guide import MeanFieldNormalGuide, initial_scale

    guide = MeanFieldNormalGuide({"a.w": torch.tensor([1.0, -2.0])},
                                 {"a.w": torch.tensor([0.5, 0.25])})
    assert guide.kl_weight == 1.0
    trace = pyro.poutine.trace(guide).get_trace()
    assert trace.nodes["a.w"]["scale"] == 1.0
    assert trace.nodes["a.w"]["fn"].base_dist.scale.tolist() == pytest.approx([0.5, 0.25])
    w = torch.tensor([2.0, -0.5, 0.0])
    assert initial_scale(w, "relative").tolist() == pytest.approx([0.2, 0.05, 1e-6])
    with pytest.raises(ValueError, match="^init_relative_scale: "):
        initial_scale(w, "relative", relative=0.0)


def test_to_module_is_the_callers_own_copy():
    qnet = pqnet.quantize(mlp_posterior(), "uniform", bits=2)
    before = qnet.weights()["0.weight"].clone()
    module = qnet.to_module()
    with torch.no_grad():
        module[0].weight.add_(1.0)  # e.g. the caller fine-tunes it
    assert torch.equal(qnet.weights()["0.weight"], before)
    assert torch.equal(qnet.to_module()[0].weight, before)


def test_grid_scales_and_layers_by_hand():
    """The half-range of a grid: ``mean|w|`` at 1 bit, ``max|w|`` above, over the tensor by
    default or per row; a layer's widths are uint8 whatever integer type they came in; with
    posterior sds the grid clips an outlier that its wide posterior says is cheap to move."""
    from pqnet.quantize.grids import grid_layer, grid_scale

    w = torch.tensor([[1.0, -3.0, 2.0], [0.5, 0.5, -0.5]])
    assert grid_scale(w, 1).tolist() == pytest.approx([7.5 / 6])
    assert grid_scale(w, 3).tolist() == [3.0]
    assert grid_scale(w, 1, per_channel=True).tolist() == pytest.approx([2.0, 0.5])
    assert grid_scale(w, 3, per_channel=True).tolist() == [3.0, 0.5]
    layer = grid_layer(w, 2)
    assert layer.bits.dtype == torch.uint8 and layer.codebooks[2].shape == (1, 4)  # one grid
    assert layer.scales[2].tolist() == [3.0]
    wide = grid_layer(w, torch.tensor([[2, 2, 3], [3, 2, 2]]))  # int64 widths
    assert wide.bits.dtype == torch.uint8 and wide.widths == [2, 3]
    sigma = torch.tensor([[0.01, 10.0, 0.01], [0.01, 0.01, 0.01]])  # -3.0 is nearly free
    clipped = grid_layer(w, 3, sigma=sigma)
    assert float(clipped.scales[3]) == float(grid_scale(w, 3, sigma=sigma)) < 3.0


def _most_probable_half_range(w: torch.Tensor, sigma: torch.Tensor, bits: int) -> float:
    """``argmin_m sum_i ((q_m(w_i) - w_i) / sigma_i)^2`` over ``m = t max|w|``, ``t`` on the
    library's grid of clip fractions, each ``q_m`` the nearest of ``m (-1 + 2j / (2^b - 1))``
    (by brute force over the levels)."""
    from pqnet.quantize.grids import CLIP_FRACTIONS

    best, best_error = None, math.inf
    for t in CLIP_FRACTIONS.tolist():
        m = t * float(w.abs().max())
        levels = torch.tensor([m * (-1 + 2 * j / (2 ** bits - 1)) for j in range(2 ** bits)])
        q = levels[(w.reshape(-1, 1) - levels).abs().argmin(1)]
        error = float((((q - w.reshape(-1)) / sigma.reshape(-1)) ** 2).sum())
        if error < best_error - 1e-9:
            best, best_error = m, error
    return best


def test_the_posteriors_most_probable_grid_by_hand():
    """``grid_scale`` with posterior sds (the grid under which the rounded means are most
    probable): at 1 bit ``m = sum |w| / sigma^2 / sum sigma^-2``; above, the best clip fraction,
    here found by brute force; per row with ``per_channel``."""
    from pqnet.quantize.grids import grid_layer, grid_scale

    gen = torch.Generator().manual_seed(3)
    w = torch.randn(2, 12, generator=gen) * torch.tensor([[1.0], [4.0]])
    sigma = 10 ** (-2 + 2 * torch.rand(2, 12, generator=gen))
    p = sigma ** -2
    assert grid_scale(w, 1, sigma=sigma).tolist() == pytest.approx(
        [float((w.abs() * p).sum() / p.sum())], rel=1e-5)
    assert grid_scale(w, 1, per_channel=True, sigma=sigma).tolist() == pytest.approx(
        ((w.abs() * p).sum(1) / p.sum(1)).tolist(), rel=1e-5)
    for bits in (2, 3):
        assert grid_scale(w, bits, sigma=sigma).tolist() == pytest.approx(
            [_most_probable_half_range(w, sigma, bits)], rel=1e-5)
        assert grid_scale(w, bits, per_channel=True, sigma=sigma).tolist() == pytest.approx(
            [_most_probable_half_range(w[r], sigma[r], bits) for r in range(2)], rel=1e-5)
    # an all-zero row keeps the grid of half-range 0: every one of its weights is 0
    zero_row = grid_layer(torch.stack([torch.zeros(12), w[1]]), 2, per_channel=True)
    assert torch.equal(zero_row.values()[0], torch.zeros(12))
    # ... and codes of a well-defined rounding (w / m read as 0, the grid's middle), not of
    # 0 / 0 cast to an integer
    assert zero_row.codes[0].tolist() == [round(1.5)] * 12


def test_priors_by_name_and_their_bad_values():
    from pqnet.bnn.priors import FanInPrior, make_prior

    assert make_prior("fan_in") == make_prior("fan-in") == FanInPrior()  # either spelling
    assert FanInPrior().scale_for(1) == pytest.approx(math.sqrt(2))  # gain / sqrt(1)
    assert FanInPrior().scale_for(0) == pytest.approx(math.sqrt(2))  # no inputs: as one
    assert FanInPrior(1.0).scale_for(16) == 0.25
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="^prior: gain must be a positive finite"):
            FanInPrior(bad)


def test_grid_quantize_passes_its_options_to_the_scale():
    from pqnet.quantize.grids import grid_quantize, grid_scale

    gen = torch.Generator().manual_seed(4)
    w = torch.randn(3, 8, generator=gen)
    sigma = 10 ** (-2 + 2 * torch.rand(3, 8, generator=gen))
    for per_channel in (False, True):
        for s in (None, sigma):
            _, _, scale = grid_quantize(w, 2, per_channel, s)
            assert torch.equal(scale, grid_scale(w, 2, per_channel, s))
    assert grid_quantize(w, 2, True, sigma)[2].shape == (3,)
    assert not torch.equal(grid_quantize(w, 2, False, sigma)[2], grid_quantize(w, 2)[2])


def test_a_quantized_layer_refuses_inconsistent_parts():
    """Each rule of a layer's consistency, one broken at a time (the reader and every
    quantizer rely on them)."""
    codes, bits = torch.tensor([[0, 1], [2, 3]], dtype=torch.uint8), torch.full((2, 2), 2,
                                                                                dtype=torch.uint8)
    good = {2: torch.tensor([[-1.0, -0.3, 0.3, 1.0]])}
    QuantizedLayer(codes, bits, good)  # consistent
    QuantizedLayer(codes, bits, {2: torch.zeros(2, 4)})  # one codebook per row is fine
    QuantizedLayer(codes[:1, :1], bits[:1, :1], good)  # a single weight is a layer
    cases = [
        ((codes.long(), bits, good), "^codes, bits: expected uint8"),
        ((codes, bits.long(), good), "^codes, bits: expected uint8"),
        ((codes, bits[:1], good), "^bits: shape"),
        ((codes[:0], bits[:0], good), "^bits: shape"),
        ((codes, bits, {2: good[2].double()}), "^codebooks: the 2-bit codebook"),
        ((codes, bits, {2: good[2][0]}), "^codebooks: the 2-bit codebook"),
        ((codes, bits, {2: torch.zeros(3, 4)}), "^codebooks: the 2-bit codebook"),
        ((codes, bits, {2: torch.zeros(1, 5)}), "^codebooks: the 2-bit codebook"),
        ((codes, bits, {2: torch.zeros(1, 9)}), "^codebooks: the 2-bit codebook"),  # 9 > 2^2
        ((codes, bits, {2: torch.zeros(1, 3)}), "^codes: a 2-bit code exceeds"),  # code 3
        ((torch.zeros(2, 2, dtype=torch.uint8), torch.zeros(2, 2, dtype=torch.uint8),
          {0: torch.ones(1, 1)}), "^codebooks: the 0-bit"),
    ]
    for args, match in cases:
        with pytest.raises(ValueError, match=match):
            QuantizedLayer(*args)


def test_make_likelihood_by_name():
    from pqnet.bnn.likelihoods import Categorical, Gaussian, make_likelihood

    assert isinstance(make_likelihood("categorical"), Categorical)
    for name in ("normal", "gaussian"):
        lik = make_likelihood(name)
        assert isinstance(lik, Gaussian) and float(lik.noise) == 1.0 and not lik.learn_noise
    assert make_likelihood("normal", 0.5, learn_noise=True).learn_noise is True
    with pytest.raises(ValueError, match="^likelihood: unknown name"):
        make_likelihood("poisson")


def test_a_posterior_refuses_bad_sds_and_keeps_its_copies(tmp_path):
    from pqnet.inference.posterior import Posterior

    post = mlp_posterior()
    for bad in (0.0, math.inf):
        scale = {k: v.clone() for k, v in post.scale.items()}
        scale["0.weight"][0, 0] = bad
        with pytest.raises(ValueError, match="^scale: 0.weight must be positive and finite"):
            Posterior(post.loc, scale, post.layers, post.module)
    assert post.sample(seed=0)["0.weight"].shape == (1, 6, 4)  # one draw by default
    mean = post.mean_module()
    with torch.no_grad():
        mean[0].weight.add_(1.0)
    assert torch.equal(post.mean_module()[0].weight, post.loc["0.weight"])
    (tmp_path / "bad.pt").write_bytes(b"not a posterior")
    with pytest.raises(ValueError, match="is not a readable pqnet posterior"):
        Posterior.load(tmp_path / "bad.pt")


# --------------------------------------------------------------------------- temperature


class _WithUnusedLayer(nn.Module):
    """Softmax regression, plus a Linear layer the forward pass never calls."""

    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(5, 3), nn.Linear(2, 2)

    def forward(self, x):
        return self.used(x)


def test_fisher_diagonal_is_the_batch_weighted_mean_of_squared_batch_gradients():
    """``h = (1 / |batches|) sum_b |b| gbar_b^2`` by hand, in data order, for softmax
    regression, whose per-example gradients are ``(p - e_y) x^T`` and ``p - e_y``; 23
    examples in batches of 10 (the last one partial); a weight the network never uses has
    no gradient: its Fisher is 0."""
    from pqnet.inference.temperature import fisher_diagonal

    torch.manual_seed(0)
    bnn = pqnet.bayesian(_WithUnusedLayer())
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(23, 5, generator=gen), torch.randint(0, 3, (23,), generator=gen)
    fisher = fisher_diagonal(bnn, TensorDataset(x, y), 10, torch.device("cpu"))
    weight, bias = (bnn.guide.loc_of(f"net.used.{n}").detach() for n in ("weight", "bias"))
    residual = torch.softmax(x @ weight.T + bias, 1) - nn.functional.one_hot(y, 3)
    sums = {"weight": torch.zeros(3, 5), "bias": torch.zeros(3)}
    for part in (slice(0, 10), slice(10, 20), slice(20, 23)):
        r, xb = residual[part], x[part]
        sums["weight"] += len(xb) * (r.T @ xb / len(xb)).square()
        sums["bias"] += len(xb) * r.mean(0).square()
    for name, total in sums.items():
        assert torch.allclose(fisher[f"net.used.{name}"], total / 3, rtol=1e-5, atol=1e-8)
    assert not fisher["net.unused.weight"].any() and not fisher["net.unused.bias"].any()
    with pytest.raises(ValueError, match="^train_dataset: "):
        fisher_diagonal(bnn, TensorDataset(x, y.float() + 0.5), 10, torch.device("cpu"))


def test_tempered_scales_are_the_tempered_gaussian_posterior_sds():
    """``sigma = sqrt(beta / (N h + beta / s^2))`` with ``s`` each layer's prior sd."""
    from pqnet.inference.temperature import tempered_scales

    torch.manual_seed(0)
    bnn = pqnet.bayesian(nn.Sequential(nn.Linear(4, 3)), prior=0.5)
    fisher = {site: torch.rand(bnn.guide.loc_of(site).shape) for site in bnn.sites}
    scales = tempered_scales(bnn, fisher, 0.01, 200)
    for site in bnn.sites:
        expected = (0.01 / (200 * fisher[site] + 0.01 / 0.5 ** 2)).sqrt()
        assert torch.allclose(scales[site], expected, rtol=1e-6)


# --------------------------------------------------------------------------- Bayesian Compression


def test_bayesian_compression_width_is_the_mean_precision_rounded_up_and_its_budget_scale():
    """``b = ceil(mean_i log2(1 + R / (2 s sigma_i)))``, ``R = 2 max|mu|``: with
    ``max|mu| = 2`` and ``sigma = 1/3`` that is ``ceil(log2 7) = 3`` bits at ``s = 1``; a
    2-bit budget needs ``6 / s <= 3``, so the smallest common scale is ``s = 2``."""
    from pqnet.quantize.bayesian_compression import bayesian_compression
    module = nn.Linear(4, 3)
    with torch.no_grad():
        module.weight.copy_(torch.linspace(-2.0, 1.0, 12).reshape(3, 4))
    posterior = make_posterior(module, {"weight": torch.full((3, 4), 1 / 3)})
    assert bayesian_compression(posterior).config["seed"] == 0  # its own default
    plain = pqnet.quantize(posterior, "bayesian-compression")
    assert plain.layers[""].widths == [3]
    assert plain.config == {"avg_bits": None, "sigma_scale": 1.0, "per_channel": False,
                            "seed": 0}
    channel = pqnet.quantize(posterior, "bayesian-compression", per_channel=True, seed=2)
    assert channel.config == {"avg_bits": None, "sigma_scale": 1.0, "per_channel": True,
                              "seed": 2}
    assert channel.layers[""].widths == [3] and len(channel.layers[""].scales[3]) == 3
    budget = pqnet.quantize(posterior, "bayesian-compression", avg_bits=2.0)
    assert budget.layers[""].widths == [2]
    assert budget.config["sigma_scale"] == pytest.approx(2.0, rel=1e-3)
    one = pqnet.quantize(posterior, "bayesian-compression", avg_bits=1.0)  # 6 / s <= 1
    assert one.layers[""].widths == [1]
    assert one.config["sigma_scale"] == pytest.approx(6.0, rel=1e-3)
    # a budget every scale meets returns the search's 8-bit end: e^-100 times the scale at
    # which every layer has 1 bit, e times the largest ratio R / (2 sigma)
    for sd, largest in ((1 / 3, 6.0), (10.0, 0.2)):
        wide = make_posterior(module, {"weight": torch.full((3, 4), sd)})
        eight = pqnet.quantize(wide, "bayesian-compression", avg_bits=8.0)
        assert eight.config["sigma_scale"] == pytest.approx(largest * math.exp(-99),
                                                            rel=1e-6, abs=0)
    with pytest.raises(ValueError, match="^per_channel: "):
        pqnet.quantize(posterior, "bayesian-compression", per_channel="yes")


def test_the_kl_weight_is_the_warmest_within_one_paired_se_of_the_best():
    """The one-standard-error rule on the held-out NLL of each tempered posterior: with the
    Fisher at 1 and a tiny data set every warmer posterior is clearly worse, so the grid's
    floor (1e-5) is chosen; with a larger one 1e-4 is within one paired se of 1e-5's NLL and
    is chosen, though 1e-5 scores best."""
    from pqnet.inference import temperature

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 3))
    gen = torch.Generator().manual_seed(2)
    truth = torch.randn(3, 5, generator=gen)
    with torch.no_grad():
        net[0].weight.copy_(3 * truth)
        net[0].bias.zero_()
    bnn = pqnet.bayesian(net)
    x = torch.randn(300, 5, generator=gen)
    val = TensorDataset(x, (x @ truth.T).argmax(1))
    fisher = {site: torch.ones_like(bnn.guide.loc_of(site)) for site in bnn.sites}
    cpu = torch.device("cpu")
    for fit_size, chosen in ((1e-3, 5), (1.0, 4)):
        got = temperature.choose_kl_weight(bnn, fisher, fit_size, val, 0, cpu)
        scores = [temperature.predictive_log_lik(bnn, temperature.tempered_scales(
            bnn, fisher, beta, fit_size), val, 300, 0, cpu) for beta in temperature.KL_WEIGHTS]
        nll = [float(-s.mean()) for s in scores]
        se = [float((s - scores[5]).std() / math.sqrt(300)) for s in scores]
        assert min(range(6), key=nll.__getitem__) == 5  # the coldest scores best
        assert nll[chosen] - nll[5] <= se[chosen] and all(
            nll[i] - nll[5] > se[i] for i in range(chosen))
        assert got == {"kl_weight": temperature.KL_WEIGHTS[chosen], "grid": [1.0, 0.1, 0.01,
                       1e-3, 1e-4, 1e-5], "val_nll": pytest.approx(nll, rel=1e-12),
                       "val_nll_se_to_best": pytest.approx(se, rel=1e-9), "val_size": 300,
                       "draws": 16, "at_grid_floor": chosen == 5}


# --------------------------------------------------------------------------- sigma-bits


def test_sigma_bits_records_its_defaults_and_rounds_per_channel_when_asked():
    """Defaults: ``k = 1``, one grid per layer and width, seed 0, all in the config. With
    ``per_channel`` both the widths (each weight's error against its own channel's grids)
    and the stored grids are per output channel."""
    from pqnet.quantize.sigma_bits import bits_at, error_ratios, sigma_bits

    posterior = linear_posterior()
    mu, sigma = posterior.loc["weight"], posterior.scale["weight"]
    default = sigma_bits(posterior)  # its own defaults, not quantize's
    assert default.config == {"k": 1.0, "avg_bits": None, "per_channel": False, "seed": 0}
    assert torch.equal(default.layers[""].bits, bits_at(error_ratios(mu, sigma, False), 1.0))
    assert all(len(levels) == 1 for levels in default.layers[""].codebooks.values())
    channel = pqnet.quantize(posterior, "sigma-bits", k=1.0, per_channel=True, seed=3)
    assert channel.config == {"k": 1.0, "avg_bits": None, "per_channel": True, "seed": 3}
    expected = bits_at(error_ratios(mu, sigma, True), 1.0)
    assert torch.equal(channel.layers[""].bits, expected)
    assert not torch.equal(expected, default.layers[""].bits)
    assert all(len(levels) == 40 for levels in channel.layers[""].codebooks.values())
    with pytest.raises(ValueError, match="^per_channel: "):
        pqnet.quantize(posterior, "sigma-bits", per_channel=1)
    assert bits_at(error_ratios(mu, sigma), 1.0).dtype == torch.uint8
    assert torch.equal(error_ratios(mu, sigma), error_ratios(mu, sigma, False))  # the default
    rows = torch.cat([error_ratios(mu[i:i + 1], sigma[i:i + 1]) for i in range(40)], dim=1)
    assert torch.allclose(error_ratios(mu, sigma, True), rows)  # each channel its own grids


def test_error_ratios_by_hand():
    """``c[b-1] = min_{b' <= b} |q_b'(mu) - mu| / sigma``: at 1 bit the levels are
    ``+-mean|mu| = +-0.4375``, at 2 bits ``+-1, +-1/3``."""
    from pqnet.quantize.sigma_bits import error_ratios

    c = error_ratios(torch.tensor([[1.0, 0.5, -0.25, 0.0]]), torch.full((1, 4), 0.1))
    assert torch.allclose(c[0, 0], torch.tensor([5.625, 0.625, 1.875, 4.375]))
    assert torch.allclose(c[1, 0], torch.tensor([0.0, 0.625, 5 / 6, 10 / 3]))


# --------------------------------------------------------------------------- quantile-inform


def test_quantile_inform_defaults_its_quantile_check_and_per_channel_widths():
    """Defaults ``k = 1``, ``q = 0.9``; ``q = 1`` is allowed (every weight's need met) and
    anything outside ``(0, 1]`` or not a number is refused; with ``per_channel`` the needs
    are measured against each channel's own grids."""
    from pqnet.quantize.grids import grid_scale
    from pqnet.quantize.quantile_inform import quantile_inform, quantile_ratios
    from pqnet.quantize.sigma_bits import bits_at, error_ratios

    posterior = linear_posterior()
    mu, sigma = posterior.loc["weight"], posterior.scale["weight"]
    default = quantile_inform(posterior)  # its own defaults, not quantize's
    assert default.config == {"avg_bits": None, "k": 1.0, "q": 0.9, "per_channel": False,
                              "seed": 0}
    assert default.layers[""].widths == [int(bits_at(quantile_ratios(
        error_ratios(mu, sigma, False), 0.9), 1.0))]
    channel = pqnet.quantize(posterior, "quantile-inform", k=8.0, q=1.0, per_channel=True)
    assert channel.config["k"] == 8.0 and channel.config["q"] == 1.0
    widths = [int(bits_at(quantile_ratios(error_ratios(mu, sigma, per), 1.0), 8.0))
              for per in (True, False)]
    assert channel.layers[""].widths == [widths[0]] and widths[0] != widths[1]
    scale = channel.layers[""].scales[widths[0]]  # the posterior's most probable grids
    assert len(scale) == 40 and torch.equal(scale, grid_scale(mu, widths[0], True, sigma))
    five = pqnet.quantize(posterior, "quantile-inform", avg_bits=5.0, q=0.5)
    assert five.layers[""].widths == [5] and five.config["k"] < 1.0  # 4 bits at k = 1
    for bad in (True, "0.5", 0.0, 1.5):
        with pytest.raises(ValueError, match="^q: expected a quantile"):
            pqnet.quantize(posterior, "quantile-inform", q=bad)
    with pytest.raises(ValueError, match="^k: "):
        pqnet.quantize(posterior, "quantile-inform", k=-1.0)


def test_quantile_ratios_take_the_ceil_q_n_th_smallest_per_width():
    from pqnet.quantize.quantile_inform import quantile_ratios

    ratios = torch.tensor([[[4.0, 1.0], [3.0, 2.0]], [[0.5, 0.25], [2.0, 1.0]]])  # 2 widths
    for q, expected in ((0.25, [1.0, 0.25]), (0.3, [2.0, 0.5]), (0.5, [2.0, 0.5]),
                        (1.0, [4.0, 2.0])):  # ceil(0.3 * 4) = 2
        assert quantile_ratios(ratios, q).tolist() == expected


# --------------------------------------------------------------------------- batching


class _Pairs(torch.utils.data.Dataset):
    """A map-style dataset that is not a TensorDataset: labels must be read through it."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def test_split_validation_is_stratified_seeded_disjoint_and_complete():
    """Per class ``min(n_c - 1, max(1, round(f n_c)))`` examples are held out (none of a
    class with one member), drawn by the seed alone; the two parts partition the data."""
    from pqnet.inference.batching import split_validation

    y = torch.tensor([0] * 10 + [1] * 7 + [2] + [3] * 2)
    x = torch.arange(len(y), dtype=torch.float32).reshape(-1, 1)
    held = {0: 2, 1: 1, 2: 0, 3: 1}  # f = 0.2: round(2.0), round(1.4), -, max(1, round(0.4))
    splits = []
    for data in (TensorDataset(x, y), _Pairs(x, y)):
        for global_seed in (0, 1):
            torch.manual_seed(global_seed)  # the split must not depend on it
            fit_part, val = split_validation(data, 0.2, seed=5)  # kind: categorical
            fit_idx = [int(fit_part[i][0]) for i in range(len(fit_part))]
            val_idx = [int(val[i][0]) for i in range(len(val))]
            assert sorted(fit_idx + val_idx) == list(range(len(y)))
            assert val_idx == sorted(val_idx)
            assert {c: sum(int(y[i]) == c for i in val_idx) for c in held} == held
            splits.append(val_idx)
    assert all(s == splits[0] for s in splits)
    assert split_validation(TensorDataset(x, y), 0.2, seed=6)[1].tensors[0].flatten().tolist() \
        != splits[0]
    assert len(split_validation(TensorDataset(x, y), 0.5, 5)[1]) == 10  # 5 + round(3.5) + 0 + 1


def test_split_validation_of_regression_targets_and_of_tiny_sets():
    """Not stratified: ``min(n - 1, max(1, round(f n)))`` of a seeded permutation."""
    from pqnet.inference.batching import split_validation

    x = torch.arange(10.0).reshape(-1, 1)
    data = TensorDataset(x, x.square())
    _, val = split_validation(data, 0.3, 4, kind="normal")
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(4))[:3].sort().values
    assert val.tensors[0].flatten().long().tolist() == expected.tolist()
    for n, fraction, size in ((2, 0.9, 1), (2, 0.1, 1), (10, 0.04, 1)):
        part = TensorDataset(x[:n], x[:n])
        assert len(split_validation(part, fraction, 0, kind="normal")[1]) == size
    distinct = TensorDataset(x, torch.arange(10))  # every class a singleton: random instead
    assert len(split_validation(distinct, 0.3, 0)[1]) == 3
    with pytest.raises(ValueError, match="^train_dataset: 1 example cannot be split"):
        split_validation(TensorDataset(x[:1], x[:1]), 0.5, 0)


def test_a_data_parallel_shard_and_its_loss_weight():
    """Rank ``r`` of ``W`` takes ``idx[r::W]`` at weight ``W |shard| / |batch|``; a rank left
    without an example takes the first at weight 0."""
    from pqnet.inference.batching import _shard

    idx = torch.arange(10, 15)
    mine, weight = _shard(idx, 0, 1)
    assert torch.equal(mine, idx) and weight == 1.0
    assert [(s.tolist(), w) for s, w in (_shard(idx, r, 2) for r in (0, 1))] == \
        [([10, 12, 14], 1.2), ([11, 13], 0.8)]
    assert [(s.tolist(), w) for s, w in (_shard(idx[:2], r, 4) for r in range(4))] == \
        [([10], 2.0), ([11], 2.0), ([10], 0.0), ([10], 0.0)]


# --------------------------------------------------------------------------- checkpoints


def test_checkpoint_files_keep_their_header_keys_and_errors_name_the_argument(tmp_path):
    from pqnet.inference.checkpoint import (
        load_checkpoint,
        rng_state,
        save_checkpoint,
        set_rng_state,
    )

    path = tmp_path / "job.pt"
    for key in ("format", "version", "kind"):
        with pytest.raises(ValueError, match=rf"^state: the keys \['{key}'\] are reserved"):
            save_checkpoint(path, "job", {key: 1})
    assert not path.exists()
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=rf"^checkpoint_dir: {path} is not a readable pqnet "
                                         r"checkpoint \(corrupt"):
        load_checkpoint(path, "job", argument="checkpoint_dir")
    # generators saved on a GPU machine restore on one without CUDA (the CPU ones only)
    state = rng_state()
    first = torch.rand(2)
    set_rng_state({**state, "cuda": [torch.zeros(16, dtype=torch.uint8)]})
    assert torch.equal(torch.rand(2), first)


def test_check_dataset_reads_a_map_style_dataset_by_its_first_batch():
    """A TensorDataset is checked whole (extra tensors after the targets are allowed); any
    other dataset by its first batch of 256, the rest as training draws it."""
    from pqnet.inference.batching import batches, check_dataset

    module = nn.Sequential(nn.Linear(2, 3))
    x, y = torch.randn(300, 2), torch.zeros(300, dtype=torch.long)
    assert check_dataset(module, _Pairs(x, y), "data") == 300
    assert check_dataset(module, TensorDataset(x, y, torch.ones(300)), "data") == 300
    for where, label, caught in ((5, 3, True), (7, -1, True), (256, 3, False)):
        bad = y.clone()
        bad[where] = label
        if caught:
            with pytest.raises(ValueError, match=r"^data: labels must lie in \[0, 3\)"):
                check_dataset(module, _Pairs(x, bad), "data")
        else:  # the 257th example is beyond the first batch
            assert check_dataset(module, _Pairs(x, bad), "data") == 300
    with pytest.raises(ValueError, match="^data: "):
        check_dataset(module, _Pairs(x, y.float()), "data")  # not class labels
    nan = x.clone()
    nan[3, 0] = math.nan
    with pytest.raises(ValueError, match="^data: inputs contain NaN"):
        check_dataset(module, _Pairs(nan, y), "data")
    three = TensorDataset(x, y, torch.ones(300))  # e.g. per-example weights after the targets
    for data in (three, torch.utils.data.Subset(three, range(300)), _Pairs(x, y)):
        first = next(batches(data, 4, shuffle=False))  # sliced, or collated example by example
        assert len(first) == 2 and torch.equal(first[0], x[:4]) and torch.equal(first[1], y[:4])


# --------------------------------------------------------------------------- predictive


def test_regression_evaluate_by_hand_two_outputs_default_noise_and_named_errors():
    """A Normal likelihood without a recorded noise uses 1; each draw's log-likelihood sums
    the outputs of an example; bad inputs are named after the argument."""
    from torch.func import functional_call

    module = nn.Sequential(nn.Linear(3, 2))
    made = make_posterior(module)
    posterior = pqnet.Posterior(made.loc, made.scale, made.layers, made.module,
                                {"kind": "normal"})
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(20, 3, generator=gen), torch.randn(20, 2, generator=gen)
    got = pqnet.evaluate(posterior, TensorDataset(x, y), num_samples=1, seed=3)
    f = functional_call(module, posterior.draw(torch.Generator().manual_seed(3)), (x,),
                        strict=False).double()
    expected = -torch.distributions.Normal(f, 1.0).log_prob(y.double()).sum(1).mean()
    assert got["nll"] == pytest.approx(float(expected), rel=1e-9)
    labels = torch.zeros(20, dtype=torch.long)
    with pytest.raises(ValueError, match="^dataset: expected a floating-point tensor"):
        pqnet.evaluate(module, TensorDataset(x.long(), labels))
    with pytest.raises(ValueError, match=r"^dataset: inputs of shape \(4,\) do not fit"):
        pqnet.evaluate(module, TensorDataset(torch.randn(20, 4), labels))
    with pytest.raises(ValueError, match="^x: expected a floating-point tensor"):
        pqnet.predict(module, [[1.0, 2.0, 3.0]])


def test_posterior_predictive_draws_of_a_regression_posterior_are_its_outputs():
    """The Pyro model rebuilt for ``return_draws`` keeps the posterior's Normal likelihood:
    its draws are outputs, not probabilities, and average to the predictive mean."""
    made = make_posterior(nn.Sequential(nn.Linear(3, 2)))
    posterior = pqnet.Posterior(made.loc, made.scale, made.layers, made.module,
                                {"kind": "normal", "noise": 0.5})
    x = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    draws = pqnet.predict(posterior, x, num_samples=4, seed=2, return_draws=True)
    assert draws.shape == (4, 6, 2)
    assert torch.allclose(draws.mean(0), pqnet.predict(posterior, x, num_samples=4, seed=2),
                          atol=1e-6)


# --------------------------------------------------------------------------- plain training


def test_plain_training_one_batch_is_one_adam_step_of_size_lr():
    """Adam's first step moves every parameter with a gradient by ``lr`` (``m / sqrt(v)`` is
    the gradient's sign), so one epoch of one batch moves the weights by ``lr``; the net is
    left in eval mode."""
    from pqnet.inference.plain import train_plain

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 5, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    torch.manual_seed(0)
    net = nn.Linear(5, 3)
    before = net.weight.detach().clone()
    train_plain(net, TensorDataset(x, y), epochs=1, batch_size=32, lr=0.05,
                generator=torch.Generator().manual_seed(0))
    # |step| = lr |g| / (|g| + 1e-8): lr, less 1e-3 of it for a gradient as small as 1e-5
    assert torch.allclose((net.weight.detach() - before).abs(), torch.full((3, 5), 0.05),
                          rtol=1e-3, atol=0)
    assert not net.training


# --------------------------------------------------------------------------- random-bits


def _one_sure_layer():
    """A linear classifier of 16 examples whose posterior is all but a point: every width's
    log-likelihood is exact, and the whole data is one batch."""
    from pqnet.quantize.grids import grid_layer
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
    module = nn.Linear(6, 3)
    with torch.no_grad():
        module.weight.copy_(0.5 * torch.randn(3, 6, generator=gen))
    posterior = make_posterior(module, {"weight": torch.full((3, 6), 1e-9)})
    mu = posterior.loc["weight"]
    log_lik = torch.stack([  # -n * cross-entropy of the net at each width, 1..8
        -16 * torch.nn.functional.cross_entropy(
            nn.functional.linear(x, grid_layer(mu, b, sigma=posterior.scale["weight"]).values(),
                                 module.bias), y).double() for b in range(1, 9)]).detach()
    return posterior, TensorDataset(x, y), log_lik


def test_random_bits_two_svi_steps_by_hand():
    """Step 1 (rho = 1, no penalty yet): q(b) = softmax of the log-likelihoods; the dual
    ascent then sets lambda = max(0, dual_lr (E_q[b] - budget)). Step 2 mixes in the new
    estimate, less lambda n b nats, at rho = 2^-forgetting."""
    from pqnet.quantize.random_bits import random_bits

    posterior, data, log_lik = _one_sure_layer()
    widths = torch.arange(1.0, 9.0, dtype=torch.float64)
    q1 = log_lik.softmax(0)
    penalty = max(0.0, 0.3 * (float(q1 @ widths) - 1.5))
    assert penalty > 0  # the budget binds
    one = random_bits(posterior, data=data, avg_bits=1.5, steps=1, dual_lr=0.3)
    assert one.config["bit_probabilities"][""] == pytest.approx(q1.tolist(), abs=1e-6)
    assert all(round(p, 6) == p for p in one.config["bit_probabilities"][""])  # 6 decimals
    assert one.config["final"] == pytest.approx(  # float32 forward passes: 1e-5 apart
        {"penalty": penalty, "expected_avg_bits": float(q1 @ widths)}, rel=1e-4)
    rho = 2 ** -0.8
    q2 = ((1 - rho) * log_lik + rho * (log_lik - penalty * 16 * widths)).softmax(0)
    two = random_bits(posterior, data=data, avg_bits=1.5, steps=2, dual_lr=0.3,
                      forgetting=0.8)
    assert two.config["bit_probabilities"][""] == pytest.approx(q2.tolist(), abs=1e-6)
    assert two.config["final"]["expected_avg_bits"] == pytest.approx(float(q2 @ widths),
                                                                      rel=1e-4)
    # the widths: the most probable (within the budget here)
    assert two.layer_bits[""] == int(q2.argmax()) + 1 <= 1.5


def test_random_bits_records_its_defaults_and_names_bad_arguments():
    from pqnet.quantize.random_bits import random_bits

    posterior, data, _ = _one_sure_layer()
    default = random_bits(posterior, data=data)  # its own defaults, not quantize's
    assert {k: v for k, v in default.config.items() if k not in ("final", "bit_probabilities")} \
        == {"avg_bits": 3.0, "seed": 0, "steps": 40, "batch_size": 256, "forgetting": 0.7,
            "dual_lr": 0.5}
    assert default.avg_bits <= 3.0
    for bad, message in [({"avg_bits": 0.5}, "avg_bits: "), ({"steps": 0}, "steps: "),
                         ({"batch_size": 0}, "batch_size: "), ({"forgetting": 0.5}, "forgetting: "),
                         ({"forgetting": 1.01}, "forgetting: "), ({"dual_lr": -1.0}, "dual_lr: "),
                         ({"forgetting": float("nan")}, "forgetting: "),
                         ({"steps": (1 << 30) + 1}, r"steps: .* 1\.\.1073741824"),
                         ({"batch_size": (1 << 30) + 1}, r"batch_size: .* 1\.\.1073741824")]:
        with pytest.raises(ValueError, match=f"^{message}"):
            random_bits(posterior, data=data, **bad)
    with pytest.raises(ValueError, match="^data: "):  # inputs of 7 features for a Linear(6, 3)
        random_bits(posterior, data=TensorDataset(torch.randn(4, 7), torch.zeros(4).long()))
    # the modes of the caller's module, submodules included, are left alone
    training = make_posterior(nn.Sequential(nn.Linear(6, 3)).train())
    random_bits(training, data=data, steps=1)
    assert all(m.training for m in training.module.modules())
    # the ends that are allowed: one example a batch, and kappa = 1 (rho_t = 1 / (t + 1))
    edge = random_bits(posterior, data=data, steps=2, batch_size=1, forgetting=1.0)
    assert edge.config["batch_size"] == 1 and edge.config["forgetting"] == 1.0


def _random_bits_by_hand(posterior, data, budget: float, steps: int, seed: int = 0,
                         forgetting: float = 0.7, dual_lr: float = 0.5,
                         batch_size: int | None = None):
    """Random Bits' SVI for a posterior that is all but a point, written out: each step
    takes the next minibatch (epochs of ``batch_size``, all the data by default; the last
    epoch stops at ``steps``), draws the other layers' widths from q, scores every width of
    every layer with the minibatch's log-likelihood scaled by N / B, mixes the estimate in at
    rho_t, then moves lambda. The generator is consumed in the method's order (the batch
    order, each layer's posterior draw, the widths), so the widths drawn are the method's."""
    from torch.func import functional_call

    from pqnet.inference.batching import batches
    from pqnet.quantize.budget import layer_posteriors
    from pqnet.quantize.grids import grid_layer

    layers = layer_posteriors(posterior)
    values = {p: [grid_layer(mu, b, sigma=sigma).values() for b in range(1, 9)]
              for p, mu, sigma in layers}
    n = len(data)
    widths = torch.arange(1.0, 9.0, dtype=torch.float64)
    sizes = torch.tensor([float(mu.numel()) for _, mu, _ in layers], dtype=torch.float64)
    cost = n * sizes[:, None] / sizes.sum() * widths
    logits, penalty = torch.zeros(len(layers), 8, dtype=torch.float64), 0.0
    gen = torch.Generator().manual_seed(seed)
    epochs = itertools.chain.from_iterable(
        batches(data, batch_size or n, generator=gen) for _ in itertools.count())
    for t, (x, y) in zip(range(steps), epochs, strict=False):  # the epochs never end
        for _, mu, _ in layers:
            torch.randn(mu.shape, generator=gen)  # the posterior draw: w = mu here
        drawn = torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(1).tolist()
        log_lik = torch.empty_like(logits)
        for i, b in itertools.product(range(len(layers)), range(8)):
            w = {f"{p}.weight": values[p][b if j == i else drawn[j]]
                 for j, (p, _, _) in enumerate(layers)}
            with torch.no_grad():
                f = functional_call(posterior.module, w, (x,), strict=False)
            log_lik[i, b] = -n / len(y) * torch.nn.functional.cross_entropy(
                f, y, reduction="sum").double()
        rho = (t + 1) ** -forgetting
        logits = (1 - rho) * logits + rho * (log_lik - penalty * cost)
        expected = float((logits.softmax(-1) @ widths) @ sizes / sizes.sum())
        penalty = max(0.0, penalty + dual_lr * (expected - budget))
    return logits.softmax(-1), expected, penalty


def test_random_bits_sixty_svi_steps_on_two_layers_by_hand():
    """Sixty steps: enough for logits that were not kept near 0 (each step subtracts the
    row's largest) to lose digits to their own size."""
    from pqnet.quantize.grids import grid_layer
    from pqnet.quantize.random_bits import random_bits
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 5, generator=gen), torch.randint(0, 3, (24,), generator=gen)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        module = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    posterior = make_posterior(module, {
        "0.weight": 1e-9 * (1 + torch.rand(8, 5, generator=gen)),
        "2.weight": 1e-9 * (1 + torch.rand(3, 8, generator=gen))})
    data = TensorDataset(x, y)
    q, expected, penalty = _random_bits_by_hand(posterior, data, budget=2.5, steps=60, seed=3)
    got = random_bits(posterior, data=data, avg_bits=2.5, steps=60, batch_size=24, seed=3)
    for i, path in enumerate(("0", "2")):  # recorded to 1e-6
        assert got.config["bit_probabilities"][path] == pytest.approx(q[i].tolist(), abs=2e-6)
    assert got.config["final"] == pytest.approx({"penalty": penalty,
                                                 "expected_avg_bits": expected}, rel=1e-4)
    assert got.method == "random-bits" and got.avg_bits <= 2.5
    for path, mu, sigma in [(p, posterior.loc[f"{p}.weight"], posterior.scale[f"{p}.weight"])
                            for p in ("0", "2")]:  # each layer on its posterior's grid
        width = int(got.layer_bits[path])
        assert torch.equal(got.weights()[f"{path}.weight"],
                           grid_layer(mu, width, sigma=sigma).values())


def test_random_bits_on_minibatches_by_hand():
    """Batches of 10 of 24 examples (10, 10, 4): seven steps are two epochs and the first
    batch of a third, each batch's log-likelihood scaled by N / B, and the run stops there."""
    from pqnet.quantize.random_bits import random_bits
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(24, 5, generator=gen), torch.randint(0, 3, (24,), generator=gen)
    with torch.random.fork_rng():
        torch.manual_seed(2)
        module = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    posterior = make_posterior(module, {"0.weight": torch.full((6, 5), 1e-9),
                                        "2.weight": torch.full((3, 6), 1e-9)})
    data = TensorDataset(x, y)
    for steps in (3, 7):
        q, expected, penalty = _random_bits_by_hand(posterior, data, budget=2.0, steps=steps,
                                                    seed=4, batch_size=10)
        got = random_bits(posterior, data=data, avg_bits=2.0, steps=steps, batch_size=10,
                          seed=4)
        for i, path in enumerate(("0", "2")):
            assert got.config["bit_probabilities"][path] == pytest.approx(q[i].tolist(),
                                                                          abs=2e-6)
        assert got.config["final"] == pytest.approx({"penalty": penalty,
                                                     "expected_avg_bits": expected}, rel=1e-4)


# --------------------------------------------------------------------------- reprs


def test_the_short_reprs_word_for_word():
    """A root layer is "(root)"; the fit's epochs and KL weight show only when both are
    known; a random bias is said; columns are aligned and lines carry no trailing blanks."""
    import dataclasses

    root = make_posterior(nn.Linear(3, 2), {"weight": torch.full((2, 3), 0.1)})
    text = ("Posterior(1 random layers, 6 random weights, likelihood='categorical')\n"
            "  (root)  Linear  2x3  6 random  mean sigma 0.1")
    assert repr(root) == text
    assert repr(dataclasses.replace(root, config={"epochs": 3})) == text
    fitted = dataclasses.replace(root, config={"epochs": 3, "kl_weight": 0.1})
    assert repr(fitted).splitlines()[0] == ("Posterior(1 random layers, 6 random weights, "
                                            "likelihood='categorical', epochs=3, kl_weight=0.1)")
    torch.manual_seed(0)
    bnn = pqnet.bayesian(nn.Sequential(nn.Linear(3, 12), nn.ReLU(), nn.Linear(12, 100)))
    assert repr(bnn).splitlines()[1:] == ["  0  Linear  12x3    48 random (bias too)",
                                          "  2  Linear  100x12  1,300 random (bias too)"]


def test_posterior_sample_with_a_seed_is_a_draw_and_needs_no_seed():
    """``sample(1, seed)`` is :meth:`Posterior.draw` from a generator seeded with ``seed``
    (the same normals, layer by layer); without a seed it draws from torch's global
    generator."""
    posterior = make_posterior(nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)))
    one = posterior.sample(1, seed=5)
    drawn = posterior.draw(torch.Generator().manual_seed(5))
    for k in posterior.loc:
        assert torch.equal(one[k][0], drawn[k])
    assert posterior.sample(3, seed=5)["0.weight"].shape == (3, 4, 3)
    torch.manual_seed(1)
    unseeded = posterior.sample(2)
    torch.manual_seed(1)
    assert torch.equal(posterior.sample(2)["0.weight"], unseeded["0.weight"])
    torch.manual_seed(2)
    assert not torch.equal(posterior.sample(2)["0.weight"], unseeded["0.weight"])


# ----------------------------------------------------------------- the BNN as a Pyro model


def test_the_model_scales_its_likelihood_through_the_data_plate():
    """A Pyro user's view: the ``obs`` site sits in a plate named ``data`` of the data set's
    size, so its log-likelihood is scaled by N / B; a learned noise is each BNN's own (not
    one shared through Pyro's global parameter store)."""
    from pyro import poutine

    x, y = torch.randn(8, 3), torch.randn(8, 1)
    models = [pqnet.bayesian(nn.Linear(3, 1), likelihood="normal", noise=s, learn_noise=True)
              for s in (0.5, 2.0)]
    for bnn, noise in zip(models, (0.5, 2.0), strict=True):
        obs = poutine.trace(bnn).get_trace(x, y, dataset_size=100).nodes["obs"]
        assert [f.name for f in obs["cond_indep_stack"]] == ["data"]
        assert obs["cond_indep_stack"][0].full_size == 100 and obs["scale"] == 100 / 8
        assert float(obs["fn"].base_dist.scale[0, 0].detach()) == pytest.approx(noise)


def test_bnn_kl_of_given_means_and_variances():
    """``kl(locs, variances)`` is the KL of those, not of the guide's current ones."""
    from pqnet.bnn.convert import normal_kl

    bnn = pqnet.bayesian(nn.Linear(3, 2), init_scale=0.1)
    locs = {s: torch.full_like(bnn.guide.loc_of(s), 0.3) for s in bnn.sites}
    variances = {s: torch.full_like(bnn.guide.loc_of(s), 0.04) for s in bnn.sites}
    by_hand = sum(float(normal_kl(locs[s], variances[s], *bnn.prior_parameters(s)))
                  for s in bnn.sites)
    with torch.no_grad():
        assert float(bnn.kl(locs, variances)) == pytest.approx(float(by_hand))
        assert float(bnn.kl(locs, variances)) != pytest.approx(float(bnn.kl()))
    assert "kl" in dir(bnn)  # what kl caches on the BNN leaves it listable (tab completion)


def test_a_posterior_saved_and_loaded_is_the_same_and_a_foreign_file_is_named(tmp_path):
    posterior = make_posterior(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    posterior.history.append({"epoch": 1, "loss": 2.5})
    posterior.config.update({"epochs": 1, "kl_weight": 0.1})
    loaded = pqnet.Posterior.load(posterior.save(tmp_path / "p.pt"))
    for k in posterior.loc:
        assert torch.equal(loaded.loc[k], posterior.loc[k])
        assert torch.equal(loaded.scale[k], posterior.scale[k])
    assert loaded.layers == posterior.layers and loaded.likelihood == posterior.likelihood
    assert loaded.history == posterior.history and loaded.config == posterior.config
    x = torch.randn(5, 3)
    with torch.no_grad():
        assert torch.equal(loaded.module(x), posterior.module(x))
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"^path: .* is not a pqnet posterior file$"):
        pqnet.Posterior.load(tmp_path / "other.pt")


def test_posteriors_read_off_one_bnn_at_two_times_do_not_share_their_networks():
    bnn = pqnet.bayesian(nn.Linear(3, 2), init_scale=0.1)
    before = pqnet.Posterior.from_bnn(bnn)
    bnn.fix("net.weight", torch.ones(2, 3, dtype=torch.bool), torch.tensor(0.7))
    after = pqnet.Posterior.from_bnn(bnn)
    assert torch.equal(after.module.weight, torch.full((2, 3), 0.7))
    assert torch.equal(before.module.weight, before.loc["weight"])
    assert not torch.equal(before.module.weight, after.module.weight)


@pytest.mark.parametrize("per_weight_prior", [False, True])
def test_normal_kl_of_a_large_layer_close_to_its_prior_keeps_its_digits(per_weight_prior):
    """Four million weights within 1e-3 of a N(0.2, 0.5^2) prior: each term is ~1e-6 and
    the sums it is made of are ~1e6, so they are taken in float64 (float32 sums would be
    off by more than the KL itself). The prior's scale as a scalar or one per weight."""
    from pqnet.bnn.convert import normal_kl

    gen = torch.Generator().manual_seed(0)
    n = 1 << 22
    loc = 0.2 + 1e-3 * torch.randn(n, generator=gen)
    var = 0.25 * (1 + 1e-3 * torch.randn(n, generator=gen))
    s = torch.full((n,), 0.5) if per_weight_prior else torch.tensor(0.5)
    m = torch.full((n,), 0.2) if per_weight_prior else torch.tensor(0.2)
    d = {k: t.double() for k, t in (("loc", loc), ("var", var), ("s", s), ("m", m))}
    exact = (d["s"].log() - 0.5 * d["var"].log()
             + (d["var"] + (d["loc"] - d["m"]).square()) / (2 * d["s"].square()) - 0.5).sum()
    assert 1 < float(exact) < 10
    # a scalar prior: float32 logs, 3e-4 of the KL off; one per weight: terms that do not
    # cancel, off only by the float32 result's rounding (the plain terms were 1.3e-3 off);
    # float32 sums would be 2e-3 to 2.5e-2 off
    rounding = torch.finfo(torch.float32).eps
    assert float(normal_kl(loc, var, m, s)) == pytest.approx(
        float(exact), rel=rounding if per_weight_prior else 1e-3)


def test_normal_kl_with_a_prior_per_weight_of_a_vector():
    """A bias's prior after fixing is a vector of its shape: the per-weight rule, not the
    scalar one."""
    from pqnet.bnn.convert import normal_kl

    loc, var = torch.tensor([0.1, -0.2, 0.3]), torch.tensor([0.01, 0.04, 0.09])
    m, s = torch.tensor([0.0, 0.1, 0.3]), torch.tensor([1.0, 0.5, 0.3])
    by_hand = sum(math.log(s[i] / var[i].sqrt()) + (var[i] + (loc[i] - m[i]) ** 2)
                  / (2 * s[i] ** 2) - 0.5 for i in range(3))
    kl = normal_kl(loc, var, m, s)
    assert kl.shape == () and float(kl) == pytest.approx(float(by_hand), rel=1e-5)


def test_normal_kl_per_weight_gradients_are_torchs():
    """The non-cancelling form of the per-weight terms has the same gradients in the means
    and variances as torch's KL, taken in float64."""
    from pqnet.bnn.convert import normal_kl

    gen = torch.Generator().manual_seed(3)
    loc = (0.3 * torch.randn(50, generator=gen)).requires_grad_()
    var = (0.02 + 0.1 * torch.rand(50, generator=gen)).requires_grad_()
    m, s = 0.1 * torch.randn(50, generator=gen), 0.05 + 0.3 * torch.rand(50, generator=gen)
    normal_kl(loc, var, m, s).backward()
    loc64, var64 = loc.detach().double().requires_grad_(), var.detach().double().requires_grad_()
    torch.distributions.kl_divergence(torch.distributions.Normal(loc64, var64.sqrt()),
                                      torch.distributions.Normal(m.double(), s.double())
                                      ).sum().backward()
    assert torch.allclose(loc.grad.double(), loc64.grad, rtol=1e-5, atol=1e-6)
    assert torch.allclose(var.grad.double(), var64.grad, rtol=1e-5, atol=1e-6)


def test_normal_kl_per_weight_far_from_its_prior_keeps_its_digits():
    """Sds from 1e-6 to 30 times the prior's (a nearly fixed weight under PWFN's cap sits
    at the low end; a form through log1p(sigma^2 / s^2 - 1) returned inf there)."""
    from pqnet.bnn.convert import normal_kl

    ratio = torch.logspace(-6, 1.5, 200)
    loc, m, s = torch.linspace(-0.1, 0.1, 200), torch.zeros(200), torch.full((200,), 0.05)
    var = (ratio * s).square()
    exact = torch.distributions.kl_divergence(
        torch.distributions.Normal(loc.double(), var.double().sqrt()),
        torch.distributions.Normal(m.double(), s.double())).sum()
    assert float(normal_kl(loc, var, m, s)) == pytest.approx(float(exact), rel=1e-6)


def test_bayesian_records_each_layer_with_its_defaults_and_does_not_alias_the_callers_net():
    """Each layer's record (its path, kind, shape, fan-in: 1 for an embedding table, whose
    rows are looked up, not summed), the fan-in prior's scale sqrt(2 / fan_in), the relative
    initial scale 0.1 |w|, a regression likelihood's learned noise starting at 1; and the
    caller's network changed afterwards does not reach the BNN or its posterior."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(5, 4), nn.Flatten(), nn.Linear(8, 2))
    bnn = pqnet.bayesian(net, embeddings=True, init_scale="relative")
    assert bnn.layers == {"0": LayerInfo("0", "Embedding", (5, 4), 1, False),
                          "2": LayerInfo("2", "Linear", (2, 8), 8, True)}
    assert float(bnn.prior_parameters("net.0.weight")[1]) == pytest.approx(math.sqrt(2))
    assert float(bnn.prior_parameters("net.2.weight")[1]) == pytest.approx(math.sqrt(2 / 8))
    assert torch.allclose(bnn.guide.scale_of("net.2.weight"),
                          (0.1 * net[2].weight.abs()).clamp_min(1e-6))
    regression = pqnet.bayesian(nn.Linear(3, 1), likelihood="normal")
    assert regression.likelihood.learn_noise and regression.likelihood.describe() == {
        "kind": "normal", "noise": 1.0}
    net.append(nn.Softmax(-1))  # the caller reuses its Sequential
    assert len(pqnet.Posterior.from_bnn(bnn).module) == 3


# --------------------------------------------------------------------------- analysis: words


def test_bits_sigma_text_word_for_word():
    from pqnet.diagnostics.analysis import bits_sigma_text

    head = "Spearman correlation of code width with relative posterior sd: "
    assert bits_sigma_text(math.nan) == ("All weights have the same width: no correlation of "
                                         "bits with posterior sd.")
    assert bits_sigma_text(-0.456) == (f"{head}-0.46: more bits went to weights whose "
                                       "posterior is more certain.")
    assert bits_sigma_text(0.4) == (f"{head}+0.40: more bits went to weights whose posterior "
                                    "is *less* certain, the opposite of the uncertainty-to-bits "
                                    "premise.")
    assert bits_sigma_text(0.0) == f"{head}+0.00: widths do not follow the posterior sd."


def test_uninformed_layers_are_named_in_one_warning():
    from pqnet.diagnostics.analysis import DiagnosticWarning, _warn_uninformed

    rows = [{"layer": "a", "sd_ratio": 0.1, "informed": True},
            {"layer": "b", "sd_ratio": 0.953, "informed": False},
            {"layer": "c", "sd_ratio": 1.2, "informed": False}]
    def analyze_like():  # analyze calls it: the warning points at analyze's caller
        return _warn_uninformed(rows)

    with pytest.warns(DiagnosticWarning) as caught:
        assert analyze_like() == ["b", "c"]
    assert len(caught) == 1
    if "MUTANT_UNDER_TEST" not in os.environ:  # mutmut's trampolines add frames
        assert caught[0].filename == __file__
    assert str(caught[0].message) == (
        "the data did not inform layer(s) b (sd ratio 0.95), c (sd ratio 1.20): their "
        "posterior sd is (nearly) the prior sd, so HDI coverage and z-scores accept any value "
        "near the prior and cannot judge their quantization; judge it by the predictive checks")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _warn_uninformed(rows[:1]) == []  # all informed: nothing to say


def test_failed_checks_are_named_in_one_warning_at_analyzes_caller():
    import inspect

    from pqnet.diagnostics.analysis import DiagnosticWarning, _warn_flagged

    qnet, _ = hand_qnet()
    checks = [{"check": "nll", "quantized": 1.23456, "mean_network": 1.1, "difference": 0.13456,
               "se": 0.0512, "flagged": True},
              {"check": "agreement", "quantized": 0.9, "mean_network": 0.95,
               "difference": -0.05, "se": 0.2, "flagged": False},
              {"check": "ece", "quantized": 0.25, "mean_network": 0.05, "difference": 0.2,
               "se": 0.031, "flagged": True}]

    def analyze_like():  # analyze calls it: the warning points at analyze's caller
        _warn_flagged(checks, qnet)

    with pytest.warns(DiagnosticWarning) as caught:
        line = inspect.currentframe().f_lineno + 1
        analyze_like()
    assert len(caught) == 1 and caught[0].category is DiagnosticWarning
    if "MUTANT_UNDER_TEST" not in os.environ:  # mutmut's trampolines add frames
        assert (caught[0].filename, caught[0].lineno) == (__file__, line)
    assert str(caught[0].message) == (
        f"the quantized net (hand, {qnet.avg_bits:.2f} avg bits) fails predictive checks: "
        "nll 1.235 against the mean network's 1.1 (difference +0.1346 +- 0.051 se); "
        "ece 0.25 against the mean network's 0.05 (difference +0.2 +- 0.031 se)")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_flagged([{**c, "flagged": False} for c in checks], qnet)  # none failed


def _small_classifier(seed: int, examples: int):
    """A 4-6-3 MLP's posterior and ``examples`` labelled inputs, both from ``seed``, and the
    data's generator (to draw more)."""
    torch.manual_seed(seed)
    posterior = make_posterior(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)))
    gen = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(examples, 4, generator=gen),
                         torch.randint(0, 3, (examples,), generator=gen))
    return posterior, data, gen


def test_analyze_defaults_and_a_given_prior_reach_every_part():
    """By default 32 posterior draws from seed 0 and 15 bins; a prior passed to analyze is
    the one every per-layer figure uses, and the result says it was given."""
    from pqnet.diagnostics.analysis import predictive_summary
    posterior, data, _ = _small_classifier(seed=0, examples=200)
    qnet = pqnet.quantize(posterior, "uniform", bits=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DiagnosticWarning)
        out = analyze(posterior, qnet, data)
        given = analyze(posterior, qnet, data, prior=0.25, num_samples=2)
    before = predictive_summary(posterior, data, num_samples=32, seed=0, num_bins=15)
    assert torch.equal(out["before"]["probs"], before["probs"])
    assert out["after"]["ece"] == predictive_summary(qnet, data, num_bins=15)["ece"]
    assert out["after"]["ece"] != predictive_summary(qnet, data, num_bins=16)["ece"]
    assert out["prior"] == ("FanInPrior(gain=1.4142135623730951) (assumed: the posterior "
                            "records none (pqnet.bayesian's default))")
    assert given["prior"] == "NormalPrior(scale=0.25) (given)"
    expected = prior_movement(posterior, 0.25)
    assert [r["kl_per_weight"] for r in given["prior_movement"]] \
        == [r["kl_per_weight"] for r in expected] \
        == [r["kl_per_weight"] for r in given["layers"]]
    assert [r["kl_per_weight"] for r in expected] != [r["kl_per_weight"]
                                                      for r in out["prior_movement"]]


def _same_summary(a: dict, b: dict) -> bool:
    """Two predictive summaries equal entry by entry (tensors exactly)."""
    def same(u, v):
        if isinstance(u, torch.Tensor):
            return isinstance(v, torch.Tensor) and torch.equal(u, v)
        if isinstance(u, dict):
            return isinstance(v, dict) and u.keys() == v.keys() and all(
                same(u[k], v[k]) for k in u)
        if isinstance(u, list):
            return isinstance(v, list) and len(u) == len(v) and all(map(same, u, v))
        return u == v or (u != u and v != v)  # nan equals nan here
    return same(a, b)


def test_analyze_is_its_parts_with_its_arguments_passed_on():
    """analyze's predictive parts are predictive_summary of the posterior (``num_samples``
    draws from ``seed``), of the mean network and of the quantized net, all with ``ood`` and
    ``num_bins``, and prediction_checks of the three from ``seed``; summaries passed as
    ``reference`` / ``mean_reference`` are used as they are."""
    from pqnet.diagnostics.analysis import prediction_checks, predictive_summary
    posterior, data, gen = _small_classifier(seed=1, examples=150)
    qnet = pqnet.quantize(posterior, "sigma-bits", avg_bits=3.0)  # widths vary
    ood = 3 * torch.randn(40, 4, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DiagnosticWarning)
        out = analyze(posterior, qnet, data, ood=ood, seed=5, num_samples=3, num_bins=7,
                      prob=0.8)
    before = predictive_summary(posterior, data, ood=ood, num_samples=3, seed=5, num_bins=7)
    mean = predictive_summary(posterior.mean_module(), data, ood=ood, num_bins=7)
    after = predictive_summary(qnet, data, ood=ood, num_bins=7)
    assert _same_summary(out["before"], before) and _same_summary(out["mean"], mean)
    assert _same_summary(out["after"], after) and mean["ood_auroc"] is not None
    checks = prediction_checks(after, mean, before, num_bins=7, seed=5)
    assert _same_summary(out["checks"], checks)
    assert out["flagged"] == [c["check"] for c in checks if c["flagged"]]
    assert out["ok"] is (not out["flagged"])
    movement = prior_movement(posterior)
    assert _same_summary(out["prior_movement"], movement)
    layers = layer_table(posterior, qnet, 0.8)
    assert out["hdi_prob"] == 0.8 and _same_summary(out["layers"], layers)
    assert out["hdi_coverage"] == pytest.approx(
        sum(r["hdi_coverage"] * r["weights"] for r in layers) / (6 * 4 + 3 * 6), rel=1e-12)
    assert out["bits_sigma_spearman"] == bits_sigma_correlation(posterior, qnet) < 0
    assert {k: out[k] for k in ("agreement", "kl")} == predictive_divergence(before["probs"],
                                                                              after["probs"])
    assert out["uninformed_layers"] == [r["layer"] for r in movement if not r["informed"]]
    assert set(out) == {"checks", "flagged", "ok", "prior_movement", "uninformed_layers",
                        "prior", "hdi_prob", "layers", "hdi_coverage", "z_abs_mean",
                        "bits_sigma_spearman", "before", "mean", "after", "agreement", "kl"}
    other = predictive_summary(posterior, data, ood=ood, num_samples=2, seed=9, num_bins=7)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DiagnosticWarning)
        reused = analyze(posterior, qnet, data, ood=ood, seed=5, num_bins=7,
                         reference=other, mean_reference=before)
    assert reused["before"] is other and reused["mean"] is before
    assert _same_summary(reused["checks"], prediction_checks(after, before, other, num_bins=7,
                                                             seed=5))


def test_predictive_summary_keeps_the_data_order_defaults_and_names_bad_data():
    """Per-example outputs in the data's order (the paired checks pair two summaries by
    position), its defaults (32 draws, seed 0, 15 bins), a data set of one example, and the
    argument named in each error."""
    from pqnet.diagnostics.analysis import predictive_summary
    torch.manual_seed(0)
    posterior = make_posterior(nn.Linear(4, 3))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(1500, 4, generator=gen), torch.randint(0, 3, (1500,), generator=gen)
    summary = predictive_summary(posterior, TensorDataset(x, y))  # two batches of _inputs
    assert torch.equal(summary["labels"], y)
    assert torch.allclose(summary["probs"], pqnet.predict(posterior, x, num_samples=32, seed=0),
                          atol=1e-6)
    again = predictive_summary(posterior, TensorDataset(x, y), num_samples=32, seed=0,
                               num_bins=15)
    assert summary["nll"] == again["nll"] and len(summary["reliability"]["accuracy"]) == 15
    seeded = predictive_summary(posterior, TensorDataset(x[:50], y[:50]), seed=3)
    assert torch.allclose(seeded["probs"], pqnet.predict(posterior, x[:50], seed=3), atol=1e-6)
    one = predictive_summary(posterior, TensorDataset(x[:1], y[:1]))
    assert one["log_density"].shape == (1,)
    logp = summary["probs"].double().log()  # log p(y_n | x_n), example by example
    assert summary["log_density"].shape == (1500,)
    assert torch.allclose(summary["log_density"], logp[torch.arange(1500), y], atol=1e-5)
    assert summary["nll"] == pytest.approx(-float(summary["log_density"].mean()), rel=1e-12)
    assert summary["elpd"] == pytest.approx(float(summary["log_density"].sum()), rel=1e-12)
    assert summary["nll"] > 0 and len(predictive_summary(  # bins passed on
        posterior, TensorDataset(x, y), num_samples=2, num_bins=4)["reliability"]["count"]) == 4
    assert summary["ood_auroc"] is None  # no ood inputs
    x_ood = 4 * torch.randn(30, 4, generator=gen)
    with_ood = predictive_summary(posterior, TensorDataset(x[:60], y[:60]), ood=x_ood,
                                  num_samples=3, seed=5)
    assert with_ood["ood_auroc"] == entropy_auroc(  # the same draws for the ood inputs
        pqnet.predict(posterior, x[:60], num_samples=3, seed=5),
        pqnet.predict(posterior, x_ood, num_samples=3, seed=5))
    with pytest.raises(ValueError, match=r"^ood: inputs of shape \(5,\) do not fit"):
        predictive_summary(posterior, TensorDataset(x[:60], y[:60]), ood=torch.randn(8, 5))
    with pytest.raises(ValueError, match="^ood: the dataset is empty"):
        predictive_summary(posterior, TensorDataset(x[:60], y[:60]), ood=TensorDataset(x[:0]))
    with pytest.raises(TypeError, match="^ood: expected a torch Dataset"):
        predictive_summary(posterior, TensorDataset(x[:60], y[:60]), ood=x_ood.numpy())
    for label in (-1, 3):  # three classes
        bad = y.clone()
        bad[7] = label
        with pytest.raises(ValueError, match=r"^data: labels must lie in \[0, 3\)"):
            predictive_summary(posterior, TensorDataset(x, bad), num_samples=2)
    with pytest.raises(ValueError, match="^data: the dataset is empty"):
        predictive_summary(posterior, TensorDataset(x[:0], y[:0]))
    with pytest.raises(TypeError, match="^data: expected a torch Dataset"):
        predictive_summary(posterior, [x, y])
    with pytest.raises(ValueError, match=r"^data: inputs of shape \(5,\) do not fit"):
        predictive_summary(posterior, TensorDataset(torch.randn(8, 5), y[:8]))


def test_paired_difference_and_a_checks_verdict_by_hand():
    """Vehtari et al.'s paired difference: the sum and sqrt(N Var d) by default, the mean and
    sqrt(Var d / N) per example; a check is flagged only when worse by more than 2 standard
    errors and more than its floor."""
    from pqnet.diagnostics.analysis import _verdict, paired_difference

    a, b = np.array([1.0, 2.0, 4.0, 0.5]), np.array([1.0, 1.0, 1.0, 2.0])
    d = a - b  # 0, 1, 3, -1.5
    assert paired_difference(a, b) == pytest.approx((2.5, math.sqrt(4 * d.var())))
    assert paired_difference(a, b, total=False) == pytest.approx((0.625,
                                                                  math.sqrt(d.var() / 4)))
    row = _verdict("nll", 0.3, 0.2, 0.25, 0.1, 0.04, worse=0.1, floor=0.05)
    assert row == {"check": "nll", "quantized": 0.3, "mean_network": 0.2, "posterior": 0.25,
                   "difference": 0.1, "se": 0.04, "flagged": True}
    assert not _verdict("nll", 0, 0, 0, 0, 0.05, worse=0.1, floor=0.05)["flagged"]  # = 2 se
    assert not _verdict("nll", 0, 0, 0, 0, 0.01, worse=0.04, floor=0.05)["flagged"]  # < floor


def test_prediction_checks_by_hand():
    """Three summaries of six examples built by hand: each row's values, difference and
    paired standard error; the KL per example with a zero probability on either side; the
    ECE's standard error by the paired bootstrap of 200 resamples from the seed."""
    from pqnet.diagnostics.analysis import SE_FACTOR, prediction_checks

    y = torch.tensor([0, 1, 2, 0, 1, 2])

    def summary(probs):
        probs = torch.tensor(probs, dtype=torch.float32)
        log_density = probs.double().log().gather(-1, y[:, None]).squeeze(-1)
        return {"probs": probs, "labels": y, "log_density": log_density,
                "elpd": float(log_density.sum()), "nll": float(-log_density.mean()),
                "ece": expected_calibration_error(probs.double(), y, 15)}

    before = summary([[.8, .1, .1], [.1, .8, .1], [.1, .1, .8], [.6, .4, 0], [.2, .7, .1],
                      [.3, .3, .4]])
    mean = summary([[.7, .2, .1], [.2, .7, .1], [.1, .2, .7], [.5, .5, 0], [.3, .6, .1],
                    [.2, .3, .5]])
    after = summary([[.5, .5, 0], [.4, .5, .1], [.2, .2, .6], [.05, .95, 0], [.5, .4, .1],
                     [.2, .2, .6]])
    torch.manual_seed(123)  # the bootstrap draws from its own seed, not torch's generator
    rows = {r["check"]: r for r in prediction_checks(after, mean, before)}
    d = (after["log_density"] - mean["log_density"]).numpy()
    assert rows["elpd"]["difference"] == pytest.approx(d.sum())
    assert rows["elpd"]["se"] == pytest.approx(math.sqrt(6 * d.var()))
    assert rows["nll"]["difference"] == pytest.approx(-d.sum() / 6)
    assert rows["nll"]["se"] == pytest.approx(math.sqrt(6 * d.var()) / 6)
    assert (rows["elpd"]["quantized"], rows["elpd"]["mean_network"], rows["elpd"]["posterior"]) \
        == (after["elpd"], mean["elpd"], before["elpd"])
    # top classes: before 0,1,2,0,1,2; after 0,1,2,1,0,2 (4 of 6); mean all 6
    agree = np.array([1, 1, 1, 0, 0, 1.0]) - 1
    assert rows["agreement"]["quantized"] == pytest.approx(4 / 6)
    assert rows["agreement"]["difference"] == pytest.approx(agree.mean())
    assert rows["agreement"]["se"] == pytest.approx(math.sqrt(agree.var() / 6))
    assert rows["agreement"]["posterior"] == 1.0

    def kl(p, q):  # 0 log 0 = 0; a q of 0 where p > 0 counts as 1e-12
        return sum(pi * (math.log(pi) - math.log(max(qi, 1e-12)))
                   for pi, qi in zip(p, q, strict=True) if pi > 0)

    p_bnn = before["probs"].double().tolist()
    kl_q = np.array([kl(p, q) for p, q in zip(p_bnn, after["probs"].double().tolist(),
                                              strict=True)])
    kl_m = np.array([kl(p, q) for p, q in zip(p_bnn, mean["probs"].double().tolist(),
                                              strict=True)])
    assert rows["kl"]["quantized"] == pytest.approx(kl_q.mean(), rel=1e-6)
    assert rows["kl"]["mean_network"] == pytest.approx(kl_m.mean(), rel=1e-6)
    assert rows["kl"]["se"] == pytest.approx(math.sqrt((kl_q - kl_m).var() / 6), rel=1e-6)
    assert rows["kl"]["posterior"] == 0.0
    def bootstrap_se(after, mean, seed, bins):
        y, n = after["labels"], len(after["labels"])
        gen = torch.Generator().manual_seed(seed)
        diffs = []
        for _ in range(200):
            i = torch.randint(0, n, (n,), generator=gen)
            diffs.append(expected_calibration_error(after["probs"][i].double(), y[i], bins)
                         - expected_calibration_error(mean["probs"][i].double(), y[i], bins))
        return float(np.std(diffs))

    assert rows["ece"]["difference"] == pytest.approx(after["ece"] - mean["ece"])
    assert rows["ece"]["se"] == pytest.approx(bootstrap_se(after, mean, 0, 15))
    for r in rows.values():  # worse = the difference in the bad direction
        worse = {"elpd": -r["difference"], "nll": r["difference"],
                 "agreement": -r["difference"]}.get(r["check"], r["difference"])
        floor = {"elpd": 4.0, "nll": 4.0 / 6, "agreement": 0.01}.get(r["check"], 0.01)
        assert r["flagged"] == (worse > max(SE_FACTOR * r["se"], floor)), r["check"]
    assert rows["nll"]["posterior"] == before["nll"]
    assert rows["ece"]["posterior"] == before["ece"]
    # the direction of each check: the true class at .9 against .05 on every example (a
    # constant paired difference, se 0); the network that is worse is flagged, the better not
    good = summary([[.9, .05, .05], [.05, .9, .05], [.05, .05, .9]] * 2)
    bad = summary([[.05, .9, .05], [.05, .05, .9], [.9, .05, .05]] * 2)
    worse = {r["check"]: r for r in prediction_checks(bad, good, good)}
    better = {r["check"]: r for r in prediction_checks(good, bad, good)}
    for check in ("elpd", "nll", "agreement", "kl", "ece"):  # nll: 2.9 nats each, over 4/6
        assert worse[check]["se"] < 1e-9 and worse[check]["flagged"], check
        assert better[check]["se"] < 1e-9 and not better[check]["flagged"], check
    # 60 random examples: another seed and bins, and the defaults (15 bins, seed 0)
    gen = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (60,), generator=gen)
    many = [summary(torch.rand(60, 3, generator=gen).softmax(-1).tolist()) for _ in range(3)]
    other = prediction_checks(*many, seed=1, num_bins=3)[-1]
    assert other["se"] == pytest.approx(bootstrap_se(many[0], many[1], 1, 3))
    default = prediction_checks(*many)
    assert default == prediction_checks(*many, num_bins=15, seed=0)
    assert default != prediction_checks(*many, num_bins=16, seed=0)
