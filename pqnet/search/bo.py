"""The search loops: multi-fidelity Bayesian optimisation, and random search as its baseline.

Both spend a budget of ``budget_epochs`` on evaluations of allocations ``b`` at fidelities
``e`` (fine-tuning epochs), an evaluation at ``e`` costing ``c(e) = e + c_0`` epochs (``c_0``,
``overhead_epochs``: quantizing and validating, counted in epochs). What they find is the best
evaluation at the top fidelity ``e_max``.

:func:`bayes_opt` (NUQ, Gennari do Nascimento, Costain & Prisacariu, ECCV 2020):

1. initial design: each warm-start allocation (the one nearest in the candidate set) at every
   fidelity, so that the task covariance has a shared point, then ``n_init`` allocations drawn
   at random at the lowest fidelity;
2. each step fits the multi-task GP (:func:`~pqnet.search.gp.fit_model`) to all evaluations
   and queries the ``(b, e)`` not yet evaluated with the most information about the top
   fidelity's maximum per epoch (:func:`~pqnet.search.gp.max_value_entropy`), among those
   that leave enough budget for one more top-fidelity query;
3. occasional top-fidelity queries: when ``top_every - 1`` queries in a row were below the top
   fidelity (or no such query is left), the step evaluates the recommendation instead, the
   allocation not yet evaluated at ``e_max`` with the highest posterior mean there (the
   search's best is only ever what it evaluated at ``e_max``; choosing these queries by the
   same information criterion, restricted to ``e_max``, did worse on the LeNet-5 benchmark);
4. it stops when no query fits the remaining budget. The final GP's recommendation over all
   candidates is recorded as ``predicted``.

:func:`random_sample`: allocations drawn uniformly without replacement from the candidates,
each evaluated at ``e_max``, until the budget is spent.

Every decision is seeded from ``seed`` and the step number, so a search is reproducible and a
resumed one (:class:`~pqnet.search.trace.Trace`) takes the same decisions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from numbers import Integral, Real

import torch
from botorch.models import MultiTaskGP

from .. import _checks
from .gp import fit_model, max_value_entropy, one_thread, predict_top
from .space import BitSpace
from .trace import Trace, best_record

__all__ = ["Objective", "bayes_opt", "candidates", "check_fidelities", "random_sample",
           "to_unit"]

Objective = Callable[[list[int], int], "dict | float"]
TOLERANCE = 1e-9
STEP = 1000


def _seed(seed: int, stream: int) -> int:
    """A seed per use of the search's ``seed``: the initial design (stream 1), random search
    (2) and each acquisition step (``STEP + step``) draw independent numbers."""
    return seed * 1_000_003 + stream


def check_fidelities(fidelities: object) -> tuple[int, ...]:
    """Fine-tuning epochs ``e_0 < e_1 < ... < e_max``, integers ``>= 0``."""
    if isinstance(fidelities, (str, bytes)) or not isinstance(fidelities, Sequence) \
            or not fidelities:
        raise ValueError(f"fidelities: expected a non-empty sequence of fine-tuning epochs, "
                         f"got {fidelities!r}")
    for e in fidelities:
        if isinstance(e, bool) or not isinstance(e, Integral) or e < 0:
            raise ValueError(f"fidelities: expected integer epochs >= 0, got {fidelities!r}")
    if any(b <= a for a, b in zip(fidelities, fidelities[1:], strict=False)):
        raise ValueError(f"fidelities: must be strictly increasing (the last is the top "
                         f"fidelity), got {list(fidelities)}")
    return tuple(int(e) for e in fidelities)


def _check_budget(budget_epochs: object) -> float:
    if isinstance(budget_epochs, bool) or not isinstance(budget_epochs, Real) \
            or not math.isfinite(budget_epochs) or budget_epochs <= 0:
        raise ValueError(f"budget_epochs: expected a finite number of epochs > 0, "
                         f"got {budget_epochs!r}")
    return float(budget_epochs)


def candidates(space: BitSpace, max_avg_bits: float | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(params, bits)`` of the space's allocations with ``avg_bits <= max_avg_bits``."""
    params, bits = space.grid()
    if max_avg_bits is None:
        return params, bits
    avg = space.avg_bits(bits)
    keep = avg <= max_avg_bits + TOLERANCE
    if not bool(keep.any()):
        raise ValueError(f"avg_bits: no allocation of the {space.kind!r} space meets "
                         f"{max_avg_bits} bits per weight; its fewest are {float(avg.min()):.4f}")
    return params[keep], bits[keep]


def to_unit(params: torch.Tensor) -> torch.Tensor:
    """The candidates' parameters scaled to the unit cube by their own range (a constant
    parameter: 0). The range is the candidates', not the space's: under a budget a large layer
    may only take widths 1 and 2, which must be as far apart for the GP as any two settings."""
    low, high = params.min(0).values, params.max(0).values
    return (params.double() - low) / (high - low).clamp_min(1e-12)


def _rows(trace: Trace, bits: torch.Tensor) -> list[int]:
    """The candidate row of each evaluation in ``trace``."""
    row_of = {tuple(b): i for i, b in enumerate(bits.tolist())}
    return [row_of[tuple(r["bits"])] for r in trace.records]


def bayes_opt(function: Objective, space: BitSpace, trace: Trace, *,
              fidelities: Sequence[int] = (0, 1, 2, 4), budget_epochs: float,
              max_avg_bits: float | None = None, warm_start: Sequence[Sequence[int]] = (),
              n_init: int = 8, top_every: int = 4, overhead_epochs: float = 0.1,
              rank: int | None = None, mes_candidates: int = 1000, seed: int = 0,
              log: Callable[[str], None] | None = None) -> Trace:
    """Maximise ``function(bits, epochs)`` at the top fidelity by multi-fidelity BO (see the
    module docstring), recording every evaluation in ``trace``; returns ``trace``.

    ``function`` returns the objective value or a dict with it under ``"value"`` (and more
    fields to record). ``max_avg_bits`` restricts the candidates to that average; ``warm_start``
    lists allocations (per-layer widths) to start from.

    Examples
    --------
    >>> space = BitSpace(("a", "b"), (100, 300))
    >>> f = lambda bits, e: -abs(bits[0] - 6) - abs(bits[1] - 2) - 2 ** -e
    >>> trace = bayes_opt(f, space, Trace("gp", {}), fidelities=(0, 2), budget_epochs=20)
    >>> trace.result["best"]["bits"]  # doctest: +SKIP
    [6, 2]
    """
    fidelities = check_fidelities(fidelities)
    budget = _check_budget(budget_epochs)
    n_init = _checks.int_in("n_init", n_init, 0, 1 << 20)
    top_every = _checks.int_in("top_every", top_every, 1, 1 << 20)
    overhead = _checks.nonnegative_float("overhead_epochs", overhead_epochs)
    mes_candidates = _checks.int_in("mes_candidates", mes_candidates, 1, 1 << 20)
    seed = _checks.seed(seed)
    if rank is not None:
        rank = _checks.int_in("rank", rank, 1, len(fidelities))
    say = log or (lambda line: None)
    params, bits = candidates(space, max_avg_bits)
    unit = to_unit(params)
    n, tasks, top = len(bits), len(fidelities), len(fidelities) - 1
    costs = [e + overhead for e in fidelities]

    def run(row: int, task: int, source: str, seconds: float = 0.0) -> dict:
        record = trace.evaluate(params[row].tolist(), bits[row].tolist(), fidelities[task],
                                costs[task], source, function, seconds)
        say(f"[{len(trace.records):3d}] {source:>14}: bits {record['bits']} at "
            f"{record['fidelity']} epochs -> {record['value']:.4f} (spent "
            f"{record['total_cost']:.2f} of {budget:g} epochs)")
        return record

    # 1. the initial design
    order = torch.randperm(n, generator=torch.Generator().manual_seed(_seed(seed, 1))).tolist()
    anchors = list(dict.fromkeys(space.nearest(w, bits) for w in warm_start)) or order[:1]
    others = [i for i in order if i not in anchors][:n_init]
    plan = [(i, t, "warm-start") for i in anchors for t in range(tasks)] + \
        [(i, 0, "initial") for i in others]
    first_cost = sum(costs[t] for _, t, _ in plan)
    if first_cost > budget + TOLERANCE:
        raise ValueError(f"budget_epochs: the initial design ({len(anchors)} allocation(s) at "
                         f"every fidelity, {len(others)} at the lowest) costs "
                         f"{first_cost:g} epochs, more than the budget of {budget:g}")
    for row, task, source in plan:
        run(row, task, source)

    # 2.-4. the acquisition loop
    task_of = {e: t for t, e in enumerate(fidelities)}

    def refit() -> MultiTaskGP:
        rows = _rows(trace, bits)
        return fit_model(unit[rows], torch.tensor([task_of[r["fidelity"]]
                                                   for r in trace.records]),
                         torch.tensor([r["value"] for r in trace.records]), rank)

    since_top, step = 0, 0
    cost = torch.tensor(costs)
    while True:
        remaining = budget - trace.total_cost + TOLERANCE
        done = torch.zeros(n, tasks, dtype=torch.bool)
        done[_rows(trace, bits), [task_of[r["fidelity"]] for r in trace.records]] = True
        allowed = ~done & (cost <= remaining) & ((cost + costs[top] <= remaining)
                                                  | (torch.arange(tasks) == top))
        low = allowed[:, :top].any()
        if not bool(allowed.any()):
            break
        start = time.perf_counter()
        with torch.random.fork_rng(), one_thread():
            torch.manual_seed(_seed(seed, STEP + step))
            model = refit()
            if bool(allowed[:, top].any()) and (since_top >= top_every - 1 or not bool(low)):
                untested = allowed[:, top].nonzero()[:, 0]
                row = int(untested[predict_top(model, unit[untested], top).argmax()])
                task, source = top, "recommendation"
            else:
                choices = allowed.nonzero()
                sample = torch.randperm(n)[:mes_candidates]
                row, task = choices[max_value_entropy(model, unit, choices, sample,
                                                      costs)].tolist()
                source = "acquisition"
        run(row, task, source, time.perf_counter() - start)
        since_top = 0 if task == top else since_top + 1
        step += 1

    # the final model's recommendation, and the best evaluation at the top fidelity
    with torch.random.fork_rng(), one_thread():
        torch.manual_seed(_seed(seed, STEP + step))
        mean = predict_top(refit(), unit, top)
    best = int(mean.argmax())
    trace.result = {"best": best_record(trace.records, fidelities[top]),
                    "predicted": {"params": params[best].tolist(), "bits": bits[best].tolist(),
                                  "warped_mean": float(mean[best])}}
    trace.save()
    return trace


def random_sample(function: Objective, space: BitSpace, trace: Trace, *, fidelity: int,
                  budget_epochs: float, max_avg_bits: float | None = None,
                  overhead_epochs: float = 0.1, seed: int = 0,
                  log: Callable[[str], None] | None = None) -> Trace:
    """Random search: allocations drawn uniformly without replacement from the candidates
    (``avg_bits <= max_avg_bits``), each evaluated at ``fidelity`` epochs, until the next one
    would exceed ``budget_epochs``; every evaluation recorded in ``trace``."""
    fidelity = check_fidelities([fidelity])[0]
    budget = _check_budget(budget_epochs)
    cost = fidelity + _checks.nonnegative_float("overhead_epochs", overhead_epochs)
    say = log or (lambda line: None)
    params, bits = candidates(space, max_avg_bits)
    generator = torch.Generator().manual_seed(_seed(_checks.seed(seed), 2))
    order = torch.randperm(len(bits), generator=generator)
    for row in order.tolist():
        if trace.total_cost + cost > budget + TOLERANCE:
            break
        record = trace.evaluate(params[row].tolist(), bits[row].tolist(), fidelity, cost,
                                "random", function)
        say(f"[{len(trace.records):3d}] random: bits {record['bits']} at {fidelity} epochs -> "
            f"{record['value']:.4f} (spent {record['total_cost']:.2f} of {budget:g} epochs)")
    trace.result = {"best": best_record(trace.records, fidelity)}
    trace.save()
    return trace
