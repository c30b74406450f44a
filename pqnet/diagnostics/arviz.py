"""ArviZ conversion: a fitted Posterior (or several) as an ``az.InferenceData``; PSIS-LOO of
the training data with its Pareto k checked; and exact held-out log predictive densities that
rank a BNN, its mean network and its quantized versions in one table (``elpd_test``, not LOO).

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
import xarray as xr
from torch import nn
from torch.func import functional_call
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .. import __version__
from .._checks import flag as _flag
from .._checks import one_of as _one_of
from .._checks import positive_int as _positive_int
from ..inference.batching import batches, check_dataset
from ..inference.posterior import Posterior
from ..quantize.qnet import QuantizedNet
from .analysis import DiagnosticWarning

with warnings.catch_warnings():  # ArviZ 0.23 announces its 1.0 refactor on import; pqnet pins <1
    warnings.filterwarnings("ignore", category=FutureWarning)
    import arviz as az

__all__ = ["DEFAULT_CHAINS", "compare_networks", "held_out_log_density", "parameter_dims",
           "pareto_k_table", "psis_loo", "to_inference_data"]

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
#: chains drawn from one posterior by default: two, so that ``az.summary`` computes R-hat
DEFAULT_CHAINS = 2

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


def _stored_entries(first: Posterior, var_names: Sequence[str], max_weights: int | None
                    ) -> tuple[dict, dict, dict]:
    """Which entries of each parameter to store, and their dims and coordinates."""
    index: dict[str, list[np.ndarray]] = {}
    dims: dict[str, list[str]] = {}
    coords: dict[str, np.ndarray] = {}
    for name in var_names:
        layer, _, param = name.rpartition(".")
        weight = f"{layer}.weight" if layer else "weight"
        if param in ("weight", "bias") and weight in first.loc:  # a bias follows its weight
            index[name] = weight_subset(first.loc[weight].shape, max_weights)
            index[name] = index[name][:1] if param == "bias" else index[name]
        else:
            index[name] = weight_subset(first.loc[name].shape, max_weights)
        info = first.layers.get(layer)
        dims[name] = parameter_dims(name, info.kind if info else "", first.loc[name].shape)
        coords.update(zip(dims[name], index[name], strict=True))
    return index, dims, coords


def _chain(fit: Posterior, x: torch.Tensor, y: torch.Tensor, index: dict, num_samples: int,
           gens: tuple[torch.Generator, torch.Generator], batch_size: int, bar: tqdm) -> tuple:
    """One chain: ``num_samples`` draws of the stored weights, their log-likelihood of every
    observation and one replicate of each."""
    gen, rep_gen = gens
    net = copy.deepcopy(fit.module).eval()  # the caller's module keeps its mode
    draws = {name: [] for name in index}
    log_lik, y_rep = [], []
    for _ in range(num_samples):
        weights = fit.draw(gen)
        f = _forward(net, weights, x, batch_size)
        log_lik.append(_log_lik(f, y, fit.likelihood))
        y_rep.append(_replicate(f, y, fit.likelihood, rep_gen))
        for name, where in index.items():
            draws[name].append(weights[name][np.ix_(*where)])
        bar.update()
    return ({k: torch.stack(v) for k, v in draws.items()}, torch.stack(log_lik),
            torch.stack(y_rep))


def _sample_stats(fits: list[Posterior]) -> xr.Dataset | None:
    """Each chain's fit history (:attr:`Posterior.history`: ``elbo``, ``objective``, ``nll``,
    ``kl``, ``kl_weight``, ``seconds``) with dims ``(chain, epoch)``; NaN past a shorter fit's
    end. SVI's record is per epoch of optimisation, not per draw, so it has its own dimension
    ``epoch`` rather than ArviZ's ``draw``. ``None`` when no fit has a history."""
    longest = max(fits, key=lambda f: len(f.history)).history
    if not longest:
        return None
    keys = [k for k, v in longest[0].items()
            if k != "epoch" and isinstance(v, (int, float)) and not isinstance(v, bool)]
    values = np.full((len(keys), len(fits), len(longest)), np.nan)
    for c, fit in enumerate(fits):
        for e, entry in enumerate(fit.history):
            values[:, c, e] = [float(entry.get(k, np.nan)) for k in keys]
    epochs = [int(entry.get("epoch", e + 1)) for e, entry in enumerate(longest)]
    return xr.Dataset({k: (("chain", "epoch"), values[i]) for i, k in enumerate(keys)},
                      coords={"chain": np.arange(len(fits)), "epoch": epochs})


def _chains(posterior: Posterior | Sequence[Posterior], chains: int | None) -> list[Posterior]:
    fits = _posteriors(posterior)
    if len(fits) > 1:
        if chains is not None and chains != len(fits):
            raise ValueError(f"chains: {len(fits)} posteriors are {len(fits)} chains, "
                             f"got chains={chains!r}")
        return fits
    return fits * _positive_int("chains", DEFAULT_CHAINS if chains is None else chains)


def _var_names(first: Posterior, var_names: Sequence[str] | None) -> list[str]:
    if var_names is None:
        return first.names
    if isinstance(var_names, str) or not var_names or not set(var_names) <= set(first.names):
        raise ValueError(f"var_names: expected a non-empty list of random parameters, some of "
                         f"{', '.join(first.names)}; got {var_names!r}")
    return list(var_names)


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
    split: str = "train",
    progress: bool = True,
) -> az.InferenceData:
    """Draws from a fitted posterior, and what the network does with them, as ArviZ data.

    For chain ``c`` and draw ``s``, ``w_cs ~ q_c(w) = prod_i N(mu_ci, sigma_ci^2)``; on each
    observation ``(x_n, y_n)`` of ``data`` the network computes ``f(x_n; w_cs)`` and

    - ``posterior``: the drawn weights, one variable per random parameter (``"0.weight"``),
      with named dims (:func:`parameter_dims`: ``out_channel, in_channel, kh, kw`` for a
      convolution, ``out_feature, in_feature`` for a Linear, prefixed by the layer) and
      coordinates (the weight's indices);
    - ``log_likelihood``: ``y``, ``log p(y_n | x_n, w_cs)`` per observation (categorical:
      ``log softmax(f)_{y_n}``; Normal: the log density summed over the observation's
      outputs), for :func:`psis_loo` / ``az.loo`` when ``data`` is the training data;
    - ``posterior_predictive``: ``y``, one replicate ``y_rep ~ p(y | x_n, w_cs)`` per draw;
    - ``observed_data``: ``y``; ``constant_data``: the inputs ``x`` when they fit
      (``store_inputs``; by default when they have at most 2^20 entries);
    - ``sample_stats``: each chain's SVI history per ``epoch`` (``elbo``, ``nll``, ``kl``,
      ...; :attr:`Posterior.history`), when the fit recorded one.

    Every group carries ``inference_library`` ("pyro") and its version.

    PSIS-LOO (Vehtari, Gelman & Gabry 2017, "Practical Bayesian model evaluation using
    leave-one-out cross-validation and WAIC", Stat. Comput. 27) estimates, from the
    log-likelihood of data the posterior *was* fitted on, the density of each observation
    under a posterior fitted without it. It is valid on the training data only: on held-out
    data the posterior never saw the observations, importance sampling has nothing to
    correct, and the exact held-out density is simpler and better
    (:func:`compare_networks`). ``split`` records which the data are; :func:`psis_loo`
    refuses ``"test"``.

    Parameters
    ----------
    posterior : one :class:`~pqnet.Posterior`, or a list of independent fits of the same
        network (e.g. from different seeds), each one chain. Draws from a single ``q`` are
        independent, so R-hat and ESS then only measure Monte Carlo noise; across fits they
        measure whether SVI finds the same posterior. Weights of hidden units are not
        identifiable across fits (permuting units gives the same network), so expect a large
        R-hat on weights of independent fits; the per-observation log-likelihood and the
        predictive are identifiable, and their R-hat is the one to read.
    data : the observations, a dataset of ``(x, y)`` the network takes.
    num_samples : draws per chain.
    chains : chains of a single posterior (default :data:`DEFAULT_CHAINS`, 2, so that
        ``az.summary`` can compute R-hat); for a list, its length (default).
    seed : seeds the weight draws and the replicates; the same seed gives the same data.
    var_names : random parameters to store in ``posterior`` (default all); the
        log-likelihood always uses the whole network.
    max_weights_per_layer : store at most this many entries of each weight, evenly spaced
        along its input axes first (:func:`weight_subset`; the bias keeps the entries of
        the weight's output units), to keep files of big networks small; coordinates keep
        the original indices.
    store_inputs : whether to put ``x`` in ``constant_data``.
    batch_size : observations per forward pass.
    split : ``"train"`` (the data the posterior was fitted on) or ``"test"`` (held out).
    progress : a progress bar over the draws (tqdm), shown only when stderr is a terminal.

    Returns
    -------
    az.InferenceData
        Written with ``idata.to_netcdf(path)`` and read back with ``az.from_netcdf(path)``.
        Its cost is ``chains * num_samples`` forward passes over ``data``.

    Examples
    --------
    >>> idata = pqnet.to_inference_data(posterior, train, num_samples=100)  # doctest: +SKIP
    >>> az.summary(idata, var_names=["8.bias"])                            # doctest: +SKIP
    >>> loo = psis_loo(idata)            # az.loo with its Pareto k checked  # doctest: +SKIP
    >>> compare_networks({"BNN": posterior, "mean": posterior.mean_module()}, test)  # +SKIP
    """
    fits = _chains(posterior, chains)
    first = fits[0]
    num_samples = _positive_int("num_samples", num_samples)
    batch_size = _positive_int("batch_size", batch_size)
    split = _one_of("split", split, ("train", "test"))
    progress = _flag("progress", progress)
    var_names = _var_names(first, var_names)
    if max_weights_per_layer is not None:
        max_weights_per_layer = _positive_int("max_weights_per_layer", max_weights_per_layer)
    kind = first.likelihood["kind"]
    check_dataset(first.module, data, "data", kind)
    x, y = _tensors(data)
    store_inputs = x.numel() <= MAX_CONSTANT_ENTRIES if store_inputs is None else store_inputs
    index, dims, coords = _stored_entries(first, var_names, max_weights_per_layer)

    gens = (torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1))
    # disable=None: no bar when stderr is not a terminal (logs, CI), as in pqnet.fit
    with tqdm(total=len(fits) * num_samples, unit="draw", desc="to_inference_data",
              disable=None if progress else True) as bar:
        chain_data = [_chain(fit, x, y, index, num_samples, gens, batch_size, bar)
                      for fit in fits]
    draws, log_lik, y_rep = zip(*chain_data, strict=True)
    groups = {
        "posterior": {k: torch.stack([d[k] for d in draws]).numpy() for k in var_names},
        "log_likelihood": {"y": torch.stack(log_lik).numpy()},
        "posterior_predictive": {"y": torch.stack(y_rep).numpy()},
        "observed_data": {"y": y.numpy()},
    }
    dims = {**dims, "y": ["obs"] + [f"y_dim_{i}" for i in range(y.dim() - 1)]}
    if store_inputs:
        groups["constant_data"] = {"x": x.numpy()}
        dims["x"] = ["obs", *INPUT_DIMS.get(x.dim() - 1, [f"x_dim_{i}"
                                                         for i in range(x.dim() - 1)])]
    fits_note = "independent fits, one per chain" if len(set(map(id, fits))) > 1 else \
        "one fit; chains are independent draws from the same q"
    attrs = {"inference_library": "pyro", "inference_library_version": pyro.__version__,
             "pqnet_version": __version__,
             "inference_method": "SVI, mean-field Normal guide; draws from q(w)",
             "chains_are": fits_note, "likelihood": kind, "seed": seed, "split": split,
             "stored_weights": "all" if max_weights_per_layer is None else
             f"at most {max_weights_per_layer} per layer, evenly spaced"}
    idata = az.from_dict(**groups, coords={**coords, "obs": np.arange(len(y))}, dims=dims)
    stats = _sample_stats(fits)
    if stats is not None:
        idata.add_groups(sample_stats=stats.assign_attrs(
            sample_stats_are="the SVI fit's history per epoch, not per draw"))
    for group in idata.groups():  # from_dict's attrs= reaches only some groups
        idata[group].attrs.update(attrs)
    return idata


def psis_loo(idata: az.InferenceData, *, warn: bool = True) -> az.ELPDData:
    """PSIS-LOO of the training data (Vehtari, Gelman & Gabry 2017): ``az.loo(idata,
    pointwise=True)`` with the draws' relative efficiency ``r_eff = 1`` (draws from ``q`` are
    independent) and its Pareto ``k`` checked.

    .. math:: \\widehat{\\mathrm{elpd}}_\\mathrm{loo} = \\sum_n \\log
        \\frac{\\sum_s w_n^s\\, p(y_n \\mid w^s)}{\\sum_s w_n^s}, \\qquad
        w_n^s \\propto 1 / p(y_n \\mid w^s) \\text{ Pareto-smoothed.}

    Where the estimated tail shape ``k_n`` of an observation's weights exceeds ArviZ's
    threshold ``good_k = min(1 - 1/log10 S, 0.7)`` (``S`` draws in all; Vehtari et al. 2024,
    "Pareto smoothed importance sampling", JMLR 25), its estimate is unreliable. Returns the
    ``ELPDData`` with ``pareto_k``; ArviZ's own generic warning is replaced by a
    :class:`~pqnet.diagnostics.analysis.DiagnosticWarning` that counts the bad points (with
    ``warn``). Refuses an InferenceData made from held-out data (``split="test"``).
    """
    if not isinstance(idata, az.InferenceData) or "log_likelihood" not in idata.groups():
        raise TypeError("idata: expected an InferenceData with a log_likelihood group "
                        "(pqnet.to_inference_data)")
    if idata.log_likelihood.attrs.get("split") == "test":
        raise ValueError("idata: its log-likelihood is of held-out data, where PSIS-LOO does "
                         "not apply; score held-out data exactly with compare_networks")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Estimated shape parameter of Pareto")
        loo = az.loo(idata, pointwise=True, reff=1.0)
    bad = int((loo.pareto_k.values > loo.good_k).sum())
    if warn and bad:
        warnings.warn(f"PSIS-LOO: {bad} of {loo.n_data_points} observations "
                      f"({100 * bad / loo.n_data_points:.1f} %) have Pareto k > "
                      f"{loo.good_k:.2f}, so their LOO estimates are unreliable: leaving one of "
                      "them out changes the posterior more than importance sampling can "
                      "follow (more draws raise the threshold toward 0.7)",
                      DiagnosticWarning, stacklevel=2)
    return loo


def pareto_k_table(loo: az.ELPDData) -> list[dict]:
    """The Pareto ``k`` of :func:`psis_loo` in ranges, with counts and shares: ``good``
    (``k <= good_k``), ``bad`` (``good_k < k <= 1``) and ``very bad`` (``k > 1``), as
    ``loo`` (R) and ``az.loo`` report them."""
    k, good = loo.pareto_k.values, float(loo.good_k)
    ranges = [(f"(-inf, {good:.2f}] good", k <= good),
              (f"({good:.2f}, 1] bad", (k > good) & (k <= 1)), ("(1, inf) very bad", k > 1)]
    return [{"pareto_k": label, "count": int(m.sum()), "share": float(m.mean())}
            for label, m in ranges]


# --------------------------------------------------------------------------- held-out comparison


def _as_model(model: Network, argument: str) -> Posterior | nn.Module:
    if isinstance(model, QuantizedNet):
        return model.to_module()
    if isinstance(model, (Posterior, nn.Module)):
        return model
    raise TypeError(f"{argument}: expected a pqnet Posterior, QuantizedNet or torch.nn.Module, "
                    f"got {type(model).__name__}")


@torch.no_grad()
def held_out_log_density(model: Network, data: Dataset, *, num_samples: int = 32,
                         seed: int = 0, batch_size: int = 1000) -> np.ndarray:
    """The log predictive density of ``model`` on each observation of held-out ``data``
    (float64, shape ``(N,)``):

    .. math::

        \\ell_n = \\log p(y_n \\mid x_n, \\mathcal D) = \\log \\frac1S \\sum_{s=1}^S
            p(y_n \\mid x_n, w_s), \\quad w_s \\sim q, \\qquad
        \\ell_n = \\log p(y_n \\mid x_n, \\hat w) \\text{ for a deterministic net.}

    A deterministic network (the posterior mean, a :class:`QuantizedNet`, any ``nn.Module``)
    is scored by its one setting of the weights, a BNN by the log of its mean density over
    ``num_samples`` draws. A plain network is scored as a classifier (categorical
    likelihood); a Posterior by its own.
    """
    num_samples = _positive_int("num_samples", num_samples)
    batch_size = _positive_int("batch_size", batch_size)
    model = _as_model(model, "model")
    likelihood = model.likelihood if isinstance(model, Posterior) else {"kind": "categorical"}
    module = model.module if isinstance(model, Posterior) else model
    check_dataset(module, data, "data", likelihood["kind"])
    x, y = _tensors(data)
    module = copy.deepcopy(module).eval()  # the caller's module keeps its mode
    if not isinstance(model, Posterior):
        return _log_lik(_forward(module, {}, x, batch_size), y, likelihood).numpy()
    gen = torch.Generator().manual_seed(seed)
    draws = [_log_lik(_forward(module, model.draw(gen), x, batch_size), y, likelihood)
             for _ in range(num_samples)]
    return (torch.logsumexp(torch.stack(draws), 0) - math.log(num_samples)).numpy()


def compare_networks(models: Mapping[str, Network], data: Dataset, *, num_samples: int = 32,
                     seed: int = 0) -> pd.DataFrame:
    """Rank networks by their exact held-out log predictive density on the same observations.

    ``models`` maps a name to a :class:`~pqnet.Posterior` (scored by its posterior predictive
    with ``num_samples`` draws), a :class:`~pqnet.quantize.QuantizedNet` or a plain network,
    so one table holds the full BNN, its mean network and its quantized versions. Columns:

    - ``elpd_test``: ``sum_n l_n`` (:func:`held_out_log_density`), higher is better, and its
      ``se``, ``sqrt(N Var_n l_n)``;
    - ``elpd_diff`` / ``dse``: the difference to the best and its standard error from the
      paired pointwise differences (Vehtari, Gelman & Gabry 2017, eq. 24);
    - ``nll``: ``-mean_n l_n``; ``n``: the number of observations.

    This is not LOO and is not labelled so: nothing is left out or importance-sampled, the
    observations were simply never seen (use :func:`psis_loo` for the training data).
    """
    if not isinstance(models, Mapping) or len(models) < 2:
        raise ValueError("models: expected a mapping of at least two names to networks")
    lpd = {name: held_out_log_density(m, data, num_samples=num_samples, seed=seed)
           for name, m in models.items()}
    best = max(lpd, key=lambda name: lpd[name].sum())
    rows = []
    for name, values in lpd.items():
        n, diff = len(values), lpd[best] - values
        rows.append({"network": name, "elpd_test": float(values.sum()),
                     "se": float(np.sqrt(n * values.var())), "elpd_diff": float(diff.sum()),
                     "dse": float(np.sqrt(n * diff.var())), "nll": float(-values.mean()),
                     "n": n})
    table = pd.DataFrame(rows).set_index("network").sort_values("elpd_test", ascending=False)
    table.insert(0, "rank", np.arange(len(table)))
    return table
