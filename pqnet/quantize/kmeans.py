"""k-means weight sharing of the posterior means (Deep Compression): the second baseline."""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning
from torch.utils.data import Dataset

from .. import _checks
from ..inference.posterior import Posterior
from .budget import layer_posteriors, one_of
from .grids import MAX_BITS, nearest_level
from .qnet import QuantizedLayer, QuantizedNet

INITS = ("linear", "k-means++")


def kmeans(posterior: Posterior, *, data: Dataset | None = None, seed: int = 0,
           k: int | None = None, avg_bits: float | None = None,
           init: str = "linear") -> QuantizedNet:
    """Share weights within each layer: the ``k`` centres of 1-d k-means on its means.

    Han, Mao & Dally 2016, "Deep Compression", Sec. 3: minimise
    ``sum_j sum_{mu_i in C_j} |mu_i - c_j|^2`` over ``k`` clusters per layer and replace every
    weight by its centre; codes take ``ceil(log2 k)`` bits. Centres start evenly spaced over
    ``[min mu, max mu]`` (``init="linear"``, the paper's best) or by k-means++ seeded with
    ``seed``; one run (``n_init=1``). A layer with at most ``k`` distinct means gets one
    centre per distinct value, exactly (and the fewer bits that need).

    Parameters
    ----------
    posterior : the fitted posterior; only its means are used.
    data : unused (data-free); kept for the common quantizer signature.
    seed : the k-means random state.
    k : clusters per layer, ``2..256``. Or ``avg_bits``: a budget,
        ``k = 2^min(8, floor(avg_bits))``.
    init : ``"linear"`` or ``"k-means++"``.
    """
    seed = _checks.seed(seed)
    if one_of(k=k, avg_bits=avg_bits) == "k":
        k = _checks.int_in("k", k, 2, 2 ** MAX_BITS)
    else:
        k = 2 ** min(MAX_BITS, math.floor(_checks.avg_bits("avg_bits", avg_bits)))
    if init not in INITS:
        raise ValueError(f"init: expected one of {', '.join(INITS)}, got {init!r}")
    layers = {layer: _cluster(mu, k, init, seed) for layer, mu, _ in layer_posteriors(posterior)}
    return QuantizedNet(layers, posterior.module, "kmeans",
                        {"k": k, "avg_bits": avg_bits, "init": init, "seed": seed})


def _cluster(mu: torch.Tensor, k: int, init: str, seed: int) -> QuantizedLayer:
    x = mu.reshape(-1, 1).double().numpy()
    distinct = np.unique(x)
    if len(distinct) <= k:  # every value its own centre, exactly (Lloyd's means round)
        centres = distinct
    else:
        start = np.linspace(x.min(), x.max(), k)[:, None] if init == "linear" else init
        with warnings.catch_warnings():  # near-duplicate means may leave a cluster empty
            warnings.simplefilter("ignore", ConvergenceWarning)
            fitted = KMeans(k, init=start, n_init=1, random_state=seed).fit(x)
        centres = np.sort(fitted.cluster_centers_[:, 0])
    levels = torch.from_numpy(centres).float()
    bits = max(1, math.ceil(math.log2(len(levels))))
    codes = nearest_level(mu, levels)
    return QuantizedLayer(codes, torch.full(mu.shape, bits, dtype=torch.uint8),
                          {bits: levels.reshape(1, -1)})
