"""The defaults panel (issue 12): plain PyTorch against ``pqnet.fit``'s defaults, six nets.

For each network, data set and seed, two fits from the same initial weights, on the same
training data, for the same number of epochs, with the same batch size (64) and Adam at
the same learning rate (1e-3) under the same cosine schedule:

- **plain**: the deterministic network, cross-entropy (classification) or squared error
  (regression), every training example;
- **pqnet**: ``pqnet.fit(pqnet.bayesian(net[, likelihood="normal"]), train, epochs=E,
  seed=s)``: nothing else set, so its defaults choose (warm start, the KL weight on a
  validation part of the training data, BatchNorm frozen after the warm start).

Scored on the test split only: accuracy, NLL and ECE (15 bins) of the predictive mean
(pqnet: 32 posterior draws); for regression RMSE, NLL and the coverage of the central
90 % predictive interval. Targets per row, on the mean over seeds: accuracy >= plain - 0.3
pp, NLL and ECE <= plain's; regression: coverage in [85, 95] %, RMSE <= 1.05 x plain's.

The panel: LeNet-300-100 (``mlp``) and LeNet-5 on MNIST-5k (``../shared/data/mnist``),
``digits_cnn`` and ``digits_cnn(batchnorm=True)`` on scikit-learn's digits, ``vit_tiny`` on
MNIST-5k, and a 10-50-1 MLP with a Normal likelihood (learned noise) on scikit-learn's
diabetes data (442 patients; a fixed 80/20 split; inputs and target standardised on the
training part).

    python benchmarks/defaults_panel.py --json benchmarks/defaults_panel.json
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_diabetes
from torch import nn
from torch.utils.data import TensorDataset

import pqnet
from pqnet._io import save_json
from pqnet.inference.batching import batches

PANEL = {  # name: (factory, data, epochs)
    "mlp": (lambda: pqnet.models.mlp(), "mnist", 10),
    "lenet5": (lambda: pqnet.models.lenet5(), "mnist", 10),
    "digits_cnn": (lambda: pqnet.models.digits_cnn(), "digits", 30),
    "digits_cnn_bn": (lambda: pqnet.models.digits_cnn(batchnorm=True), "digits", 30),
    "vit_tiny": (lambda: pqnet.models.vit_tiny(), "mnist", 10),
    "regression": (lambda: nn.Sequential(nn.Linear(10, 50), nn.ReLU(), nn.Linear(50, 1)),
                   "diabetes", 200),
}
BATCH, LR, DRAWS = 64, 1e-3, 32


def diabetes() -> tuple[TensorDataset, TensorDataset]:
    """scikit-learn's diabetes data, a fixed 80/20 split, standardised on the training part."""
    x, y = (torch.tensor(a, dtype=torch.float32) for a in load_diabetes(return_X_y=True))
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    cut = int(0.8 * len(x))
    train, test = order[:cut], order[cut:]
    mx, sx, my, sy = x[train].mean(0), x[train].std(0), y[train].mean(), y[train].std()
    return (TensorDataset((x[train] - mx) / sx, ((y[train] - my) / sy)[:, None]),
            TensorDataset((x[test] - mx) / sx, ((y[test] - my) / sy)[:, None]))


def load(data: str, mnist_dir: str):
    if data == "diabetes":
        return diabetes()
    return pqnet.data.load(data, root=mnist_dir if data == "mnist" else None)


def train_plain(net: nn.Module, train, epochs: int, seed: int, regression: bool) -> nn.Module:
    """Adam, cosine schedule, the batch order ``pqnet.fit`` draws from ``seed``."""
    optimizer = torch.optim.Adam(net.parameters(), lr=LR)
    total = epochs * math.ceil(len(train) / BATCH)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    order = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(epochs):
        for x, y in batches(train, BATCH, generator=order):
            optimizer.zero_grad(set_to_none=True)
            out = net(x)
            loss = F.mse_loss(out, y) if regression else F.cross_entropy(out, y)
            loss.backward()
            optimizer.step()
            schedule.step()
    return net.eval()


def regression_metrics(net: nn.Module, test, noise: float) -> dict:
    """A plain regression net scored as a Normal with its training residual's noise."""
    x, y = test.tensors
    with torch.no_grad():
        f = net(x)
    normal = torch.distributions.Normal(f, noise)
    cdf = normal.cdf(y)
    return {"rmse": float((f - y).square().mean().sqrt()),
            "nll": float(-normal.log_prob(y).mean()),
            "coverage_90": float(((cdf >= 0.05) & (cdf <= 0.95)).float().mean())}


def one_seed(name: str, seed: int, train, test) -> dict:
    factory, _, epochs = PANEL[name]
    regression = name == "regression"
    torch.manual_seed(seed)
    net = factory()
    start = time.perf_counter()
    plain = train_plain(copy.deepcopy(net), train, epochs, seed, regression)
    plain_seconds = time.perf_counter() - start
    if regression:  # the plain net's noise: its training residual's standard deviation
        x, y = train.tensors
        with torch.no_grad():
            noise = float((plain(x) - y).square().mean().sqrt())
        plain_metrics = regression_metrics(plain, test, noise)
    else:
        plain_metrics = pqnet.evaluate(plain, test)
    start = time.perf_counter()
    bnn = pqnet.bayesian(net, likelihood="normal" if regression else "categorical")
    posterior = pqnet.fit(bnn, train, epochs=epochs, seed=seed, progress=False)
    pqnet_seconds = time.perf_counter() - start
    metrics = pqnet.evaluate(posterior, test, num_samples=DRAWS, seed=seed)
    config = posterior.config
    return {"seed": seed, "epochs": epochs,
            "plain": {**plain_metrics, "seconds": plain_seconds},
            "pqnet": {**metrics, "seconds": pqnet_seconds, "kl_weight": config["kl_weight"],
                      "warm_start": config["warm_start"], "batchnorm": config["batchnorm"],
                      "svi_seconds_per_epoch": statistics.fmean(
                          h["seconds"] for h in posterior.history)}}


KEYS = {"classification": ("accuracy", "nll", "ece"),
        "regression": ("rmse", "nll", "coverage_90")}


def summary(name: str, runs: list[dict]) -> dict:
    """Means over seeds and the targets of the row."""
    keys = KEYS["regression" if name == "regression" else "classification"]
    mean = {side: {k: statistics.fmean(r[side][k] for r in runs)
                   for k in (*keys, "seconds")} for side in ("plain", "pqnet")}
    p, q = mean["plain"], mean["pqnet"]
    if name == "regression":
        targets = {"coverage in [0.85, 0.95]": 0.85 <= q["coverage_90"] <= 0.95,
                   "rmse <= 1.05 x plain": q["rmse"] <= 1.05 * p["rmse"]}
    else:
        targets = {"accuracy >= plain - 0.3 pp": q["accuracy"] >= p["accuracy"] - 0.003,
                   "nll <= plain": q["nll"] <= p["nll"], "ece <= plain": q["ece"] <= p["ece"]}
    return {"mean": mean, "targets": targets, "met": all(targets.values()),
            "kl_weights": [r["pqnet"]["kl_weight"] for r in runs]}


def print_row(name: str, row: dict) -> None:
    keys = KEYS["regression" if name == "regression" else "classification"]
    p, q = row["mean"]["plain"], row["mean"]["pqnet"]
    cells = "  ".join(f"{k} {p[k]:.4f}/{q[k]:.4f}" for k in keys)
    missed = [t for t, ok in row["targets"].items() if not ok]
    verdict = "met" if not missed else "MISSED: " + ", ".join(missed)
    print(f"{name:<14} {cells}  s {p['seconds']:.1f}/{q['seconds']:.1f}  "
          f"beta {row['kl_weights']}  {verdict}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="../shared/data/mnist")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--nets", nargs="+", default=list(PANEL), choices=list(PANEL))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    print(f"plain/pqnet per row, mean over seeds {args.seeds}; load {load_before[0]:.2f}")
    rows = {}
    for name in args.nets:
        train, test = load(PANEL[name][1], args.data_dir)
        runs = [one_seed(name, seed, train, test) for seed in args.seeds]
        rows[name] = {"runs": runs, **summary(name, runs)}
        print_row(name, rows[name])
    result = {"benchmark": "defaults_panel",
              "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                          "threads": torch.get_num_threads(), "torch": torch.__version__,
                          "load_average_before": load_before,
                          "load_average_after": os.getloadavg()},
              "config": {"batch_size": BATCH, "lr": LR, "draws": DRAWS, "seeds": args.seeds},
              "rows": rows, "all_met": all(r["met"] for r in rows.values())}
    if args.json:
        save_json(result, args.json)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
