"""``fit(bnn, data)``: the posterior of a BNN, by stochastic variational inference.

The default is a recipe, in three stages, each a short function below:

1. **Warm start** (:func:`_warm_start`): the guide's means are trained by maximum likelihood,
   as plain training of the same network would (half the epochs by default), on the data
   less a held-out validation part. Mean-field VI started from random weights underfits;
   started from the solution of ordinary training with small variances it does not
   (MOPED, Krishnan et al. 2020; Izmailov et al. 2021, "What Are Bayesian Neural Network
   Posteriors Really Like?", whose mean-field recipe starts from the SGD solution).
   BatchNorm statistics are then frozen (:func:`_freeze_batchnorm`).
2. **Temperature** (:mod:`pqnet.inference.temperature`): the KL weight ``beta`` is chosen on
   the validation part among ``1, 0.1, ..., 1e-5``, by the held-out NLL of the tempered
   posterior around the warm start: the warmest ``beta`` within one paired standard error
   of the best. The posterior scales start at that posterior's.
3. **SVI** (:func:`_variational`): the ELBO with KL weight ``beta`` on the whole data set,
   with Adam and a cosine schedule, checkpointed every epoch.

``kl_weight=1, warm_start=0`` is plain SVI on the exact ELBO from the network's weights.

The SVI loop checkpoints itself at the end of every epoch (``checkpoint_dir``) and resumes
from the last complete epoch (``resume=True``) with bit-identical results on CPU; it stops
with a :class:`DivergenceError` naming the step where the ELBO or a gradient became NaN or
inf, or retries that epoch at a lower learning rate (``retry_lr_factor``); and under
``torchrun`` every stage trains data-parallel with
:class:`~torch.nn.parallel.DistributedDataParallel`.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pyro
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import update_bn
from torch.utils.data import Dataset, TensorDataset
from tqdm.auto import tqdm

from .. import _checks
from .._modules import preserved_modes
from ..bnn.convert import BNN
from ..bnn.layers import drawn
from .batching import (
    _batch_indices,
    _shard,
    _take,
    batches,
    check_batch,
    check_dataset,
    split_validation,
)
from .checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .distributed import _step_health, _world
from .elbo import MeanFieldELBO, MeansLikelihood, means
from .posterior import Posterior
from .temperature import choose_kl_weight, fisher_diagonal, set_scales, tempered_scales

log = logging.getLogger(__name__)
"""One INFO line per epoch (what the progress bar shows, kept where a log goes) and one per
choice of the recipe; process 0 alone logs."""

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


# --------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    """The checked arguments of :func:`fit` (see there)."""

    epochs: int
    batch_size: int
    lr: float
    scale_lr: float
    seed: int
    num_particles: int
    kl_weight: float | str
    warm_start: int
    val_fraction: float
    warmup_epochs: int
    lr_schedule: str
    retry_lr_factor: float | None
    max_retries: int

    @property
    def vi_epochs(self) -> int:
        return self.epochs - self.warm_start

    @property
    def validates(self) -> bool:
        """Whether a validation part is held out (only to choose the KL weight)."""
        return self.kl_weight == "auto"


def check_settings(epochs, batch_size, lr, scale_lr, seed, num_particles, kl_weight,
                   warm_start, val_fraction, warmup_epochs, lr_schedule, retry_lr_factor,
                   max_retries) -> Settings:
    """:func:`fit`'s arguments checked (each error names its argument), before any data
    is touched; the CLI calls it before it loads a data set."""
    epochs = _checks.positive_int("epochs", epochs)
    lr = _checks.positive_float("lr", lr)
    if warm_start == "auto":
        warm_start = epochs // 2
    warm_start = _checks.nonnegative_int("warm_start", warm_start)
    if warm_start >= epochs:
        raise ValueError(f"warm_start: {warm_start} epochs leave none of the {epochs} for "
                         "SVI; expected fewer than epochs")
    if kl_weight != "auto":
        kl_weight = _checks.positive_float("kl_weight", kl_weight)
    if retry_lr_factor is not None:
        retry_lr_factor = _checks.fraction("retry_lr_factor", retry_lr_factor)
    return Settings(
        epochs=epochs, batch_size=_checks.positive_int("batch_size", batch_size), lr=lr,
        scale_lr=10 * lr if scale_lr is None else _checks.positive_float("scale_lr", scale_lr),
        seed=_checks.seed(seed),
        num_particles=_checks.positive_int("num_particles", num_particles),
        kl_weight=kl_weight, warm_start=warm_start,
        val_fraction=_checks.fraction("val_fraction", val_fraction),
        warmup_epochs=_checks.nonnegative_int("warmup_epochs", warmup_epochs),
        lr_schedule=_checks.one_of("lr_schedule", lr_schedule, ("constant", "cosine")),
        retry_lr_factor=retry_lr_factor,
        max_retries=_checks.nonnegative_int("max_retries", max_retries))


# --------------------------------------------------------------------------- one stage


class _Stage:
    """One stage's training: Adam on ``loss`` (a module over the BNN's parameters), a
    learning-rate schedule over ``epochs`` epochs, minibatches of ``data`` in the order of
    its own generator, and under several processes each process's shard of each batch.

    ``groups`` are Adam's parameter groups: ``[(params, lr), ...]``.
    """

    def __init__(self, bnn: BNN, loss: nn.Module, groups: list[tuple[list, float]],
                 epochs: int, data: Dataset, settings: Settings, device: torch.device,
                 bar: tqdm, order_seed: int) -> None:
        self.bnn, self.data, self.settings, self.device, self.bar = bnn, data, settings, device, bar
        self.n = len(data)
        self.rank, self.world_size = _world()
        self.params = [p for params, _ in groups for p in params]
        self.optimizer = torch.optim.Adam([{"params": p, "lr": lr} for p, lr in groups])
        self.steps_per_epoch = math.ceil(self.n / settings.batch_size)
        total = epochs * self.steps_per_epoch
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, (
            lambda step: 0.5 * (1 + math.cos(math.pi * step / total))
        ) if settings.lr_schedule == "cosine" else (lambda step: 1.0))
        self.order = torch.Generator().manual_seed(order_seed)  # the same in every process
        self.loss = loss if self.world_size == 1 else DistributedDataParallel(
            loss, device_ids=[device.index] if device.type == "cuda" else None)
        self.checked_every_batch = not isinstance(data, TensorDataset)

    def epoch(self, epoch: int) -> float:
        """One pass over the data; the mean loss of its steps. Raises
        :class:`DivergenceError` before a step with a non-finite loss or gradient is taken."""
        sum_loss, steps = 0.0, 0
        for idx in _batch_indices(self.n, self.settings.batch_size, True, self.order):
            mine, weight = _shard(idx, self.rank, self.world_size)
            x, y = _take(self.data, mine, self.device)
            if self.checked_every_batch:
                check_batch(self.bnn.likelihood.kind, x, y, "train_dataset")
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.loss(x, y, dataset_size=self.n) * weight  # c_r (1.0 in one process)
            loss.backward()
            value, grads_finite = _step_health(loss, self.params, self.world_size)
            if not (math.isfinite(value) and grads_finite):
                raise self._divergence(value, epoch, steps + 1)
            self.optimizer.step()
            self.schedule.step()
            sum_loss += value
            steps += 1
            self.bar.update()
            self.bar.set_postfix(epoch=epoch, loss=f"{sum_loss / steps:.4g}", refresh=False)
        return sum_loss / steps

    def _divergence(self, value: float, epoch: int, step: int) -> DivergenceError:
        where = f"at epoch {epoch}, step {step} (lr={self.optimizer.param_groups[0]['lr']:.3g}"
        if not math.isfinite(value):
            what = f"the ELBO became {value} {where})"
        else:
            first = next((name for name, p in self.bnn.named_parameters()
                          if p.grad is not None and not bool(torch.isfinite(p.grad).all())), "?")
            what = f"a gradient became NaN or inf {where}; first in {first})"
        return DivergenceError(f"fit: {what}", epoch, step)


def _mean_groups(bnn: BNN) -> list[nn.Parameter]:
    """The guide's means and the point estimates (everything but the posterior scales)."""
    rho = {id(p) for p in bnn.guide.rho.parameters()}
    return [p for p in bnn.parameters() if id(p) not in rho]


# --------------------------------------------------------------------------- stage 1 and 2


def _warm_start(bnn: BNN, data: Dataset, settings: Settings, device: torch.device,
                bar: tqdm) -> dict:
    """Maximum likelihood for the guide's means (and the point estimates) over
    ``settings.warm_start`` epochs: the loss of plain training, through the same layers.
    The scales get no gradient meanwhile. Returns the record ``{"epochs", "nll",
    "seconds"}`` (``nll``: mean per example of each epoch)."""
    record = {"epochs": settings.warm_start, "nll": [], "seconds": 0.0}
    if not settings.warm_start:
        return record
    for rho in bnn.guide.rho.parameters():
        rho.requires_grad_(False)
    stage = _Stage(bnn, MeansLikelihood(bnn), [(_mean_groups(bnn), settings.lr)],
                   settings.warm_start, data, settings, device, bar, settings.seed + 1)
    bar.set_description("warm start")
    start = time.perf_counter()
    try:
        for epoch in range(1, settings.warm_start + 1):
            began = time.perf_counter()
            record["nll"].append(stage.epoch(epoch) / len(data))
            if stage.rank == 0:
                log.info("epoch %d/%d warm start: nll %.4f, %.1f s", epoch, settings.epochs,
                         record["nll"][-1], time.perf_counter() - began)
    except DivergenceError as err:
        raise DivergenceError(f"{err} in the warm start; try a lower lr", err.epoch,
                              err.step) from None
    finally:
        for rho in bnn.guide.rho.parameters():
            rho.requires_grad_(True)
    record["seconds"] = time.perf_counter() - start
    return record


def _freeze_batchnorm(bnn: BNN) -> None:
    """Put every BatchNorm layer in eval mode (its running statistics fixed; its affine
    parameters still learned): it is then one fixed affine map shared by every weight draw
    and every quantized network, and SVI fits the posterior through that same map, so the
    predictive of each draw is the function that was trained."""
    for m in bnn.net.modules():
        if isinstance(m, _BatchNorm):
            m.eval()


def _train(bnn: BNN, frozen_batchnorm: bool) -> None:
    bnn.train()
    if frozen_batchnorm:
        _freeze_batchnorm(bnn)


class _MeansNetwork(nn.Module):
    """The BNN's network on its guide's means (for :func:`torch.optim.swa_utils.update_bn`)."""

    def __init__(self, bnn: BNN) -> None:
        super().__init__()
        self.bnn = bnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with drawn(means(self.bnn), local_reparam=False):
            return self.bnn.net(x)


def _prepare(bnn: BNN, data: Dataset, settings: Settings, device: torch.device,
             bar: tqdm) -> dict:
    """Stages 1 and 2: the warm start, BatchNorm frozen, the KL weight (given, or chosen on
    a validation part) and the posterior scales it implies. Returns the record that the
    posterior's config carries."""
    if settings.validates:
        fit_part, val_part = split_validation(data, settings.val_fraction, settings.seed,
                                              bnn.likelihood.kind)
    else:
        fit_part, val_part = data, None
    _train(bnn, frozen_batchnorm=False)
    warm = _warm_start(bnn, fit_part, settings, device, bar)
    has_batchnorm = any(isinstance(m, _BatchNorm) for m in bnn.net.modules())
    frozen = has_batchnorm and settings.warm_start > 0
    if frozen:
        _freeze_batchnorm(bnn)
    prep = {"warm_start": warm, "frozen_batchnorm": frozen, "temperature": None,
            "batchnorm": "none" if not has_batchnorm else "frozen" if frozen else "re-estimated",
            "kl_weight": settings.kl_weight, "initial_scales": "init_scale of bayesian()"}
    if settings.warm_start or settings.validates:
        if has_batchnorm and not frozen:  # statistics of the means, before they are used
            _reestimate_batchnorm(bnn, fit_part, settings.batch_size, device)
        bnn.eval()  # dropout off, BatchNorm on its running statistics
        fisher = _fisher(bnn, fit_part, settings, device)
        if settings.validates:
            prep["temperature"] = choose_kl_weight(bnn, fisher, len(fit_part), val_part,
                                                   settings.seed, device)
            prep["kl_weight"] = _broadcast(prep["temperature"]["kl_weight"])
            _log_temperature(prep["kl_weight"], len(val_part))
        set_scales(bnn, tempered_scales(bnn, fisher, prep["kl_weight"], len(data)))
        prep["initial_scales"] = "tempered empirical-Fisher diagonal at the warm start"
    return prep


def _log_temperature(beta: float, val_size: int) -> None:
    """kl_weight="auto" asked for this choice, so it is news, not a warning."""
    if _world()[0] == 0:
        kind = "the exact ELBO" if beta == 1 else "a tempered posterior"
        log.info("kl_weight auto: chose %g (%s) by the NLL on %d held-out training examples",
                 beta, kind, val_size)


def _fisher(bnn: BNN, data: Dataset, settings: Settings,
            device: torch.device) -> dict[str, torch.Tensor]:
    """The per-example Fisher information at the means; a :class:`DivergenceError` when a
    gradient there is not finite."""
    fisher = fisher_diagonal(bnn, data, settings.batch_size, device)
    for site, h in fisher.items():
        if not bool(torch.isfinite(h).all()):
            raise DivergenceError(f"fit: a gradient at the means is NaN or inf (in {site}) "
                                  "after the warm start; try a lower lr", settings.warm_start, 0)
    return fisher


def _broadcast(value: float) -> float:
    """Process 0's ``value`` in every process (one choice, whatever the rounding)."""
    rank, world_size = _world()
    if world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------- stage 3


def _variational(bnn: BNN, data: Dataset, settings: Settings, prep: dict,
                 device: torch.device, folder: Path | None, saved: dict | None,
                 config: dict, bar: tqdm) -> dict:
    """SVI on the whole data set at the prepared KL weight (with ``warmup_epochs`` it rises
    linearly to it), from ``saved`` when resuming; a checkpoint after every epoch; a
    retry at a lower learning rate on divergence when asked. Returns the run record."""
    rho = list(bnn.guide.rho.parameters())
    stage = _Stage(bnn, MeanFieldELBO(bnn, settings.num_particles),
                   [(_mean_groups(bnn), settings.lr), (rho, settings.scale_lr)],
                   settings.vi_epochs, data, settings, device, bar, settings.seed)
    if saved is None:
        with torch.no_grad():
            run = {"epoch": 0, "history": [], "kl": float(bnn.kl()), "retries": [],
                   "resumed_from_epochs": [], "prep": prep}
    else:
        run = _restore(saved, saved["rng"][stage.rank], stage)
        run["resumed_from_epochs"].append(run["epoch"])
    saved_epoch = None if saved is None else run["epoch"]
    snapshot = (None if settings.retry_lr_factor is None else
                _training_state(stage, run, copied=True))
    bar.set_description("SVI")
    while run["epoch"] < settings.vi_epochs:
        epoch = run["epoch"] + 1
        bar.n = _steps_done(settings, len(data), run["epoch"])
        beta = prep["kl_weight"] * (min(1.0, epoch / settings.warmup_epochs)
                                    if settings.warmup_epochs else 1.0)
        bnn.kl_weight = beta
        _train(bnn, prep["frozen_batchnorm"])
        start = time.perf_counter()
        try:
            mean_loss = stage.epoch(settings.warm_start + epoch)
        except DivergenceError as err:
            if snapshot is None or len(run["retries"]) >= settings.max_retries:
                advice = _divergence_advice(folder, saved_epoch, settings.retry_lr_factor,
                                            settings.max_retries)
                raise DivergenceError(f"{err}; {advice}", err.epoch, err.step) from None
            run = _retry(stage, snapshot, err, settings.retry_lr_factor)
            snapshot = _training_state(stage, run, copied=True)
            continue
        _record(run, bnn, mean_loss, beta, len(data), settings.warm_start + epoch,
                time.perf_counter() - start)
        if stage.rank == 0:
            _log_epoch(run["history"][-1], settings.epochs)
        if snapshot is not None:
            snapshot = _training_state(stage, run, copied=True)
        if folder is not None:
            state = snapshot or _training_state(stage, run, copied=False)
            _write_checkpoint(folder, {**state, "config": config}, bnn, _final(config, run),
                              stage.rank, stage.world_size)
            saved_epoch = run["epoch"]
    return run


def _record(run: dict, bnn: BNN, mean_loss: float, beta: float, n: int, epoch: int,
            seconds: float) -> None:
    """Close an epoch: its history entry (ELBO, NLL, KL, KL weight, seconds)."""
    with torch.no_grad():  # once an epoch: a KL per step would cost ~10 % of the step
        kl = float(bnn.kl())
    # the steps' KL terms averaged as the mean of the epoch's first and last KL
    nll_total = mean_loss - beta * (run["kl"] + kl) / 2
    run["history"].append(dict(epoch=epoch, elbo=-(nll_total + kl),
                               objective=-(nll_total + beta * kl), nll=nll_total / n, kl=kl,
                               kl_weight=beta, seconds=seconds))
    run["kl"] = kl
    run["epoch"] += 1


def _log_epoch(entry: dict, epochs: int) -> None:
    log.info("epoch %d/%d SVI: elbo %.6g, nll %.4f, kl %.6g (weight %.3g), %.1f s",
             entry["epoch"], epochs, entry["elbo"], entry["nll"], entry["kl"],
             entry["kl_weight"], entry["seconds"])


def _steps_done(settings: Settings, n: int, vi_epochs_done: int) -> int:
    fit_n = n - round(settings.val_fraction * n) if settings.validates else n
    return (settings.warm_start * math.ceil(fit_n / settings.batch_size)
            + vi_epochs_done * math.ceil(n / settings.batch_size))


def _retry(stage: _Stage, snapshot: dict, err: DivergenceError, factor: float) -> dict:
    """Back to the end of the last complete epoch, with both learning rates times
    ``factor``; the retry is recorded in the run."""
    run = _restore(snapshot, snapshot["rng"], stage)
    for group in stage.optimizer.param_groups:
        group["lr"] *= factor
        group["initial_lr"] *= factor
    stage.schedule.base_lrs = [lr * factor for lr in stage.schedule.base_lrs]
    run["retries"].append({"epoch": err.epoch, "step": err.step,
                           "lr": stage.optimizer.param_groups[0]["initial_lr"],
                           "scale_lr": stage.optimizer.param_groups[1]["initial_lr"]})
    return run


# --------------------------------------------------------------------------- checkpoints


def _training_state(stage: _Stage, run: dict, copied: bool) -> dict:
    """Everything the fit needs to continue from here: the network and guide, Adam's
    moments, the schedule, the batch-order and sampling generators, and ``run`` (epoch,
    history, KL, retries, the prepared KL weight). ``copied`` detaches it from the live
    tensors (an in-memory snapshot); a state that is only written to disk needs no copy."""
    state = {"model": stage.bnn.state_dict(), "optimizer": stage.optimizer.state_dict(),
             "schedule": stage.schedule.state_dict(), "order": stage.order.get_state(),
             "rng": rng_state(), **run}
    return copy.deepcopy(state) if copied else state


def _restore(state: dict, rng: dict, stage: _Stage) -> dict:
    """Load ``state`` (from :func:`_training_state`) into the live objects; return its run."""
    try:
        stage.bnn.load_state_dict(state["model"])
        stage.optimizer.load_state_dict(state["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise ValueError(f"checkpoint_dir: the checkpoint's network does not match bnn: "
                         f"{err}") from err
    stage.schedule.load_state_dict(state["schedule"])
    stage.order.set_state(state["order"])
    set_rng_state(rng)
    return copy.deepcopy({k: state[k] for k in ("epoch", "history", "kl", "retries",
                                                "resumed_from_epochs", "prep")})


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


def _saved_state(folder: Path | None, resume: bool, config: dict) -> dict | None:
    """The checkpoint to resume from (``None``: start afresh); refuses to overwrite one
    without ``resume`` and to resume a different fit."""
    path = None if folder is None else folder / CHECKPOINT
    if resume:
        saved = load_checkpoint(path, "fit", argument="checkpoint_dir")
        if saved is not None:
            _check_same_fit(saved["config"], config, path)  # world_size included
        return saved
    if path is not None and path.exists():
        raise ValueError(f"checkpoint_dir: {folder} already holds a fit's checkpoint "
                         f"({CHECKPOINT}); pass resume=True to continue it, or use another "
                         "folder")
    return None


def _checkpoint_folder(checkpoint_dir: str | os.PathLike | None,
                       resume: object) -> Path | None:
    _checks.flag("resume", resume)
    if checkpoint_dir is None:
        if resume:
            raise ValueError("resume: needs checkpoint_dir, the folder to resume from")
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
        return head + "; pass checkpoint_dir= to keep each epoch's state" + (
            ", and retry_lr_factor= to retry an epoch at a lower lr"
            if retry_lr_factor is None else "")
    if saved_epoch is None:
        return head + f"; no epoch completed, so {folder} holds no checkpoint"
    return head + (f"; the checkpoint of epoch {saved_epoch} in {folder} is kept: rerun with "
                   "resume=True and retry_lr_factor=0.5 (--resume --retry-lr-factor 0.5) to "
                   "continue from it at a lower lr")


def _final(config: dict, run: dict) -> dict:
    """The posterior's ``config``: the settings asked for, what the preparation chose
    (the KL weight, the warm start, BatchNorm, the initial scales), each retry and resume."""
    prep = run["prep"]
    return {**config, "kl_weight": prep["kl_weight"], "kl_weight_asked": config["kl_weight"],
            "tempered": prep["kl_weight"] != 1, "temperature": prep["temperature"],
            "warm_start_record": prep["warm_start"],
            "batchnorm": prep["batchnorm"],
            "initial_scales": prep["initial_scales"], "retries": run["retries"],
            "resumed_from_epochs": run["resumed_from_epochs"]}


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
    kl_weight: float | str = "auto",
    warm_start: int | str = "auto",
    val_fraction: float = 0.1,
    warmup_epochs: int = 0,
    lr_schedule: str = "cosine",
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    retry_lr_factor: float | None = None,
    max_retries: int = 3,
) -> Posterior:
    """Fit the mean-field posterior of ``bnn`` to ``train_dataset``; return it.

    SVI maximises, with Adam on minibatches of size ``B`` from ``N`` examples,

    .. math::

        \\mathcal L(q) = \\frac{N}{B}\\sum_{n \\in \\text{batch}}
            \\mathbb E_{q(w)}[\\log p(y_n \\mid x_n, w)] - \\beta\\,\\mathrm{KL}(q \\,\\|\\, p),

    the loss of Pyro's :class:`~pyro.infer.TraceMeanField_ELBO` (computed by
    :class:`~pqnet.inference.elbo.MeanFieldELBO`), ``beta`` the KL weight: 1 is the exact
    ELBO, below 1 a tempered ("cold") posterior.

    **The default recipe** (see the module docstring): ``warm_start`` of the ``epochs``
    (``"auto"``: half) train the means by maximum likelihood on the data less a held-out
    ``val_fraction``; BatchNorm's statistics are then frozen; ``kl_weight="auto"`` chooses
    ``beta`` among ``1, 0.1, ..., 1e-5`` by the validation NLL of the tempered Laplace
    posterior at the warm start (:mod:`pqnet.inference.temperature`: the warmest ``beta``
    within one paired standard error of the best), which also gives the initial posterior
    scales; the remaining epochs are SVI on all the data, under a cosine
    schedule. The test data are never seen. ``posterior.config`` says what was chosen
    (``kl_weight``, ``tempered``, ``temperature`` with the validation NLL of each
    candidate, ``warm_start_record``, ``batchnorm``, ``initial_scales``). Pass
    ``kl_weight=1, warm_start=0`` for plain SVI on the exact ELBO from ``bnn``'s weights
    (then the scales start at ``bayesian(init_scale=...)``, and BatchNorm's running
    statistics are re-estimated on the means at the end).

    The posterior scales' parameters ``rho`` learn at ``scale_lr`` (default ``10 * lr``).
    With ``warmup_epochs`` the KL weight rises linearly over the first SVI epochs.

    ``history`` on the result has per SVI epoch: ``epoch`` (counted from the start of the
    fit, warm start included), ``elbo`` (the exact ELBO of the whole data set: minus the
    epoch's mean expected NLL, minus the end-of-epoch KL), ``objective`` (what the fit
    maximises: the same with the KL times its weight), ``nll``
    (expected negative log-likelihood per example, averaged over the epoch's steps),
    ``kl`` (nats, whole network, at the end of the epoch), ``kl_weight`` and ``seconds``.

    **Checkpoints.** With ``checkpoint_dir`` the end of every SVI epoch writes
    ``checkpoint_dir/fit.pt`` (network, guide, Adam's state, schedule, every random
    generator, epoch, history, the prepared KL weight) and ``checkpoint_dir/posterior.pt``
    (that epoch's posterior), each atomically: a fit killed at any moment loses at most the
    epoch it was in (a fit killed before its first SVI epoch redoes its warm start).
    ``resume=True`` continues from ``fit.pt`` (or starts afresh when there is none) and, on
    CPU, ends bit-identical to a fit that was never interrupted. It needs the same settings
    and data size (``device``, ``retry_lr_factor`` and ``max_retries`` may change); without
    ``resume`` an existing ``fit.pt`` is an error, never overwritten.

    **Divergence.** A NaN or infinite loss or gradient raises :class:`DivergenceError`
    naming the epoch and step, before the optimiser takes that step; the last checkpoint
    stays as it was. With ``retry_lr_factor`` (in (0, 1)) an SVI epoch that diverges is
    redone from the end of the last complete one with both learning rates multiplied by
    the factor, at most ``max_retries`` times in all; ``config["retries"]`` records each.

    **Several processes.** When a :mod:`torch.distributed` process group of ``P > 1``
    processes is up (``torchrun``; :func:`init_distributed` joins it), each stage's loss is
    wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`. ``batch_size`` stays
    the *global* batch: every process draws the same batch order (``seed``) and takes the
    strided shard ``B_r = batch[r::P]``, with its own weight draws (Pyro's generator is
    seeded ``seed + r``). Process ``r``'s loss is weighted by ``c_r = P |B_r| / |B|``,

    .. math::

        \\ell_r = c_r\\Big(-\\frac{N}{|B_r|}\\sum_{n \\in B_r}
            \\mathbb E_q[\\log p(y_n \\mid x_n, w)] + \\beta\\,\\mathrm{KL}\\Big),
        \\qquad \\frac1P\\sum_r \\nabla \\ell_r = -\\frac{N}{|B|}\\sum_{n \\in B}
            \\nabla\\mathbb E_q[\\log p(y_n \\mid x_n, w)] + \\beta\\,\\nabla\\mathrm{KL},

    so DDP's gradient average is the single-process gradient of the whole batch, exactly,
    also when ``|B|`` is not a multiple of ``P``, except through BatchNorm layers in train
    mode (the warm start; SVI without one), which normalise over each process's shard. The
    Fisher pass and the temperature are computed by every process on all the data alike
    (process 0's choice is broadcast). Process 0 writes the checkpoints;
    every process returns the same posterior.
    """
    if not isinstance(bnn, BNN):
        raise TypeError(f"bnn: expected a pqnet BNN from pqnet.bayesian(...), "
                        f"got {type(bnn).__name__}")
    settings = check_settings(epochs, batch_size, lr, scale_lr, seed, num_particles, kl_weight,
                              warm_start, val_fraction, warmup_epochs, lr_schedule,
                              retry_lr_factor, max_retries)
    folder = _checkpoint_folder(checkpoint_dir, resume)
    device = _checks.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    rank, world_size = _world()
    if settings.batch_size < world_size:
        raise ValueError(f"batch_size: {settings.batch_size} is smaller than the {world_size} "
                         "processes; each process needs at least one example a step")
    with preserved_modes(bnn):  # training sets modes; the caller's are restored
        bnn.to(device)
        n = check_dataset(bnn.template, train_dataset, "train_dataset", bnn.likelihood.kind)
        pyro.set_rng_seed(settings.seed + rank)
        config = {**asdict(settings), "device": str(device), "dataset_size": n,
                  "local_reparam": bnn.local_reparam, "prior": repr(bnn.prior),
                  "world_size": world_size}
        saved = _saved_state(folder, resume, config)
        # disable=None: no bar when stderr is not a terminal (logs, CI), as tqdm documents
        bar = tqdm(total=_steps_done(settings, n, settings.vi_epochs), unit="step",
                   disable=None if progress and rank == 0 else True)
        # Pyro's validation is off: the fit's own checks cover its inputs
        with bar, pyro.validation_enabled(False):
            prep = saved["prep"] if saved is not None else _prepare(bnn, train_dataset, settings,
                                                                    device, bar)
            run = _variational(bnn, train_dataset, settings, prep, device, folder, saved, config,
                               bar)
        bnn.kl_weight = prep["kl_weight"]
        if prep["batchnorm"] == "re-estimated":
            _reestimate_batchnorm(bnn, train_dataset, settings.batch_size, device)
        bnn.eval()
        return Posterior.from_bnn(bnn, run["history"], _final(config, run))


def _reestimate_batchnorm(bnn: BNN, data: Dataset, batch_size: int,
                          device: torch.device) -> None:
    """Running statistics of the means network over ``data`` (when BatchNorm was not
    frozen by a warm start, its statistics averaged the SVI draws)."""
    with torch.no_grad():
        update_bn((x for x, _ in batches(data, batch_size, shuffle=False, device=device)),
                  _MeansNetwork(bnn))
