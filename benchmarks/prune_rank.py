"""Which weights to prune: smallest posterior mean ``|mu|`` or smallest ``|mu| / sigma``?

The frontier's setup (:mod:`frontier`): per seed a stratified 10 % of MNIST-5k is
validation, the float LeNet-5 trains 10 epochs, ``pqnet.fit`` with its defaults 8 more from
it. Each candidate is uniform 2 bits with a fraction of the weights zeroed, ranked one of two
ways over the whole network (each layer keeping its largest), then fine-tuned 2 epochs
(zeros held): the same as ``pqnet.quantize(posterior, "uniform", bits=2,
prune_fraction=f, finetune_epochs=2)`` for the magnitude ranking. Every net is saved and
scored as loaded. Each layer's median ``|mu| / sigma`` is recorded beside them.

    python benchmarks/prune_rank.py --data-dir ../shared/data/mnist --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from frontier import fitted, float_start, reloaded_accuracy

import pqnet
from pqnet._io import save_json
from pqnet.diagnostics.table import format_table
from pqnet.quantize import QuantizedNet, finetune
from pqnet.quantize.budget import layer_posteriors
from pqnet.quantize.prune import keep_largest

FRACTIONS = (0.8, 0.9, 0.95)
RANKS = {"magnitude": lambda mu, sigma: mu, "snr": lambda mu, sigma: mu / sigma}


def pruned(qnet: QuantizedNet, posterior: pqnet.Posterior, fraction: float,
           rank: str) -> QuantizedNet:
    keep = keep_largest({p: RANKS[rank](mu, sigma) for p, mu, sigma in
                         layer_posteriors(posterior)}, 1 - fraction)
    return QuantizedNet({p: layer.pruned(~keep[p]) for p, layer in qnet.layers.items()},
                        qnet.module, qnet.method, qnet.config)


def one_seed(seed: int, train, test, folder: Path) -> list[dict]:
    fit_part, val, float_net = float_start(seed, train)
    _, posterior = fitted(float_net, fit_part, seed, epochs=8)
    rows = [{"seed": seed, "layer": path, "median_snr": float((mu.abs() / sigma).median()),
             "median_abs_mu": float(mu.abs().median())}
            for path, mu, sigma in layer_posteriors(posterior)]
    for fraction in FRACTIONS:
        for rank in RANKS:
            qnet = pruned(pqnet.quantize(posterior, "uniform", bits=2), posterior, fraction, rank)
            qnet = finetune(qnet, posterior, fit_part, epochs=2, seed=seed)
            file = folder / f"{seed}_{fraction}_{rank}.pqn"
            rows.append({"seed": seed, "fraction": fraction, "rank": rank,
                         **reloaded_accuracy(qnet, file, val, test)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="../shared/data/mnist")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", default="benchmarks/prune_rank.json")
    args = parser.parse_args()
    train, test = pqnet.data.load("mnist", root=args.data_dir)
    start, load = time.perf_counter(), os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            rows += one_seed(seed, train, test, Path(tmp))
            print(format_table([r for r in rows if "rank" in r],
                               ["seed", "fraction", "rank", "size_bytes", "val_accuracy",
                                "accuracy"]), flush=True)
    save_json({"config": vars(args), "load_before": load, "load_after": os.getloadavg(),
               "seconds": time.perf_counter() - start, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
