"""The result of a search: its trace, the chosen allocation and network, and their plot."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .._io import atomic_write, save_json
from ..quantize.qnet import QuantizedNet
from .trace import read_trace

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["SearchResult", "best_so_far", "plot_searches"]


def best_so_far(state: dict) -> tuple[list[float], list[float]]:
    """``(costs, values)``: after each top-fidelity evaluation of the trace ``state``, the
    epochs spent so far and the best top-fidelity objective value found so far."""
    top = state["settings"]["top_fidelity"]
    costs, values = [], []
    for record in state["evaluations"]:
        if record["fidelity"] == top:
            costs.append(record["total_cost"])
            values.append(max(record["value"], values[-1]) if values else record["value"])
    return costs, values


@dataclass
class SearchResult:
    """What :func:`pqnet.search.search` and :func:`~pqnet.search.random_search` return.

    Attributes
    ----------
    trace : the trace as written to its JSON file (``format``, ``version``, ``method``,
        ``settings``, ``evaluations``, ``result``; see :mod:`pqnet.search.trace`).
    qnet : the best allocation at the top fidelity as a :class:`QuantizedNet` (fine-tuned
        ``e_max`` epochs), or ``None`` for a search without a network (a plain function).
    """

    trace: dict
    qnet: QuantizedNet | None = None

    @property
    def evaluations(self) -> list[dict]:
        return self.trace["evaluations"]

    @property
    def best(self) -> dict:
        """The evaluation at the top fidelity with the highest objective value."""
        return self.trace["result"]["best"]

    @property
    def best_bits(self) -> dict[str, int]:
        """``{layer: width}`` of the best allocation."""
        layers = self.trace["settings"]["space"]["layers"]
        return dict(zip(layers, self.best["bits"], strict=True))

    @property
    def best_value(self) -> float:
        return self.best["value"]

    @property
    def cost(self) -> float:
        """Epochs spent on all evaluations."""
        return self.evaluations[-1]["total_cost"] if self.evaluations else 0.0

    def save_trace(self, path: str | os.PathLike) -> Path:
        """Write the trace JSON to ``path`` atomically."""
        return save_json(self.trace, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> SearchResult:
        """The result in a trace file (without its network); a ``ValueError`` naming ``path``
        for a file that is not a complete pqnet search trace."""
        state = read_trace(path, "path")
        if not isinstance(state.get("result"), dict) or "best" not in state["result"]:
            raise ValueError(f"path: {path} holds an unfinished search (no result yet)")
        return cls(state)

    def plot(self, path: str | os.PathLike | None = None,
             others: dict[str, SearchResult] | None = None) -> Figure:
        """Best-found objective against cost for this search and ``others`` (by label);
        written to ``path`` (atomically) when given."""
        fig = plot_searches({self.trace["method"]: self, **(others or {})})
        if path is not None:
            atomic_write(path, lambda tmp: fig.savefig(tmp, format=Path(path).suffix.lstrip(".")
                                                        or "png", dpi=120))
        return fig


def plot_searches(results: dict[str, SearchResult], ax: Axes | None = None,
                  title: str = "bit-width search: best found vs cost") -> Figure:
    """One step line per search: the best top-fidelity value found against the epochs spent,
    with each top-fidelity evaluation as a dot and each lower-fidelity one as an x. Drawn on
    ``ax`` when given (its figure is returned), else on a new figure."""
    if ax is None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4.2), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
    for label, result in results.items():
        costs, values = best_so_far(result.trace)
        if not costs:
            continue
        line = ax.step(costs + [result.cost], values + values[-1:], where="post",
                       label=f"{label}: best {values[-1]:.4f} in {result.cost:.1f} epochs")[0]
        top = result.trace["settings"]["top_fidelity"]
        low = [r for r in result.evaluations if r["fidelity"] != top]
        ax.scatter(costs, [r["value"] for r in result.evaluations if r["fidelity"] == top],
                   s=12, color=line.get_color(), alpha=0.6)
        if low:
            ax.scatter([r["total_cost"] for r in low], [r["value"] for r in low], s=8,
                       marker="x", color=line.get_color(), alpha=0.35)
    values = [v for r in results.values() for v in best_so_far(r.trace)[1]]
    if values:  # zoom on the best-found curves; failed allocations fall off the bottom
        ax.set_ylim(min(values) - 0.01, max(values) + 0.005)
    ax.set_xlabel("cost (fine-tuning epochs, overhead included)")
    ax.set_ylabel("objective at the top fidelity (validation)")
    ax.set_title(title, fontsize="medium", loc="left")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return ax.figure
