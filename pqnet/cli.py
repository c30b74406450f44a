"""The ``pqnet`` command: a thin layer over the library.

::

    pqnet demo                                  # digits: fit, evaluate, write runs/demo
    pqnet fit --model lenet5 --data mnist --data-dir DIR --epochs 20 --out RUN_DIR

Each command writes its results atomically (a file is replaced whole or not at all) and
reports bad arguments as one line naming the argument, with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from . import data as datasets
from . import models
from ._io import save_json
from .bnn import bayesian
from .diagnostics.table import format_table
from .inference import Posterior, evaluate, fit


def _add_fit_options(parser: argparse.ArgumentParser, epochs: int, lr: float) -> None:
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=lr)
    parser.add_argument("--kl-weight", type=float, default=1.0,
                        help="beta of the ELBO's KL term (1: the true posterior)")
    parser.add_argument("--warmup-epochs", type=int, default=0)
    parser.add_argument("--prior", default="fan-in", help="'fan-in', 'normal' or a scale")
    parser.add_argument("--init-scale", default="0.001",
                        help="initial posterior sigma: a number, 'relative' or 'pwfn'")
    parser.add_argument("--num-samples", type=int, default=32,
                        help="posterior draws for the predictive metrics")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def _number_or_name(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value


def fit_run(model: str, data: str, data_dir: str | None, out: Path | None,
            args: argparse.Namespace) -> tuple[Posterior, dict]:
    """Fit ``model`` on ``data`` as the options in ``args`` say, evaluate the posterior
    predictive and the mean network on the test split, and write ``posterior.pt`` and
    ``metrics.json`` to ``out`` (when given)."""
    train, test = datasets.load(data, root=data_dir)
    print(train.note)
    module = models.for_data(model, train.input_shape, train.num_classes)
    bnn = bayesian(module, prior=_number_or_name(args.prior),
                   init_scale=_number_or_name(args.init_scale))
    posterior = fit(bnn, train, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                    kl_weight=args.kl_weight, warmup_epochs=args.warmup_epochs,
                    seed=args.seed, device=args.device, progress=args.progress)
    metrics = {
        "bnn": evaluate(posterior, test, num_samples=args.num_samples, seed=args.seed),
        "mean": evaluate(posterior.mean_module(), test),
    }
    result = {"model": model, "data": data, "data_note": train.note,
              "num_weights": posterior.num_weights, "config": posterior.config,
              "history": posterior.history, "test": metrics}
    if out is not None:
        posterior.save(out / "posterior.pt")
        save_json(result, out / "metrics.json")
    rows = [{"network": f"BNN ({args.num_samples} draws)", **metrics["bnn"]},
            {"network": "posterior mean", **metrics["mean"]}]
    print(format_table(rows, ["network", "accuracy", "nll", "ece", "entropy",
                              "mutual_information"]))
    seconds = sum(h["seconds"] for h in posterior.history)
    print(f"{posterior.num_weights:,} random weights, {args.epochs} epochs in {seconds:.1f} s"
          + (f"; wrote {out}/posterior.pt and metrics.json" if out is not None else ""))
    return posterior, result


def _demo(args: argparse.Namespace) -> None:
    fit_run("digits_cnn", "digits", None, args.out, args)


def _fit(args: argparse.Namespace) -> None:
    fit_run(args.model, args.data, args.data_dir, args.out, args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pqnet", description="Quantize neural networks by their Bayesian weight "
        "uncertainty: fit a posterior with SVI, then quantize and diagnose it.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="the main job on scikit-learn's digits")
    demo.add_argument("--out", type=Path, default=Path("runs/demo"))
    _add_fit_options(demo, epochs=30, lr=1e-2)
    demo.set_defaults(run=_demo)

    fit_cmd = commands.add_parser("fit", help="fit a BNN and write its posterior and metrics")
    fit_cmd.add_argument("--model", required=True, help=", ".join(models.MODELS))
    fit_cmd.add_argument("--data", required=True, help=", ".join(datasets.DATASETS))
    fit_cmd.add_argument("--data-dir", help="folder of the dataset's files")
    fit_cmd.add_argument("--out", type=Path, required=True, help="run folder to write")
    _add_fit_options(fit_cmd, epochs=20, lr=1e-3)
    fit_cmd.set_defaults(run=_fit)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, TypeError, FileNotFoundError, IsADirectoryError) as err:
        print(f"pqnet {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0
