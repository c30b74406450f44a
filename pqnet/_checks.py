"""Argument checks: the one home of the rules pqnet's public functions apply to numbers,
flags, seeds, choices and devices.

Each returns the value in its canonical type or raises a ``ValueError`` whose message starts
with the argument's name and says what was expected.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Integral, Real

import torch


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def positive_int(name: str, value: object) -> int:
    if not _is_int(value) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def nonnegative_int(name: str, value: object) -> int:
    if not _is_int(value) or value < 0:
        raise ValueError(f"{name}: expected a non-negative int, got {value!r}")
    return int(value)


def int_in(name: str, value: object, low: int, high: int) -> int:
    if not _is_int(value) or not low <= value <= high:
        raise ValueError(f"{name}: expected an integer in {low}..{high}, got {value!r}")
    return int(value)


def bits(name: str, value: object, high: int) -> int:
    """An integer bit-width in ``1..high``."""
    if not _is_int(value) or not 1 <= value <= high:
        raise ValueError(f"{name}: expected an integer bit-width in 1..{high}, got {value!r}")
    return int(value)


def avg_bits(name: str, value: object) -> float:
    """A finite average bit budget of at least 1 (no method codes a weight in under 1 bit)."""
    if not _is_real(value) or value < 1:
        raise ValueError(f"{name}: expected a finite number of bits per weight >= 1, "
                         f"got {value!r}")
    return float(value)


def positive_float(name: str, value: object) -> float:
    if not _is_real(value) or value <= 0:
        raise ValueError(f"{name}: expected a positive finite number, got {value!r}")
    return float(value)


def nonnegative_float(name: str, value: object) -> float:
    if not _is_real(value) or value < 0:
        raise ValueError(f"{name}: expected a finite non-negative number, got {value!r}")
    return float(value)


def above(name: str, value: object, bound: float) -> float:
    if not _is_real(value) or not value > bound:
        raise ValueError(f"{name}: expected a finite number above {bound:g}, got {value!r}")
    return float(value)


def fraction(name: str, value: object, closed_below: bool = False) -> float:
    """A number in the open interval (0, 1), or in [0, 1) when ``closed_below``."""
    inside = _is_real(value) and (0 <= value if closed_below else 0 < value) and value < 1
    if not inside:
        raise ValueError(f"{name}: expected a number in {'[' if closed_below else '('}0, 1), "
                         f"got {value!r}")
    return float(value)


def flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: expected True or False, got {value!r}")
    return value


def seed(value: object, name: str = "seed") -> int:
    if not _is_int(value):
        raise ValueError(f"{name}: expected an int, got {value!r}")
    return int(value)


def one_of(name: str, value: object, choices: Iterable[object]) -> object:
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, "
                         f"got {value!r}")
    return value


def device(value: str | torch.device, name: str = "device") -> torch.device:
    """``value`` as a ``torch.device``; refused when it is not one, or when it asks for CUDA
    on a machine without."""
    try:
        value = torch.device(value)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"{name}: {value!r} is not a torch device") from err
    if value.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name}: CUDA was asked for but torch.cuda.is_available() is False")
    return value


def probability_rows(name: str, value: object, like: torch.Tensor | None = None
                     ) -> torch.Tensor:
    """``value`` as an ``(N, C)`` tensor of per-example class probabilities, of the shape of
    ``like`` when given."""
    if not isinstance(value, torch.Tensor) or value.dim() != 2:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name}: expected an (N, C) tensor of class probabilities, got {shape}")
    if like is not None and value.shape != like.shape:
        raise ValueError(f"{name}: expected the shape {tuple(like.shape)} of the other "
                         f"predictive, got {tuple(value.shape)}")
    return value
