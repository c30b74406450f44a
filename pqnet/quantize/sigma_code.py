"""Entropy-constrained quantization driven by the posterior: more uncertainty, a shorter code.

Each layer starts from a fine symmetric grid of :data:`LEVELS` values that holds 0. Weight
``i`` may take any level ``v`` inside its ``k``-sigma interval, ``|v - mu_i| <= k sigma_i``;
among those it takes the one with the shortest code under the layer's current code model,
``-log2 p(v)`` with ``p`` the levels' frequencies, and the model and the assignment are
iterated (Chou, Lookabaugh & Gray 1989, "Entropy-constrained vector quantization", with the
posterior's credible interval as the distortion constraint). A weight whose interval holds
no level keeps its nearest level.

Each step minimises the cross-entropy of the new assignment under the old model, which
bounds its own entropy, so the layer's code entropy never rises from one step to the next
and is at most that of rounding to the nearest level. Uncertain weights pool on a few
popular values (0 first, which prunes them); certain ones keep a precise value. The width
of each weight is implicit in its code length: no width map.
"""

from __future__ import annotations

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


def assign(mu: np.ndarray, sigma: np.ndarray, grid: np.ndarray, k: float,
           steps: int = MAX_STEPS) -> tuple[np.ndarray, list[float]]:
    """Indices into the sorted ``grid`` for each weight, and the code entropy (bits per
    weight) after each step: nearest level first, then the shortest code in the interval."""
    midpoints = (grid[1:] + grid[:-1]) / 2
    nearest = np.searchsorted(midpoints, mu)
    lo = np.searchsorted(grid, mu - k * sigma, side="left")
    hi = np.searchsorted(grid, mu + k * sigma, side="right") - 1
    free = lo <= hi  # some level lies inside the interval
    index = nearest
    entropies = [codec.entropy_bits(np.bincount(index, minlength=len(grid)))]
    for _ in range(steps):
        counts = np.bincount(index, minlength=len(grid))
        best = nearest.copy()
        best[free] = _range_argmax(counts, lo[free], hi[free])
        if np.array_equal(best, index):
            break
        index = best
        entropies.append(codec.entropy_bits(np.bincount(index, minlength=len(grid))))
    return index, entropies


def code_layer(mu: torch.Tensor, sigma: torch.Tensor, k: float) -> QuantizedLayer:
    """A layer whose codebook is the grid levels the assignment uses."""
    grid = fine_grid(mu)
    index, _ = assign(mu.reshape(-1).numpy(), sigma.reshape(-1).numpy(), grid, k)
    used, codes = np.unique(index, return_inverse=True)
    width = max(1, int(np.ceil(np.log2(len(used)))))
    return QuantizedLayer(torch.from_numpy(codes.astype(np.uint8)).reshape(mu.shape),
                          torch.full(mu.shape, width, dtype=torch.uint8),
                          {width: torch.from_numpy(grid[used]).reshape(1, -1)})


def recode(layer: QuantizedLayer, mu: torch.Tensor, sigma: torch.Tensor, k: float
           ) -> torch.Tensor:
    """uint8 codes of new means ``mu`` in ``layer``'s codebook by the same rule (the shortest
    code within ``k`` sds): how fine-tuning re-rounds a sigma-code layer."""
    levels = layer.codebooks[layer.widths[-1]][0].numpy()  # one sorted codebook per layer
    index, _ = assign(mu.detach().reshape(-1).numpy(), sigma.reshape(-1).numpy(), levels, k)
    return torch.from_numpy(index.astype(np.uint8)).reshape(mu.shape)


def sigma_code(posterior: Posterior, *, data: Dataset | None = None, seed: int = 0,
               k: float | None = None, code_bits: float | None = None) -> QuantizedNet:
    """Give each weight the shortest code among the values within ``k`` posterior sds.

    See the module for the rule. ``k`` defaults to 1; or ``code_bits``: the smallest ``k``
    (by bisection) whose code entropy (:attr:`QuantizedNet.code_entropy_bits`, bits per
    weight) is at most ``code_bits``. Larger ``k``, shorter codes.

    Parameters
    ----------
    posterior : the fitted posterior (means and scales).
    data : unused (data-free); kept for the common quantizer signature.
    seed : unused (deterministic); recorded.
    """
    seed = _checks.seed(seed)
    if k is None and code_bits is None:
        k = 1.0
    given = one_of(k=k, code_bits=code_bits)
    layers = layer_posteriors(posterior)
    if given == "k":
        k = _checks.positive_float("k", k)
    else:
        k = _k_for(layers, _checks.positive_float("code_bits", code_bits))
    quantized = {layer: code_layer(mu, sigma, k) for layer, mu, sigma in layers}
    return QuantizedNet(quantized, posterior.module, "sigma-code",
                        {"k": k, "code_bits": code_bits, "seed": seed})


def _k_for(layers: list, budget: float) -> float:
    """The smallest ``k`` whose code entropy meets ``budget`` (bits per weight)."""
    total = sum(mu.numel() for _, mu, _ in layers)

    def code_bits_at(k: float) -> float:
        bits = 0.0
        for _, mu, sigma in layers:
            _, entropies = assign(mu.reshape(-1).numpy(), sigma.reshape(-1).numpy(),
                                  fine_grid(mu), k)
            bits += mu.numel() * entropies[-1]
        return bits / total

    # at k = widest / min sigma every interval spans the whole grid: one value, 0 bits
    widest = max(2 * float(mu.abs().max()) / float(sigma.min()) for _, mu, sigma in layers)
    return meet_budget(code_bits_at, budget, fewest=widest, most=1e-6, steps=40)
