"""The quantization benchmark (issue 3): every quantizer at the same budgets, side by side.

What is measured
----------------
One run, one data set, one seed, the same minibatches (one ``torch.Generator`` seeded with
``seed``, a fresh permutation per epoch, the order :func:`pqnet.fit` uses), the same epochs
and the same Adam learning rate for every network that is trained:

- **float**: the BNN ``pqnet.fit(pqnet.bayesian(model), train, ...)``, scored by its
  posterior predictive (``num_samples`` weight draws), and **float_mean**, its network of
  posterior means (the network every quantizer below rounds);
- **deterministic**: the same architecture trained by plain PyTorch (cross-entropy), from the
  same initial weights;
- one **row** per quantizer of :data:`pqnet.quantize.METHODS` and budget: ``pqnet.quantize(
  posterior, method, data=train, avg_bits=b, seed=seed)`` at each budget ``b``; k-means at
  each ``k`` (``k=``; its budget is its code width ``ceil(log2 k)``); ``uniform`` at ``b`` is
  ``floor(b)`` bits everywhere;
- **pwfn** rows follow PWFN's own pipeline (Subia-Waud & Dasmahapatra 2023): a second
  posterior, ``pqnet.bayesian(trained deterministic net, prior="pwfn", init_scale="pwfn")``
  fitted for ``pwfn_epochs`` (cosine, ``kl_weight=1``, ``scale_lr=PWFN_SCALE_LR``: its sigmas
  start as low as ``2^-30`` and must climb to the prior's cap in a few epochs), then
  ``pqnet.quantize(..., "pwfn", threshold=t, retrain_epochs=pwfn_retrain_epochs)`` for each
  ``t`` in ``pwfn_thresholds``. PWFN has no bit budget: a row's budget is its ``avg_bits``
  (``ceil(log2)`` of the values each layer uses); its ``seconds`` include the pre-fit;
- one **brevitas-qat** row per width ``b``: quantization-aware training with brevitas
  (``QuantConv2d`` / ``QuantLinear``, ``weight_bit_width=b``, brevitas's default per-tensor
  scale, float activations), the float model's layers mirrored one for one, trained like the
  deterministic net; its budget and ``avg_bits`` are ``b``.

Every quantized network is written to a file (:meth:`QuantizedNet.save`), read back, and its
``accuracy``, ``nll`` and ``ece`` are those of the **loaded** copy on the test split
(``pqnet.evaluate(loaded.to_module(), test)``). Accounting is the one of
:class:`~pqnet.quantize.QuantizedNet`, for every row alike: ``size_bytes`` is the length of
the saved file (:mod:`pqnet.quantize.codec`), ``bits_per_weight = 8 * size_bytes / N``
the headline; ``code_entropy_bits`` (the coder's bound), ``avg_bits`` (fixed-width code bits,
no codebooks or floats), ``unique_values`` and ``layer_bits`` (mean width per layer) describe
it. A brevitas net is exported as a QuantizedNet whose codes are brevitas's integer weights
(``quant_weight().int()``) and whose codebook is ``scale * integers``, stored as its values.
``seconds`` is the time spent quantizing: the ``quantize`` call (fine-tuning included) for a
row, the whole training for brevitas-qat and for the deterministic net.

    pqnet bench --model lenet5 --data mnist --data-dir DIR --json OUT.json --plot OUT.png
"""

from __future__ import annotations

import copy
import math
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from numbers import Integral, Real
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from . import data as datasets
from . import models
from ._io import save_json
from .bnn import bayesian
from .diagnostics.table import format_table
from .inference import Posterior, evaluate, fit
from .inference.plain import train_plain
from .quantize import METHODS, RETRAINED, QuantizedLayer, QuantizedNet, quantize
from .quantize.codec import raw_bytes

__all__ = ["BREVITAS_BITS", "BUDGETS", "KMEANS_KS", "brevitas_available", "brevitas_net",
           "print_results", "qat_to_qnet", "run_benchmark", "train_network"]

BUDGETS: tuple[float, ...] = (1.5, 2.0, 3.0, 4.0)
KMEANS_KS: tuple[int, ...] = (3, 4, 8, 16)
BREVITAS_BITS: tuple[int, ...] = (2, 3, 4)
PWFN_THRESHOLDS: tuple[float, ...] = (1.0, 1.25)
PWFN_SCALE_LR = 0.1
METRICS = ("accuracy", "nll", "ece")


# --------------------------------------------------------------------------- training


def train_network(net: nn.Module, train: Dataset, *, epochs: int, batch_size: int, lr: float,
                  seed: int) -> float:
    """Train ``net`` in place with Adam at ``lr`` on the cross-entropy, on the minibatches
    :func:`pqnet.fit` draws with ``seed``; return the seconds it took."""
    start = time.perf_counter()
    train_plain(net, train, epochs=epochs, batch_size=batch_size, lr=lr,
                generator=torch.Generator().manual_seed(seed))
    return time.perf_counter() - start


# --------------------------------------------------------------------------- brevitas


def brevitas_available() -> str | None:
    """``None`` when brevitas imports, else the reason it does not."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import brevitas.nn  # noqa: F401
    except Exception as err:  # ImportError, or a broken install
        return f"{type(err).__name__}: {err}"
    return None


def _quant_layer(layer: nn.Module, bits: int) -> nn.Module:
    """The brevitas twin of a float ``Conv1d`` / ``Conv2d`` / ``Linear`` with the same
    hyper-parameters and initial weights, weights quantized to ``bits``, activations float."""
    import brevitas.nn as qnn

    bias = layer.bias is not None
    if isinstance(layer, nn.Linear):
        twin = qnn.QuantLinear(layer.in_features, layer.out_features, bias=bias,
                               weight_bit_width=bits)
    else:
        cls = qnn.QuantConv1d if isinstance(layer, nn.Conv1d) else qnn.QuantConv2d
        twin = cls(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                   padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                   bias=bias, padding_mode=layer.padding_mode, weight_bit_width=bits)
    with torch.no_grad():
        twin.weight.copy_(layer.weight)
        if bias:
            twin.bias.copy_(layer.bias)
    return twin


def brevitas_net(module: nn.Module, bits: int) -> nn.Module:
    """A copy of ``module`` with every ``Conv1d`` / ``Conv2d`` / ``Linear`` replaced by its
    brevitas ``QuantConv*`` / ``QuantLinear`` twin at ``weight_bit_width=bits`` (same
    hyper-parameters, same initial weights); every other module is kept as it is."""
    out = copy.deepcopy(module)
    for name, child in list(out.named_children()):
        if isinstance(child, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            setattr(out, name, _quant_layer(child, bits))
        elif isinstance(child, (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d)):
            raise ValueError(f"model: brevitas-qat mirrors Conv1d/Conv2d/Linear only, "
                             f"got {type(child).__name__} at {name!r}")
        else:
            setattr(out, name, brevitas_net(child, bits))
    return out


def qat_to_qnet(qat: nn.Module, template: nn.Module, bits: int) -> QuantizedNet:
    """Export a trained brevitas net as a :class:`QuantizedNet` on the float ``template``.

    Each quantized layer's integer weights ``n_i = quant_weight().int()`` become the codes
    ``n_i + 2^(b-1)`` into the codebook ``scale * (-2^(b-1) .. 2^(b-1) - 1)`` (one row per
    scale), so the decoded weights are brevitas's ``quant_weight().value``; biases and
    everything else are copied from ``qat`` into ``template``.
    """
    layers = {}
    for path, layer in qat.named_modules():
        if not hasattr(layer, "quant_weight") or not hasattr(layer, "weight_quant"):
            continue
        with torch.no_grad():
            q = layer.quant_weight()
            ints, scale = q.int().to(torch.int64), q.scale.detach().float()
            if float(q.zero_point.abs().max()) != 0:
                raise ValueError(f"brevitas layer {path!r}: a non-zero zero point is not "
                                 "supported")
            low = -(2 ** (bits - 1))
            levels = scale.reshape(-1, 1) * torch.arange(low, -low, dtype=torch.float32)
        layers[path] = QuantizedLayer((ints - low).to(torch.uint8),
                                      torch.full(ints.shape, bits, dtype=torch.uint8),
                                      {bits: levels.float()})
    state = qat.state_dict()
    module = copy.deepcopy(template).cpu()
    module.load_state_dict({k: state[k] for k in module.state_dict()})
    return QuantizedNet(layers, module, "brevitas-qat", {"bits": bits})


# --------------------------------------------------------------------------- the benchmark


def _check_names(values: Sequence[str] | None, known: Sequence[str], argument: str
                 ) -> list[str]:
    values = list(known) if values is None else list(values)
    for value in values:
        if value not in known:
            raise ValueError(f"{argument}: unknown {value!r}; expected some of "
                             f"{', '.join(known)}")
    return values


def _check_numbers(values: Sequence, argument: str, low: float, high: float,
                   integer: bool = False) -> list:
    kind = Integral if integer else Real
    out = list(values)
    for v in out:
        if isinstance(v, bool) or not isinstance(v, kind) or not (low <= v <= high):
            raise ValueError(f"{argument}: expected {'integers' if integer else 'numbers'} in "
                             f"[{low}, {high}], got {v!r}")
    return out


def _fresh(model: str, train, seed: int) -> nn.Module:
    """The float model, initialised from ``seed``: the same starting weights for all."""
    torch.manual_seed(seed)
    return models.for_data(model, train.input_shape, train.num_classes)


def _scores(metrics: dict) -> dict:
    return {k: float(metrics[k]) for k in METRICS}


def _measure(qnet: QuantizedNet, file: Path, test: Dataset) -> tuple[dict, QuantizedNet]:
    """Save ``qnet`` to ``file``, load it back and score the loaded copy on ``test``."""
    qnet.save(file)
    loaded = QuantizedNet.load(file)
    if file.stat().st_size != loaded.size_bytes:  # the size is the file: never otherwise
        raise RuntimeError(f"{file}: {file.stat().st_size} bytes on disk, size_bytes "
                           f"{loaded.size_bytes}")
    return _scores(evaluate(loaded.to_module(), test)), loaded


def _row(method: str, budget: float, qnet: QuantizedNet, scores: dict, seconds: float,
         **extra) -> dict:
    return {"method": method, "budget": float(budget), "size_bytes": qnet.size_bytes,
            "bits_per_weight": qnet.bits_per_weight, **scores,
            "code_entropy_bits": qnet.code_entropy_bits, "avg_bits": qnet.avg_bits,
            "unique_values": qnet.unique_values, "seconds": seconds,
            "layer_bits": qnet.layer_bits, "sizes": qnet.sizes, **extra}


def row_label(row: dict) -> str:
    """A row's method, with its k (k-means) or threshold (PWFN), its pruning and its
    fine-tuning."""
    label = row["method"]
    if row["method"] == "kmeans":
        label += f" k={row['k']}"
    if row["method"] == "pwfn":
        label += f" t={row['threshold']:g}"
    if row.get("prune"):
        label += f", pruned at credible level {row['prune']:g}"
    if row.get("prune_fraction"):
        label += f", pruned {row['prune_fraction']:g}"
    if row.get("finetune_epochs"):
        label += f", fine-tuned {row['finetune_epochs']}"
    return label


def print_results(results: dict, log: Callable[[str], None] = print) -> None:
    """Print the reference networks and the quantized rows as two text tables."""
    refs = [{"network": "BNN posterior predictive", **results["float"]},
            {"network": "BNN mean network", **results["float_mean"]},
            {"network": "deterministic (plain PyTorch)", **results["deterministic"]}]
    for r in refs:
        r["size_bytes"] = results["float_size_bytes"]
    log(format_table(refs, ["network", "accuracy", "nll", "ece", "size_bytes"]))
    log("")
    rows = [{**r, "method": row_label(r)} for r in results["rows"]]
    log(format_table(rows, ["method", "budget", "size_bytes", "bits_per_weight", "accuracy",
                            "nll", "ece", "code_entropy_bits", "avg_bits", "unique_values",
                            "seconds"]))
    for skip in results["skipped"]:
        log(f"skipped: {skip}")


def quantized_rows(posterior: Posterior, train: Dataset, test: Dataset, *,
                   methods: Sequence[str], budgets: Sequence[float], kmeans_ks: Sequence[int],
                   folder: Path, seed: int = 0,
                   skipped: list[str] | None = None, log: Callable[[str], None] = print,
                   pwfn_thresholds: Sequence[float] = (1.0,), pwfn_options: dict | None = None,
                   **options) -> list[dict]:
    """Quantize ``posterior`` with each of ``methods`` at each budget (k-means at each ``k``,
    PWFN at each threshold in ``pwfn_thresholds`` with ``pwfn_options``), save each result in
    ``folder``, load it back, and score the loaded copy on ``test``: one row per run. A run
    that raises ``ValueError`` / ``RuntimeError`` is noted in ``skipped``. ``options`` (e.g.
    ``finetune_epochs``) go to every :func:`pqnet.quantize` call but PWFN's, which retrains
    in its own rounds."""
    skipped = [] if skipped is None else skipped
    pruned = "".join(f"_{tag}{options[key]:g}" for key, tag in (("prune", "c"),
                                                                ("prune_fraction", "p"))
                     if options.get(key))
    runs = []  # (method, quantize keywords, budget (None: the result's avg_bits), file stem)
    for m in methods:
        if m == "kmeans":
            runs += [(m, {"k": k, **options}, max(1, math.ceil(math.log2(k))),
                      f"kmeans_k{k}{pruned}") for k in kmeans_ks]
        elif m == "deep-compression":  # its own settings and training, no bit budget
            runs.append((m, {}, None, m))
        elif m == "pwfn":
            runs += [(m, {"threshold": t, **(pwfn_options or {})}, None, f"pwfn_t{t:g}")
                     for t in pwfn_thresholds]
        else:  # sigma-code's budget is its code entropy, the others' their code width
            key = "code_bits" if m == "sigma-code" else "avg_bits"
            runs += [(m, {key: b, **options}, b, f"{m}_b{b:g}{pruned}") for b in budgets]
    rows = []
    for method, keywords, budget, stem in runs:
        start = time.perf_counter()
        try:
            qnet = quantize(posterior, method, data=train, seed=seed, **keywords)
        except (ValueError, RuntimeError) as err:
            skipped.append(f"{method} at {keywords}: {type(err).__name__}: {err}")
            log(f"skipped: {skipped[-1]}")
            continue
        seconds = time.perf_counter() - start
        file = folder / f"{stem}.pqn"
        scores, loaded = _measure(qnet, file, test)
        info = {"file": file.name, **({} if method in RETRAINED else options)}
        if method in ("kmeans", "pwfn"):
            key = "k" if method == "kmeans" else "threshold"
            info[key] = keywords[key]
        budget = loaded.avg_bits if budget is None else budget
        rows.append(_row(method, budget, loaded, scores, seconds, **info))
        log(f"{stem}: {loaded.avg_bits:.3f} bits, accuracy {scores['accuracy']:.4f}, "
            f"{seconds:.1f} s")
    return rows


def run_benchmark(model: str, data: str, data_dir: str | Path | None = None, *,
                  epochs: int = 20, batch_size: int = 64, lr: float = 1e-3,
                  kl_weight: float | str = "auto", bnn_init: str = "scratch",
                  bnn_epochs: int | None = None, lr_schedule: str = "cosine",
                  seed: int = 0, num_samples: int = 32,
                  methods: Sequence[str] | None = None,
                  budgets: Sequence[float] = BUDGETS,
                  kmeans_ks: Sequence[int] = KMEANS_KS,
                  brevitas_bits: Sequence[int] = BREVITAS_BITS,
                  finetune_epochs: int = 0, pwfn_epochs: int = 3,
                  pwfn_thresholds: Sequence[float] = PWFN_THRESHOLDS,
                  pwfn_retrain_epochs: int = 2,
                  json_path: str | Path | None = None, plot_path: str | Path | None = None,
                  save_dir: str | Path | None = None, progress: bool = False,
                  log: Callable[[str], None] = print) -> dict:
    """Fit the BNN once, quantize it with every method at every budget, train the
    deterministic and brevitas QAT baselines, and score them all on the test split.

    See the module docstring for what is measured. The BNN starts from the same initial
    weights as the deterministic net (``bnn_init="scratch"``) or from the trained deterministic
    net (``"deterministic"``, as PWFN and the uncertainty-to-bits paper start from a
    pretrained net), and is fitted for ``bnn_epochs`` (default ``epochs``) with ``kl_weight``
    and ``lr_schedule``. ``methods`` (default: all of
    :data:`~pqnet.quantize.METHODS`) run at ``budgets`` (average bits), except ``kmeans``,
    which runs at ``kmeans_ks``; ``brevitas_bits`` are the QAT widths (skipped, with a note,
    when brevitas does not import). ``finetune_epochs > 0`` is passed on to
    :func:`pqnet.quantize`. ``pwfn_epochs``, ``pwfn_thresholds`` and
    ``pwfn_retrain_epochs`` set up the PWFN rows (see the module docstring). The result
    (schema below) is written atomically to
    ``json_path`` and plotted by :func:`pqnet.diagnostics.plots.pareto_plot` to
    ``plot_path`` when given; the quantized files go to ``save_dir`` (kept, and named in each
    row's ``file``) or to a temporary folder.

    ``{"model", "data", "seed", "epochs", "data_note", "config", "num_weights",
    "float_size_bytes", "float": {accuracy, nll, ece}, "float_mean": {...},
    "deterministic": {accuracy, nll, ece, seconds}, "rows": [{method, budget, avg_bits,
    size_bytes, bits_per_weight, accuracy, nll, ece, code_entropy_bits, avg_bits, ...}],
    "skipped": [...]}``
    """
    _check_run(model, data, epochs=epochs, num_samples=num_samples, batch_size=batch_size,
               finetune_epochs=finetune_epochs, pwfn_epochs=pwfn_epochs,
               pwfn_retrain_epochs=pwfn_retrain_epochs, bnn_init=bnn_init)
    methods = _check_names(methods, list(METHODS), "methods")
    budgets = [float(b) for b in _check_numbers(budgets, "budgets", 1, 8)]
    kmeans_ks = _check_numbers(kmeans_ks, "kmeans_ks", 2, 256, integer=True)
    brevitas_bits = _check_numbers(brevitas_bits, "brevitas_bits", 2, 8, integer=True)
    pwfn_thresholds = [float(t) for t in _check_numbers(pwfn_thresholds, "pwfn_thresholds",
                                                        1e-3, 1e3)]
    bnn_epochs = epochs if bnn_epochs is None else bnn_epochs
    _check_numbers([bnn_epochs], "bnn_epochs", 1, math.inf, integer=True)
    extra = {"finetune_epochs": finetune_epochs} if finetune_epochs > 0 else {}

    train, test = datasets.load(data, root=data_dir)
    log(train.note)
    skipped: list[str] = []
    net, deterministic = _deterministic(model, train, test, epochs=epochs,
                                        batch_size=batch_size, lr=lr, seed=seed, log=log)
    start = time.perf_counter()
    from_trained = bnn_init == "deterministic"  # then it needs no warm start
    posterior = fit(bayesian(net if from_trained else _fresh(model, train, seed)), train,
                    epochs=bnn_epochs, batch_size=batch_size, lr=lr, kl_weight=kl_weight,
                    lr_schedule=lr_schedule, seed=seed,
                    warm_start=0 if from_trained else "auto", progress=progress)
    fit_seconds = time.perf_counter() - start
    log(f"BNN fitted: {bnn_epochs} epochs from {bnn_init} in {fit_seconds:.1f} s")
    results: dict = {
        "model": model, "data": data, "seed": seed, "epochs": epochs, "data_note": train.note,
        "config": {"batch_size": batch_size, "lr": lr,
                   "kl_weight": posterior.config["kl_weight"], "kl_weight_asked": kl_weight,
                   "bnn_init": bnn_init, "bnn_epochs": bnn_epochs, "lr_schedule": lr_schedule,
                   "num_samples": num_samples, "finetune_epochs": finetune_epochs,
                   "methods": methods, "budgets": budgets, "kmeans_ks": kmeans_ks,
                   "brevitas_bits": brevitas_bits, "fit_seconds": fit_seconds,
                   "torch": torch.__version__},
        "num_weights": posterior.num_weights,
        "float_size_bytes": raw_bytes(posterior.mean_module().state_dict().values()),
        "float": _scores(evaluate(posterior, test, num_samples=num_samples, seed=seed)),
        "float_mean": _scores(evaluate(posterior.mean_module(), test)),
        "deterministic": deterministic,
    }

    # every quantizer at every budget; each scored on its saved-and-loaded copy
    with tempfile.TemporaryDirectory(prefix="pqnet-bench-") as tmp:
        folder = Path(save_dir) if save_dir is not None else Path(tmp)
        rows = quantized_rows(posterior, train, test,
                              methods=[m for m in methods if m != "pwfn"], budgets=budgets,
                              kmeans_ks=kmeans_ks, seed=seed, folder=folder,
                              skipped=skipped, log=log, **extra)
        if "pwfn" in methods:  # PWFN's own pipeline: its prior, from the trained net
            pwfn = _pwfn_rows(net, train, test, folder, epochs=pwfn_epochs,
                              thresholds=pwfn_thresholds, retrain_epochs=pwfn_retrain_epochs,
                              lr=lr, batch_size=batch_size, seed=seed, progress=progress,
                              skipped=skipped, log=log)
            rows += pwfn.pop("rows")
            results.update(pwfn)
            results["config"].update(pwfn_epochs=pwfn_epochs, pwfn_thresholds=pwfn_thresholds,
                                     pwfn_retrain_epochs=pwfn_retrain_epochs,
                                     pwfn_scale_lr=PWFN_SCALE_LR)
        rows += _brevitas_rows(model, train, test, folder, brevitas_bits, epochs=epochs,
                               batch_size=batch_size, lr=lr, seed=seed, skipped=skipped,
                               log=log)

    results["rows"] = rows
    results["skipped"] = skipped
    log("")
    print_results(results, log)
    _write(results, json_path, plot_path, log)
    return results


def _check_run(model: str, data: str, *, bnn_init: str, **counts: int) -> None:
    """Raise a ``ValueError`` naming the first bad argument of :func:`run_benchmark`."""
    if model not in models.MODELS:
        raise ValueError(f"model: unknown model {model!r}; expected one of "
                         f"{', '.join(models.MODELS)}")
    if data not in datasets.DATASETS:
        raise ValueError(f"data: unknown data set {data!r}; expected one of "
                         f"{', '.join(datasets.DATASETS)}")
    least = {"finetune_epochs": 0, "pwfn_retrain_epochs": 0}  # the others need at least 1
    for name, value in counts.items():
        _check_numbers([value], name, least.get(name, 1), math.inf, integer=True)
    if bnn_init not in ("scratch", "deterministic"):
        raise ValueError(f"bnn_init: expected 'scratch' or 'deterministic', got {bnn_init!r}")


def _deterministic(model: str, train: Dataset, test: Dataset, *, epochs: int, batch_size: int,
                   lr: float, seed: int, log: Callable[[str], None]) -> tuple[nn.Module, dict]:
    """The float net trained from ``seed``'s initial weights, and its test scores."""
    net = _fresh(model, train, seed)
    seconds = train_network(net, train, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    log(f"deterministic net trained in {seconds:.1f} s")
    return net, {**_scores(evaluate(net, test)), "seconds": seconds}


def _pwfn_rows(net: nn.Module, train: Dataset, test: Dataset, folder: Path, *, epochs: int,
               thresholds: Sequence[float], retrain_epochs: int, lr: float, batch_size: int,
               seed: int, progress: bool, skipped: list[str], log: Callable[[str], None]
               ) -> dict:
    """PWFN's own pipeline from the trained ``net``: its prior fitted for ``epochs``, then one
    row per threshold (its ``seconds`` include the pre-fit); ``{"rows", "pwfn_float_mean"}``."""
    start = time.perf_counter()
    posterior = fit(bayesian(net, prior="pwfn", init_scale="pwfn"), train, epochs=epochs,
                    batch_size=batch_size, lr=lr, scale_lr=PWFN_SCALE_LR, lr_schedule="cosine",
                    seed=seed, kl_weight=1.0, warm_start=0, progress=progress)
    prefit = time.perf_counter() - start
    log(f"PWFN posterior fitted: {epochs} epochs in {prefit:.1f} s")
    rows = quantized_rows(posterior, train, test, methods=["pwfn"], budgets=[], kmeans_ks=[],
                          seed=seed, folder=folder, skipped=skipped, log=log,
                          pwfn_thresholds=thresholds,
                          pwfn_options={"retrain_epochs": retrain_epochs, "lr": lr,
                                        "batch_size": batch_size})
    for row in rows:
        row["seconds"] += prefit
    return {"rows": rows, "pwfn_float_mean": _scores(evaluate(posterior.mean_module(), test))}


def _brevitas_rows(model: str, train: Dataset, test: Dataset, folder: Path,
                   widths: Sequence[int], *, epochs: int, batch_size: int, lr: float, seed: int,
                   skipped: list[str], log: Callable[[str], None]) -> list[dict]:
    """brevitas QAT at each width from the deterministic net's initial weights, exported and
    scored as a saved file like every row (none, with a note, when brevitas does not import)."""
    why = brevitas_available() if widths else None
    if why is not None:
        skipped.append(f"brevitas-qat: brevitas is not importable ({why})")
        log(f"skipped: {skipped[-1]}")
        return []
    rows = []
    for bits in widths:
        with warnings.catch_warnings():  # brevitas warns about its own internals
            warnings.simplefilter("ignore")
            qat = brevitas_net(_fresh(model, train, seed), bits)
            seconds = train_network(qat, train, epochs=epochs, batch_size=batch_size, lr=lr,
                                    seed=seed)
            qat_accuracy = float(evaluate(qat, test)["accuracy"])
            qnet = qat_to_qnet(qat, _fresh(model, train, seed), bits)
        file = folder / f"brevitas-qat_{bits}bit.pqn"
        scores, loaded = _measure(qnet, file, test)
        rows.append(_row("brevitas-qat", bits, loaded, scores, seconds,
                         qat_module_accuracy=qat_accuracy, file=file.name))
        log(f"brevitas-qat {bits} bits: accuracy {scores['accuracy']:.4f} "
            f"(brevitas module {qat_accuracy:.4f}), {seconds:.1f} s")
    return rows


def _write(results: dict, json_path: str | Path | None, plot_path: str | Path | None,
           log: Callable[[str], None]) -> None:
    if json_path is not None:
        save_json(results, json_path)
        log(f"wrote {json_path}")
    if plot_path is not None:
        from .diagnostics.plots import pareto_plot, save_figure

        save_figure(pareto_plot(results), plot_path)
        log(f"wrote {plot_path}")
