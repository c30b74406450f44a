"""The evaluation trace of a search: written after every evaluation, replayed on resume.

The file is JSON, ``{"format": "pqnet.search", "version": 1, "method", "settings",
"evaluations": [...], "result": ...}``, one evaluation a record::

    {"step", "source", "params", "bits", "fidelity", "value", "accuracy", "avg_bits",
     "seconds", "cost", "total_cost", "search_seconds"}

``params`` is the parameter ``theta`` of the search space, ``bits`` the per-layer widths it
gives, ``fidelity`` the fine-tuning epochs, ``value`` the objective, ``seconds`` the time
the evaluation took, ``cost`` and ``total_cost`` the cost in epochs of this and of all
evaluations so far, ``search_seconds`` the time the search took to choose it (GP fit and
acquisition).

Resuming: a search is a deterministic function of its settings, its seed and the values it
has seen, so a resumed search takes the same decisions again; each decision that the file
already holds is read from it instead of being evaluated (after checking that it is the
same allocation at the same fidelity), and the search goes on from the first one it does not.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from .. import _checks
from .._io import load_json, save_json

__all__ = ["FORMAT", "VERSION", "Trace", "best_record", "read_trace"]

FORMAT = "pqnet.search"
VERSION = 1


def _plain(obj: object) -> object:
    """``obj`` as it reads back from JSON (tuples become lists, ...)."""
    return json.loads(json.dumps(obj))


def best_record(records: Sequence[dict], fidelity: int) -> dict | None:
    """The evaluation at ``fidelity`` with the highest ``value`` (the first of equals)."""
    best = None
    for record in records:
        if record["fidelity"] == fidelity and (best is None or record["value"] > best["value"]):
            best = record
    return best


def read_trace(path: str | os.PathLike, argument: str = "trace_path") -> dict:
    """Read a trace file; a ``ValueError`` naming ``argument`` for a file that is not a
    readable pqnet search trace of this version."""
    state = load_json(path, "search trace", FORMAT, VERSION, argument=argument)
    if not isinstance(state.get("evaluations"), list) or not isinstance(
            state.get("settings"), dict):
        raise ValueError(f"{argument}: {path} is a malformed search trace")
    return state


class Trace:
    """The records of one search, checkpointed to ``path`` (atomically) after each evaluation.

    With ``resume`` and an existing file at ``path``, its evaluations are replayed: the
    settings must be those of this run (a ``ValueError`` naming ``trace_path`` otherwise).
    """

    def __init__(self, method: str, settings: dict, path: str | os.PathLike | None = None,
                 resume: bool = False) -> None:
        _checks.flag("resume", resume)
        if resume and path is None:
            raise ValueError("trace_path: resume=True needs the trace file to resume from")
        self.method, self.settings = method, _plain(settings)
        self.path = None if path is None else Path(path)
        self.records: list[dict] = []
        self.stored: list[dict] = []
        self.result: dict | None = None
        if resume and self.path.is_file():
            state = read_trace(self.path)
            if state.get("method") != method:
                raise ValueError(f"trace_path: {self.path} holds a {state.get('method')!r} "
                                 f"search, not {method!r}")
            differ = sorted(k for k in set(self.settings) | set(state["settings"])
                            if self.settings.get(k) != state["settings"].get(k))
            if differ:
                raise ValueError(f"trace_path: {self.path} was written with other settings "
                                 f"({', '.join(differ)} differ); resume it with the same ones")
            self.stored = state["evaluations"]

    @property
    def total_cost(self) -> float:
        return self.records[-1]["total_cost"] if self.records else 0.0

    @property
    def replayed(self) -> int:
        """How many of the records were read from the file rather than evaluated."""
        return min(len(self.records), len(self.stored))

    def evaluate(self, params: Sequence[float], bits: Sequence[int], fidelity: int,
                 cost: float, source: str, function: Callable[[list[int], int], dict | float],
                 search_seconds: float = 0.0) -> dict:
        """Record ``function(bits, fidelity)`` (or its stored result), save, return it.
        ``search_seconds`` is the time the search took to choose this query."""
        params, bits = [float(p) for p in params], [int(b) for b in bits]
        step = len(self.records)
        if step < len(self.stored):
            record = self.stored[step]
            if record.get("bits") != bits or record.get("fidelity") != fidelity:
                raise ValueError(f"trace_path: evaluation {step} in {self.path} is "
                                 f"{record.get('bits')} at {record.get('fidelity')} epochs, this "
                                 f"run's is {bits} at {fidelity}: not the same search")
        else:
            out = function(bits, fidelity)
            out = {"value": out} if isinstance(out, (int, float)) else dict(out)
            if not math.isfinite(float(out["value"])):
                raise ValueError(f"objective: not finite ({out['value']!r}) for {bits} at "
                                 f"{fidelity} epochs")
            record = {"step": step, "source": source, "params": params, "bits": bits,
                      "fidelity": fidelity, **_plain(out), "cost": cost,
                      "total_cost": self.total_cost + cost, "search_seconds": search_seconds}
            self.records.append(record)
            self.save()
            return record
        self.records.append(record)
        return record

    def state(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "method": self.method,
                "settings": self.settings, "evaluations": self.records, "result": self.result}

    def save(self, path: str | os.PathLike | None = None) -> Path | None:
        """Write the trace to ``path`` (default: the checkpoint path), atomically."""
        path = self.path if path is None else Path(path)
        return None if path is None else save_json(self.state(), path)
