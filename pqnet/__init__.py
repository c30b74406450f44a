"""pqnet: quantize neural networks by their Bayesian weight uncertainty.

The data flow: ``nn.Module`` --:func:`bayesian`--> ``BNN`` --:func:`fit`--> ``Posterior``
--> quantized network --> diagnostics.
"""

import logging

__version__ = "0.1.0"

# the library logs (one line per epoch of fit, ...) to the "pqnet" logger and leaves where
# it goes to the application: the CLI shows INFO on stderr; logging.basicConfig(level=
# logging.INFO) does the same in a notebook
logging.getLogger(__name__).addHandler(logging.NullHandler())

from . import data, models  # noqa: E402
from .bnn import BNN, bayesian  # noqa: E402
from .inference import Posterior, evaluate, fit, predict  # noqa: E402
from .quantize import QuantizedNet, quantize  # noqa: E402

__all__ = ["BNN", "Posterior", "QuantizedNet", "bayesian", "data", "evaluate", "fit", "models",
           "predict", "quantize", "to_inference_data"]


def __getattr__(name: str):
    # to_inference_data imports ArviZ (a second or so): loaded on first use
    if name == "to_inference_data":
        from .diagnostics.arviz import to_inference_data

        return to_inference_data
    if name == "search":  # the bit-width search subpackage imports BoTorch: loaded on first use
        import importlib

        return importlib.import_module(".search", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
