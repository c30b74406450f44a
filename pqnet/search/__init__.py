"""Bit-width search: multi-fidelity Bayesian optimisation of per-layer widths (BoTorch).

NUQ (Gennari do Nascimento, Costain & Prisacariu, "Finding Non-Uniform Quantization Schemes
using Multi-Task Gaussian Processes", ECCV 2020) searches per-layer bit-widths ``b_l in 1..8``
with a multi-task Gaussian process whose tasks are numbers of fine-tuning epochs: cheap
evaluations (few epochs, or none: post-training quantization) inform the expensive one. pqnet
carries it on a fitted posterior, with BoTorch (Balandat et al., NeurIPS 2020):

=============================  ==========================================================
space (:mod:`.space`)          per-layer widths (``"layers"``), or a Bezier / Chebyshev
                               curve of low degree over depth for deep networks
objective (:mod:`.objective`)  quantize (the posterior's most probable grid per layer),
                               fine-tune ``e`` epochs, accuracy on a validation split:
                               ``"accuracy"`` under an average-bits budget, or NUQ's
                               ``"effective"`` accuracy (less ``cost_per_bit`` per bit
                               above it)
model (:mod:`.gp`)             ``MultiTaskGP``: ICM kernel, tasks = fidelities ``e``
acquisition (:mod:`.gp`)       ``qMultiFidelityMaxValueEntropy`` per epoch of cost, with
                               occasional top-fidelity queries of the GP's recommendation
loop (:mod:`.bo`)              warm start from ``quantile-inform`` at the same budget, so
                               the posterior's uncertainty informs the first points
trace (:mod:`.trace`)          JSON checkpoint after every evaluation; ``resume=True``
                               replays it
=============================  ==========================================================

>>> train, val = split_validation(train, 1000, seed=0)                    # doctest: +SKIP
>>> result = pqnet.search.search(posterior, train, val, avg_bits=2.0, budget_epochs=40,
...                              trace_path="search.json")
>>> result.best_bits, result.best_value, result.cost, result.qnet.avg_bits
>>> result.plot("search.png", others={"random": pqnet.search.random_search(...)})
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from torch.utils.data import Dataset

from .. import _checks
from ..inference.posterior import Posterior
from ..quantize import quantize
from ..quantize.grids import MAX_BITS
from ..quantize.qnet import QuantizedNet
from .bo import bayes_opt, check_fidelities, random_sample
from .objective import OBJECTIVES, QuantizedAccuracy, objective_value, split_validation
from .result import SearchResult, best_so_far, plot_searches
from .space import SPACES, BitSpace
from .trace import Trace, read_trace

__all__ = ["OBJECTIVES", "SPACES", "BitSpace", "QuantizedAccuracy", "SearchResult", "Trace",
           "bayes_opt", "best_so_far", "objective_value", "plot_searches", "random_sample",
           "random_search", "read_trace", "search", "split_validation"]

WIDTHS = tuple(range(1, MAX_BITS + 1))


class _KeepBest:
    """The objective, keeping the network of the best evaluation at the top fidelity."""

    def __init__(self, objective: QuantizedAccuracy, top: int) -> None:
        self.objective, self.top = objective, top
        self.bits: list[int] | None = None
        self.value, self.qnet = -float("inf"), None

    def __call__(self, bits: list[int], epochs: int) -> dict:
        out = self.objective(bits, epochs)
        if epochs == self.top and out["value"] > self.value:
            self.bits, self.value, self.qnet = list(bits), out["value"], self.objective.last
        return out

    def network(self, bits: list[int]) -> QuantizedNet:
        """The best network (re-made, deterministically, when a resumed run read it)."""
        return self.qnet if self.bits == bits else self.objective.quantize(bits, self.top)


def _setup(posterior: Posterior, train: Dataset, val: Dataset, avg_bits: float, space: str,
           degree: int, widths: Sequence[int], objective: str, cost_per_bit: float,
           finetune_lr: float, batch_size: int, seed: int
           ) -> tuple[QuantizedAccuracy, BitSpace, float | None, dict]:
    function = QuantizedAccuracy(posterior, train, val, avg_bits=avg_bits, objective=objective,
                                 cost_per_bit=cost_per_bit, lr=finetune_lr,
                                 batch_size=batch_size, seed=seed)
    bit_space = BitSpace.from_posterior(posterior, space, degree, widths)
    max_avg_bits = function.avg_bits if objective == "accuracy" else None
    settings = {"avg_bits": function.avg_bits, "objective": objective,
                "cost_per_bit": function.cost_per_bit, "space": bit_space.describe(),
                "finetune_lr": function.lr, "batch_size": function.batch_size, "seed": seed,
                "train_size": len(train), "val_size": len(val)}
    return function, bit_space, max_avg_bits, settings


def search(posterior: Posterior, train: Dataset, val: Dataset, *, avg_bits: float,
           fidelities: Sequence[int] = (0, 1, 2, 4), budget_epochs: float = 40.0,
           space: str = "layers", degree: int = 2, widths: Sequence[int] = WIDTHS,
           objective: str = "accuracy", cost_per_bit: float = 0.01, warm_start: bool = True,
           n_init: int = 8, top_every: int = 4, overhead_epochs: float = 0.1,
           rank: int | None = None, mes_candidates: int = 1000, finetune_lr: float = 1e-3,
           batch_size: int = 64, seed: int = 0, trace_path: str | os.PathLike | None = None,
           resume: bool = False, log: Callable[[str], None] | None = None) -> SearchResult:
    """Search per-layer bit-widths of ``posterior`` by multi-fidelity Bayesian optimisation.

    Maximises, over allocations ``b`` (per-layer widths in ``widths``, parameterised by
    ``space``: ``"layers"``, or a ``"bezier"`` / ``"chebyshev"`` curve of ``degree`` over depth,
    see :class:`BitSpace`), the objective at the top fidelity ``e_max = fidelities[-1]``:

    - ``objective="accuracy"``: the validation accuracy ``a(b, e_max)`` subject to
      ``avg_bits(b) <= avg_bits`` (only allocations within the budget are candidates);
    - ``objective="effective"``: NUQ's effective accuracy ``a(b, e_max) - cost_per_bit *
      max(0, avg_bits(b) - avg_bits)``, over all allocations.

    ``a(b, e)`` is the accuracy on ``val`` after quantizing the posterior means at ``b`` and
    fine-tuning ``e`` epochs on ``train`` (:class:`QuantizedAccuracy`). Evaluations at every
    fidelity in ``fidelities`` (strictly increasing epochs, e.g. ``(0, 1, 2, 4)``) feed one
    multi-task GP (ICM kernel; NUQ Sec. 3.3, BoTorch's ``MultiTaskGP``), and the next query is
    the one with the most information about the top fidelity's maximum per epoch of cost
    (``qMultiFidelityMaxValueEntropy``, cost ``e + overhead_epochs``), with a top-fidelity
    query of the GP's recommendation at least every ``top_every`` steps; see
    :func:`~pqnet.search.bo.bayes_opt`. With ``warm_start``, the ``quantile-inform``
    allocation at ``avg_bits`` (:func:`pqnet.quantize.quantile_inform`) is the first point,
    evaluated at every fidelity, so the posterior's uncertainty informs the search.

    The search stops when no query fits into ``budget_epochs``. The trace is written to
    ``trace_path`` after every evaluation (atomically); with ``resume=True`` a search with
    the same settings continues from the evaluations already in that file. Everything is
    seeded by ``seed``: the same seed gives the same trace.

    Returns a :class:`SearchResult`: ``trace``, ``best`` (evaluation), ``best_bits``,
    ``best_value``, ``cost`` and ``qnet``, the best allocation at ``e_max`` as a
    :class:`~pqnet.quantize.QuantizedNet`.
    """
    fidelities = check_fidelities(fidelities)
    warm_start = _checks.flag("warm_start", warm_start)
    function, bit_space, max_avg_bits, settings = _setup(
        posterior, train, val, avg_bits, space, degree, widths, objective, cost_per_bit,
        finetune_lr, batch_size, seed)
    settings.update({"fidelities": list(fidelities), "top_fidelity": fidelities[-1],
                     "budget_epochs": budget_epochs, "warm_start": warm_start,
                     "n_init": n_init, "top_every": top_every,
                     "overhead_epochs": overhead_epochs, "rank": rank,
                     "mes_candidates": mes_candidates})
    starts = []
    if warm_start:
        informed = quantize(posterior, "quantile-inform",
                            avg_bits=_checks.avg_bits("avg_bits", avg_bits))
        starts.append([round(informed.layer_bits[p]) for p in bit_space.layers])
        settings["warm_start_bits"] = starts[0]
    trace = Trace("gp", settings, trace_path, resume)
    keep = _KeepBest(function, fidelities[-1])
    bayes_opt(keep, bit_space, trace, fidelities=fidelities, budget_epochs=budget_epochs,
              max_avg_bits=max_avg_bits, warm_start=starts, n_init=n_init, top_every=top_every,
              overhead_epochs=overhead_epochs, rank=rank, mes_candidates=mes_candidates,
              seed=seed, log=log)
    return SearchResult(trace.state(), keep.network(trace.result["best"]["bits"]))


def random_search(posterior: Posterior, train: Dataset, val: Dataset, *, avg_bits: float,
                  fidelity: int = 4, budget_epochs: float = 120.0, space: str = "layers",
                  degree: int = 2, widths: Sequence[int] = WIDTHS, objective: str = "accuracy",
                  cost_per_bit: float = 0.01, overhead_epochs: float = 0.1,
                  finetune_lr: float = 1e-3, batch_size: int = 64, seed: int = 0,
                  trace_path: str | os.PathLike | None = None, resume: bool = False,
                  log: Callable[[str], None] | None = None) -> SearchResult:
    """The baseline of :func:`search`: allocations of the same space, drawn uniformly at
    random (without replacement) among the candidates (within ``avg_bits`` for
    ``objective="accuracy"``), each evaluated by the same objective at ``fidelity`` epochs,
    until ``budget_epochs`` are spent. Same trace, resume and result as :func:`search`."""
    fidelity = check_fidelities([fidelity])[0]
    function, bit_space, max_avg_bits, settings = _setup(
        posterior, train, val, avg_bits, space, degree, widths, objective, cost_per_bit,
        finetune_lr, batch_size, seed)
    settings.update({"fidelities": [fidelity], "top_fidelity": fidelity,
                     "budget_epochs": budget_epochs, "overhead_epochs": overhead_epochs})
    trace = Trace("random", settings, trace_path, resume)
    keep = _KeepBest(function, fidelity)
    random_sample(keep, bit_space, trace, fidelity=fidelity, budget_epochs=budget_epochs,
                  max_avg_bits=max_avg_bits, overhead_epochs=overhead_epochs, seed=seed,
                  log=log)
    if trace.result["best"] is None:
        raise ValueError(f"budget_epochs: {budget_epochs} epochs do not pay for one evaluation "
                         f"at {fidelity} epochs")
    return SearchResult(trace.state(), keep.network(trace.result["best"]["bits"]))
