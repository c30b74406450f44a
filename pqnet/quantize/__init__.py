"""Quantizers behind one interface: ``quantize(posterior, method, **budget) -> QuantizedNet``.

Every method is one function in its own module with the signature
``method(posterior, *, data=None, seed=0, <budget keywords>) -> QuantizedNet`` and is listed
in :data:`METHODS`; adding a method is one line there.

========================= =============================================== ====================
method                    rule                                            budget keywords
========================= =============================================== ====================
``uniform``               same width everywhere, symmetric min-max grid   ``bits`` | ``avg_bits``
``kmeans``                k-means weight sharing (Han et al. 2016)        ``k`` | ``avg_bits``
``bayesian-compression``  per-layer width from the posterior variance     ``avg_bits``
                          (Louizos et al. 2017)
``sigma-bits``            per-weight width: rounding error <= k sigma     ``k`` | ``avg_bits``
``quantile-inform``       per-layer width: a quantile of the per-weight   ``avg_bits`` | ``k``
                          needs (ICLR 2025 submission)
``random-bits``           per-layer width: a random variable fitted by    ``avg_bits`` + data
                          SVI on the quantized likelihood (same source)
``pwfn``                  rounds of fixing weights to power-of-two        ``schedule``,
                          centres by distance in posterior sds,           ``max_order`` + data
                          retraining between rounds (Subia-Waud &         (no bit budget: it
                          Dasmahapatra 2023)                              counts values)
``sigma-code``            per-weight code length: the shortest code       ``k`` | ``code_bits``
                          within k sigma, entropy-constrained
``deep-compression``      magnitude pruning with retraining, per-layer    ``sparsity``, ``k``
                          k-means, centroid fine-tuning (Han et al. 2016) + data
========================= =============================================== ====================

Every method but the two that retrain their own weights (``pwfn``, ``deep-compression``)
also takes ``prune=c``: the weights whose central ``c`` credible interval holds 0 are then
zeroed at width 0; or ``prune_fraction=f``: the fraction ``f`` of the weights with the
smallest posterior means are (:mod:`pqnet.quantize.prune`).

Note that ``pqnet.quantize`` is the function :func:`quantize`; import the rest from this
package, e.g. ``from pqnet.quantize import METHODS, QuantizedNet``.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Callable

from torch.utils.data import Dataset

from .. import _checks
from ..inference.posterior import Posterior
from .bayesian_compression import bayesian_compression
from .deep_compression import deep_compression
from .finetune import finetune
from .kmeans import kmeans
from .prune import bayesian_prune, magnitude_prune
from .pwfn import pwfn
from .qnet import QuantizedLayer, QuantizedNet, weight_name
from .quantile_inform import quantile_inform
from .random_bits import random_bits
from .sigma_bits import sigma_bits
from .sigma_code import sigma_code
from .uniform import uniform

__all__ = ["METHODS", "QuantizedLayer", "QuantizedNet", "bayesian_compression",
           "bayesian_prune", "budget_keywords", "deep_compression", "finetune", "kmeans",
           "magnitude_prune", "pwfn", "quantile_inform", "quantize", "random_bits",
           "sigma_bits", "sigma_code", "uniform", "weight_name"]

Quantizer = Callable[..., QuantizedNet]
RETRAINED = ("deep-compression", "pwfn")  # methods that train their own weights
UNUSED_BITS = 0.25  # a budget left unused by more than this many bits per weight is said

log = logging.getLogger(__name__)

METHODS: dict[str, Quantizer] = {
    "uniform": uniform,
    "kmeans": kmeans,
    "bayesian-compression": bayesian_compression,
    "sigma-bits": sigma_bits,
    "quantile-inform": quantile_inform,
    "random-bits": random_bits,
    "pwfn": pwfn,
    "sigma-code": sigma_code,
    "deep-compression": deep_compression,
}


def budget_keywords(method: str) -> list[str]:
    """The keywords ``method`` takes besides ``posterior``, ``data`` and ``seed``."""
    params = inspect.signature(METHODS[method]).parameters.values()
    return [p.name for p in params
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ("data", "seed")]


def quantize(posterior: Posterior, method: str, data: Dataset | None = None, seed: int = 0,
             prune: float = 0.0, prune_fraction: float = 0.0, finetune_epochs: int = 0,
             finetune_lr: float = 1e-3, **budget) -> QuantizedNet:
    """Quantize ``posterior`` with ``method`` (a name in :data:`METHODS`) at ``budget``.

    ``budget`` holds the method's own keywords (``bits=4``, ``avg_bits=3.0``, ``k=16``, ...);
    see the table in :mod:`pqnet.quantize` and each method's docstring for its exact rule
    and paper. ``data`` is passed to methods that use data; ``seed`` to every method. With
    ``prune = c`` in ``(0, 1)`` the weights whose central ``c`` credible interval holds zero
    are then set to 0 (:func:`~pqnet.quantize.prune.bayesian_prune`); with
    ``prune_fraction = f`` the fraction ``f`` of the weights with the smallest ``|mu|``
    (:func:`~pqnet.quantize.prune.magnitude_prune`). With
    ``finetune_epochs > 0`` the posterior means are then retrained on ``data`` under the
    quantized forward pass, widths and codebooks fixed (:func:`~pqnet.quantize.finetune.
    finetune`, straight-through, posterior noise kept).

    Examples
    --------
    >>> qnet = pqnet.quantize(posterior, "quantile-inform", avg_bits=3.0)  # doctest: +SKIP
    >>> qnet.avg_bits <= 3.0, qnet.size_bytes, pqnet.evaluate(qnet.to_module(), test)
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method: unknown quantizer {method!r}; expected one of "
                         f"{', '.join(METHODS)}")
    accepted = budget_keywords(method)
    for name in budget:
        if name not in accepted:
            raise ValueError(f"{name}: not a keyword of method {method!r}, which takes "
                             f"{', '.join(accepted)}")
    finetune_epochs = _checks.int_in("finetune_epochs", finetune_epochs, 0, 10_000)
    finetune_lr = _checks.nonnegative_float("finetune_lr", finetune_lr)
    prune = _checks.fraction("prune", prune, closed_below=True)
    prune_fraction = _checks.fraction("prune_fraction", prune_fraction, closed_below=True)
    if prune and prune_fraction:
        raise ValueError("prune, prune_fraction: give one pruning rule, a credible level or a "
                         f"fraction, not both (got {prune} and {prune_fraction})")
    after = {"prune": prune, "prune_fraction": prune_fraction, "finetune_epochs": finetune_epochs}
    for name, value in after.items():
        if value and method in RETRAINED:
            raise ValueError(f"{name}: {method} retrains its own network (see its options), "
                             "so the posterior no longer describes its weights")
    qnet = METHODS[method](posterior, data=data, seed=seed, **budget)
    _say_unused(qnet, budget)
    if prune > 0:
        qnet = bayesian_prune(qnet, posterior, prune)
    if prune_fraction > 0:
        qnet = magnitude_prune(qnet, posterior, prune_fraction)
    if prune > 0 or prune_fraction > 0:
        log.info("pruned %.1f %% of the weights", 100 * qnet.config["prune"]["fraction"])
    if finetune_epochs > 0:
        qnet = finetune(qnet, posterior, data, epochs=finetune_epochs, lr=finetune_lr,
                        seed=seed)
    log.info("%s: %d bytes, %.3f bits per weight (fixed-width codes %.3f bits)", method,
             qnet.size_bytes, qnet.bits_per_weight, qnet.avg_bits)
    return qnet


def _say_unused(qnet: QuantizedNet, budget: dict) -> None:
    """Warn when the method left more than :data:`UNUSED_BITS` of an ``avg_bits`` budget."""
    asked = budget.get("avg_bits")
    if asked is not None and qnet.avg_bits < asked - UNUSED_BITS:
        warnings.warn(f"avg_bits: {qnet.method} uses {qnet.avg_bits:.3f} of the {asked:g} bits "
                      "asked (its widths are whole bits, per layer or network)", stacklevel=3)
