"""Training a plain (deterministic) network: the float baselines and Deep Compression's
retraining share this loop."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from .batching import batches


def train_plain(net: nn.Module, data: Dataset, *, epochs: int, batch_size: int, lr: float,
                generator: torch.Generator,
                after_step: Callable[[], None] | None = None) -> None:
    """Train ``net`` in place with Adam at ``lr`` on the cross-entropy, on the minibatches
    :func:`pqnet.fit` draws from ``generator``; ``after_step`` runs after every step (e.g. to
    hold pruned weights at zero). Leaves ``net`` in eval mode."""
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    for _ in range(epochs):
        for x, y in batches(data, batch_size, generator=generator):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
            if after_step is not None:
                after_step()
    net.eval()
