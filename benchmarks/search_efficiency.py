"""Bit-width search efficiency: the multi-task GP search against random search (issue 6).

What is measured
----------------
LeNet-5 on MNIST read by ``pqnet.data.load("mnist", root=DIR)`` (the 5k training subset when
only that is present; the official 10k test set). ``--val-size`` training examples are held
out (:func:`pqnet.search.split_validation`) as the search's validation split; the rest train
everything:

1. the deterministic LeNet-5 trains ``--epochs`` epochs (Adam, :func:`pqnet.bench.train_network`),
   and the BNN starts from it: ``pqnet.fit(pqnet.bayesian(net), ...)`` for ``--bnn-epochs``
   epochs with ``kl_weight`` 0.1 and a cosine schedule, as in ``make bench``;
2. **random search** (:func:`pqnet.search.random_search`): per-layer widths drawn uniformly
   among the allocations within ``--avg-bits``, each fine-tuned ``e_max`` epochs
   (the top fidelity) and scored on the validation split, for ``--random-budget`` epochs;
3. **GP search** (:func:`pqnet.search.search`): the multi-task GP over fidelities
   ``--fidelities`` with a budget of a third of what the random search *spent*, warm-started
   from ``quantile-inform`` at the same ``--avg-bits``.

Cost is counted in epochs, ``e + overhead_epochs`` per evaluation (``--overhead-epochs``: the
quantizing and validating, which is also timed: the measured ratio is reported). Both
searches use the same objective (validation accuracy after ``e`` fine-tuning epochs, the same
minibatches). The chosen network of each is saved, loaded back and scored on the **test**
split, which neither search saw.

Each of ``--seeds`` is an independent replicate: its own validation split, networks,
posterior and search seeds.

Target (reported, not asserted), per seed: the GP's best validation accuracy at ``e_max`` is
within 0.2 pp of the random search's best, at most a third of its cost. The validation score
of a search's best is the maximum of the noisy scores it saw (about 0.5 pp of binomial noise
on 1,000 examples), so a search with more top-fidelity evaluations gains from that noise
alone; the same comparison of the two chosen networks on the test split, free of that
selection, is reported beside it. Writes ``--json`` (settings, every trace, the figures) and
``--plot`` (best found against cost, one panel per seed).

    python benchmarks/search_efficiency.py --data-dir ../shared/data/mnist
"""

from __future__ import annotations

import os

# passive OpenMP threads on a shared 2-core machine (see benchmarks/train_speed.py)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import datetime
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

import pqnet
from pqnet._io import atomic_write, save_json
from pqnet.bench import train_network
from pqnet.search import SearchResult, plot_searches, random_search, search, split_validation

HERE = Path(__file__).resolve().parent
GAP_PP = 0.2  # the GP's best may be this far (percentage points) below random search's
COST_RATIO = 1 / 3  # ... at this fraction of its cost


def posterior_for(train, args: argparse.Namespace, seed: int, cache: Path) -> pqnet.Posterior:
    """The tempered LeNet-5 BNN started from the trained deterministic net (cached)."""
    if cache.is_file():
        print(f"posterior read from {cache}")
        return pqnet.Posterior.load(cache)
    torch.manual_seed(seed)
    net = pqnet.models.lenet5()
    seconds = train_network(net, train, epochs=args.epochs, batch_size=64, lr=1e-3, seed=seed)
    print(f"deterministic LeNet-5: {args.epochs} epochs in {seconds:.1f} s")
    posterior = pqnet.fit(pqnet.bayesian(net), train, epochs=args.bnn_epochs, batch_size=64,
                          lr=1e-3, kl_weight=0.1, warm_start=0, seed=seed, progress=False)
    posterior.save(cache)
    return posterior


def chosen(result: SearchResult, folder: Path, name: str, test) -> dict:
    """The best allocation of ``result``: validation, and test on the saved-and-loaded net."""
    file = folder / f"{name}.pt"
    result.qnet.save(file)
    loaded = pqnet.QuantizedNet.load(file)
    evaluations = result.evaluations
    top = result.trace["settings"]["top_fidelity"]
    return {"bits": result.best_bits, "avg_bits": loaded.avg_bits,
            "val_accuracy": result.best["accuracy"],
            "test_accuracy": float(pqnet.evaluate(loaded.to_module(), test)["accuracy"]),
            "size_bytes": loaded.size_bytes, "cost_epochs": result.cost,
            "evaluations": len(evaluations),
            "top_evaluations": sum(r["fidelity"] == top for r in evaluations),
            "mean_top_val_accuracy": statistics.fmean(
                r["accuracy"] for r in evaluations if r["fidelity"] == top),
            "found_at_epochs": result.best["total_cost"],
            "evaluation_seconds": sum(r["seconds"] for r in evaluations),
            "search_seconds": sum(r.get("search_seconds", 0.0) for r in evaluations)}


def overhead_ratio(result: SearchResult) -> float | None:
    """Measured seconds of an evaluation without fine-tuning / seconds of one epoch."""
    zero = [r["seconds"] for r in result.evaluations if r["fidelity"] == 0]
    tuned = [(r["seconds"], r["fidelity"]) for r in result.evaluations if r["fidelity"] > 0]
    if not zero or not tuned:
        return None
    base = sum(zero) / len(zero)
    per_epoch = sum(s - base for s, _ in tuned) / sum(e for _, e in tuned)
    return base / per_epoch


def one_seed(seed: int, args: argparse.Namespace, fidelities: tuple[int, ...], full_train,
             test) -> tuple[dict, dict[str, SearchResult]]:
    """Random search, then the GP search at a third of its cost, on replicate ``seed``."""
    train, val = split_validation(full_train, args.val_size, seed=seed)
    work = args.work / f"seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    posterior = posterior_for(train, args, seed, work / "posterior.pt")
    reference = {"val": float(pqnet.evaluate(posterior.mean_module(), val)["accuracy"]),
                 "test": float(pqnet.evaluate(posterior.mean_module(), test)["accuracy"])}
    print(f"seed {seed}: BNN mean network validation {reference['val']:.4f}, "
          f"test {reference['test']:.4f}")
    common = {"avg_bits": args.avg_bits, "overhead_epochs": args.overhead_epochs,
              "seed": seed, "resume": args.resume, "log": print}
    t = time.perf_counter()
    rand = random_search(posterior, train, val, fidelity=fidelities[-1],
                         budget_epochs=args.random_budget,
                         trace_path=work / "random_trace.json", **common)
    rand_seconds = time.perf_counter() - t
    t = time.perf_counter()
    gp = search(posterior, train, val, fidelities=fidelities,
                budget_epochs=rand.cost * COST_RATIO, trace_path=work / "gp_trace.json",
                **common)
    gp_seconds = time.perf_counter() - t

    rows = {"gp": chosen(gp, work, "gp_best", test),
            "random": chosen(rand, work, "random_best", test)}
    for row, seconds in ((rows["gp"], gp_seconds), (rows["random"], rand_seconds)):
        row["wall_seconds"] = None if args.resume else seconds  # a resumed run replays
    warm = next(r for r in gp.evaluations
                if r["source"] == "warm-start" and r["fidelity"] == fidelities[-1])
    gaps = {split: round(100 * (rows["random"][f"{split}_accuracy"]
                                - rows["gp"][f"{split}_accuracy"]), 9)
            for split in ("val", "test")}
    ratio = rows["gp"]["cost_epochs"] / rows["random"]["cost_epochs"]
    run = {"seed": seed, "data_note": val.note, "bnn_mean_network": reference,
           "quantile_inform_warm_start": {"bits": warm["bits"], "avg_bits": warm["avg_bits"],
                                          "val_accuracy": warm["accuracy"]},
           "gp": rows["gp"], "random": rows["random"],
           "measured_overhead_epochs": overhead_ratio(gp),
           "target": {"val_gap_pp": gaps["val"], "test_gap_pp": gaps["test"],
                      "cost_ratio": ratio,
                      "met": gaps["val"] <= GAP_PP and ratio <= COST_RATIO,
                      "met_on_test": gaps["test"] <= GAP_PP and ratio <= COST_RATIO},
           "traces": {"gp": gp.trace, "random": rand.trace}}
    for name, row in rows.items():
        print(f"{name:>6}: val {row['val_accuracy']:.4f}  test {row['test_accuracy']:.4f}  "
              f"bits {list(row['bits'].values())} ({row['avg_bits']:.3f} avg)  "
              f"cost {row['cost_epochs']:.2f} epochs, {row['evaluations']} evaluations "
              f"({row['top_evaluations']} at {fidelities[-1]} epochs), "
              f"{row['evaluation_seconds']:.0f} s evaluating + {row['search_seconds']:.0f} s "
              "choosing")
    print(f"seed {seed}: GP - random: validation {-gaps['val']:+.2f} pp, test "
          f"{-gaps['test']:+.2f} pp, at {ratio:.3f} of its cost -> "
          f"{'met' if run['target']['met'] else 'MISSED'} (on test: "
          f"{'met' if run['target']['met_on_test'] else 'missed'})\n")
    return run, {"gp": gp, "random": rand}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="../shared/data/mnist")
    parser.add_argument("--avg-bits", type=float, default=2.0)
    parser.add_argument("--fidelities", default="0,1,2,4",
                        help="fine-tuning epochs of the GP's tasks, comma-separated")
    parser.add_argument("--random-budget", type=float, default=120.0,
                        help="epochs the random search may spend (the GP gets a third of "
                        "what it spends)")
    parser.add_argument("--overhead-epochs", type=float, default=0.1)
    parser.add_argument("--val-size", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=20, help="deterministic net's epochs")
    parser.add_argument("--bnn-epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir())
                        / "pqnet-search-bench", help="posterior caches, trace checkpoints "
                        "and the chosen networks")
    parser.add_argument("--resume", action="store_true",
                        help="continue the traces checkpointed in --work")
    parser.add_argument("--json", type=Path, default=HERE / "search_lenet5.json")
    parser.add_argument("--plot", type=Path, default=HERE / "search_lenet5.png")
    args = parser.parse_args(argv)
    fidelities = tuple(int(e) for e in args.fidelities.split(","))
    torch.set_num_threads(2)
    start = time.perf_counter()
    load_before = os.getloadavg()[0]
    full_train, test = pqnet.data.load("mnist", root=args.data_dir)
    print(full_train.note)

    runs, searches = [], []
    for seed in args.seeds:
        run, found = one_seed(seed, args, fidelities, full_train, test)
        runs.append(run)
        searches.append(found)
    results = {
        "format": "pqnet.search-benchmark", "version": 1,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
        "machine": f"{platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}",
        "load_average_before": load_before,
        "settings": {**vars(args), "fidelities": list(fidelities), "work": str(args.work),
                     "json": str(args.json), "plot": str(args.plot),
                     "max_gap_pp": GAP_PP, "max_cost_ratio": COST_RATIO},
        "summary": {
            "met": sum(r["target"]["met"] for r in runs),
            "met_on_test": sum(r["target"]["met_on_test"] for r in runs), "seeds": len(runs),
            "mean_val_gap_pp": statistics.fmean(r["target"]["val_gap_pp"] for r in runs),
            "mean_test_gap_pp": statistics.fmean(r["target"]["test_gap_pp"] for r in runs)},
        "runs": runs, "seconds": time.perf_counter() - start}
    save_json(results, args.json)
    save_figure(searches, args.seeds, args.avg_bits, args.plot)
    summary = results["summary"]
    print(f"target met on validation in {summary['met']} of {summary['seeds']} seeds (on test: "
          f"{summary['met_on_test']}); mean gap random - GP: validation "
          f"{summary['mean_val_gap_pp']:+.2f} pp, test {summary['mean_test_gap_pp']:+.2f} pp; "
          f"wrote {args.json} and {args.plot}")
    return results


def save_figure(searches: list[dict[str, SearchResult]], seeds: list[int], avg_bits: float,
                path: Path) -> None:
    """Best found against cost, one panel per seed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6 * len(seeds), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, found, seed in zip(fig.subplots(1, len(seeds), squeeze=False)[0], searches, seeds,
                               strict=True):
        plot_searches(found, ax=ax, title=f"LeNet-5 / MNIST, {avg_bits:g} avg bits, seed {seed}")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


if __name__ == "__main__":
    main()
