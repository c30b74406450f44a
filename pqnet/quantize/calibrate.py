"""Temperature scaling of a quantized classifier, folded into its output layer.

Scaling a classifier's logits ``z`` by an inverse temperature ``b`` keeps every prediction
and changes only the confidence; the ``b`` that minimises the negative log-likelihood of
held-out data calibrates the network (Guo et al. 2017, "On Calibration of Modern Neural
Networks", Sec. 4.2). Quantization moves the logits' scale: a 1-bit grid makes a network
underconfident, a 2-bit one overconfident, which is what this undoes.

When the logits are the output of the last quantized layer, ``z = W h + c``, then
``b z = (b W) h + b c``: multiplying that layer's codebooks (or grid scales) and its bias by
``b`` folds the temperature into the network. The codes do not change and the file stores
one set of scaled values for the other, so calibration costs no bytes.

The NLL ``L(b) = mean_n [logsumexp(b z_n) - b z_{n, y_n}]`` is convex in ``b``, with
``L'(b) = mean_n [E_{softmax(b z_n)}[z] - z_{n, y_n}]`` increasing, so its minimiser is
found by bisection on ``log b``.
"""

from __future__ import annotations

import copy
import math

import torch
from torch.utils.data import Dataset

from ..inference.batching import batches, check_dataset
from .qnet import QuantizedLayer, QuantizedNet

LOG_RANGE = 7.0  # b in [e^-7, e^7]: temperatures from 1e-3 to 1e3
STEPS = 60  # bisection steps on log b: the range shrinks 2^60-fold


def inverse_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The ``b`` in ``[e^-7, e^7]`` minimising the mean NLL of ``softmax(b * logits)``."""
    z = logits.double()
    picked = z.gather(1, labels.reshape(-1, 1)).squeeze(1)
    lo, hi = -LOG_RANGE, LOG_RANGE
    for _ in range(STEPS):
        mid = (lo + hi) / 2
        slope = ((math.exp(mid) * z).softmax(1) * z).sum(1) - picked
        lo, hi = (lo, mid) if float(slope.mean()) > 0 else (mid, hi)
    return math.exp((lo + hi) / 2)


def _scaled(layer: QuantizedLayer, b: float) -> QuantizedLayer:
    """``layer`` with every codebook value (or grid scale) times ``b``, the same codes."""
    if layer.scales is not None:
        return QuantizedLayer.from_grid(layer.codes, layer.bits,
                                        {w: s * b for w, s in layer.scales.items()})
    return QuantizedLayer(layer.codes, layer.bits, {w: v * b for w, v in layer.codebooks.items()})


def _logits(module: torch.nn.Module, data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    module.eval()
    with torch.no_grad():
        pairs = [(module(x), y) for x, y in batches(data, 1000, shuffle=False)]
    return torch.cat([z for z, _ in pairs]), torch.cat([y for _, y in pairs])


def calibrate(qnet: QuantizedNet, data: Dataset) -> QuantizedNet:
    """``qnet`` with the temperature that minimises its NLL on ``data`` (held-out labelled
    examples) folded into its last quantized layer; ``config["calibration"]`` records the
    temperature ``1 / b`` and the number of examples.

    Raises a ``ValueError`` naming ``qnet`` when its logits are not that layer's output (a
    layer or function after it), where a temperature cannot be folded in.
    """
    check_dataset(qnet.module, data, "data")
    logits, labels = _logits(qnet.to_module(), data)
    if logits.dim() != 2 or labels.dtype != torch.long:
        raise ValueError("qnet: calibration is for classifiers (logits of shape (N, classes) "
                         "and class labels)")
    b = inverse_temperature(logits, labels)
    last = [path for path, _ in qnet.module.named_modules() if path in qnet.layers][-1]
    module = copy.deepcopy(qnet.module)
    bias = getattr(module.get_submodule(last), "bias", None)
    if bias is not None:
        with torch.no_grad():
            bias.mul_(b)
    layers = {**qnet.layers, last: _scaled(qnet.layers[last], b)}
    config = {**qnet.config, "calibration": {"temperature": 1 / b, "examples": len(labels)}}
    calibrated = QuantizedNet(layers, module, qnet.method, config)
    if not torch.allclose(_logits(calibrated.to_module(), data)[0], b * logits,
                          rtol=1e-4, atol=1e-5):
        raise ValueError(f"qnet: its logits are not the output of its last quantized layer "
                         f"{last!r}, so a temperature cannot be folded into it")
    return calibrated
