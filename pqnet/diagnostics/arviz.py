"""ArviZ conversion: a fitted Posterior (or several) as an ``az.InferenceData``, and held-out
log predictive densities that rank a BNN, its mean network and its quantized versions in
one ``az.compare`` table.

ArviZ has no converter for SVI (arviz-devs/arviz issue 498): a variational posterior is not
a set of draws. The converter here makes it one, as the ArviZ docs do for any sampler:
draw weights from ``q``, run the network with each draw
(:func:`torch.func.functional_call`), and hand the arrays, with a chain axis and named
dimensions, to :func:`arviz.from_dict`.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import pyro
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import Dataset

from .. import __version__
from .._checks import positive_int as _positive_int
from ..inference.batching import batches, check_dataset
from ..inference.posterior import Posterior
from ..quantize.qnet import QuantizedNet

with warnings.catch_warnings():  # ArviZ 0.23 announces its 1.0 refactor on import; pqnet pins <1
    warnings.filterwarnings("ignore", category=FutureWarning)
    import arviz as az

__all__ = ["compare_networks", "held_out_elpd", "held_out_inference_data", "parameter_dims",
           "to_inference_data"]

#: dimension names of a layer's weight, by layer type (PyTorch's layout)
WEIGHT_DIMS: dict[str, tuple[str, ...]] = {
    "Linear": ("out_feature", "in_feature"),
    "Conv1d": ("out_channel", "in_channel", "kw"),
    "Conv2d": ("out_channel", "in_channel", "kh", "kw"),
    "Conv3d": ("out_channel", "in_channel", "kd", "kh", "kw"),
    "Embedding": ("embedding", "embedding_dim"),
}
#: dimension names of the inputs in ``constant_data``, by their rank (without the batch axis)
INPUT_DIMS: dict[int, tuple[str, ...]] = {1: ("feature",), 2: ("channel", "length"),
                                          3: ("channel", "height", "width"),
                                          4: ("channel", "depth", "height", "width")}
#: the largest input tensor (in entries) that ``constant_data`` stores by default
MAX_CONSTANT_ENTRIES = 2 ** 20

Network = Posterior | nn.Module | QuantizedNet


# --------------------------------------------------------------------------- names and shapes


def parameter_dims(name: str, kind: str, shape: Sequence[int]) -> list[str]:
    """Named dimensions of the random parameter ``name`` of a ``kind`` layer.

    A layer's dimension names are prefixed with its module path, because ArviZ (xarray)
    needs one length per dimension name across a data set and layers differ in size:
    ``"features.0.weight"`` of a ``Conv2d`` has dims ``features.0.out_channel``,
    ``features.0.in_channel``, ``features.0.kh``, ``features.0.kw``; its bias shares the first.
    A layer type without names gets ``dim_0, dim_1, ...``.
    """
    layer, _, param = name.rpartition(".")
    names = WEIGHT_DIMS.get(kind)
    if param not in ("weight", "bias"):
        names = tuple(f"{param}_dim_{i}" for i in range(len(shape)))
    elif names is None or param == "weight" and len(names) != len(shape):
        names = tuple(f"dim_{i}" for i in range(len(shape)))
    return [f"{layer}.{d}" if layer else d for d in names[:len(shape)]]


def _evenly_spaced(n: int, k: int) -> np.ndarray:
    """``k`` of ``0..n-1`` spread evenly, first and last included (all when ``k >= n``)."""
    if k >= n:
        return np.arange(n)
    return np.floor(np.linspace(0, n - 1, k) + 0.5).astype(np.int64)


def weight_subset(shape: Sequence[int], max_weights: int | None) -> list[np.ndarray]:
    """Indices along each axis of a tensor of ``shape`` that keep at most ``max_weights``
    entries. Every output unit (axis 0, and so every entry of the bias) is kept while the
    budget allows: the largest of the other axes (inputs, kernel positions) is thinned
    first, one index at a time, and axis 0 only when they are down to one. The kept indices
    are evenly spaced, first and last included, so the subset covers the tensor and its
    coordinates stay the original indices. ``None`` keeps everything."""
    keep = list(shape)
    if max_weights is not None:
        while math.prod(keep) > max_weights:
            inner = [k if i > 0 else 1 for i, k in enumerate(keep)]
            keep[int(np.argmax(inner)) if max(inner) > 1 else 0] -= 1
    return [_evenly_spaced(n, k) for n, k in zip(shape, keep, strict=True)]


# --------------------------------------------------------------------------- checks


def _posteriors(posterior: Posterior | Sequence[Posterior]) -> list[Posterior]:
    if isinstance(posterior, Posterior):
        return [posterior]
    if isinstance(posterior, Sequence) and not isinstance(posterior, str) and posterior and \
            all(isinstance(p, Posterior) for p in posterior):
        first = posterior[0]
        for i, other in enumerate(posterior[1:], start=1):
            shapes = {k: tuple(v.shape) for k, v in other.loc.items()}
            if shapes != {k: tuple(v.shape) for k, v in first.loc.items()}:
                raise ValueError(f"posterior: fit {i} has other random weights than fit 0; "
                                 "chains must be fits of the same network")
        return list(posterior)
    raise TypeError(f"posterior: expected a pqnet Posterior or a non-empty list of them, "
                    f"got {type(posterior).__name__}")


def _tensors(data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*batches(data, 1024, shuffle=False), strict=True)
    return torch.cat(xs), torch.cat(ys)


def _log_lik(f: torch.Tensor, y: torch.Tensor, likelihood: dict) -> torch.Tensor:
    """``log p(y_n | f_n)`` per observation (float64): categorical, or Normal summed over
    the outputs of one observation."""
    if likelihood["kind"] == "categorical":
        return f.double().log_softmax(-1).gather(-1, y[:, None]).squeeze(-1)
    noise = float(likelihood.get("noise", 1.0))
    f = f.reshape(y.shape).double()
    return torch.distributions.Normal(f, noise).log_prob(y.double()).reshape(len(y), -1).sum(-1)


def _replicate(f: torch.Tensor, y: torch.Tensor, likelihood: dict,
               gen: torch.Generator) -> torch.Tensor:
    """One posterior-predictive replicate ``y_rep ~ p(y | f)`` per observation."""
    if likelihood["kind"] == "categorical":
        return torch.multinomial(f.float().softmax(-1), 1, generator=gen).squeeze(-1)
    noise = float(likelihood.get("noise", 1.0))
    f = f.reshape(y.shape).float()
    return f + noise * torch.randn(f.shape, generator=gen)


def _forward(net: nn.Module, weights: dict, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([functional_call(net, weights, (x[i:i + batch_size],), strict=False)
                      for i in range(0, len(x), batch_size)])


# --------------------------------------------------------------------------- the converter


@torch.no_grad()
def to_inference_data(
    posterior: Posterior | Sequence[Posterior],
    data: Dataset,
    *,
    num_samples: int = 100,
    chains: int | None = None,
    seed: int = 0,
    var_names: Sequence[str] | None = None,
    max_weights_per_layer: int | None = None,
    store_inputs: bool | None = None,
    batch_size: int = 1000,
) -> az.InferenceData:
    """Draws from a fitted posterior, and what the network does with them, as ArviZ data.

    For chain ``c`` and draw ``s``, ``w_cs ~ q_c(w) = prod_i N(mu_ci, sigma_ci^2)``; on each
    observation ``(x_n, y_n)`` of ``data`` the network computes ``f(x_n; w_cs)`` and

    - ``posterior``: the drawn weights, one variable per random parameter (``"0.weight"``),
      with named dims (:func:`parameter_dims`: ``out_channel, in_channel, kh, kw`` for a
      convolution, ``out_feature, in_feature`` for a Linear, prefixed by the layer) and
      coordinates (the weight's indices);
    - ``log_likelihood``: ``y``, ``log p(y_n | x_n, w_cs)`` per observation, for
      ``az.loo`` / ``az.waic`` (categorical: ``log softmax(f)_{y_n}``; Normal: the log
      density summed over the observation's outputs);
    - ``posterior_predictive``: ``y``, one replicate ``y_rep ~ p(y | x_n, w_cs)`` per draw;
    - ``observed_data``: ``y``; ``constant_data``: the inputs ``x`` when they fit
      (``store_inputs``; by default when they have at most 2^20 entries).

    Parameters
    ----------
    posterior : one :class:`~pqnet.Posterior`, or a list of independent fits of the same
        network (e.g. from different seeds), each one chain. Draws from a single ``q`` are
        independent, so R-hat and ESS then only measure Monte Carlo noise; across fits they
        measure whether SVI finds the same posterior. Weights of hidden units are not
        identifiable across fits (permuting units gives the same network), so expect a large
        R-hat on weights of independent fits; the per-observation log-likelihood and the
        predictive are identifiable, and their R-hat is the one to read.
    data : the observations, a dataset of ``(x, y)`` the network takes (usually held out).
    num_samples : draws per chain.
    chains : chains of a single posterior (default 1); for a list, its length (default).
    seed : seeds the weight draws and the replicates; the same seed gives the same data.
    var_names : random parameters to store in ``posterior`` (default all); the
        log-likelihood always uses the whole network.
    max_weights_per_layer : store at most this many entries of each weight, evenly spaced
        along its input axes first (:func:`weight_subset`; the bias keeps the entries of
        the weight's output units), to keep files of big networks small; coordinates keep
        the original indices.
    store_inputs : whether to put ``x`` in ``constant_data``.
    batch_size : observations per forward pass.

    Returns
    -------
    az.InferenceData
        Written with ``idata.to_netcdf(path)`` and read back with ``az.from_netcdf(path)``.

    Examples
    --------
    >>> idata = pqnet.to_inference_data(posterior, test, num_samples=100)  # doctest: +SKIP
    >>> az.summary(idata, var_names=["8.bias"]); az.loo(idata)
    """
    fits = _posteriors(posterior)
    num_samples = _positive_int("num_samples", num_samples)
    batch_size = _positive_int("batch_size", batch_size)
    if len(fits) > 1:
        if chains is not None and chains != len(fits):
            raise ValueError(f"chains: {len(fits)} posteriors are {len(fits)} chains, "
                             f"got chains={chains!r}")
        chains = len(fits)
    else:
        chains = _positive_int("chains", 1 if chains is None else chains)
        fits = fits * chains
    first = fits[0]
    if var_names is None:
        var_names = first.names
    elif isinstance(var_names, str) or not set(var_names) <= set(first.names) or not var_names:
        raise ValueError(f"var_names: expected a non-empty list of random parameters, some of "
                         f"{', '.join(first.names)}; got {var_names!r}")
    if max_weights_per_layer is not None:
        max_weights_per_layer = _positive_int("max_weights_per_layer", max_weights_per_layer)
    kind = first.likelihood["kind"]
    check_dataset(first.module, data, "data", kind)
    x, y = _tensors(data)
    if store_inputs is None:
        store_inputs = x.numel() <= MAX_CONSTANT_ENTRIES

    # which entries of each parameter to store, and their dims and coordinates
    index: dict[str, list[np.ndarray]] = {}
    dims: dict[str, list[str]] = {}
    coords: dict[str, np.ndarray] = {}
    for name in var_names:
        layer, _, param = name.rpartition(".")
        weight = f"{layer}.weight" if layer else "weight"
        if param in ("weight", "bias") and weight in first.loc:  # a bias follows its weight
            index[name] = weight_subset(first.loc[weight].shape, max_weights_per_layer)
            index[name] = index[name][:1] if param == "bias" else index[name]
        else:
            index[name] = weight_subset(first.loc[name].shape, max_weights_per_layer)
        info = first.layers.get(layer)
        dims[name] = parameter_dims(name, info.kind if info else "", first.loc[name].shape)
        coords.update(zip(dims[name], index[name], strict=True))

    gen = torch.Generator().manual_seed(seed)
    rep_gen = torch.Generator().manual_seed(seed + 1)
    draws = {name: [] for name in var_names}
    log_lik, y_rep = [], []
    for fit in fits:
        net = copy.deepcopy(fit.module).eval()  # the caller's module keeps its mode
        chain_draws = {name: [] for name in var_names}
        chain_ll, chain_rep = [], []
        for _ in range(num_samples):
            weights = fit.draw(gen)
            f = _forward(net, weights, x, batch_size)
            chain_ll.append(_log_lik(f, y, fit.likelihood))
            chain_rep.append(_replicate(f, y, fit.likelihood, rep_gen))
            for name in var_names:
                chain_draws[name].append(weights[name][np.ix_(*index[name])])
        for name in var_names:
            draws[name].append(torch.stack(chain_draws[name]))
        log_lik.append(torch.stack(chain_ll))
        y_rep.append(torch.stack(chain_rep))

    obs_dims = ["obs"] + [f"y_dim_{i}" for i in range(y.dim() - 1)]
    groups = {
        "posterior": {k: torch.stack(v).numpy() for k, v in draws.items()},
        "log_likelihood": {"y": torch.stack(log_lik).numpy()},
        "posterior_predictive": {"y": torch.stack(y_rep).numpy()},
        "observed_data": {"y": y.numpy()},
    }
    dims = {**dims, "y": obs_dims}
    if store_inputs:
        groups["constant_data"] = {"x": x.numpy()}
        dims["x"] = ["obs", *INPUT_DIMS.get(x.dim() - 1, [f"x_dim_{i}"
                                                         for i in range(x.dim() - 1)])]
    fits_note = "independent fits, one per chain" if len(set(map(id, fits))) > 1 else \
        "one fit; chains are independent draws from the same q"
    attrs = {"inference_library": "pyro", "inference_library_version": pyro.__version__,
             "pqnet_version": __version__,
             "inference_method": "SVI, mean-field Normal guide; draws from q(w)",
             "chains_are": fits_note, "likelihood": kind, "seed": seed,
             "stored_weights": "all" if max_weights_per_layer is None else
             f"at most {max_weights_per_layer} per layer, evenly spaced"}
    return az.from_dict(**groups, coords={**coords, "obs": np.arange(len(y))}, dims=dims,
                        posterior_attrs=attrs, log_likelihood_attrs=attrs)


# --------------------------------------------------------------------------- held-out comparison


def _as_model(model: Network, argument: str) -> Posterior | nn.Module:
    if isinstance(model, QuantizedNet):
        return model.to_module()
    if isinstance(model, (Posterior, nn.Module)):
        return model
    raise TypeError(f"{argument}: expected a pqnet Posterior, QuantizedNet or torch.nn.Module, "
                    f"got {type(model).__name__}")


@torch.no_grad()
def held_out_inference_data(model: Network, data: Dataset, *, num_samples: int = 32,
                            seed: int = 0, batch_size: int = 1000) -> az.InferenceData:
    """The held-out log predictive density of ``model`` on each observation of ``data``, in
    the form ArviZ reads: ``log_likelihood["y"]`` of shape ``(chain=1, draw=1, obs)``.

    .. math::

        \\ell_n = \\log p(y_n \\mid x_n, \\mathcal D) = \\log \\frac1S \\sum_{s=1}^S
            p(y_n \\mid x_n, w_s), \\quad w_s \\sim q, \\qquad
        \\ell_n = \\log p(y_n \\mid x_n, \\hat w) \\text{ for a deterministic net.}

    A deterministic network (the posterior mean, a :class:`QuantizedNet`, any ``nn.Module``)
    is a posterior that is a point mass at ``w_hat``: a single draw. A BNN is stored already
    integrated over its ``S`` draws, also as one "draw", so every model has the same shape
    and the same meaning: the log density it gives to data it was not fitted on.
    ``posterior["lpd"]`` holds ``sum_n l_n``, the point mass's only quantity. A plain
    network is scored as a classifier (categorical likelihood); a Posterior by its own.
    """
    num_samples = _positive_int("num_samples", num_samples)
    batch_size = _positive_int("batch_size", batch_size)
    model = _as_model(model, "model")
    likelihood = model.likelihood if isinstance(model, Posterior) else {"kind": "categorical"}
    module = model.module if isinstance(model, Posterior) else model
    check_dataset(module, data, "data", likelihood["kind"])
    x, y = _tensors(data)
    module = copy.deepcopy(module).eval()  # the caller's module keeps its mode
    if isinstance(model, Posterior):
        gen = torch.Generator().manual_seed(seed)
        draws = [_log_lik(_forward(module, model.draw(gen), x, batch_size), y, likelihood)
                 for _ in range(num_samples)]
        lpd = torch.logsumexp(torch.stack(draws), 0) - math.log(num_samples)
        what = f"BNN posterior predictive, log of the mean density over {num_samples} draws"
    else:
        lpd = _log_lik(_forward(module, {}, x, batch_size), y, likelihood)
        what = "deterministic network: a point-mass posterior, one draw"
    lpd = lpd.numpy()[None, None]
    return az.from_dict(posterior={"lpd": lpd.sum(-1)}, log_likelihood={"y": lpd},
                        observed_data={"y": y.numpy()}, coords={"obs": np.arange(len(y))},
                        dims={"y": ["obs"] + [f"y_dim_{i}" for i in range(y.dim() - 1)]},
                        log_likelihood_attrs={"held_out": what, "seed": seed})


def held_out_elpd(idata: az.InferenceData) -> az.ELPDData:
    """The held-out log predictive density of :func:`held_out_inference_data` as the
    ``ELPDData`` ``az.loo`` returns (pointwise), so that ``az.compare(..., ic="loo")`` takes it.

    LOO estimates the density of each observation under a posterior fitted without it. On
    held-out data the posterior never saw the observation, so the held-out density *is* that
    quantity, computed exactly rather than by importance sampling:

    .. math::

        \\widehat{\\mathrm{elpd}} = \\sum_n \\ell_n, \\qquad
        \\mathrm{se} = \\sqrt{N \\operatorname{Var}_n(\\ell_n)}, \\qquad p_\\mathrm{loo} = 0,
        \\qquad \\hat k_n = 0.

    ``p_loo`` (the effective number of parameters, ``lppd - elpd_loo``) is 0 because no
    observation is left out of a fit that contains it; the Pareto ``k`` is 0 because no
    importance weights are used. PSIS-LOO itself cannot run on a point mass: with one draw
    every importance ratio is the same and the Pareto tail cannot be fitted (Vehtari,
    Gelman & Gabry 2017, "Practical Bayesian model evaluation using leave-one-out
    cross-validation and WAIC", Stat. Comput. 27).
    """
    ll = idata.log_likelihood["y"].stack(__sample__=("chain", "draw"))
    if ll.sizes["__sample__"] != 1:
        raise ValueError("idata: expected the one-draw held-out log density of "
                         "held_out_inference_data")
    loo_i = ll.isel(__sample__=0, drop=True).rename("loo_i")
    n = loo_i.size
    return az.ELPDData(
        data=[float(loo_i.sum()), float(np.sqrt(n * np.var(loo_i.values))), 0.0, 1, n, False,
              loo_i, (loo_i * 0).rename("pareto_shape"), "log", 0.7],
        index=["elpd_loo", "se", "p_loo", "n_samples", "n_data_points", "warning", "loo_i",
               "pareto_k", "scale", "good_k"])


def compare_networks(models: Mapping[str, Network], data: Dataset, *, num_samples: int = 32,
                     seed: int = 0, method: str = "stacking") -> pd.DataFrame:
    """Rank networks by their held-out log predictive density on the same observations:
    ``az.compare`` over :func:`held_out_elpd` of each (``ic="loo"``, log scale).

    ``models`` maps a name to a :class:`~pqnet.Posterior` (scored by its posterior predictive
    with ``num_samples`` draws), a :class:`~pqnet.quantize.QuantizedNet` or a plain network,
    so one table holds the full BNN, its mean network and its quantized versions. ``elpd_loo``
    is the summed held-out log density (higher is better), ``elpd_diff`` / ``dse`` the
    difference to the best and its standard error from the paired pointwise differences,
    ``weight`` the stacking weights (Yao et al. 2018, "Using stacking to average Bayesian
    predictive distributions", Bayesian Analysis 13).
    """
    if not isinstance(models, Mapping) or len(models) < 2:
        raise ValueError("models: expected a mapping of at least two names to networks")
    elpds = {name: held_out_elpd(held_out_inference_data(m, data, num_samples=num_samples,
                                                         seed=seed))
             for name, m in models.items()}
    return az.compare(elpds, ic="loo", method=method, scale="log")
