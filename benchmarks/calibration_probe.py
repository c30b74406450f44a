"""A probe, not a feature: does temperature scaling after fine-tuning calibrate pqnet's nets?

Temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks") divides a
classifier's logits by the ``T`` that minimises a held-out NLL; for a quantized net ``1 / T``
could be folded into the output layer's codebook and bias at no cost in bytes. The
question is where the held-out labels come from, since ``pqnet.fit`` trains on all of the
data it is given. Four choices of ``b = 1 / T`` are compared, each the minimiser of a
cross-entropy ``mean_n sum_c t_nc (-log softmax(b z_n)_c)``, convex in ``b``:

- ``none``: ``b = 1``;
- ``posterior``: targets ``t`` the posterior predictive (16 draws) on the training inputs,
  so the quantized net takes the posterior's confidence (no held-out labels needed);
- ``train labels``: the training labels (what a calibration part carved from the data
  the posterior was fitted on gives);
- ``validation labels``: the frontier's 500 validation images, which nothing was fitted on.

On the frontier's seed-0 float net and validation split: ``pqnet.fit``'s defaults for 8
epochs, then each quantizer with 2 epochs of fine-tuning (8 for the pruned one); every
temperature is scored on the 10k test images (ECE with 15 bins, NLL).

    python benchmarks/calibration_probe.py --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import argparse
import math
import os

import torch
import torch.nn.functional as F
from frontier import fitted, float_start

import pqnet
from pqnet._io import save_json
from pqnet.diagnostics.metrics import expected_calibration_error
from pqnet.diagnostics.table import format_table

CANDIDATES = [("uniform", {"bits": 1}, 2), ("uniform", {"bits": 2}, 2),
              ("kmeans", {"k": 4}, 2), ("bayesian-compression", {"avg_bits": 3.0}, 2),
              ("quantile-inform", {"avg_bits": 1.5}, 2),
              ("uniform", {"bits": 2, "prune_fraction": 0.93}, 8)]


def inverse_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """``argmin_b`` of the cross-entropy of ``softmax(b * logits)`` against ``targets``
    (probabilities), by bisection on ``log b`` in ``[-7, 7]`` (its derivative,
    ``mean_n [E_softmax(b z_n)[z] - E_t_n[z]]``, increases with ``b``)."""
    z, target = logits.double(), (targets.double() * logits.double()).sum(1)
    lo, hi = -7.0, 7.0
    for _ in range(60):
        mid = (lo + hi) / 2
        slope = ((math.exp(mid) * z).softmax(1) * z).sum(1) - target
        lo, hi = (lo, mid) if float(slope.mean()) > 0 else (mid, hi)
    return math.exp((lo + hi) / 2)


def logits(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    module.eval()
    with torch.no_grad():
        return torch.cat([module(part) for part in x.split(1000)])


def one_hot(y: torch.Tensor, classes: int = 10) -> torch.Tensor:
    return F.one_hot(y, classes).double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="../shared/data/mnist")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="benchmarks/calibration_probe.json")
    args = parser.parse_args()
    train, test = pqnet.data.load("mnist", root=args.data_dir)
    fit_part, val, float_net = float_start(args.seed, train)
    _, posterior = fitted(float_net, fit_part, args.seed, 8)
    (x_fit, y_fit), (x_val, y_val), (x_test, y_test) = (d.tensors[:2] for d in
                                                        (fit_part, val, test))
    predictive = pqnet.predict(posterior, x_fit, num_samples=16, seed=args.seed)
    rows, load = [], os.getloadavg()
    for method, options, epochs in CANDIDATES:
        qnet = pqnet.quantize(posterior, method, data=fit_part, seed=args.seed,
                              finetune_epochs=epochs, **options)
        module = qnet.to_module()
        z_fit, z_test = logits(module, x_fit), logits(module, x_test)
        choices = {"none": 1.0, "posterior": inverse_temperature(z_fit, predictive),
                   "train labels": inverse_temperature(z_fit, one_hot(y_fit)),
                   "validation labels": inverse_temperature(logits(module, x_val),
                                                            one_hot(y_val))}
        setting = f"{method} " + " ".join(f"{k}={v:g}" for k, v in options.items())
        for rule, b in choices.items():
            rows.append({"setting": setting, "rule": rule, "b": b,
                         "accuracy": float((z_test.argmax(1) == y_test).float().mean()),
                         "ece": expected_calibration_error((b * z_test).softmax(1), y_test),
                         "nll": float(F.cross_entropy(b * z_test, y_test))})
        print(format_table(rows[-4:], list(rows[0])), flush=True)
    save_json({"config": vars(args), "load_before": load, "load_after": os.getloadavg(),
               "rows": rows}, args.json)


if __name__ == "__main__":
    main()
