"""``fit(bnn, data)``: stochastic variational inference as a plain PyTorch training loop.

The loop checkpoints itself at the end of every epoch (``checkpoint_dir``) and resumes from
the last complete epoch (``resume=True``) with bit-identical results on CPU; it stops with a
:class:`DivergenceError` naming the step where the ELBO or a gradient became NaN or inf,
or retries that epoch at a lower learning rate (``retry_lr_factor``); and under ``torchrun``
it trains data-parallel with :class:`~torch.nn.parallel.DistributedDataParallel`.
"""

from __future__ import annotations

import copy
import math
import numbers
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pyro
import torch
import torch.distributed as dist
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import prune_subsample_sites
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, TensorDataset, default_collate
from tqdm.auto import tqdm

from ..bnn.convert import BNN
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .posterior import Posterior

CHECKPOINT = "fit.pt"
"""``checkpoint_dir/fit.pt``: everything a resumed fit needs, as of its last complete epoch."""
CHECKPOINT_POSTERIOR = "posterior.pt"
"""``checkpoint_dir/posterior.pt``: that epoch's :class:`Posterior` (``Posterior.load``)."""
_MAY_CHANGE_ON_RESUME = ("device", "retry_lr_factor", "max_retries")


class DivergenceError(FloatingPointError):
    """The ELBO or a gradient became NaN or infinite at (1-based) ``epoch`` and ``step``."""

    def __init__(self, message: str, epoch: int, step: int) -> None:
        super().__init__(message)
        self.epoch, self.step = epoch, step


class ClosedFormKLELBO(TraceMeanField_ELBO):
    """:class:`~pyro.infer.TraceMeanField_ELBO` that evaluates log-densities only where its
    loss reads them.

    With every latent site's KL in closed form (pqnet's Normal guide against Normal priors)
    the loss needs ``log p`` at the observed sites alone, but Pyro's importance trace also
    evaluates the prior and guide densities of every weight: 20 unused log-densities a step
    for LeNet-5, about a sixth of its time. Same loss, same gradients; with Pyro's validation
    on, the parent's fully checked trace is used. A latent site without a closed-form KL
    would need the skipped densities: pqnet's priors and guide are all Normal.
    """

    def _get_trace(self, model, guide, args, kwargs):
        if is_validation_enabled():
            return super()._get_trace(model, guide, args, kwargs)
        guide_trace = poutine.trace(guide, graph_type="flat").get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace),
                                    graph_type="flat").get_trace(*args, **kwargs)
        model_trace = prune_subsample_sites(model_trace)
        model_trace.compute_log_prob(site_filter=lambda name, site: site["is_observed"])
        return model_trace, prune_subsample_sites(guide_trace)


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


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return value


def _positive_float(name: str, value, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name}: expected a {bound} finite number, got {value!r}")
    return float(value)


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
    template, was_training = module, module.training
    template.eval()  # a shape check must not touch BatchNorm statistics
    with torch.no_grad():
        try:
            out = template(x[:2].cpu())
        except RuntimeError as err:
            raise ValueError(f"{argument}: inputs of shape {tuple(x.shape[1:])} do not fit "
                             f"the model: {err}") from err
        finally:
            template.train(was_training)
    if kind == "categorical":
        classes = out.shape[-1]
        if int(y.min()) < 0 or int(y.max()) >= classes:
            raise ValueError(f"{argument}: labels must lie in [0, {classes}) for a model with "
                             f"{classes} outputs, got [{int(y.min())}, {int(y.max())}]")
    elif out.numel() // len(out) != y.numel() // len(y):
        raise ValueError(f"{argument}: targets of shape {tuple(y.shape[1:])} do not match "
                         f"the model's outputs of shape {tuple(out.shape[1:])}")
    return n


# --------------------------------------------------------------------------- processes


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``; a ``ValueError`` naming it when it is not one, or
    when it asks for CUDA on a machine without."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: {device!r} is not a torch device") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: CUDA was asked for but torch.cuda.is_available() is False")
    return device


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


def _first_nonfinite_grad(bnn: BNN) -> str:
    return next((name for name, p in bnn.named_parameters()
                 if p.grad is not None and not bool(torch.isfinite(p.grad).all())), "?")


# --------------------------------------------------------------------------- checkpoints


def _training_state(bnn: BNN, optimizer: torch.optim.Optimizer,
                    schedule: torch.optim.lr_scheduler.LRScheduler, order: torch.Generator,
                    run: dict, copied: bool) -> dict:
    """Everything the fit needs to continue from here: the network and guide, Adam's
    moments, the schedule, the batch-order and sampling generators, and ``run`` (epoch,
    history, KL, retries). ``copied`` detaches it from the live tensors (an in-memory
    snapshot); a state that is only written to disk needs no copy."""
    state = {"model": bnn.state_dict(), "optimizer": optimizer.state_dict(),
             "schedule": schedule.state_dict(), "order": order.get_state(),
             "rng": rng_state(), **run}
    return copy.deepcopy(state) if copied else state


def _restore(state: dict, rng: dict, bnn: BNN, optimizer: torch.optim.Optimizer,
             schedule: torch.optim.lr_scheduler.LRScheduler, order: torch.Generator) -> dict:
    """Load ``state`` (from :func:`_training_state`) into the live objects; return its run."""
    try:
        bnn.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(f"checkpoint_dir: the checkpoint's network does not match bnn: "
                         f"{err}") from err
    schedule.load_state_dict(state["schedule"])
    order.set_state(state["order"])
    set_rng_state(rng)
    return copy.deepcopy({k: state[k] for k in ("epoch", "history", "kl", "retries",
                                                "resumed_from_epochs")})


def _check_same_fit(saved: dict, config: dict, path: Path) -> None:
    """A checkpoint resumes only the fit that wrote it: the same settings and data size."""
    for key in sorted((saved.keys() | config.keys()) - set(_MAY_CHANGE_ON_RESUME)):
        if saved.get(key) != config.get(key):
            raise ValueError(
                f"checkpoint_dir: {path} is the checkpoint of a different fit ({key} "
                f"{saved.get(key)!r} there, {config.get(key)!r} here); resume with the same "
                "settings, or use another checkpoint_dir")


def _write_checkpoint(folder: Path, state: dict, bnn: BNN, config: dict, rank: int,
                      world_size: int) -> None:
    """Process 0 writes ``folder/posterior.pt`` and then ``folder/fit.pt``, each atomically;
    ``fit.pt`` holds every process's generator states (gathered here: all processes call
    this)."""
    rngs = [state["rng"]]
    if world_size > 1:
        rngs = [None] * world_size
        dist.all_gather_object(rngs, state["rng"])
    if rank == 0:
        Posterior.from_bnn(bnn, state["history"], config).save(folder / CHECKPOINT_POSTERIOR)
        save_checkpoint(folder / CHECKPOINT, "fit", {**state, "rng": rngs})


def _lower_lr(optimizer: torch.optim.Optimizer,
              schedule: torch.optim.lr_scheduler.LambdaLR, factor: float) -> None:
    """Multiply every learning rate, now and in the schedule to come, by ``factor``."""
    for group in optimizer.param_groups:
        group["lr"] *= factor
        group["initial_lr"] *= factor
    schedule.base_lrs = [lr * factor for lr in schedule.base_lrs]


# --------------------------------------------------------------------------- fit


def fit(
    bnn: BNN,
    train_dataset: Dataset,
    *,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    scale_lr: float | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    num_particles: int = 1,
    kl_weight: float = 1.0,
    warmup_epochs: int = 0,
    lr_schedule: str = "constant",
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    retry_lr_factor: float | None = None,
    max_retries: int = 3,
) -> Posterior:
    """Fit the mean-field posterior of ``bnn`` to ``train_dataset`` by SVI; return it.

    Maximises the ELBO with Adam on minibatches of size ``B`` from ``N`` examples,

    .. math::

        \\mathcal L(q) = \\frac{N}{B}\\sum_{n \\in \\text{batch}}
            \\mathbb E_{q(w)}[\\log p(y_n \\mid x_n, w)] - \\beta\\,\\mathrm{KL}(q \\,\\|\\, p),

    with the KL in closed form (:class:`~pyro.infer.TraceMeanField_ELBO`, as
    :class:`ClosedFormKLELBO`, through its :class:`~pyro.infer.elbo.ELBOModule`, so the loop
    is plain PyTorch) and ``beta =
    kl_weight`` (1 is the true ELBO; below 1 a tempered posterior). With ``warmup_epochs``
    beta rises linearly from ``kl_weight / warmup_epochs`` to ``kl_weight``. The posterior
    scales' parameters ``rho`` learn at ``scale_lr`` (default ``10 * lr``): they start
    several units of ``rho`` away from where the data put them, and at ``lr`` they would
    still be near their initial value after a typical fit, so the scales would report the
    optimiser's path, not the posterior. ``lr_schedule="cosine"`` anneals both to zero,
    which removes the last iterates' SGD noise (use it when the scales must be precise).

    ``history`` on the result has per epoch: ``elbo`` (the true ELBO of the whole data set:
    minus the epoch's mean expected NLL, minus the end-of-epoch KL), ``nll`` (expected
    negative log-likelihood per example, averaged over the epoch's steps: the mean loss less
    ``beta`` times the KL, the KL taken as the mean of its values at the epoch's start and
    end), ``kl`` (nats, whole network, at the end of the epoch), ``kl_weight`` and
    ``seconds``.

    **Checkpoints.** With ``checkpoint_dir`` the end of every epoch writes
    ``checkpoint_dir/fit.pt`` (network, guide, Adam's state, schedule, every random
    generator, epoch, history) and ``checkpoint_dir/posterior.pt`` (that epoch's
    posterior), each atomically (temporary file, then rename): a fit killed at any moment
    loses at most the epoch it was in. ``resume=True`` continues from ``fit.pt`` (or starts
    afresh when there is none) and, on CPU, ends bit-identical to a fit that was never
    interrupted. It needs the same settings and data size (``device``, ``retry_lr_factor``
    and ``max_retries`` may change); without ``resume`` an existing ``fit.pt`` is an error,
    never overwritten.

    **Divergence.** A NaN or infinite ELBO or gradient raises :class:`DivergenceError`
    naming the epoch and step, before the optimiser takes that step; the last checkpoint
    stays as it was. With ``retry_lr_factor`` (in (0, 1)) the fit instead goes back to the
    end of the last complete epoch (the checkpoint's state, kept in memory), multiplies both
    learning rates by the factor and tries again, at most ``max_retries`` times in all;
    ``config["retries"]`` records each retry.

    **Several processes.** When a :mod:`torch.distributed` process group of ``P > 1``
    processes is up (``torchrun``; :func:`init_distributed` joins it), the loss is wrapped in
    :class:`~torch.nn.parallel.DistributedDataParallel`. ``batch_size`` stays the *global*
    batch: every process draws the same batch order (``seed``) and takes the strided shard
    ``B_r = batch[r::P]``, with its own weight draws (Pyro's generator is seeded
    ``seed + r``). Process ``r``'s loss is weighted by ``c_r = P |B_r| / |B|``,

    .. math::

        \\ell_r = c_r\\Big(-\\frac{N}{|B_r|}\\sum_{n \\in B_r}
            \\mathbb E_q[\\log p(y_n \\mid x_n, w)] + \\beta\\,\\mathrm{KL}\\Big),
        \\qquad \\frac1P\\sum_r \\nabla \\ell_r = -\\frac{N}{|B|}\\sum_{n \\in B}
            \\nabla\\mathbb E_q[\\log p(y_n \\mid x_n, w)] + \\beta\\,\\nabla\\mathrm{KL},

    so DDP's gradient average is the single-process gradient of the whole batch, exactly,
    also when ``|B|`` is not a multiple of ``P`` (``dataset_size`` stays the global ``N``).
    Only the Monte Carlo draws differ. Process 0 writes the checkpoints; every process
    returns the same posterior.
    """
    if not isinstance(bnn, BNN):
        raise TypeError(f"bnn: expected a pqnet BNN from pqnet.bayesian(...), "
                        f"got {type(bnn).__name__}")
    epochs = _positive_int("epochs", epochs)
    batch_size = _positive_int("batch_size", batch_size)
    num_particles = _positive_int("num_particles", num_particles)
    lr = _positive_float("lr", lr)
    scale_lr = 10 * lr if scale_lr is None else _positive_float("scale_lr", scale_lr)
    kl_weight = _positive_float("kl_weight", kl_weight)
    if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int) or warmup_epochs < 0:
        raise ValueError(f"warmup_epochs: expected a non-negative int, got {warmup_epochs!r}")
    if lr_schedule not in ("constant", "cosine"):
        raise ValueError(f"lr_schedule: expected 'constant' or 'cosine', got {lr_schedule!r}")
    if not isinstance(seed, numbers.Integral) or isinstance(seed, bool):
        raise ValueError(f"seed: expected an int, got {seed!r}")
    seed = int(seed)
    folder = _checkpoint_folder(checkpoint_dir)
    if not isinstance(resume, bool):
        raise ValueError(f"resume: expected True or False, got {resume!r}")
    if resume and folder is None:
        raise ValueError("resume: needs checkpoint_dir, the folder to resume from")
    if retry_lr_factor is not None:
        retry_lr_factor = _positive_float("retry_lr_factor", retry_lr_factor)
        if retry_lr_factor >= 1:
            raise ValueError(f"retry_lr_factor: expected a number in (0, 1), "
                             f"got {retry_lr_factor!r}")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries: expected a non-negative int, got {max_retries!r}")
    device = check_device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    rank, world_size = _world()
    if batch_size < world_size:
        raise ValueError(f"batch_size: {batch_size} is smaller than the {world_size} processes; "
                         "each process needs at least one example a step")

    bnn.to(device)
    n = check_dataset(bnn.template, train_dataset, "train_dataset", bnn.likelihood.kind)
    pyro.set_rng_seed(seed + rank)
    order = torch.Generator().manual_seed(seed)  # the same batch order in every process
    elbo = ClosedFormKLELBO(num_particles=num_particles)(bnn, bnn.guide)
    params = list(elbo.parameters())
    rho = {id(p) for p in bnn.guide.rho.parameters()}
    optimizer = torch.optim.Adam([
        {"params": [p for p in params if id(p) not in rho]},
        {"params": list(bnn.guide.rho.parameters()), "lr": scale_lr},
    ], lr=lr)
    steps_per_epoch = math.ceil(n / batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, (
        lambda step: 0.5 * (1 + math.cos(math.pi * step / (epochs * steps_per_epoch)))
    ) if lr_schedule == "cosine" else (lambda step: 1.0))
    checked_every_batch = not isinstance(train_dataset, TensorDataset)
    config = dict(epochs=epochs, batch_size=batch_size, lr=lr, scale_lr=scale_lr, seed=seed,
                  device=str(device), num_particles=num_particles, kl_weight=kl_weight,
                  warmup_epochs=warmup_epochs, lr_schedule=lr_schedule, dataset_size=n,
                  local_reparam=bnn.local_reparam, prior=repr(bnn.prior),
                  world_size=world_size, retry_lr_factor=retry_lr_factor,
                  max_retries=max_retries)

    bnn.train()
    with torch.no_grad():
        run = {"epoch": 0, "history": [], "kl": float(bnn.kl()), "retries": [],
               "resumed_from_epochs": []}
    path = None if folder is None else folder / CHECKPOINT
    saved = None
    if resume:
        saved = load_checkpoint(path, "fit", argument="checkpoint_dir")
        if saved is not None:
            _check_same_fit(saved["config"], config, path)  # world_size included
            run = _restore(saved, saved["rng"][rank], bnn, optimizer, schedule, order)
            run["resumed_from_epochs"].append(run["epoch"])
    elif path is not None and path.exists():
        raise ValueError(f"checkpoint_dir: {folder} already holds a fit's checkpoint "
                         f"({CHECKPOINT}); pass resume=True to continue it, or use another "
                         "folder")
    saved_epoch = None if saved is None else run["epoch"]  # the epoch of fit.pt on disk
    snapshot = (None if retry_lr_factor is None else
                _training_state(bnn, optimizer, schedule, order, run, copied=True))
    loss_fn: nn.Module = elbo if world_size == 1 else DistributedDataParallel(
        elbo, device_ids=[device.index] if device.type == "cuda" else None)

    # disable=None: no bar when stderr is not a terminal (logs, CI), as tqdm documents
    bar = tqdm(total=epochs * steps_per_epoch, initial=run["epoch"] * steps_per_epoch,
               disable=None if progress and rank == 0 else True, desc="SVI", unit="step")
    # Pyro's validation: checked once above; the per-step checks cost ~10%
    with bar, pyro.validation_enabled(False):
        while run["epoch"] < epochs:
            epoch = run["epoch"] + 1
            beta = kl_weight * min(1.0, epoch / warmup_epochs) if warmup_epochs else kl_weight
            bnn.kl_weight = beta
            start = time.perf_counter()
            sum_loss, steps = 0.0, 0
            try:
                for idx in _batch_indices(n, batch_size, True, order):
                    mine, weight = _shard(idx, rank, world_size)
                    x, y = _take(train_dataset, mine, device)
                    if checked_every_batch:
                        check_batch(bnn.likelihood.kind, x, y, "train_dataset")
                    optimizer.zero_grad(set_to_none=True)
                    loss = loss_fn(x, y, dataset_size=n)
                    if weight != 1.0:
                        loss = loss * weight
                    loss.backward()
                    value, grads_finite = _step_health(loss, params, world_size)
                    if not (math.isfinite(value) and grads_finite):
                        where = (f"at epoch {epoch}, step {steps + 1} "
                                 f"(lr={optimizer.param_groups[0]['lr']:.3g}")
                        if not math.isfinite(value):
                            what = f"the ELBO became {value} {where})"
                        else:
                            what = (f"a gradient became NaN or inf {where}; first in "
                                    f"{_first_nonfinite_grad(bnn)})")
                        raise DivergenceError(f"fit: {what}", epoch, steps + 1)
                    optimizer.step()
                    schedule.step()
                    sum_loss += value
                    steps += 1
                    bar.update()
                    if progress:
                        bar.set_postfix(epoch=epoch, loss=f"{sum_loss / steps:.4g}")
            except DivergenceError as err:
                if snapshot is None or len(run["retries"]) >= max_retries:
                    advice = _divergence_advice(folder, saved_epoch, retry_lr_factor, max_retries)
                    raise DivergenceError(f"{err}; {advice}", err.epoch, err.step) from None
                run = _restore(snapshot, snapshot["rng"], bnn, optimizer, schedule, order)
                _lower_lr(optimizer, schedule, retry_lr_factor)
                run["retries"].append({"epoch": err.epoch, "step": err.step,
                                       "lr": optimizer.param_groups[0]["initial_lr"],
                                       "scale_lr": optimizer.param_groups[1]["initial_lr"]})
                snapshot = _training_state(bnn, optimizer, schedule, order, run, copied=True)
                bar.n = run["epoch"] * steps_per_epoch
                continue
            seconds = time.perf_counter() - start
            with torch.no_grad():  # once an epoch: a KL per step would cost ~10 % of the step
                kl = float(bnn.kl())
            # the steps' KL terms averaged as the mean of the epoch's first and last KL
            nll_total = sum_loss / steps - beta * (run["kl"] + kl) / 2
            run["history"].append(dict(epoch=epoch, elbo=-(nll_total + kl), nll=nll_total / n,
                                       kl=kl, kl_weight=beta, seconds=seconds))
            run["kl"] = kl
            run["epoch"] = epoch
            if snapshot is not None:
                snapshot = _training_state(bnn, optimizer, schedule, order, run, copied=True)
            if folder is not None:
                state = snapshot or _training_state(bnn, optimizer, schedule, order, run,
                                                    copied=False)
                _write_checkpoint(folder, {**state, "config": config}, bnn,
                                  _final(config, run), rank, world_size)
                saved_epoch = epoch
    bnn.kl_weight = kl_weight
    bnn.eval()
    return Posterior.from_bnn(bnn, run["history"], _final(config, run))


def _final(config: dict, run: dict) -> dict:
    """The posterior's ``config``: the settings, each retry and each resume."""
    return {**config, "retries": run["retries"],
            "resumed_from_epochs": run["resumed_from_epochs"]}


def _checkpoint_folder(checkpoint_dir: str | os.PathLike | None) -> Path | None:
    if checkpoint_dir is None:
        return None
    if not isinstance(checkpoint_dir, (str, os.PathLike)):
        raise TypeError(f"checkpoint_dir: expected a folder path, "
                        f"got {type(checkpoint_dir).__name__}")
    folder = Path(checkpoint_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"checkpoint_dir: {folder} is a file; expected a folder")
    return folder


def _divergence_advice(folder: Path | None, saved_epoch: int | None,
                       retry_lr_factor: float | None, max_retries: int) -> str:
    if retry_lr_factor is not None:
        head = f"gave up after max_retries={max_retries} retries at lower learning rates"
    else:
        head = "try a lower lr or a smaller init_scale"
    if folder is None:
        return head + ("; pass checkpoint_dir= to keep each epoch's state, and "
                       "retry_lr_factor= to retry an epoch at a lower lr")
    if saved_epoch is None:
        return head + f"; no epoch completed, so {folder} holds no checkpoint"
    return head + (f"; the checkpoint of epoch {saved_epoch} in {folder} is kept: rerun with "
                   "resume=True and retry_lr_factor=0.5 (--resume --retry-lr-factor 0.5) to "
                   "continue from it at a lower lr")
