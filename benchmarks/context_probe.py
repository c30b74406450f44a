"""Would context coding shrink the frontier's pruned files? Ideal code lengths of each
layer's symbols under an order-0 model (what the file's coder gets) and under contexts.

The frontier's pruned candidates (:mod:`frontier`: float LeNet-5 10 epochs on 90 % of
MNIST-5k, ``pqnet.fit`` 2 more, uniform 2 or 3 bits, 90 or 95 % pruned, 8 epochs of
fine-tuning) are made for one seed, and each layer's symbols, as a matrix of output rows by
input columns, are costed under:

- **order 0**: one categorical model per layer, ``n H`` bits (the file pays this plus the
  coder's overhead and the model's counts);
- **row** / **column**: one categorical model per output row / input column, each charged
  ``log2(size + 1)`` bits a row for its count (a lower bound on any model cost);
- **previous**: the model chosen by whether the previous symbol in the row is a zero;
- **previous and above**: chosen by whether the previous symbol and the one in the same
  column of the row above are zeros.

The rest of the file (header, float biases, checksum) is reported beside them.

    python benchmarks/context_probe.py --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
from frontier import fitted, float_start, reloaded_accuracy

import pqnet
from pqnet._io import save_json
from pqnet.diagnostics.table import format_table
from pqnet.quantize import QuantizedNet
from pqnet.quantize.codec import entropy_bits, symbol_counts

CANDIDATES = [{"bits": b, "prune_fraction": f} for b in (2, 3) for f in (0.9, 0.95)]


def bits_of(symbols: np.ndarray) -> float:
    """Ideal code length (bits) of ``symbols`` under their own categorical model."""
    return len(symbols) * entropy_bits(np.bincount(symbols)) if len(symbols) else 0.0


def bits_given(symbols: np.ndarray, context: np.ndarray) -> float:
    """Ideal code length with one model per value of ``context``."""
    return sum(bits_of(symbols[context == c]) for c in np.unique(context))


def context_costs(layer) -> dict[str, float]:
    """Bytes of a layer's symbols under each model of the module docstring."""
    flat, counts = symbol_counts(layer)
    rows = flat.reshape(layer.shape[0], -1)
    zero = rows == np.argmax(counts)  # the pruned value is the most frequent symbol here
    previous = np.pad(zero, ((0, 0), (1, 0)))[:, :-1].ravel()
    above = np.pad(zero, ((1, 0), (0, 0)))[:-1].ravel()
    out, fan_in = rows.shape
    costs = {
        "order 0": bits_of(flat),
        "row": sum(bits_of(r) for r in rows) + out * np.log2(fan_in + 1),
        "column": sum(bits_of(c) for c in rows.T) + fan_in * np.log2(out + 1),
        "previous": bits_given(flat, previous),
        "previous and above": bits_given(flat, 2 * previous + above)}
    return {k: v / 8 for k, v in costs.items()}


def probe(qnet: QuantizedNet) -> dict:
    per_layer = [context_costs(layer) for layer in qnet.layers.values()]
    costs = {k: sum(c[k] for c in per_layer) for k in per_layer[0]}
    sizes = qnet.sizes
    return {**{f"{k} (B)": round(v) for k, v in costs.items()},
            "codes in file (B)": sizes["codes"] + sizes["code_model"],
            "rest of file (B)": sizes["header"] + sizes["float"] + sizes["checksum"],
            "best saving": 1 - min(costs.values()) / costs["order 0"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="../shared/data/mnist")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="benchmarks/context_probe.json")
    args = parser.parse_args()
    train, test = pqnet.data.load("mnist", root=args.data_dir)
    fit_part, val, float_net = float_start(args.seed, train)
    _, posterior = fitted(float_net, fit_part, args.seed, epochs=2)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for options in CANDIDATES:
            qnet = pqnet.quantize(posterior, "uniform", data=fit_part, seed=args.seed,
                                  finetune_epochs=8, **options)
            scored = reloaded_accuracy(qnet, Path(folder) / "net.pqn", val, test)
            rows.append({**options, "size_bytes": scored["size_bytes"],
                         "accuracy": scored["accuracy"], **probe(qnet)})
    print(format_table(rows, list(rows[0])))
    save_json({"config": vars(args), "load": os.getloadavg(), "rows": rows}, args.json)


if __name__ == "__main__":
    main()
