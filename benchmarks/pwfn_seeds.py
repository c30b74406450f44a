"""PWFN on MNIST over several seeds: unique values, code entropy and accuracy against float.

For each seed, the same pipeline as the ``pwfn`` rows of ``pqnet bench``: a plain PyTorch
net trained for ``--epochs`` (the float reference), PWFN's posterior fitted from it
(``prior="pwfn"``, ``init_scale="pwfn"``, ``--pwfn-epochs``, ``scale_lr=0.1``, cosine),
then ``pqnet.quantize(..., "pwfn", threshold=t, retrain_epochs=--retrain-epochs)`` for each
threshold. Every quantized net is saved, loaded back and scored on the test split.

    .venv/bin/python benchmarks/pwfn_seeds.py --model lenet5 --seeds 0 1 2 \\
        --json benchmarks/pwfn_lenet5_seeds.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import pqnet
from pqnet._io import save_json
from pqnet.bench import PWFN_SCALE_LR, train_network
from pqnet.diagnostics.table import format_table
from pqnet.quantize import QuantizedNet


def one_seed(model: str, train, test, seed: int, args, folder: Path) -> list[dict]:
    torch.manual_seed(seed)
    net = pqnet.models.for_data(model, train.input_shape, train.num_classes)
    train_network(net, train, epochs=args.epochs, batch_size=64, lr=1e-3, seed=seed)
    float_accuracy = pqnet.evaluate(net, test)["accuracy"]
    posterior = pqnet.fit(pqnet.bayesian(net, prior="pwfn", init_scale="pwfn"), train,
                          epochs=args.pwfn_epochs, lr=1e-3, scale_lr=PWFN_SCALE_LR,
                          kl_weight=1, warm_start=0, seed=seed, progress=False)
    mean_accuracy = pqnet.evaluate(posterior.mean_module(), test)["accuracy"]
    rows = []
    for threshold in args.thresholds:
        start = time.perf_counter()
        qnet = pqnet.quantize(posterior, "pwfn", data=train, seed=seed, threshold=threshold,
                              retrain_epochs=args.retrain_epochs)
        seconds = time.perf_counter() - start
        loaded = QuantizedNet.load(qnet.save(folder / f"{model}_{seed}_{threshold:g}.pqn"))
        accuracy = pqnet.evaluate(loaded.to_module(), test)["accuracy"]
        rows.append({"model": model, "seed": seed, "threshold": threshold,
                     "float": float_accuracy, "pwfn_mean": mean_accuracy,
                     "accuracy": accuracy, "drop_pp": 100 * (float_accuracy - accuracy),
                     "unique_values": loaded.unique_values,
                     "value_entropy_bits": loaded.value_entropy_bits,
                     "code_entropy_bits": loaded.code_entropy_bits, "avg_bits": loaded.avg_bits,
                     "size_bytes": loaded.size_bytes, "bits_per_weight": loaded.bits_per_weight,
                     "seconds": seconds})
        print(format_table(rows[-1:], list(rows[-1])), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="lenet5")
    parser.add_argument("--data-dir", default="../shared/data/mnist")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[1.0, 1.25])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--pwfn-epochs", type=int, default=3)
    parser.add_argument("--retrain-epochs", type=int, default=2)
    parser.add_argument("--json", default="benchmarks/pwfn_seeds.json")
    args = parser.parse_args()
    train, test = pqnet.data.load("mnist", root=args.data_dir)
    print(train.note)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            rows += one_seed(args.model, train, test, seed, args, Path(tmp))
    columns = ["model", "seed", "threshold", "float", "accuracy", "drop_pp", "unique_values",
               "value_entropy_bits", "code_entropy_bits", "avg_bits", "size_bytes",
               "bits_per_weight"]
    print(format_table(rows, columns))
    summary = []
    for threshold in args.thresholds:
        mine = [r for r in rows if r["threshold"] == threshold]
        summary.append({"threshold": threshold, **{
            key: statistics.mean(r[key] for r in mine)
            for key in ("drop_pp", "unique_values", "value_entropy_bits", "size_bytes",
                        "accuracy")},
            "worst_drop_pp": max(r["drop_pp"] for r in mine)})
    print(format_table(summary, list(summary[0])))
    save_json({"config": vars(args), "rows": rows, "mean_over_seeds": summary}, args.json)


if __name__ == "__main__":
    main()
