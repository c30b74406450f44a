"""The notebook user's API: what predict/evaluate accept, modes left alone, posterior-predictive
draws, short reprs, named errors and the fit's log."""

import io
import logging
import re
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import pqnet
from pqnet import data as datasets


@pytest.fixture(scope="module")
def digits():
    return datasets.load("digits")


@pytest.fixture(scope="module")
def posterior(digits):
    torch.manual_seed(0)
    bnn = pqnet.bayesian(pqnet.models.digits_cnn(batchnorm=True))
    return pqnet.fit(bnn, digits[0], epochs=2, lr=1e-2, progress=False)


def _modes(module: nn.Module) -> list[bool]:
    return [m.training for m in module.modules()]


def _mixed_modes(module: nn.Module) -> nn.Module:
    """Training mode, with the BatchNorm layers frozen: a mix that .train(flag) would lose."""
    module.train()
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    return module


# --------------------------------------------------------------------------- what they accept


def test_evaluate_and_predict_accept_a_quantized_net(posterior, digits):
    qnet = pqnet.quantize(posterior, "uniform", bits=3)
    test = digits[1]
    assert pqnet.evaluate(qnet, test) == pqnet.evaluate(qnet.to_module(), test)
    x = test.x[:20]
    assert torch.equal(pqnet.predict(qnet, x), pqnet.predict(qnet.to_module(), x))
    with pytest.raises(TypeError, match=r"^model: expected a pqnet Posterior, a pqnet "
                                        r"QuantizedNet or a torch.nn.Module, got str"):
        pqnet.evaluate("net", test)


def test_plain_module_is_one_network(posterior, digits):
    x = digits[1].x[:10]
    net = posterior.mean_module()
    draws = pqnet.predict(net, x, num_samples=5, return_draws=True)
    assert draws.shape == (1, 10, 10)
    assert torch.allclose(draws[0], net.eval()(x).softmax(-1))


# --------------------------------------------------------------------------- modes


def test_predict_and_evaluate_leave_the_modes_of_the_callers_module(posterior, digits):
    net = _mixed_modes(posterior.mean_module())
    before, stats = _modes(net), net.bn1.running_mean.clone()
    pqnet.predict(net, digits[1].x[:10])
    pqnet.evaluate(net, digits[1])
    assert _modes(net) == before and torch.equal(net.bn1.running_mean, stats)  # ran in eval
    _mixed_modes(posterior.module)
    before = _modes(posterior.module)
    pqnet.predict(posterior, digits[1].x[:10], num_samples=2)
    pqnet.evaluate(posterior, digits[1], num_samples=2)
    pqnet.predict(posterior, digits[1].x[:10], num_samples=2, return_draws=True)
    assert _modes(posterior.module) == before


def test_fit_leaves_the_modes_of_the_callers_bnn(digits):
    small = TensorDataset(digits[0].x[:64], digits[0].y[:64])
    bnn = pqnet.bayesian(pqnet.models.digits_cnn(batchnorm=True))
    before = _modes(bnn)
    assert all(before)  # a new module trains
    pqnet.fit(bnn, small, epochs=2, progress=False)  # freezes BatchNorm and ends in eval inside
    assert _modes(bnn) == before
    bnn.eval()
    pqnet.fit(bnn, small, epochs=1, kl_weight=1, warm_start=0, progress=False)
    assert not any(_modes(bnn))


# --------------------------------------------------------------------------- draws


def test_posterior_predictive_draws_are_the_draws_of_the_mean(posterior, digits):
    x = digits[1].x[:30]
    state = torch.get_rng_state()
    draws = pqnet.predict(posterior, x, num_samples=10, seed=4, return_draws=True)
    assert torch.equal(torch.get_rng_state(), state)  # Predictive ran on a forked generator
    assert draws.shape == (10, 30, 10)
    assert torch.allclose(draws.sum(-1), torch.ones(10, 30))
    mean = pqnet.predict(posterior, x, num_samples=10, seed=4)
    assert torch.allclose(draws.mean(0), mean, atol=1e-6)  # the same weight draws
    assert (draws[0] - draws[1]).abs().max() > 1e-4  # and they differ from each other
    again = pqnet.predict(posterior, x, num_samples=10, seed=4, return_draws=True)
    assert torch.equal(draws, again)
    with pytest.raises(ValueError, match=r"^return_draws: expected True or False"):
        pqnet.predict(posterior, x, return_draws=1)


# --------------------------------------------------------------------------- reprs


def test_reprs_fit_on_a_screen(posterior):
    bnn = pqnet.bayesian(pqnet.models.lenet5())
    for obj, layers in ((posterior, ["conv1", "conv2", "fc1", "fc2"]),
                        (bnn, ["conv1", "conv2", "fc1", "fc2", "fc3"])):
        text = repr(obj)
        assert len(text) < 1000 and len(text.splitlines()) == len(layers) + 1
        assert [line.split()[0] for line in text.splitlines()[1:]] == layers
    assert "16x6x5x5" in repr(bnn) and "2,416 random (bias too)" in repr(bnn)
    assert "61,706 random weights" in repr(bnn)
    assert repr(posterior).startswith("Posterior(4 random layers, 38,282 random weights, "
                                      "likelihood='categorical', epochs=2, kl_weight=")
    assert "mean sigma" in repr(posterior).splitlines()[1]


# --------------------------------------------------------------------------- named errors


class _Images(Dataset):
    """A map-style dataset (not a TensorDataset): its items are checked by shape too."""

    def __init__(self, shape):
        self.shape = shape

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.randn(self.shape), i % 10


def test_fit_names_a_dataloader_and_items_of_the_wrong_shape():
    bnn = pqnet.bayesian(pqnet.models.digits_cnn())
    with pytest.raises(TypeError, match=r"^train_dataset: got a DataLoader; pass its dataset"):
        pqnet.fit(bnn, DataLoader(_Images((1, 8, 8))), progress=False)
    with pytest.raises(ValueError, match=r"^train_dataset: inputs of shape \(3, 8, 8\) do not "
                                         r"fit the model"):
        pqnet.fit(bnn, _Images((3, 8, 8)), progress=False)


# --------------------------------------------------------------------------- the log


def test_fit_logs_one_line_per_epoch_without_a_terminal(digits, caplog):
    small = TensorDataset(digits[0].x[:200], digits[0].y[:200])
    bnn = pqnet.bayesian(pqnet.models.digits_cnn())
    with caplog.at_level(logging.INFO, logger="pqnet"):
        posterior = pqnet.fit(bnn, small, epochs=4, batch_size=50)  # progress on, no tty
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("pqnet")]
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [int(re.match(r"epoch (\d+)/4 ", line)[1]) for line in epochs] == [1, 2, 3, 4]
    assert all(float(re.search(r"warm start: nll [\d.]+, ([\d.]+) s$", line)[1]) < 600
               for line in epochs[:2])  # each epoch's seconds
    assert all(re.search(r"SVI: elbo -?[\d.e+-]+, nll [\d.]+, kl [\d.e+-]+ \(weight "
                         r"[\d.e+-]+\), [\d.]+ s$", line) for line in epochs[2:])
    beta = posterior.config["kl_weight"]
    assert [line for line in lines if line.startswith("kl_weight auto")] == [
        f"kl_weight auto: chose {beta:g} ("
        + ("the exact ELBO" if beta == 1 else "a tempered posterior")
        + ") by the NLL on 20 held-out training examples"]
    assert "%" not in caplog.text  # formatted, not raw templates


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_fit_shows_a_progress_bar_with_the_stage_epoch_and_running_loss(monkeypatch):
    """Its length: the warm start's steps on the data less the validation part (58 of 64
    examples, 6 batches of 10) and SVI's on all of it (7); without a validation part, 7
    and 7."""
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 8, 8), torch.arange(64) % 10)
    for kl_weight, steps in [("auto", 13), (1, 14)]:
        screen = _Terminal()
        monkeypatch.setattr(sys, "stderr", screen)
        pqnet.fit(pqnet.bayesian(nn.Sequential(nn.Flatten(), nn.Linear(64, 10))), data,
                  epochs=2, batch_size=10, kl_weight=kl_weight)  # progress=True
        frames = screen.getvalue().split("\r")
        assert any(f.startswith("warm start:") for f in frames)
        assert re.fullmatch(rf"SVI: 100%\|#+\| {steps}/{steps} \[[\d:<]+, [\d.]+"
                            r"(step/s|s/step), epoch=2, loss=-?\d[\d.e+]*\] *\n", frames[-1])
    # the loss shown: the last epoch's mean loss, its NLL plus the KL averaged over the epoch
    screen = _Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    history = pqnet.fit(pqnet.bayesian(nn.Sequential(nn.Flatten(), nn.Linear(64, 10))), data,
                        epochs=2, batch_size=10, kl_weight=1, warm_start=0).history
    mean_loss = history[1]["nll"] * 64 + (history[0]["kl"] + history[1]["kl"]) / 2
    assert re.search(r"loss=([^\]]*)\]", screen.getvalue().split("\r")[-1])[1] == (
        f"{mean_loss:.4g}")
    quiet = _Terminal()
    monkeypatch.setattr(sys, "stderr", quiet)
    pqnet.fit(pqnet.bayesian(nn.Sequential(nn.Flatten(), nn.Linear(64, 10))), data,
              epochs=2, batch_size=10, progress=False)
    assert quiet.getvalue() == ""


def test_the_temperature_line_says_whether_the_posterior_is_tempered(caplog):
    from pqnet.inference.fit import _log_temperature
    with caplog.at_level(logging.INFO, logger="pqnet"):
        _log_temperature(1.0, 20)
        _log_temperature(0.01, 30)
    assert [r.getMessage() for r in caplog.records] == [
        "kl_weight auto: chose 1 (the exact ELBO) by the NLL on 20 held-out training examples",
        "kl_weight auto: chose 0.01 (a tempered posterior) by the NLL on 30 held-out training "
        "examples"]


# --------------------------------------------------------------------------- one of each


def test_markdown_table_has_one_home():
    from pqnet.diagnostics import report, table

    rows = [{"method": "a|b", "bits": 3, "acc": 0.91234, "size": 123456.0, "x": float("nan"),
             "flag": True}, {"method": "c", "bits": 12345, "acc": None, "size": 2.5, "x": 1.0,
                             "flag": False}]
    columns = ["method", "bits", "acc", "size", "x", "flag"]
    text = table.markdown_table(rows, columns, {"size": ".1f"})
    assert text.splitlines()[1] == "|:---|---:|---:|---:|---:|---:|"
    assert text.splitlines()[2] == "| a\\|b | 3 | 0.9123 | 123456.0 | – | True |"
    assert text == report.markdown_table(rows, columns, {"size": ".1f"})


def test_pareto_front_is_botorchs():
    from pqnet.diagnostics.plots import pareto_front

    points = [(1, 0.5), (2, 0.4), (2, 0.9), (3, 0.8), (4, 0.95), (4, 0.95), (5, 0.95)]
    assert pareto_front(points) == [(1, 0.5), (2, 0.9), (4, 0.95)]
    assert pareto_front([]) == []


def test_one_ece():
    from pqnet.diagnostics.analysis import reliability
    from pqnet.diagnostics.metrics import expected_calibration_error

    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(500, 10, generator=gen), -1)
    labels = torch.randint(0, 10, (500,), generator=gen)
    ece = expected_calibration_error(probs.double(), labels)
    assert reliability(probs, labels)["ece"] == pytest.approx(ece, abs=1e-12)
