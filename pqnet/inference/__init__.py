"""BNN → Posterior: SVI fitting, the Posterior, and the posterior predictive."""

from .fit import batches, fit
from .posterior import Posterior
from .predictive import evaluate, predict

__all__ = ["Posterior", "batches", "evaluate", "fit", "predict"]
