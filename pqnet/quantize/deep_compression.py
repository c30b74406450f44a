"""Deep Compression (Han, Mao & Dally 2016): the weight-sharing baseline most users would pick.

The three stages of the paper on the posterior's mean network, a plain deterministic net:

1. **Iterative magnitude pruning with retraining** (Sec. 2): over ``rounds`` rounds, the
   smallest ``sparsity * r / rounds`` of all quantized weights by magnitude are zeroed (one
   threshold for the network, so the large layers of small weights lose most, as the paper's
   per-layer thresholds do: its LeNet-5 keeps 66 % of conv1 and 8 % of fc1), and the net is
   retrained for ``retrain_epochs`` with the zeros held;
2. **Weight sharing** (Sec. 3): 1-d k-means with linear initialisation on each layer's
   surviving weights, ``k`` centres;
3. **Centroid fine-tuning** (Sec. 3.3): the centres (and the float rest) are trained for
   ``centre_epochs``, each centre's gradient the sum of its weights' gradients.

The fourth stage, Huffman coding, is the file's entropy coder (:mod:`pqnet.quantize.codec`,
within a few bytes of the entropy; Huffman is above it). Pruned weights are width 0.
Training is Adam at ``lr`` on the cross-entropy, minibatches drawn as :func:`pqnet.fit`
draws them from ``seed``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.utils.data import Dataset

from .. import _checks
from ..inference.batching import batches, check_dataset
from ..inference.plain import train_plain
from ..inference.posterior import Posterior
from .kmeans import _cluster
from .prune import keep_largest
from .qnet import QuantizedLayer, QuantizedNet, weight_name


def deep_compression(posterior: Posterior, *, data: Dataset | None = None, seed: int = 0,
                     sparsity: float = 0.8, k: int = 16, rounds: int = 3,
                     retrain_epochs: int = 1, centre_epochs: int = 1, lr: float = 1e-3,
                     batch_size: int = 128) -> QuantizedNet:
    """Prune, share and fine-tune the posterior's mean network (see the module).

    Parameters
    ----------
    posterior : its mean network is the trained start; the sds are not used.
    data : the training data (required: every stage retrains).
    sparsity : the fraction of all quantized weights pruned at the end, ``[0, 1)``.
    k : k-means centres per layer for the surviving weights, ``2..256``.
    rounds, retrain_epochs, centre_epochs, lr, batch_size : the training schedule.
    """
    seed = _checks.seed(seed)
    sparsity = _checks.fraction("sparsity", sparsity, closed_below=True)
    k = _checks.int_in("k", k, 2, 256)
    rounds = _checks.positive_int("rounds", rounds)
    retrain_epochs = _checks.nonnegative_int("retrain_epochs", retrain_epochs)
    centre_epochs = _checks.nonnegative_int("centre_epochs", centre_epochs)
    lr, batch_size = _checks.positive_float("lr", lr), _checks.positive_int("batch_size",
                                                                           batch_size)
    if data is None:
        raise ValueError("data: deep-compression retrains the network; pass the training data")
    check_dataset(posterior.module, data, "data")
    net, paths = posterior.mean_module(), list(posterior.layers)
    gen = torch.Generator().manual_seed(seed)
    masks = {}
    for r in range(1, rounds + 1):
        masks = keep_largest({p: _weight(net, p) for p in paths}, 1 - sparsity * r / rounds)
        _retrain(net, data, masks, retrain_epochs, lr, batch_size, gen)
    shared = {p: _share(_weight(net, p), masks[p], k, seed) for p in paths}
    shared = _finetune_centres(net, data, shared, centre_epochs, lr, batch_size, gen)
    config = {"sparsity": sparsity, "k": k, "rounds": rounds, "retrain_epochs": retrain_epochs,
              "centre_epochs": centre_epochs, "lr": lr, "batch_size": batch_size,
              "seed": seed}
    return QuantizedNet(shared, net, "deep-compression", config)


def _weight(net: nn.Module, path: str) -> torch.Tensor:
    return net.get_submodule(path).weight



def _retrain(net: nn.Module, data: Dataset, masks: dict[str, torch.Tensor], epochs: int,
             lr: float, batch_size: int, gen: torch.Generator) -> None:
    """Train ``net`` with the pruned weights held at zero."""
    _apply(net, masks)
    train_plain(net, data, epochs=epochs, batch_size=batch_size, lr=lr, generator=gen,
                after_step=lambda: _apply(net, masks))


def _apply(net: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for path, mask in masks.items():
            _weight(net, path).mul_(mask)


def _share(w: torch.Tensor, mask: torch.Tensor, k: int, seed: int) -> QuantizedLayer:
    """k-means of the surviving weights; the pruned ones at width 0."""
    survivors = _cluster(w.detach()[mask], k, "linear", seed)
    width = survivors.widths[0]
    codes = torch.zeros(w.shape, dtype=torch.uint8)
    codes[mask] = survivors.codes
    bits = torch.where(mask, width, 0).to(torch.uint8)
    books = {width: survivors.codebooks[width], 0: torch.zeros(1, 1)}
    return QuantizedLayer(codes, bits, {b: c for b, c in books.items() if bool((bits == b).any())})


def _finetune_centres(net: nn.Module, data: Dataset, layers: dict[str, QuantizedLayer],
                      epochs: int, lr: float, batch_size: int, gen: torch.Generator
                      ) -> dict[str, QuantizedLayer]:
    """Train each layer's centres (and ``net``'s other parameters): ``w = c[codes]``."""
    centres = {p: nn.Parameter(layer.codebooks[max(layer.widths)].clone())
               for p, layer in layers.items()}
    rest = [v for k, v in net.named_parameters() if k not in {weight_name(p) for p in layers}]
    optimizer = torch.optim.Adam([*centres.values(), *rest], lr=lr)
    net.train()
    for _ in range(epochs):
        for x, y in batches(data, batch_size, generator=gen):
            optimizer.zero_grad(set_to_none=True)
            weights = {weight_name(p): _decode(layers[p], centres[p]) for p in layers}
            F.cross_entropy(functional_call(net, weights, (x,)), y).backward()
            optimizer.step()
    net.eval()
    return {p: _with_centres(layer, centres[p].detach()) for p, layer in layers.items()}


def _decode(layer: QuantizedLayer, centres: torch.Tensor) -> torch.Tensor:
    width = max(layer.widths)
    return torch.where(layer.bits == width, centres[0][layer.codes.long()], 0.0)


def _with_centres(layer: QuantizedLayer, centres: torch.Tensor) -> QuantizedLayer:
    books = dict(layer.codebooks)
    books[max(layer.widths)] = centres.float()
    return QuantizedLayer(layer.codes, layer.bits, books)
