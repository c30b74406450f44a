"""Module → Bayesian: priors, the mean-field Normal guide, local reparameterisation."""

from .convert import BNN, LayerInfo, bayesian
from .guide import MeanFieldNormalGuide, initial_scale, pwfn_scale
from .layers import LocalReparameterization
from .likelihoods import Categorical, Gaussian
from .priors import FanInPrior, NormalPrior, PWFNPrior

__all__ = [
    "BNN", "LayerInfo", "bayesian", "MeanFieldNormalGuide", "initial_scale", "pwfn_scale",
    "LocalReparameterization", "Categorical", "Gaussian", "FanInPrior", "NormalPrior",
    "PWFNPrior",
]
