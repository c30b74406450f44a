"""The surrogate and the acquisition of the bit-width search, built from BoTorch's parts.

Model (NUQ, Gennari do Nascimento, Costain & Prisacariu, ECCV 2020, Sec. 3.3): a multi-task
Gaussian process over ``(theta, t)``, ``theta`` the search-space parameter (scaled to the unit
cube over the candidates' range) and ``t`` the task, the index of the fidelity (fine-tuning
epochs ``e_t``), with the intrinsic coregionalisation (ICM) kernel

    ``k((theta, t), (theta', t')) = k_x(theta, theta') B[t, t']``,  ``B = W W^T + diag(v)``,

``k_x`` an RBF kernel with one length scale per parameter, ``W >= 0`` (BoTorch's
``PositiveIndexKernel``: tasks correlate positively, with a Beta(2.5, 1.5) prior on the
correlations) and a constant mean and a noise level per task. This is BoTorch's ``MultiTaskGP``
(Balandat et al., "BoTorch: A Framework for Efficient Monte-Carlo Bayesian Optimization",
NeurIPS 2020), fitted by maximising the exact marginal likelihood (``fit_gpytorch_mll``). It
models ``g(y) = -log(1 - y + 1e-3)``, a monotone warp of the objective ``y`` (an accuracy):
the warp spreads the few per mille that separate good allocations, which a GP with one
length scale would otherwise squeeze against a tail of failed ones.

Acquisition: multi-fidelity max-value entropy search (BoTorch's
``qMultiFidelityMaxValueEntropy``; Takeno et al. 2020, Wang & Jegelka 2017): the mutual
information between the observation at ``(theta, t)`` and the maximum ``g*`` of the top task
over the candidates, divided by the cost ``c(e_t)`` (``InverseCostWeightedUtility`` over a
``GenericDeterministicModel`` of the cost in epochs): information about the top-fidelity
optimum per epoch, NUQ's criterion.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from botorch.acquisition.cost_aware import InverseCostWeightedUtility
from botorch.acquisition.max_value_entropy_search import qMultiFidelityMaxValueEntropy
from botorch.fit import fit_gpytorch_mll
from botorch.models import MultiTaskGP
from botorch.models.deterministic import GenericDeterministicModel
from botorch.optim import optimize_acqf_discrete
from gpytorch.mlls import ExactMarginalLogLikelihood

__all__ = ["WARP_EPS", "fit_model", "max_value_entropy", "one_thread", "predict_top", "warp"]

WARP_EPS = 1e-3
MAX_ITERATIONS = 200


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread inside the block: the GP's matrices are tens of points wide,
    and a second thread's synchronisation costs more than it saves (about 1.7x slower fits
    on 2 cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def warp(y: torch.Tensor) -> torch.Tensor:
    """``g(y) = -log(1 - y + eps)``: increasing in ``y``, so both have the same maximisers."""
    return -torch.log1p(WARP_EPS - y)


def _inputs(unit: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
    return torch.cat([unit.double(), tasks.double().reshape(-1, 1)], dim=-1)


def fit_model(unit: torch.Tensor, tasks: torch.Tensor, values: torch.Tensor,
              rank: int | None = None, max_iterations: int = MAX_ITERATIONS) -> MultiTaskGP:
    """The ICM multi-task GP of ``g(values)`` at ``(unit, tasks)``, its hyper-parameters
    fitted by maximum marginal likelihood (L-BFGS-B from BoTorch's initial values, at most
    ``max_iterations`` steps; starting from the previous step's fit instead was faster but
    could stay in a poor optimum). ``tasks`` must hold every task index at least once; the
    highest is the model's output task (inputs name their own task in their last column).
    """
    train_x = _inputs(unit, tasks)
    train_y = warp(torch.as_tensor(values, dtype=torch.float64)).reshape(-1, 1)
    model = MultiTaskGP(train_x, train_y, task_feature=-1, rank=rank,
                        output_tasks=[int(tasks.max())])
    with warnings.catch_warnings():  # numerical warnings of the optimiser: it still fits
        warnings.simplefilter("ignore")
        fit_gpytorch_mll(ExactMarginalLogLikelihood(model.likelihood, model),
                         optimizer_kwargs={"options": {"maxiter": max_iterations}})
    return model


@torch.no_grad()
def predict_top(model: MultiTaskGP, unit: torch.Tensor, top: int) -> torch.Tensor:
    """The posterior mean of ``g`` at the top task ``top`` for each row of ``unit``."""
    x = _inputs(unit, torch.full((len(unit),), top))
    with warnings.catch_warnings():  # variances rounded up to 1e-10 at evaluated points
        warnings.simplefilter("ignore")
        return torch.cat([model.posterior(chunk).mean.reshape(-1) for chunk in x.split(4096)])


def max_value_entropy(model: MultiTaskGP, unit: torch.Tensor, choices: torch.Tensor,
                      candidates: torch.Tensor, costs: Sequence[float]) -> int:
    """The index into ``choices`` (``(m, 2)``: candidate row, task) with the most information
    about the top task's maximum per unit cost; ``candidates`` (rows of ``unit``) are where
    the maximum's samples are drawn (at the top task)."""
    top = len(costs) - 1
    cost = torch.tensor(list(costs), dtype=torch.float64)
    cost_model = GenericDeterministicModel(lambda x: cost[x[..., -1].round().long()][..., None])

    def project(x: torch.Tensor) -> torch.Tensor:  # the same point at the top fidelity
        return torch.cat([x[..., :-1], torch.full_like(x[..., -1:], top)], dim=-1)

    points = _inputs(unit[choices[:, 0]], choices[:, 1])
    with warnings.catch_warnings():  # variances rounded up to 1e-10 at evaluated points
        warnings.simplefilter("ignore")
        acquisition = qMultiFidelityMaxValueEntropy(
            model, candidate_set=_inputs(unit[candidates], torch.zeros(len(candidates))),
            cost_aware_utility=InverseCostWeightedUtility(cost_model=cost_model),
            project=project)
        best, _ = optimize_acqf_discrete(acquisition, q=1, choices=points, unique=False)
    # the chosen point's row: the first choice equal to it
    return int((points == best).all(-1).nonzero()[0, 0])
