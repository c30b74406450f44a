"""BNN → Posterior: SVI fitting (resumable, data-parallel), the Posterior, the posterior
predictive, and the checkpoint helpers (:mod:`pqnet.inference.checkpoint`)."""

from . import checkpoint
from .batching import batches
from .distributed import init_distributed
from .fit import DivergenceError, fit
from .posterior import Posterior
from .predictive import evaluate, predict

__all__ = ["DivergenceError", "Posterior", "batches", "checkpoint", "evaluate", "fit",
           "init_distributed", "predict"]
