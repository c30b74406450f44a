"""Running a caller's network without changing it: its train/eval mode and its device."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def preserved_modes(module: nn.Module) -> Iterator[nn.Module]:
    """Restore the train/eval flag of ``module`` and of every submodule on exit, whatever
    the body set (``module.train(flag)`` alone would overwrite mixed modes, e.g. a frozen
    BatchNorm inside a network in training mode)."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


def _on(module: nn.Module, device: torch.device) -> bool:
    tensors = [*module.parameters(), *module.buffers()]
    return all(t.device == device for t in tensors)


@contextlib.contextmanager
def evaluating(module: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """``module`` in eval mode on ``device`` for the body: the module itself when it is
    already there (its modes restored on exit), else a copy moved there (the caller's
    module is never moved)."""
    if not _on(module, device):
        yield copy.deepcopy(module).to(device).eval()
        return
    with preserved_modes(module):
        yield module.eval()
