"""The ``pqnet`` command: a thin layer over the library.

::

    pqnet demo                                  # digits: fit, evaluate, write runs/demo
    pqnet fit --model lenet5 --data mnist --data-dir DIR --epochs 20 --out RUN_DIR
    pqnet quantize RUN_DIR --method quantile-inform --avg-bits 2   # RUN_DIR/quantized/...
    pqnet bench --model lenet5 --data mnist --data-dir DIR --json OUT.json --plot OUT.png
    pqnet report RUN_DIR                        # RUN_DIR/report/: report.md, idata.nc, PNGs
    pqnet search --posterior RUN_DIR/posterior.pt --avg-bits 2   # per-layer widths by GP search

Each command writes its results atomically (a file is replaced whole or not at all), never
over the outputs of an earlier run unless ``--overwrite`` is given, and reports bad arguments
as one line naming the option the user typed (``--data-dir``), with exit status 2. Progress
goes to the ``pqnet`` logger, which the command prints at INFO to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from . import __version__, _checks, models
from . import data as datasets
from ._io import load_json, save_json
from .bnn import bayesian
from .diagnostics.table import format_table
from .inference import Posterior, evaluate, fit, init_distributed
from .inference.fit import check_settings as check_fit_settings
from .quantize import METHODS, budget_keywords

log = logging.getLogger(__name__)


def _auto_or(kind: type):
    """An argparse type: the word 'auto' or a ``kind``."""
    def parse(value: str):
        return value if value == "auto" else kind(value)
    parse.__name__ = kind.__name__
    return parse


def _add_fit_options(parser: argparse.ArgumentParser, epochs: int) -> None:
    parser.add_argument("--epochs", type=int, default=epochs,
                        help="training epochs, warm start included")
    parser.add_argument("--batch-size", type=int, default=64, help="minibatch size")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of the means")
    parser.add_argument("--scale-lr", type=float,
                        help="learning rate of the posterior scales (None: 10 x --lr)")
    parser.add_argument("--lr-schedule", choices=["constant", "cosine"], default="cosine",
                        help="learning-rate schedule")
    parser.add_argument("--kl-weight", type=_auto_or(float), default="auto",
                        help="beta of the ELBO's KL term: 1 is the exact ELBO; 'auto' "
                        "chooses it on a validation part of the training data")
    parser.add_argument("--warm-start", type=_auto_or(int), default="auto",
                        help="epochs of maximum-likelihood training of the means before SVI "
                        "('auto': half of --epochs)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="share of the training data held out to choose --kl-weight auto")
    parser.add_argument("--warmup-epochs", type=int, default=0,
                        help="SVI epochs over which the KL weight rises to --kl-weight")
    parser.add_argument("--prior", default="fan-in", help="'fan-in', 'normal' or a scale")
    parser.add_argument("--init-scale", default="0.001",
                        help="initial posterior sigma: a number, 'relative' or 'pwfn'")
    parser.add_argument("--num-samples", type=int, default=32,
                        help="posterior draws for the predictive metrics")
    parser.add_argument("--seed", type=int, default=0, help="seeds weights, batches and draws")
    parser.add_argument("--device", default="cpu",
                        help="'cpu' or 'cuda' (under torchrun: GPU LOCAL_RANK of each process)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar (the log lines stay)")
    parser.add_argument("--checkpoint-dir", type=Path,
                        help="write the fit's state here at the end of every epoch")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the checkpoint in --checkpoint-dir, if there is one")
    parser.add_argument("--retry-lr-factor", type=float,
                        help="on a NaN/inf ELBO or gradient, redo the epoch from its start "
                        "with the learning rates times this factor (in (0, 1))")
    parser.add_argument("--max-retries", type=int, default=3,
                        help="retries at lower learning rates before giving up")


def _number_or_name(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value


def fit_run(model: str, data: str, data_dir: str | None, out: Path | None,
            args: argparse.Namespace) -> tuple[Posterior, dict | None]:
    """Fit ``model`` on ``data`` as the options in ``args`` say, evaluate the posterior
    predictive and the mean network on the test split, and write ``posterior.pt`` and
    ``metrics.json`` to ``out`` (when given).

    Under ``torchrun`` every process trains its shard of each batch (see
    :func:`pqnet.inference.fit`) and process 0 alone evaluates, prints and writes; the
    others return ``(posterior, None)``.
    """
    _check_fit_arguments(model, data, args)
    if out is not None:
        # --resume continues this very run, whose folder it may rewrite
        _refuse_to_overwrite(out, ("posterior.pt", "metrics.json"),
                             args.overwrite or args.resume, "--out")
    rank, world_size, device = init_distributed(args.device)
    try:
        train, test = datasets.load(data, root=data_dir)
        if rank == 0:
            print(train.note)
        torch.manual_seed(args.seed)  # the initial weights: the same seed, the same run
        module = models.for_data(model, train.input_shape, train.num_classes)
        bnn = bayesian(module, prior=_number_or_name(args.prior),
                       init_scale=_number_or_name(args.init_scale))
        posterior = fit(bnn, train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        scale_lr=args.scale_lr, kl_weight=args.kl_weight,
                        warm_start=args.warm_start, val_fraction=args.val_fraction,
                        warmup_epochs=args.warmup_epochs, lr_schedule=args.lr_schedule,
                        seed=args.seed, device=device,
                        progress=args.progress, checkpoint_dir=args.checkpoint_dir,
                        resume=args.resume, retry_lr_factor=args.retry_lr_factor,
                        max_retries=args.max_retries)
    finally:
        if world_size > 1:
            torch.distributed.destroy_process_group()
    if rank != 0:
        return posterior, None
    for epoch in posterior.config["resumed_from_epochs"]:
        print(f"resumed from the checkpoint of epoch {epoch} in {args.checkpoint_dir}")
    for retry in posterior.config["retries"]:
        print(f"diverged at epoch {retry['epoch']}, step {retry['step']}: retried the epoch "
              f"at lr={retry['lr']:.3g}")
    metrics = {
        "bnn": evaluate(posterior, test, num_samples=args.num_samples, seed=args.seed,
                        device=device),
        "mean": evaluate(posterior.mean_module(), test, device=device),
    }
    posterior.module.cpu()  # evaluate() moved it to the device
    result = {"model": model, "data": data, "data_note": train.note,
              "data_dir": str(Path(data_dir).resolve()) if data_dir else None,
              "num_weights": posterior.num_weights, "config": posterior.config,
              "history": posterior.history, "test": metrics}
    if out is not None:
        posterior.save(out / "posterior.pt")
        save_json(result, out / "metrics.json", *METRICS_FORMAT)
        for stale in STALE_AFTER_FIT:  # made from the posterior that was just replaced
            shutil.rmtree(out / stale, ignore_errors=True)
    rows = [{"network": f"BNN ({args.num_samples} draws)", **metrics["bnn"]},
            {"network": "posterior mean", **metrics["mean"]}]
    print(format_table(rows, ["network", "accuracy", "nll", "ece", "entropy",
                              "mutual_information"]))
    print(describe_fit(posterior.config))
    seconds = (sum(h["seconds"] for h in posterior.history)
               + posterior.config["warm_start_record"]["seconds"])
    print(f"{posterior.num_weights:,} random weights, {args.epochs} epochs in {seconds:.1f} s"
          + (f"; wrote {out}/posterior.pt and metrics.json" if out is not None else ""))
    return posterior, result


STALE_AFTER_FIT = ("report", "quantized")
"""The folders of a run that ``pqnet report`` and ``pqnet quantize`` derive from its
posterior: a new fit in the same folder (``--overwrite``) removes them."""


def _check_fit_arguments(model: str, data: str, args: argparse.Namespace) -> None:
    """The checks that need no data, so a typo is named before a data set loads."""
    if model not in models.MODELS:
        raise ValueError(f"model: unknown model {model!r}; expected one of "
                         f"{', '.join(models.MODELS)}")
    _checks.one_of("data", data, datasets.DATASETS)
    check_fit_settings(args.epochs, args.batch_size, args.lr, args.scale_lr, args.seed, 1,
                       args.kl_weight, args.warm_start, args.val_fraction, args.warmup_epochs,
                       args.lr_schedule, args.retry_lr_factor, args.max_retries)
    _checks.positive_int("num_samples", args.num_samples)


def _refuse_to_overwrite(folder: Path, outputs: Sequence[str], overwrite: bool,
                         flag: str) -> None:
    """An earlier run's outputs in ``folder`` are kept unless ``--overwrite`` was given."""
    found = [name for name in outputs if (folder / name).exists()]
    if found and not overwrite:
        raise FileExistsError(f"{flag}: {folder} already holds {', '.join(found)} of an "
                              "earlier run; pass --overwrite to replace them, or choose "
                              "another folder")


def _replace_folder(folder: Path, write: Callable[[Path], None]) -> None:
    """Write a whole output folder: ``write`` fills a temporary sibling, which then takes
    the place of ``folder`` (an old one is removed only after the new one is complete)."""
    tmp, old = folder.with_name(f".{folder.name}.new"), folder.with_name(f".{folder.name}.old")
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)


def describe_fit(config: dict) -> str:
    """One line on what the fit's recipe chose: warm start, KL weight, BatchNorm."""
    choice = config.get("temperature")
    beta = config["kl_weight"]
    how = (f"chosen on {choice['val_size']} held-out training examples" if choice else "as given")
    kind = "the exact ELBO" if beta == 1 else "a tempered posterior"
    return (f"warm start {config['warm_start']} epochs; KL weight {beta:g} ({kind}, {how}); "
            f"BatchNorm: {config['batchnorm']}")


DEMO_BUDGETS = (1.5, 2.0, 3.0, 4.0)
DEMO_PRUNED = {"prune_fraction": 0.9, "finetune_epochs": 8}
"""The demo's pruned row: the recipe that gave the compression frontier's smallest files
(chosen on MNIST validation images, ``benchmarks/frontier.py``), not tuned on digits."""
METRICS_FORMAT = ("pqnet.run-metrics", 1)  # the format and version fields of metrics.json
DEMO_FORMAT = ("pqnet.demo-results", 1)  # ... and of the demo's quantize.json


def _demo(args: argparse.Namespace) -> None:
    from .bench import quantized_rows, row_label

    posterior, result = fit_run("digits_cnn", "digits", None, args.out, args)
    if result is None:  # a process other than the first under torchrun
        return
    train, test = datasets.load("digits")
    common = {"folder": args.out / "quantized", "seed": args.seed, "log": lambda line: None}
    rows = quantized_rows(posterior, train, test, methods=list(METHODS), budgets=DEMO_BUDGETS,
                          kmeans_ks=(4, 8, 16), **common)
    rows += quantized_rows(posterior, train, test, methods=["uniform"], budgets=(2.0,),
                           kmeans_ks=(), **DEMO_PRUNED, **common)
    print()
    print(format_table([{**r, "method": row_label(r)} for r in rows],
                       ["method", "budget", "size_bytes", "bits_per_weight", "accuracy", "nll",
                        "ece", "code_entropy_bits", "avg_bits"]))
    save_json({**result, "rows": rows}, args.out / "quantize.json", *DEMO_FORMAT)
    print(f"each row scored on its saved and reloaded copy in {args.out}/quantized/; "
          f"table in {args.out}/quantize.json")


def _fit(args: argparse.Namespace) -> None:
    fit_run(args.model, args.data, args.data_dir, args.out, args)


def _bench(args: argparse.Namespace) -> None:
    from .bench import run_benchmark

    run_benchmark(args.model, args.data, args.data_dir, epochs=args.epochs, seed=args.seed,
                  batch_size=args.batch_size, lr=args.lr, kl_weight=args.kl_weight,
                  bnn_init=args.bnn_init, bnn_epochs=args.bnn_epochs,
                  lr_schedule=args.lr_schedule, num_samples=args.num_samples,
                  finetune_epochs=args.finetune_epochs, methods=args.methods,
                  pwfn_epochs=args.pwfn_epochs, pwfn_thresholds=args.pwfn_thresholds,
                  pwfn_retrain_epochs=args.pwfn_retrain_epochs,
                  json_path=args.json, plot_path=args.plot, save_dir=args.save_dir,
                  progress=args.progress)


DATA_FREE = ("uniform", "kmeans", "bayesian-compression", "sigma-bits", "quantile-inform")
"""The quantizers that need no training data: the ones a report can remake."""


def _quantized_variants(run_dir: Path) -> list[tuple[str, float]]:
    """``(method, avg_bits)`` of each data-free ``pqnet quantize`` result in the run folder,
    for the report to remake and compare beside its own versions (not the pruned or
    fine-tuned ones: the report remakes a method at a budget, nothing more)."""
    variants = []
    for path in sorted(run_dir.glob("quantized/*/metrics.json")):
        found = load_json(path, "quantize metrics", *QUANTIZE_FORMAT)
        if found["method"] in DATA_FREE and not found.get("pruning") \
                and not found["finetune_epochs"]:
            variants.append((found["method"], round(found["avg_bits"], 4)))
    return variants


def _report(args: argparse.Namespace) -> None:
    from .diagnostics.report import VARIANTS, write_report

    run_dir = args.run_dir
    if not (run_dir / "posterior.pt").is_file():
        raise FileNotFoundError(f"run_dir: {run_dir} has no posterior.pt; write one with "
                                "`pqnet fit --out RUN_DIR`")
    _refuse_to_overwrite(run_dir, ["report"], args.overwrite, "RUN_DIR")
    variants = list(dict.fromkeys([*VARIANTS, *_quantized_variants(run_dir)]))
    _replace_folder(run_dir / "report", lambda tmp: write_report(
        run_dir, out=tmp, variants=variants, num_samples=args.num_samples, draws=args.draws,
        seed=args.seed, data_dir=args.data_dir, ood=args.ood_data, ood_dir=args.ood_data_dir))
    print(f"wrote {run_dir / 'report'}/: report.md, idata.nc and figures")


QUANTIZE_FORMAT = ("pqnet.quantize-metrics", 1)  # the format and version of its metrics.json
BUDGET_FLAGS = {"bits": int, "avg_bits": float, "k": float, "q": float}
"""Budget keywords with their own option (``--avg-bits``); the rest go through ``--option``."""


def _budget(args: argparse.Namespace) -> dict:
    """The method's keywords from the options the user gave; one it does not take is named
    by its flag."""
    _checks.one_of("method", args.method, METHODS)
    budget = {k: getattr(args, k) for k in BUDGET_FLAGS if getattr(args, k) is not None}
    if "k" in budget and budget["k"].is_integer() and args.method == "kmeans":
        budget["k"] = int(budget["k"])  # k-means counts clusters; the others count sds
    for item in args.option:
        name, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"option: expected NAME=VALUE, got {item!r}")
        budget[name.replace("-", "_")] = _literal(value)
    accepted = budget_keywords(args.method)
    typed = [f"--{k.replace('_', '-')}" if k in BUDGET_FLAGS else f"--option {k}=..."
             for k in accepted]
    for name in budget:
        if name not in accepted:
            raise ValueError(f"{name}: not an option of --method {args.method}, which takes "
                             f"{', '.join(typed)}")
    return budget


def _literal(value: str) -> object:
    """``--option`` values: JSON numbers, booleans and lists, else the text itself."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def _run_metrics(run_dir: Path) -> dict:
    """The ``metrics.json`` of ``pqnet fit``'s run folder: which data set it used."""
    if not (run_dir / "posterior.pt").is_file():
        raise FileNotFoundError(f"run_dir: {run_dir} has no posterior.pt; write one with "
                                "`pqnet fit --out RUN_DIR`")
    return load_json(run_dir / "metrics.json", "run metrics", *METRICS_FORMAT,
                     argument="run_dir")


def _quantize(args: argparse.Namespace) -> None:
    from .quantize import QuantizedNet, quantize

    budget = _budget(args)
    finetune_epochs = _checks.int_in("finetune_epochs", args.finetune_epochs, 0, 10_000)
    pruning = {k: getattr(args, k) for k in ("prune", "prune_fraction") if getattr(args, k)}
    run = _run_metrics(args.run_dir)
    label = "-".join([args.method, *(f"{k}{v}" for k, v in {**budget, **pruning}.items())])
    out = args.out if args.out is not None else args.run_dir / "quantized" / label
    _refuse_to_overwrite(out, ["qnet.pqn", "metrics.json"], args.overwrite, "--out")
    posterior = Posterior.load(args.run_dir / "posterior.pt")
    train, test = datasets.load(run["data"], root=args.data_dir or run.get("data_dir"))
    log.info("quantizing %s with %s (%s), %d fine-tuning epochs", args.run_dir, args.method,
             ", ".join(f"{k}={v}" for k, v in budget.items()) or "its defaults",
             finetune_epochs)
    qnet = quantize(posterior, args.method, data=train, seed=args.seed,
                    finetune_epochs=finetune_epochs, **pruning, **budget)

    def write(folder: Path) -> None:
        path = qnet.save(folder / "qnet.pqn")
        loaded = QuantizedNet.load(path, module=posterior.module)  # scored as it was written
        log.info("saved %s (%d bytes); scoring the loaded copy on %d test examples",
                 out / "qnet.pqn", loaded.size_bytes, len(test))
        result = {"method": args.method, "budget": budget, "pruning": pruning,
                  "finetune_epochs": finetune_epochs,
                  "seed": args.seed, "run_dir": str(args.run_dir.resolve()),
                  "data": run["data"], "size_bytes": loaded.size_bytes,
                  "bits_per_weight": loaded.bits_per_weight,
                  "code_entropy_bits": loaded.code_entropy_bits, "avg_bits": loaded.avg_bits,
                  "unique_values": loaded.unique_values, "layer_bits": loaded.layer_bits,
                  "config": loaded.config, "test": evaluate(loaded, test)}
        save_json(result, folder / "metrics.json", *QUANTIZE_FORMAT)
        print(format_table([{"method": label, **result, **result["test"]}],
                           ["method", "size_bytes", "bits_per_weight", "avg_bits", "accuracy",
                            "nll", "ece"]))

    _replace_folder(out, write)
    print(f"wrote {out}/: qnet.pqn, metrics.json")


def _search(args: argparse.Namespace) -> None:
    import json

    from .quantize import QuantizedNet
    from .search import random_search, search, split_validation

    posterior = Posterior.load(args.posterior)
    data, data_dir = args.data, args.data_dir
    metrics = args.posterior.parent / "metrics.json"
    if data is None and metrics.is_file():  # the run folder of `pqnet fit` names its data
        saved = json.loads(metrics.read_text())
        data, data_dir = saved.get("data"), data_dir or saved.get("data_dir")
    if data is None:
        raise ValueError(f"data: give --data; no metrics.json beside {args.posterior} names it")
    try:
        fidelities = [int(e) for e in args.fidelities.split(",")]
    except ValueError:
        raise ValueError(f"fidelities: expected comma-separated integer epochs, got "
                         f"{args.fidelities!r}") from None
    train, test = datasets.load(data, root=data_dir)
    val_size = args.val_size if args.val_size is not None else min(1000, len(train) // 5)
    train, val = split_validation(train, val_size, seed=args.seed)
    out = args.out if args.out is not None else args.posterior.parent / "search"
    log = print if args.progress else None
    common = {"avg_bits": args.avg_bits, "space": args.space, "degree": args.degree,
              "objective": args.objective, "cost_per_bit": args.cost_per_bit,
              "overhead_epochs": args.overhead_epochs, "seed": args.seed,
              "resume": args.resume, "log": log}
    result = search(posterior, train, val, fidelities=fidelities,
                    budget_epochs=args.budget_epochs, trace_path=out / "trace.json", **common)
    results = {"gp": result}
    if args.random_budget is not None:
        results["random"] = random_search(posterior, train, val, fidelity=fidelities[-1],
                                          budget_epochs=args.random_budget,
                                          trace_path=out / "random_trace.json", **common)
    result.plot(out / "search.png", others={k: r for k, r in results.items() if k != "gp"})
    rows = []
    for name, found in results.items():
        found.qnet.save(out / f"{name}_qnet.pqn")
        loaded = QuantizedNet.load(out / f"{name}_qnet.pqn", module=posterior.module)  # as written
        rows.append({"search": name, "bits": " ".join(map(str, found.best["bits"])),
                     "avg_bits": loaded.avg_bits, "val": found.best["accuracy"],
                     "objective": found.best_value,
                     "test": evaluate(loaded.to_module(), test)["accuracy"],
                     "epochs": found.cost, "evaluations": len(found.evaluations)})
    print(val.note)
    print(format_table(rows, ["search", "bits", "avg_bits", "val", "objective", "test",
                              "epochs", "evaluations"]))
    widths = ", ".join(f"{layer} {bits}" for layer, bits in result.best_bits.items())
    print(f"bits per layer: {widths}; wrote {out}/: trace.json, search.png, "
          f"{', '.join(f'{k}_qnet.pqn' for k in results)}")


HELP_FORMAT = argparse.ArgumentDefaultsHelpFormatter  # every --help shows the defaults


def _add_overwrite(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the outputs of an earlier run in the output folder")


def _add_quantize_command(commands) -> None:
    cmd = commands.add_parser("quantize", formatter_class=HELP_FORMAT,
                              help="quantize the posterior of a run folder; write the network "
                              "and its test metrics")
    cmd.add_argument("run_dir", type=Path, help="a folder written by `pqnet fit --out`")
    cmd.add_argument("--method", required=True, help=", ".join(METHODS))
    cmd.add_argument("--avg-bits", type=float, help="average-bits budget")
    cmd.add_argument("--bits", type=int, help="bits per weight (uniform)")
    cmd.add_argument("--k", type=float, help="clusters (kmeans) or posterior sds (sigma-bits, "
                     "quantile-inform)")
    cmd.add_argument("--q", type=float, help="the quantile of quantile-inform")
    cmd.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                     help="any other keyword of the method, e.g. threshold=1.25 (repeatable)")
    cmd.add_argument("--prune", type=float, default=0.0, metavar="LEVEL",
                     help="zero the weights whose central LEVEL credible interval holds 0")
    cmd.add_argument("--prune-fraction", type=float, default=0.0, metavar="F",
                     help="zero the fraction F of the weights with the smallest posterior means")
    cmd.add_argument("--finetune-epochs", type=int, default=0,
                     help="retrain the means under the quantized forward pass")
    cmd.add_argument("--data-dir", help="folder of the dataset (None: from metrics.json)")
    cmd.add_argument("--out", type=Path,
                     help="folder to write (None: RUN_DIR/quantized/METHOD-BUDGET)")
    cmd.add_argument("--seed", type=int, default=0, help="seeds the quantizer")
    _add_overwrite(cmd)
    cmd.set_defaults(run=_quantize)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pqnet", formatter_class=HELP_FORMAT, description="Quantize neural networks by "
        "their Bayesian weight uncertainty: fit a posterior with SVI, then quantize and "
        "diagnose it.")
    parser.add_argument("--version", action="version", version=f"pqnet {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="the main job on scikit-learn's digits",
                               formatter_class=HELP_FORMAT)
    demo.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder to write")
    _add_overwrite(demo)
    _add_fit_options(demo, epochs=30)
    demo.set_defaults(run=_demo)

    fit_cmd = commands.add_parser("fit", help="fit a BNN and write its posterior and metrics",
                                  formatter_class=HELP_FORMAT)
    fit_cmd.add_argument("--model", required=True, help=", ".join(models.MODELS))
    fit_cmd.add_argument("--data", required=True, help=", ".join(datasets.DATASETS))
    fit_cmd.add_argument("--data-dir", help="folder of the dataset's files")
    fit_cmd.add_argument("--out", type=Path, required=True, help="run folder to write")
    _add_overwrite(fit_cmd)
    _add_fit_options(fit_cmd, epochs=20)
    fit_cmd.set_defaults(run=_fit)
    _add_quantize_command(commands)

    bench = commands.add_parser("bench", help="every quantizer at 1.5-4 average bits against "
                                "float, deterministic and brevitas QAT nets (pqnet.bench)",
                                formatter_class=HELP_FORMAT)
    bench.add_argument("--model", required=True, help=", ".join(models.MODELS))
    bench.add_argument("--data", required=True, help=", ".join(datasets.DATASETS))
    bench.add_argument("--data-dir", help="folder of the dataset's files")
    bench.add_argument("--json", type=Path, required=True, help="results file to write")
    bench.add_argument("--plot", type=Path, help="Pareto plot to write (e.g. OUT.png)")
    bench.add_argument("--save-dir", type=Path, help="keep the quantized networks here")
    bench.add_argument("--epochs", type=int, default=20, help="training epochs")
    bench.add_argument("--batch-size", type=int, default=64, help="minibatch size")
    bench.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    bench.add_argument("--kl-weight", type=_auto_or(float), default="auto",
                       help="beta of the ELBO's KL term: 1 is the exact ELBO; 'auto' "
                       "chooses it on a validation part of the training data")
    bench.add_argument("--bnn-init", choices=["scratch", "deterministic"], default="scratch",
                       help="start the BNN from the deterministic net's initial or trained "
                       "weights")
    bench.add_argument("--bnn-epochs", type=int, help="SVI epochs (None: --epochs)")
    bench.add_argument("--lr-schedule", choices=["constant", "cosine"], default="cosine",
                       help="learning-rate schedule")
    bench.add_argument("--finetune-epochs", type=int, default=0,
                       help="fine-tune each quantized net's means for this many epochs")
    bench.add_argument("--methods", nargs="+", help="quantizers to run (None: all)")
    bench.add_argument("--pwfn-epochs", type=int, default=3,
                       help="epochs of the PWFN posterior's fit before its rounds")
    bench.add_argument("--pwfn-thresholds", type=float, nargs="+", default=[1.0, 1.25],
                       help="PWFN distance thresholds, in posterior sds: one row each")
    bench.add_argument("--pwfn-retrain-epochs", type=int, default=2,
                       help="PWFN retraining epochs between rounds")
    bench.add_argument("--num-samples", type=int, default=32,
                       help="posterior draws for the BNN's predictive metrics")
    bench.add_argument("--seed", type=int, default=0, help="seeds every stochastic step")
    bench.add_argument("--no-progress", dest="progress", action="store_false",
                       help="no progress output")
    bench.set_defaults(run=_bench)

    report = commands.add_parser("report", help="diagnose a run folder: ArviZ data, quantized "
                                 "versions, plots and RUN_DIR/report/report.md",
                                 formatter_class=HELP_FORMAT)
    report.add_argument("run_dir", type=Path, help="a folder written by `pqnet fit --out`")
    report.add_argument("--num-samples", type=int, default=32,
                        help="posterior draws for the predictive metrics")
    report.add_argument("--draws", type=int, default=100,
                        help="posterior draws per chain stored in idata.nc")
    report.add_argument("--data-dir", help="folder of the dataset (None: from metrics.json)")
    report.add_argument("--ood-data", help="data set whose test split is the OOD set "
                        "(None: the test images with shuffled pixels)")
    report.add_argument("--ood-data-dir", help="folder of the OOD data set")
    report.add_argument("--seed", type=int, default=0, help="seeds draws and quantizers")
    _add_overwrite(report)
    report.set_defaults(run=_report)

    search_cmd = commands.add_parser("search", help="search per-layer bit-widths by multi-"
                                     "fidelity Bayesian optimisation (pqnet.search)",
                                     formatter_class=HELP_FORMAT)
    search_cmd.add_argument("--posterior", type=Path, required=True,
                            help="a posterior.pt written by `pqnet fit`")
    search_cmd.add_argument("--data", help="data set (None: from the run's metrics.json)")
    search_cmd.add_argument("--data-dir", help="folder of the dataset's files")
    search_cmd.add_argument("--avg-bits", type=float, required=True,
                            help="the average-bits budget (the reference of 'effective')")
    search_cmd.add_argument("--fidelities", default="0,1,2,4",
                            help="fine-tuning epochs of the GP's tasks, comma-separated, "
                            "increasing; the last is the top fidelity")
    search_cmd.add_argument("--budget-epochs", type=float, default=40.0,
                            help="cost budget of the search, in epochs")
    search_cmd.add_argument("--space", choices=["layers", "bezier", "chebyshev"],
                            default="layers", help="per-layer widths, or a curve over depth")
    search_cmd.add_argument("--degree", type=int, default=2, help="the curve's degree")
    search_cmd.add_argument("--objective", choices=["accuracy", "effective"],
                            default="accuracy", help="accuracy within the budget, or accuracy "
                            "minus --cost-per-bit per bit above it")
    search_cmd.add_argument("--cost-per-bit", type=float, default=0.01,
                            help="accuracy lost per average bit above the budget")
    search_cmd.add_argument("--overhead-epochs", type=float, default=0.1,
                            help="cost of an evaluation without fine-tuning, in epochs")
    search_cmd.add_argument("--val-size", type=int,
                            help="training examples held out to score the search "
                            "(None: a fifth, at most 1000)")
    search_cmd.add_argument("--random-budget", type=float,
                            help="also run random search with this budget, to compare")
    search_cmd.add_argument("--out", type=Path,
                            help="folder to write (None: beside the posterior, search/)")
    search_cmd.add_argument("--resume", action="store_true",
                            help="continue the traces already in --out")
    search_cmd.add_argument("--seed", type=int, default=0, help="seeds the search")
    search_cmd.add_argument("--no-progress", dest="progress", action="store_false",
                            help="no line per evaluation")
    search_cmd.set_defaults(run=_search)
    return parser


#: library argument names that are not the dest of the option the user typed
ALIASES = {"root": "--data-dir", "name": "--data", "train_dataset": "--data"}


def _flags(parser: argparse.ArgumentParser, command: str) -> dict[str, str]:
    """``dest -> what the user typed`` for ``command``'s options (``data_dir -> --data-dir``,
    positionals by their metavar: ``run_dir -> RUN_DIR``)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.dest: max(a.option_strings, key=len) if a.option_strings else a.dest.upper()
            for a in sub.choices[command]._actions if a.dest != "help"}


def _as_typed(message: str, flags: dict[str, str]) -> str:
    """An error that starts with a library argument (``root: ...``) starts with the option
    the user typed instead (``--data-dir: ...``); so does one that starts with several
    (``prune, prune_fraction: ...``)."""
    names, sep, rest = message.partition(": ")
    typed = [flags.get(name) or ALIASES.get(name) for name in names.split(", ")]
    return f"{', '.join(typed)}: {rest}" if sep and all(typed) else message


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # the library logs to "pqnet" and configures nothing; the command shows INFO on stderr
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("pqnet")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        args.run(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, IsADirectoryError,
            FloatingPointError) as err:
        message = _as_typed(str(err), _flags(parser, args.command))
        print(f"pqnet {args.command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return 0
