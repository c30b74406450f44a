"""The compression frontier: test accuracy against file size, chosen on validation, paired tests.

For each seed, on MNIST-5k (``../shared/data/mnist``) with LeNet-5:

1. a stratified 10 % of the training images is carved out as validation; the 10k test
   images only score what validation chose;
2. the **float** net (plain PyTorch, Adam 1e-3) trains ``--float-epochs`` on the rest; it
   is every method's start; every family trains at batch 64 (:data:`BATCH`, ``pqnet.fit``'s
   default), so an epoch is the same number of steps for all;
3. every method then gets ``--epochs`` more epochs on the same images:
   - **pqnet**: ``pqnet.fit(pqnet.bayesian(float))`` with its defaults for
     ``epochs - finetune`` epochs, then each quantizer in :data:`PQNET` with
     ``finetune_epochs=finetune``; and a second posterior fitted ``epochs - long_finetune``
     epochs, then each pruned candidate in :data:`PRUNED_LONG` (the :data:`SPARSITY` levels
     at 2 and 3 bits) with ``finetune_epochs=long_finetune``;
   - **Deep Compression**: ``quantize(..., "deep-compression")`` on the float net at the
     :data:`SPARSITY` levels with ``k`` = 4, 8 or 16 (as many levels as 2, 3, 4 bits), 3 rounds
     of ``(epochs - 1) // 3`` retraining epochs and 1 epoch of centroid fine-tuning;
   - **brevitas QAT**: the float net's brevitas twin trained ``epochs`` epochs;
4. every network is saved in pqnet's file format and scored as loaded; its size is the file.

Selection: per family, the smallest file whose validation accuracy is at least the float
net's minus 0.3 pp (500 validation images: one image is 0.2 pp, so this choice is noisy;
the families get 15, 12 and 3 candidates). The float net's size is its raw state dict. The
chosen file's test accuracy, and McNemar tests on the 10k test images against brevitas
2-bit, the chosen Deep Compression file and every smaller Deep Compression file, are
reported. The posterior's
``KL(q || p)`` in kB is the information bound (a draw from ``q`` is codable in about KL nats:
Havasi et al. 2019, "Minimal Random Code Learning").

    python benchmarks/frontier.py --data-dir ../shared/data/mnist --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import pqnet
from pqnet._io import save_json
from pqnet.bench import brevitas_net, qat_to_qnet, train_network
from pqnet.diagnostics.metrics import classification_metrics, entropy, mcnemar
from pqnet.diagnostics.plots import save_figure
from pqnet.diagnostics.table import format_table
from pqnet.inference.batching import split_validation
from pqnet.quantize import QuantizedNet
from pqnet.quantize.codec import raw_bytes

PQNET = [("sigma-code", {"code_bits": b}) for b in (0.75, 1.0, 1.5)] \
    + [("uniform", {"bits": b}) for b in (2, 3)] \
    + [("quantile-inform", {"avg_bits": b}) for b in (1.5, 2.0)]
SPARSITY = (0.8, 0.9, 0.93, 0.95)  # the same pruning levels for pqnet and Deep Compression
# pqnet's pruned candidates train longer under their constraint: a shorter fit, then
# --long-finetune epochs of fine-tuning with the zeros held (the same 10 epochs in all)
PRUNED_LONG = [("uniform", {"bits": b, "prune_fraction": f}) for b in (2, 3) for f in SPARSITY]
DEEP = [{"sparsity": s, "k": k} for s in SPARSITY for k in (4, 8, 16)]
BREVITAS = (2, 3, 4)
TOLERANCE = 0.003  # 0.3 pp below the float net's validation accuracy
BATCH = 64  # every family's minibatch (pqnet.fit's default): the same steps per epoch


def scores(module: torch.nn.Module, data) -> tuple[dict, torch.Tensor]:
    """``evaluate``'s metrics and the per-example correctness on ``data``, from one pass."""
    x, y = data.tensors[:2]
    probs = pqnet.predict(module, x, num_samples=1)
    metrics = classification_metrics(probs, y, entropy(probs))
    return {k: metrics[k] for k in ("accuracy", "nll", "ece")}, probs.argmax(1) == y


def reloaded_accuracy(qnet: QuantizedNet, path: Path, val, test) -> dict:
    """Save ``qnet`` to ``path``, load it back, and score the loaded copy: its file's size
    and its validation and test accuracy."""
    loaded = QuantizedNet.load(qnet.save(path))
    module = loaded.to_module()
    return {"size_bytes": loaded.size_bytes,
            "val_accuracy": pqnet.evaluate(module, val)["accuracy"],
            "accuracy": pqnet.evaluate(module, test)["accuracy"]}


def measured(qnet: QuantizedNet, family: str, setting: str, folder: Path, val, test,
             seconds: float) -> tuple[dict, torch.Tensor]:
    """Save, reload and score ``qnet``: a row and its test correctness."""
    path = qnet.save(folder / f"{family}_{setting}.pqn".replace(" ", ""))
    loaded = QuantizedNet.load(path)
    assert path.stat().st_size == loaded.size_bytes
    val_scores, _ = scores(loaded.to_module(), val)
    test_scores, correct = scores(loaded.to_module(), test)
    return {"family": family, "setting": setting, "file": path.name,
            "size_bytes": loaded.size_bytes, "bits_per_weight": loaded.bits_per_weight,
            "code_entropy_bits": loaded.code_entropy_bits, "val_accuracy": val_scores["accuracy"],
            **test_scores, "seconds": seconds}, correct


def pqnet_rows(float_net, fit_part, val, test, seed, args, folder):
    rows, correct, info = [], {}, {}
    kl_weight = args.kl_weight if args.kl_weight == "auto" else float(args.kl_weight)
    for finetune, candidates in ((args.finetune, PQNET), (args.long_finetune, PRUNED_LONG)):
        start = time.perf_counter()
        bnn, posterior = fitted(float_net, fit_part, seed, args.epochs - finetune, kl_weight)
        fit_seconds = time.perf_counter() - start
        info[f"finetune={finetune}"] = {
            "kl_kb": float(bnn.kl().detach()) / math.log(2) / 8 / 1024,
            "kl_weight": posterior.config["kl_weight"],
            "posterior": scores(posterior.mean_module(), test)[0]}
        for method, options in candidates:
            start = time.perf_counter()
            qnet = pqnet.quantize(posterior, method, data=fit_part, seed=seed,
                                  finetune_epochs=finetune, **options)
            setting = f"{method} " + " ".join(f"{k}={v:g}" for k, v in options.items())
            setting += f" finetune={finetune}" if finetune != args.finetune else ""
            row, hits = measured(qnet, "pqnet", setting, folder, val, test,
                                 fit_seconds + time.perf_counter() - start)
            rows.append(row)
            correct[setting] = hits
    return rows, correct, {**info[f"finetune={args.finetune}"], "splits": info}


def deep_rows(float_net, fit_part, val, test, seed, args, folder):
    posterior = pqnet.Posterior.from_bnn(pqnet.bayesian(copy.deepcopy(float_net)))
    retrain = max(1, (args.epochs - 1) // 3)
    rows, correct = [], {}
    for options in DEEP:
        start = time.perf_counter()
        qnet = pqnet.quantize(posterior, "deep-compression", data=fit_part, seed=seed, rounds=3,
                              retrain_epochs=retrain, centre_epochs=1, batch_size=BATCH,
                              **options)
        setting = " ".join(f"{k}={v:g}" for k, v in options.items())
        row, hits = measured(qnet, "deep-compression", setting, folder, val, test,
                             time.perf_counter() - start)
        rows.append(row)
        correct[setting] = hits
    return rows, correct


def brevitas_rows(float_net, fit_part, val, test, seed, args, folder):
    rows, correct = [], {}
    for bits in BREVITAS:
        qat = brevitas_net(float_net, bits)
        seconds = train_network(qat, fit_part, epochs=args.epochs, batch_size=BATCH, lr=1e-3,
                                seed=seed)
        qnet = qat_to_qnet(qat, float_net, bits)
        row, hits = measured(qnet, "brevitas-qat", f"{bits} bits", folder, val, test, seconds)
        rows.append(row)
        correct[f"{bits} bits"] = hits
    return rows, correct


def float_start(seed: int, train, epochs: int = 10):
    """The validation split of ``train`` and the float LeNet-5 trained on the rest."""
    fit_part, val = split_validation(train, 0.1, seed=seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        float_net = pqnet.models.lenet5()
    train_network(float_net, fit_part, epochs=epochs, batch_size=BATCH, lr=1e-3, seed=seed)
    return fit_part, val, float_net


def fitted(float_net, fit_part, seed: int, epochs: int, kl_weight="auto"):
    """``pqnet.fit``'s defaults on ``pqnet.bayesian(float_net)``: the BNN and its posterior."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        bnn = pqnet.bayesian(copy.deepcopy(float_net))
    return bnn, pqnet.fit(bnn, fit_part, epochs=epochs, seed=seed, kl_weight=kl_weight,
                          progress=False)


def one_seed(seed: int, train, test, args, folder: Path) -> dict:
    fit_part, val, float_net = float_start(seed, train, args.float_epochs)
    float_val, _ = scores(float_net, val)
    float_test, float_correct = scores(float_net, test)
    rows, correct, info = [], {}, {}
    for family, build in (("pqnet", pqnet_rows), ("deep-compression", deep_rows),
                          ("brevitas-qat", brevitas_rows)):
        out = build(float_net, fit_part, val, test, seed, args, folder)
        rows += out[0]
        correct.update({(family, k): v for k, v in out[1].items()})
        if family == "pqnet":
            info = out[2]
        print(format_table(out[0], ["family", "setting", "size_bytes", "bits_per_weight",
                                    "val_accuracy", "accuracy", "nll", "ece"]), flush=True)
    for row in rows:
        row["seed"] = seed
    chosen = choose(rows, float_val["accuracy"])
    tests = paired_tests(chosen, rows, correct)
    return {"seed": seed, "float": {**float_test, "val_accuracy": float_val["accuracy"],
                                    "size_bytes": raw_bytes(float_net.state_dict().values())},
            **info, "rows": rows, "chosen": chosen, "mcnemar": tests,
            "float_correct": int(float_correct.sum())}


def choose(rows: list[dict], float_val: float) -> dict:
    """Per family, the smallest file within ``TOLERANCE`` of the float net on validation."""
    chosen = {}
    for family in ("pqnet", "deep-compression", "brevitas-qat"):
        ok = [r for r in rows if r["family"] == family
              and r["val_accuracy"] >= float_val - TOLERANCE]
        chosen[family] = min(ok, key=lambda r: r["size_bytes"]) if ok else None
    return chosen


def paired_tests(chosen: dict, rows: list[dict], correct: dict) -> dict:
    """McNemar of pqnet's chosen file against brevitas 2-bit, the chosen Deep Compression
    file, and every Deep Compression file smaller than pqnet's."""
    if chosen["pqnet"] is None:
        return {}
    mine = correct[("pqnet", chosen["pqnet"]["setting"])]
    rivals = {"brevitas-qat 2 bits": ("brevitas-qat", "2 bits")}
    if chosen["deep-compression"] is not None:
        rivals["deep-compression chosen"] = ("deep-compression",
                                             chosen["deep-compression"]["setting"])
    for row in rows:
        if row["family"] == "deep-compression" \
                and row["size_bytes"] < chosen["pqnet"]["size_bytes"]:
            rivals[f"deep-compression {row['setting']}"] = ("deep-compression", row["setting"])
    return {name: mcnemar(mine, correct[key]) for name, key in rivals.items()}


def plot(results: list[dict], path: Path) -> None:
    fig = Figure(figsize=(8, 5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    colours = {"pqnet": "tab:blue", "deep-compression": "tab:orange",
               "brevitas-qat": "tab:green"}
    for seed_result in results:
        for family, colour in colours.items():
            points = sorted((r["size_bytes"] / 1024, 100 * r["accuracy"])
                            for r in seed_result["rows"] if r["family"] == family)
            ax.scatter(*zip(*points, strict=True), color=colour, s=14, alpha=0.6,
                       label=family if seed_result is results[0] else None)
        ax.axvline(seed_result["kl_kb"], color="tab:blue", linestyle=":", linewidth=1,
                   label="KL(q||p) bound" if seed_result is results[0] else None)
        ax.axhline(100 * seed_result["float"]["accuracy"], color="grey", linestyle="--",
                   linewidth=1, label="float net" if seed_result is results[0] else None)
    ax.set_xscale("log")
    ax.set_ylim(max(80, ax.get_ylim()[0]), None)
    ax.set_xlabel("file size (kB, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"LeNet-5 on MNIST-5k, seeds {[r['seed'] for r in results]}: every "
                 "network as its saved file", fontsize="medium", loc="left")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="../shared/data/mnist")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--float-epochs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--finetune", type=int, default=2)
    parser.add_argument("--long-finetune", type=int, default=8,
                        help="fine-tuning epochs of the PRUNED_LONG candidates")
    parser.add_argument("--kl-weight", default="auto",
                        help="pqnet.fit's kl_weight: 'auto' (the default posterior) or a number")
    parser.add_argument("--json", default="benchmarks/frontier.json")
    parser.add_argument("--plot", default="benchmarks/frontier.png")
    args = parser.parse_args()
    train, test = pqnet.data.load("mnist", root=args.data_dir)
    start, load = time.perf_counter(), os.getloadavg()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            results.append(one_seed(seed, train, test, args, Path(tmp)))
            summary = [{"seed": r["seed"], "family": f, **(c or {})}
                       for r in results for f, c in r["chosen"].items()]
            print(format_table(summary, ["seed", "family", "setting", "size_bytes",
                                         "bits_per_weight", "val_accuracy", "accuracy", "ece"]))
            print(results[-1]["mcnemar"], flush=True)
    save_json({"config": vars(args), "load_before": load, "load_after": os.getloadavg(),
               "seconds": time.perf_counter() - start, "torch": torch.__version__,
               "seeds": results}, args.json)
    plot(results, Path(args.plot))


if __name__ == "__main__":
    main()
