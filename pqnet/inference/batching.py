"""Minibatches and data checks: the batch order of a fit, one process's shard of a batch,
the validation split, and the checks that name a bad dataset before any training."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset, default_collate

from .._modules import preserved_modes


def _batch_indices(n: int, batch_size: int, shuffle: bool,
                   generator: torch.Generator | None) -> Iterator[torch.Tensor]:
    """The example indices of each minibatch of one epoch; the order depends only on
    ``generator``."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    return (order[start:start + batch_size] for start in range(0, n, batch_size))


def _take(dataset: Dataset, idx: torch.Tensor,
          device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples ``idx`` of ``dataset`` as an ``(x, y)`` batch on ``device``.

    A :class:`~torch.utils.data.TensorDataset` is sliced directly (no per-example
    collation, which dominates the step time of small networks); anything else is indexed
    example by example and collated as a ``DataLoader`` would.
    """
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors[:2]
        return x[idx].to(device), y[idx].to(device)
    x, y = default_collate([dataset[i] for i in idx.tolist()])[:2]
    return x.to(device), y.to(device)


def batches(dataset: Dataset, batch_size: int, *, shuffle: bool = True,
            generator: torch.Generator | None = None,
            device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of ``(x, y)`` minibatches of ``dataset``, shuffled by ``generator``."""
    for idx in _batch_indices(len(dataset), batch_size, shuffle, generator):
        yield _take(dataset, idx, device)


def _shard(idx: torch.Tensor, rank: int, world_size: int) -> tuple[torch.Tensor, float]:
    """Process ``rank``'s share ``idx[rank::world_size]`` of one global batch ``idx``, and the
    weight ``c_r = world_size * |shard| / |batch|`` of its loss (see :func:`fit`).

    A process left without an example (a last batch smaller than ``world_size``) takes the
    batch's first example at weight 0: its gradient is zero, but it still joins DDP's
    gradient all-reduce, which every process must.
    """
    if world_size == 1:
        return idx, 1.0
    mine = idx[rank::world_size]
    if len(mine) == 0:
        return idx[:1], 0.0
    return mine, world_size * len(mine) / len(idx)


def check_batch(kind: str, x: torch.Tensor, y: torch.Tensor, argument: str) -> None:
    """Raise a clear ``ValueError`` naming ``argument`` for data the model cannot take."""
    if not torch.is_floating_point(x):
        raise ValueError(f"{argument}: inputs must be floating point, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{argument}: inputs contain NaN or inf")
    if kind == "categorical":
        if torch.is_floating_point(y) or y.dim() != 1:
            raise ValueError(f"{argument}: class labels must be a 1-d integer tensor, "
                             f"got {y.dtype} of shape {tuple(y.shape)}")
    elif not bool(torch.isfinite(y).all()):
        raise ValueError(f"{argument}: targets contain NaN or inf")


def check_dataset(module: nn.Module, dataset: Dataset, argument: str,
                  kind: str = "categorical") -> int:
    """Validate ``dataset`` against the plain network ``module`` with a ``kind`` likelihood
    (``"categorical"`` or ``"normal"``) before any training; return its size."""
    if isinstance(dataset, DataLoader):
        raise TypeError(f"{argument}: got a DataLoader; pass its dataset (loader.dataset): "
                        "pqnet draws its own minibatches (batch_size=, seed=)")
    try:
        n = len(dataset)
    except TypeError as err:
        raise TypeError(f"{argument}: expected a sized torch Dataset, "
                        f"got {type(dataset).__name__}") from err
    if n == 0:
        raise ValueError(f"{argument}: the dataset is empty")
    # the whole data set when it is in memory, else the first batch (the rest per step)
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors[:2]
    else:
        x, y = next(iter(DataLoader(dataset, batch_size=min(n, 256))))
    check_batch(kind, x, y, argument)
    # eval: a shape check must not touch BatchNorm statistics; the caller's modes come back
    with torch.no_grad(), preserved_modes(module):
        try:
            out = module.eval()(x[:2].cpu())
        except RuntimeError as err:
            raise ValueError(f"{argument}: inputs of shape {tuple(x.shape[1:])} do not fit "
                             f"the model: {err}") from err
    if kind == "categorical":
        classes = out.shape[-1]
        if int(y.min()) < 0 or int(y.max()) >= classes:
            raise ValueError(f"{argument}: labels must lie in [0, {classes}) for a model with "
                             f"{classes} outputs, got [{int(y.min())}, {int(y.max())}]")
    elif out.numel() // len(out) != y.numel() // len(y):
        raise ValueError(f"{argument}: targets of shape {tuple(y.shape[1:])} do not match "
                         f"the model's outputs of shape {tuple(out.shape[1:])}")
    return n


def labels(dataset: Dataset) -> torch.Tensor:
    """Every target of ``dataset``, in order."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1]
    return torch.cat([y for _, y in batches(dataset, 1024, shuffle=False)])


def split_validation(dataset: Dataset, fraction: float, seed: int,
                     kind: str = "categorical") -> tuple[Dataset, Dataset]:
    """``(fit_part, validation_part)``: a random ``fraction`` of ``dataset`` held out, drawn
    by ``seed``. For class labels it is stratified (each class with two or more examples
    gives the same share, rounded, at least one), so a class-sorted file splits evenly; a
    set too small for that holds out ``max(1, round(fraction * n))`` examples at random."""
    n = len(dataset)
    if n < 2:
        raise ValueError(f"train_dataset: {n} example cannot be split into a part to fit and "
                         "a part to validate on (val_fraction)")
    gen = torch.Generator().manual_seed(seed)
    val = torch.zeros(0, dtype=torch.long)
    if kind == "categorical":
        y = labels(dataset)
        held = []
        for c in torch.unique(y):
            members = torch.nonzero(y == c).flatten()
            members = members[torch.randperm(len(members), generator=gen)]
            held.append(members[:min(len(members) - 1, max(1, round(fraction * len(members))))])
        val = torch.cat(held)
    if len(val) == 0:
        val = torch.randperm(n, generator=gen)[:min(n - 1, max(1, round(fraction * n)))]
    keep = torch.ones(n, dtype=torch.bool)
    keep[val] = False
    fit_idx, val = torch.nonzero(keep).flatten(), val.sort().values
    if isinstance(dataset, TensorDataset):
        return (TensorDataset(*(t[fit_idx] for t in dataset.tensors)),
                TensorDataset(*(t[val] for t in dataset.tensors)))
    return Subset(dataset, fit_idx.tolist()), Subset(dataset, val.tolist())
