"""The search objective: quantize an allocation, fine-tune it ``e`` epochs, score it held out.

An evaluation at fidelity ``e`` (NUQ's task: the number of fine-tuning epochs, ``e = 0``
being post-training quantization) of the per-layer widths ``b``:

1. every layer ``l`` is rounded to the symmetric ``b_l``-bit grid under which its rounded
   posterior means are most probable (:func:`~pqnet.quantize.grids.grid_layer` with the
   posterior scales, as ``quantile-inform`` rounds);
2. with ``e > 0`` the means are fine-tuned ``e`` epochs under the quantized forward pass
   (:func:`~pqnet.quantize.finetune.finetune`: straight-through, posterior noise kept, the
   same minibatches for every allocation, from ``seed``);
3. the accuracy ``a`` of the quantized network is measured on a validation split that neither
   fine-tuning nor the search's final report (the test split) uses.

The objective ``y`` is one of

- ``"accuracy"``: ``y = a``, maximised subject to ``avg_bits(b) <= B`` (the candidates of the
  search are filtered by the budget ``B``);
- ``"effective"``: NUQ's effective accuracy as pqnet reads it, ``y = a - lambda max(0,
  avg_bits(b) - B)``: every bit per weight above the reference ``B`` costs ``lambda``
  (``cost_per_bit``) of accuracy, and no allocation is excluded.

The search counts its cost in epochs (:mod:`pqnet.search.bo`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from .. import _checks
from ..data import TensorData
from ..inference.batching import check_dataset
from ..inference.posterior import Posterior
from ..inference.predictive import evaluate
from ..quantize.budget import layer_posteriors
from ..quantize.finetune import finetune
from ..quantize.grids import grid_layer
from ..quantize.qnet import QuantizedNet

__all__ = ["OBJECTIVES", "QuantizedAccuracy", "objective_value", "split_validation"]

OBJECTIVES = ("accuracy", "effective")


def objective_value(accuracy: float, avg_bits: float, objective: str, reference_bits: float,
                    cost_per_bit: float) -> float:
    """``a`` for ``"accuracy"``; ``a - lambda max(0, avg_bits - B)`` for ``"effective"``."""
    if objective == "accuracy":
        return float(accuracy)
    return float(accuracy - cost_per_bit * max(0.0, avg_bits - reference_bits))


def split_validation(train: TensorData, size: int, seed: int = 0
                     ) -> tuple[TensorData, TensorData]:
    """``(rest, validation)``: ``size`` examples of ``train``, drawn without replacement by a
    generator seeded with ``seed``, held out as the search's validation split."""
    if not isinstance(train, TensorData):
        raise TypeError(f"train: expected a pqnet TensorData, got {type(train).__name__}")
    size = _checks.int_in("val_size", size, 1, len(train) - 1)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(_checks.seed(seed)))
    note = f"{train.note}; {size} of its examples held out for validation (seed {seed})"

    def part(index: torch.Tensor) -> TensorData:
        index = index.sort().values
        return TensorData(train.x[index], train.y[index], name=train.name,
                          num_classes=train.num_classes, note=note)

    return part(order[size:]), part(order[:size])


class QuantizedAccuracy:
    """The objective of the bit-width search on a fitted posterior (see the module docstring).

    Parameters
    ----------
    posterior : the fitted posterior whose means are quantized.
    train : the fine-tuning data.
    val : the held-out validation split the accuracy is measured on.
    avg_bits : the budget ``B`` (``"accuracy"``) or reference (``"effective"``).
    objective : ``"accuracy"`` or ``"effective"``.
    cost_per_bit : ``lambda`` of the effective accuracy (accuracy per bit per weight).
    lr, batch_size, seed : of the fine-tuning (the same minibatches for every allocation).

    Examples
    --------
    >>> f = QuantizedAccuracy(posterior, train, val, avg_bits=2.0)  # doctest: +SKIP
    >>> f([8, 4, 1, 4, 6], 1)  # LeNet-5's widths, 1 epoch: {"value", "accuracy", ...}
    """

    def __init__(self, posterior: Posterior, train: Dataset, val: Dataset, *,
                 avg_bits: float, objective: str = "accuracy", cost_per_bit: float = 0.01,
                 lr: float = 1e-3, batch_size: int = 64, seed: int = 0) -> None:
        self.layers = layer_posteriors(posterior)
        if posterior.likelihood.get("kind") != "categorical":
            raise ValueError("posterior: the bit-width search scores classifiers (a "
                             "categorical likelihood)")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective: expected one of {', '.join(OBJECTIVES)}, "
                             f"got {objective!r}")
        check_dataset(posterior.module, train, "train")
        check_dataset(posterior.module, val, "val")
        self.posterior, self.train, self.val = posterior, train, val
        self.avg_bits = _checks.avg_bits("avg_bits", avg_bits)
        self.objective = objective
        self.cost_per_bit = _checks.nonnegative_float("cost_per_bit", cost_per_bit)
        self.lr = _checks.nonnegative_float("finetune_lr", lr)
        self.batch_size = _checks.int_in("batch_size", batch_size, 1, 1 << 30)
        self.seed = _checks.seed(seed)
        self.last: QuantizedNet | None = None

    def quantize(self, bits: Sequence[int], epochs: int) -> QuantizedNet:
        """The network with layer ``l`` at ``bits[l]``, fine-tuned ``epochs`` epochs."""
        if len(bits) != len(self.layers):
            raise ValueError(f"bits: expected {len(self.layers)} widths, got {list(bits)}")
        widths = {path: int(b) for (path, _, _), b in zip(self.layers, bits, strict=True)}
        layers = {path: grid_layer(mu, widths[path], sigma=sigma)
                  for path, mu, sigma in self.layers}
        qnet = QuantizedNet(layers, self.posterior.module, "search",
                            {"bits": widths, "finetune_epochs": epochs, "seed": self.seed})
        if epochs == 0:
            return qnet
        return finetune(qnet, self.posterior, self.train, epochs=epochs, lr=self.lr,
                        batch_size=self.batch_size, seed=self.seed)

    def __call__(self, bits: Sequence[int], epochs: int) -> dict:
        """``{"value", "accuracy", "avg_bits", "seconds"}`` of ``bits`` at ``epochs``; the
        network itself is kept as :attr:`last` (the search returns its best one)."""
        start = time.perf_counter()
        self.last = self.quantize(bits, epochs)
        accuracy = float(evaluate(self.last.to_module(), self.val)["accuracy"])
        avg = self.last.avg_bits
        return {"value": objective_value(accuracy, avg, self.objective, self.avg_bits,
                                         self.cost_per_bit),
                "accuracy": accuracy, "avg_bits": avg, "seconds": time.perf_counter() - start}
