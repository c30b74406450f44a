"""Several processes: joining ``torchrun``'s process group, and the collective checks of a
step."""

from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist
from torch import nn

from .._checks import device as check_device


def init_distributed(device: str | torch.device = "cpu") -> tuple[int, int, torch.device]:
    """Join the process group that ``torchrun`` describes; return ``(rank, world_size,
    device)``.

    ``torchrun`` sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
    ``MASTER_PORT`` in each process's environment. With ``device`` on CUDA each process
    takes GPU ``cuda:LOCAL_RANK`` and the NCCL backend; on CPU the backend is gloo. Without
    ``torchrun`` (``WORLD_SIZE`` unset or 1), or when a process group is already up, it only
    reports where this process stands. :func:`fit` trains data-parallel whenever a process
    group of more than one process is up.
    """
    device = check_device(device)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, device
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _step_health(loss: torch.Tensor, params: list[nn.Parameter],
                 world_size: int) -> tuple[float, bool]:
    """The step's loss on the whole global batch and whether every gradient is finite.

    With several processes the check is collective (one all-reduce of two numbers), so that
    every process stops, or retries, at the same step.
    """
    grad_max = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None],
                                             norm_type=math.inf)
    if world_size == 1:
        return loss.item(), math.isfinite(grad_max.item())
    both = torch.stack([loss.detach().double(), grad_max.double()])
    dist.all_reduce(both)  # the weighted losses sum to P times the global one; see fit()
    value, grad_sum = both.tolist()
    return value / world_size, math.isfinite(grad_sum)
