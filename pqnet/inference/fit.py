"""``fit(bnn, data)``: stochastic variational inference as a plain PyTorch training loop."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import pyro
import torch
from pyro import poutine
from pyro.infer import TraceMeanField_ELBO
from pyro.infer.util import is_validation_enabled
from pyro.poutine.util import prune_subsample_sites
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from ..bnn.convert import BNN
from .posterior import Posterior


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


def batches(dataset: Dataset, batch_size: int, *, shuffle: bool = True,
            generator: torch.Generator | None = None,
            device: str | torch.device = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of ``(x, y)`` minibatches.

    A :class:`~torch.utils.data.TensorDataset` is sliced directly (no per-example
    collation, which dominates the step time of small networks); anything else goes
    through a :class:`~torch.utils.data.DataLoader`. The order depends only on ``generator``.
    """
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors[:2]
        n = len(x)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            yield x[idx].to(device), y[idx].to(device)
    else:
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                               generator=generator):
            yield x.to(device), y.to(device)


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
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: {device!r} is not a torch device") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: CUDA was asked for but torch.cuda.is_available() is False")

    bnn.to(device)
    n = check_dataset(bnn.template, train_dataset, "train_dataset", bnn.likelihood.kind)
    pyro.set_rng_seed(seed)
    order = torch.Generator().manual_seed(seed)
    elbo = ClosedFormKLELBO(num_particles=num_particles)(bnn, bnn.guide)
    rho = {id(p) for p in bnn.guide.rho.parameters()}
    optimizer = torch.optim.Adam([
        {"params": [p for p in elbo.parameters() if id(p) not in rho]},
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
                  local_reparam=bnn.local_reparam, prior=repr(bnn.prior))

    history: list[dict] = []
    # disable=None: no bar when stderr is not a terminal (logs, CI), as tqdm documents
    bar = tqdm(total=epochs * steps_per_epoch, disable=None if progress else True, desc="SVI",
               unit="step")
    bnn.train()
    with torch.no_grad():
        kl_start = float(bnn.kl())
    with pyro.validation_enabled(False):  # checked once above; the per-step checks cost ~10%
        for epoch in range(epochs):
            beta = kl_weight * min(1.0, (epoch + 1) / warmup_epochs) if warmup_epochs else kl_weight
            bnn.kl_weight = beta
            start = time.perf_counter()
            sum_loss, steps = 0.0, 0
            for x, y in batches(train_dataset, batch_size, generator=order, device=device):
                if checked_every_batch:
                    check_batch(bnn.likelihood.kind, x, y, "train_dataset")
                optimizer.zero_grad(set_to_none=True)
                loss = elbo(x, y, dataset_size=n)
                value = loss.item()
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"fit: the ELBO became {value} at epoch {epoch + 1}, step "
                        f"{steps + 1} (lr={lr}); try a lower lr or a smaller init_scale")
                loss.backward()
                optimizer.step()
                schedule.step()
                sum_loss += value
                steps += 1
                bar.update()
                if progress:
                    bar.set_postfix(epoch=epoch + 1, loss=f"{sum_loss / steps:.4g}")
            with torch.no_grad():  # once an epoch: a KL per step would cost ~10 % of the step
                kl = float(bnn.kl())
            # the steps' KL terms averaged as the mean of the epoch's first and last KL
            nll_total = sum_loss / steps - beta * (kl_start + kl) / 2
            history.append(dict(epoch=epoch + 1, elbo=-(nll_total + kl), nll=nll_total / n,
                                kl=kl, kl_weight=beta, seconds=time.perf_counter() - start))
            kl_start = kl
    bar.close()
    bnn.kl_weight = kl_weight
    bnn.eval()
    return Posterior.from_bnn(bnn, history, config)
