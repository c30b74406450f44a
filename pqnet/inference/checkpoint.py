"""Checkpoints: one versioned file per long-running job, replaced atomically as it goes.

A checkpoint is a ``torch.save`` of a dict whose ``format``, ``version`` and ``kind`` fields
say what it is (``kind`` tells a fit's checkpoint from, say, a PWFN round's), written to a
temporary file beside the target and renamed onto it. A process killed at any moment
therefore leaves either the previous checkpoint or the new one, never half of one, and
:func:`load_checkpoint` refuses corrupt, truncated, foreign and other-version files with a
message naming the argument. :func:`rng_state` / :func:`set_rng_state` capture every
random-number generator a pqnet job draws from, so that a resumed job continues with
bit-identical draws on CPU.

Example: a loop of rounds that survives ``kill -9``::

    from pqnet.inference.checkpoint import load_checkpoint, rng_state, save_checkpoint, \\
        set_rng_state

    path = folder / "rounds.pt"
    state = load_checkpoint(path, "my-rounds")  # None when there is none yet
    if state is None:
        start, results = 0, []
    else:
        start, results = state["round"], state["results"]
        set_rng_state(state["rng"])
    for r in range(start, 10):
        results.append(one_round(r))
        save_checkpoint(path, "my-rounds", {"round": r + 1, "results": results,
                                             "rng": rng_state()})
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .._io import load_torch, save_torch

FORMAT = "pqnet.checkpoint"
VERSION = 1


def rng_state() -> dict[str, Any]:
    """The states of the generators pqnet draws from: torch's CPU generator (Pyro's samples),
    every CUDA device's (once CUDA is in use; before that they hold only their seed, which
    ``torch.manual_seed`` sets again), Python's ``random`` and NumPy's global one."""
    state = {"torch": torch.get_rng_state(), "random": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the generators from :func:`rng_state`'s ``state`` (CUDA ones only where this
    machine has the same number of devices)."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(path: str | os.PathLike, kind: str, state: dict[str, Any]) -> Path:
    """Write ``state`` (a dict of tensors and plain Python values) as a ``kind`` checkpoint
    to ``path``, atomically, and remove temporary files an earlier killed write left behind.
    """
    path = Path(path)
    reserved = {"format", "version", "kind"} & set(state)
    if reserved:
        raise ValueError(f"state: the keys {sorted(reserved)} are reserved for the file header")
    written = save_torch({"format": FORMAT, "version": VERSION, "kind": kind, **state}, path)
    # a SIGKILL during a write leaves its temporary file (see pqnet._io.atomic_write)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    return written


def load_checkpoint(path: str | os.PathLike, kind: str, argument: str = "path",
                    map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The state of the ``kind`` checkpoint at ``path``, or ``None`` when there is no file.

    A ``ValueError`` whose message starts with ``argument`` for a file that is corrupt,
    truncated, of another format version, not a pqnet checkpoint, or of another ``kind``.
    Tensors are loaded onto ``map_location`` (the CPU by default: ``load_state_dict`` then
    copies them onto the device of the module or optimiser that takes them).
    """
    path = Path(path)
    if not path.exists():
        return None
    state = load_torch(path, "checkpoint", FORMAT, VERSION, map_location, argument=argument)
    if state.get("kind") != kind:
        raise ValueError(f"{argument}: {path} is a {state.get('kind')!r} checkpoint, "
                         f"not a {kind!r} one")
    return state
