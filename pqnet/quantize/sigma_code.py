"""Entropy-constrained quantization driven by the posterior: more uncertainty, a shorter code.

Each layer starts from a fine symmetric grid of :data:`LEVELS` values that holds 0, every
weight at its nearest level. Then, with ``p`` the levels' current frequencies, each weight
``i`` takes the level ``v`` of least

.. math:: -\\log_2 p(v) + \\lambda \\, z^2, \\qquad z = (v - \\mu_i) / \\sigma_i,
    \\quad |z| \\le k,

and model and assignment are iterated: entropy-constrained scalar quantization (Chou,
Lookabaugh & Gray 1989) whose distortion is measured in posterior sds. ``lambda = 0`` is the
rule "the shortest code within ``k`` sds"; ``lambda > 0`` prices an error of one sd at
``lambda`` bits, so a weight the posterior is sure of (small ``sigma``) pays dearly to move
and an uncertain one moves to a popular value (0 first, which prunes it). A weight with no
level within ``k`` sds keeps its nearest level. The width of each weight is implicit in its
code length: no width map.

Each step minimises the new assignment's cross-entropy under the old model (plus the same
distortion term), which bounds its own entropy: the objective never rises from one step to
the next, and with ``lambda = 0`` the code entropy is at most that of nearest rounding.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

from .. import _checks
from ..inference.posterior import Posterior
from . import codec
from .budget import layer_posteriors, meet_budget, one_of
from .qnet import QuantizedLayer, QuantizedNet

LEVELS = 255  # odd, so the grid holds 0; at most 2^8 values fit a uint8 code
MAX_STEPS = 50
BISECTIONS = 24  # trials of the budget search
LOG_LAM = (-8.0, 8.0)  # log10 of the lam range the budget search spans


def fine_grid(mu: torch.Tensor, levels: int = LEVELS) -> np.ndarray:
    """``levels`` evenly spaced values from ``-max|mu|`` to ``max|mu|``, the middle one 0."""
    grid = float(mu.abs().max()) * np.linspace(-1.0, 1.0, levels, dtype=np.float32)
    grid[levels // 2] = 0.0
    return grid


def _range_argmax(counts: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """For each ``i``, the index of the largest ``counts`` in ``[lo_i, hi_i]`` (inclusive),
    by a sparse table: ``table[j][s]`` is the argmax over ``[s, s + 2^j)``."""
    table = [np.arange(len(counts))]
    while 2 ** len(table) <= len(counts):
        prev, half = table[-1], 2 ** (len(table) - 1)
        left, right = prev[:-half], prev[half:]
        table.append(np.where(counts[right] > counts[left], right, left))
    j = np.floor(np.log2(hi - lo + 1)).astype(np.int64)
    out = np.empty(len(lo), dtype=np.int64)
    for level in np.unique(j):
        at = j == level
        left = table[level][lo[at]]
        right = table[level][hi[at] - 2 ** level + 1]
        out[at] = np.where(counts[right] > counts[left], right, left)
    return out


def assign(mu: np.ndarray, sigma: np.ndarray, grid: np.ndarray, k: float = math.inf,
           lam: float = 0.0, steps: int = MAX_STEPS, start: np.ndarray | None = None
           ) -> tuple[np.ndarray, list[float]]:
    """Indices into the sorted ``grid`` for each weight, and the objective (bits per weight:
    code entropy, plus ``lam`` times the mean squared error in sds) after each step.

    Nearest level first (or ``start``); then each weight takes the used level of least
    ``-log2 p_j + lam z^2``, ``z = (v_j - mu) / sigma``, among those within ``k`` sds (with
    ``lam = 0``: the shortest code in the interval); a weight with no used level there keeps
    its nearest.
    """
    nearest = np.searchsorted((grid[1:] + grid[:-1]) / 2, mu)
    step = _interval_step(mu, sigma, grid, k, nearest) if lam == 0 else \
        _lagrangian_step(mu, sigma, grid, k, lam, nearest)
    index = nearest if start is None else start
    history = [_objective(index, mu, sigma, grid, lam)]
    for _ in range(steps):
        best = step(np.bincount(index, minlength=len(grid)))
        if np.array_equal(best, index):
            break
        index = best
        history.append(_objective(index, mu, sigma, grid, lam))
    return index, history


def _objective(index, mu, sigma, grid, lam) -> float:
    entropy = codec.entropy_bits(np.bincount(index, minlength=len(grid)))
    return entropy + lam * float(np.mean(((grid[index] - mu) / sigma) ** 2)) if lam else entropy


def _interval_step(mu, sigma, grid, k, nearest):
    lo = np.searchsorted(grid, mu - k * sigma, side="left")
    hi = np.searchsorted(grid, mu + k * sigma, side="right") - 1
    free = lo <= hi  # some level lies inside the interval

    def step(counts: np.ndarray) -> np.ndarray:
        best = nearest.copy()
        pick = _range_argmax(counts, lo[free], hi[free])
        # an unused level has no code: with none used inside, the weight keeps its nearest
        best[free] = np.where(counts[pick] > 0, pick, nearest[free])
        return best

    return step


def _lagrangian_step(mu, sigma, grid, k, lam, nearest, chunk: int = 8192):
    def step(counts: np.ndarray) -> np.ndarray:
        used = np.flatnonzero(counts)  # a level nobody uses has an infinite code length
        length = -np.log2(counts[used] / counts.sum())
        best = nearest.copy()
        for start in range(0, len(mu), chunk):
            part = slice(start, start + chunk)
            z = (grid[used][None, :] - mu[part, None]) / sigma[part, None]
            cost = length[None, :] + lam * z ** 2
            cost[np.abs(z) > k] = np.inf
            pick = cost.argmin(1)
            feasible = np.isfinite(cost[np.arange(len(pick)), pick])
            best[part] = np.where(feasible, used[pick], nearest[part])
        return best

    return step


def code_layer(mu: torch.Tensor, sigma: torch.Tensor, k: float, lam: float) -> QuantizedLayer:
    """A layer whose codebook is the grid levels the assignment uses."""
    grid = fine_grid(mu)
    index, _ = assign(mu.reshape(-1).numpy(), sigma.reshape(-1).numpy(), grid, k, lam)
    used, codes = np.unique(index, return_inverse=True)
    width = max(1, int(np.ceil(np.log2(len(used)))))
    return QuantizedLayer(torch.from_numpy(codes.astype(np.uint8)).reshape(mu.shape),
                          torch.full(mu.shape, width, dtype=torch.uint8),
                          {width: torch.from_numpy(grid[used]).reshape(1, -1)})


def recode(layer: QuantizedLayer, mu: torch.Tensor, sigma: torch.Tensor, config: dict
           ) -> torch.Tensor:
    """uint8 codes of new means ``mu`` in ``layer``'s codebook by the rule in ``config``
    (``k``, ``lam``): how fine-tuning re-rounds a sigma-code layer."""
    width = layer.widths[-1]
    levels = layer.codebooks[width][0].numpy()  # one sorted codebook per layer
    coded = (layer.bits == width).reshape(-1).numpy()  # not the pruned ones (width 0)
    k = math.inf if config["k"] is None else config["k"]
    index, _ = assign(mu.detach().reshape(-1).numpy()[coded], sigma.reshape(-1).numpy()[coded],
                      levels, k, config["lam"], start=layer.codes.reshape(-1).numpy()[coded])
    codes = layer.codes.clone().reshape(-1)
    codes[torch.from_numpy(coded)] = torch.from_numpy(index.astype(np.uint8))
    return codes.reshape(mu.shape)


def sigma_code(posterior: Posterior, *, data: Dataset | None = None, seed: int = 0,
               k: float | None = None, lam: float | None = None,
               code_bits: float | None = None) -> QuantizedNet:
    """Give each weight the shortest code its posterior allows (see the module).

    ``k``: only levels within ``k`` posterior sds are allowed (default: any level once a
    ``lam`` or ``code_bits`` is given, else ``k = 1``). ``lam``: the price of a squared
    error of one sd in bits (default 0: the shortest code in the interval wins). Or
    ``code_bits``: the largest ``lam`` (by bisection on its logarithm) whose code entropy
    (:attr:`QuantizedNet.code_entropy_bits`, bits per weight) is at most ``code_bits``.

    Parameters
    ----------
    posterior : the fitted posterior (means and scales).
    data : unused (data-free); kept for the common quantizer signature.
    seed : unused (deterministic); recorded.
    """
    seed = _checks.seed(seed)
    if lam is not None and code_bits is not None:
        one_of(lam=lam, code_bits=code_bits)  # raises: at most one of them
    if k is not None:
        k = _checks.positive_float("k", k)
    elif lam is None and code_bits is None:
        k = 1.0
    layers = layer_posteriors(posterior)
    interval = math.inf if k is None else k
    if code_bits is not None:
        lam = _lam_for(layers, interval, _checks.positive_float("code_bits", code_bits))
    lam = 0.0 if lam is None else _checks.nonnegative_float("lam", lam)
    if lam == 0 and k is None:
        raise ValueError("k: the shortest code within k sds needs a finite k when lam is 0")
    quantized = {layer: code_layer(mu, sigma, interval, lam) for layer, mu, sigma in layers}
    return QuantizedNet(quantized, posterior.module, "sigma-code",
                        {"k": k, "lam": lam, "code_bits": code_bits, "seed": seed})


def _lam_for(layers: list, k: float, budget: float) -> float:
    """The largest ``lam`` whose code entropy meets ``budget`` (bits per weight)."""
    total = sum(mu.numel() for _, mu, _ in layers)

    def code_bits_at(log_lam: float) -> float:
        bits = 0.0
        for _, mu, sigma in layers:
            index, _ = assign(mu.reshape(-1).numpy(), sigma.reshape(-1).numpy(),
                              fine_grid(mu), k, 10.0 ** log_lam)  # as code_layer will
            bits += mu.numel() * codec.entropy_bits(np.bincount(index))
        return bits / total

    # lam -> 0: one level takes every weight it may (0 bits with k = inf); lam large: nearest
    return 10.0 ** meet_budget(code_bits_at, budget, fewest=LOG_LAM[0], most=LOG_LAM[1],
                               steps=BISECTIONS, argument="code_bits")
