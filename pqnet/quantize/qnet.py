"""``QuantizedNet``: integer codes and codebooks per layer, with honest size accounting."""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .._io import load_torch, save_torch

FORMAT = "pqnet.quantized"
VERSION = 1
FLOAT_BYTES = 4  # everything that is not a code is counted (and stored) as float32


def weight_name(layer: str) -> str:
    """The name of ``layer``'s weight in ``Posterior.loc``: ``"0"`` → ``"0.weight"``."""
    return f"{layer}.weight" if layer else "weight"


def grid_levels(scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The symmetric ``bits``-bit grid of half-range ``scale`` (rows,): shape (rows, 2**bits),

    ``level_j = scale * (-1 + 2j / (2^b - 1))``, ``j = 0..2^b - 1``: evenly spaced from
    ``-scale`` to ``scale``. A grid is stored as its scale; this rebuilds its values exactly.
    """
    return scale.float().reshape(-1, 1) * torch.linspace(-1.0, 1.0, 2 ** bits)


def gather_levels(levels: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Decode ``codes`` with the codebook ``levels`` of shape ``(rows, L)``.

    ``rows`` is 1 (one codebook for the tensor) or ``codes.shape[0]`` (one per output channel,
    i.e. per index along dim 0).
    """
    index = codes.long()
    if levels.shape[0] == 1:
        return levels[0][index]
    flat = index.reshape(len(index), -1)
    return levels.gather(1, flat).reshape(codes.shape)


@dataclass(frozen=True, eq=False)
class QuantizedLayer:
    """One layer's weight as integer codes into per-bit-width codebooks.

    A weight ``w_i`` of code width ``b_i = bits[i]`` in row ``r_i`` (its index along dim 0
    for per-channel codebooks, else 0) is ``codebooks[b_i][r_i, codes[i]]``. Most methods
    give every weight of a layer the same width, so ``codebooks`` has a single entry; per-weight
    methods (``sigma-bits``) group the weights by width, one codebook per group.

    Attributes
    ----------
    codes : uint8 tensor of the weight's shape.
    bits : uint8 tensor of the weight's shape, each in ``1..8``: the width the code is stored at.
    codebooks : ``{width: float32 tensor (rows, levels)}`` with ``levels <= 2**width``.
    scales : ``{width: float32 tensor (rows,)}`` when every codebook is a symmetric grid
        ``scale * linspace(-1, 1, 2**width)`` (see :mod:`pqnet.quantize.grids`); then only the
        scales are stored and counted, else ``None`` and the codebook values are.
    """

    codes: torch.Tensor
    bits: torch.Tensor
    codebooks: dict[int, torch.Tensor]
    scales: dict[int, torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.codes.dtype != torch.uint8 or self.bits.dtype != torch.uint8:
            raise ValueError("codes, bits: expected uint8 tensors")
        if self.codes.shape != self.bits.shape or self.codes.dim() == 0:
            raise ValueError(f"bits: shape {tuple(self.bits.shape)} does not match codes "
                             f"{tuple(self.codes.shape)}")
        if set(self.bits.unique().tolist()) != set(self.codebooks):
            raise ValueError(f"codebooks: widths {sorted(self.codebooks)} do not match the "
                             f"widths used in bits {sorted(self.bits.unique().tolist())}")
        for width, levels in self.codebooks.items():
            if not 1 <= width <= 8:
                raise ValueError(f"bits: widths must lie in 1..8, got {width}")
            if (levels.dtype != torch.float32 or levels.dim() != 2
                    or levels.shape[0] not in (1, self.codes.shape[0])
                    or not 1 <= levels.shape[1] <= 2 ** width):
                raise ValueError(f"codebooks: the {width}-bit codebook must be float32 of shape "
                                 f"(1 or {self.codes.shape[0]}, <= {2 ** width}), got "
                                 f"{levels.dtype} {tuple(levels.shape)}")
            used = self.codes[self.bits == width]
            if used.numel() and int(used.max()) >= levels.shape[1]:
                raise ValueError(f"codes: a {width}-bit code exceeds its codebook's "
                                 f"{levels.shape[1]} levels")
        if self.scales is not None and set(self.scales) != set(self.codebooks):
            raise ValueError("scales: must have one entry per codebook")

    @classmethod
    def from_grid(cls, codes: torch.Tensor, bits: torch.Tensor,
                  scales: dict[int, torch.Tensor]) -> QuantizedLayer:
        """A layer whose codebooks are symmetric grids, built from their half-ranges."""
        scales = {b: s.float().reshape(-1) for b, s in scales.items()}
        return cls(codes, bits, {b: grid_levels(s, b) for b, s in scales.items()}, scales)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def numel(self) -> int:
        return self.codes.numel()

    @property
    def widths(self) -> list[int]:
        """The distinct code widths in this layer, ascending."""
        return sorted(self.codebooks)

    @property
    def code_bits(self) -> int:
        return int(self.bits.sum())

    def values(self) -> torch.Tensor:
        """The quantized weight: float32, every entry a codebook value."""
        return self.decode(self.codes)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """The codebook values of ``codes`` (uint8, this layer's shape) under this layer's
        widths and codebooks."""
        out = torch.empty(codes.shape, dtype=torch.float32)
        for width, levels in self.codebooks.items():
            mask = self.bits == width
            own_codes = torch.where(mask, codes, 0)  # others may index past this codebook
            out[mask] = gather_levels(levels, own_codes)[mask]
        return out

    def encode(self, w: torch.Tensor) -> torch.Tensor:
        """uint8 codes of the nearest level to each entry of ``w`` in its own codebook (the
        one of its width, its row): ``w``'s rounding under this layer's widths and codebooks."""
        codes = torch.zeros(self.codes.shape, dtype=torch.uint8)
        rows = len(w)
        for width, levels in self.codebooks.items():
            ordered, order = levels.sort(dim=1)
            midpoints = ((ordered[:, 1:] + ordered[:, :-1]) / 2).contiguous()
            flat = w.detach().float().reshape(rows if len(levels) > 1 else 1, -1).contiguous()
            index = torch.searchsorted(midpoints, flat) if len(levels) > 1 else \
                torch.bucketize(flat, midpoints[0])
            width_codes = order.expand(len(index), -1).gather(1, index).reshape(w.shape)
            mask = self.bits == width
            codes[mask] = width_codes[mask].to(torch.uint8)
        return codes

    def byte_counts(self) -> dict[str, int]:
        """Bytes of this layer as stored: ``codes`` (``ceil(sum_i b_i / 8)``), ``bit_map``
        (which width each weight has, ``ceil(n * ceil(log2 G) / 8)`` for ``G > 1`` widths,
        else 0) and ``codebooks`` (4 bytes per scale of a grid or per codebook value)."""
        groups = len(self.codebooks)
        map_bits = self.numel * math.ceil(math.log2(groups)) if groups > 1 else 0
        tables = self.scales if self.scales is not None else self.codebooks
        return {"codes": math.ceil(self.code_bits / 8),
                "bit_map": math.ceil(map_bits / 8),
                "codebooks": FLOAT_BYTES * sum(t.numel() for t in tables.values())}

    # -- storage: the packed form that byte_counts accounts for -----------------------------

    def packed(self) -> dict:
        widths = self.widths
        flat_bits = self.bits.reshape(-1).numpy()
        out = {"shape": list(self.shape), "widths": widths,
               "codes": pack_bits(self.codes.reshape(-1).numpy(), flat_bits), "bit_map": None,
               "scales": None, "codebooks": None}
        if len(widths) > 1:
            group = np.searchsorted(np.asarray(widths), flat_bits).astype(np.uint8)
            out["bit_map"] = pack_bits(group, _map_width(len(widths), group.size))
        if self.scales is not None:
            out["scales"] = {b: s.clone() for b, s in self.scales.items()}
        else:
            out["codebooks"] = {b: c.clone() for b, c in self.codebooks.items()}
        return out

    @classmethod
    def unpacked(cls, d: dict) -> QuantizedLayer:
        shape, widths = tuple(d["shape"]), list(d["widths"])
        n = math.prod(shape)
        if d["bit_map"] is None:
            if len(widths) != 1:
                raise ValueError("a layer with several widths needs a bit map")
            flat_bits = np.full(n, widths[0], dtype=np.uint8)
        else:
            group = unpack_bits(d["bit_map"], _map_width(len(widths), n))
            if group.max(initial=0) >= len(widths):
                raise ValueError("bit map refers to a width that is not there")
            flat_bits = np.asarray(widths, dtype=np.uint8)[group]
        codes = torch.from_numpy(unpack_bits(d["codes"], flat_bits)).reshape(shape)
        bits = torch.from_numpy(flat_bits).reshape(shape)
        if d["scales"] is not None:
            return cls.from_grid(codes, bits, d["scales"])
        return cls(codes, bits, dict(d["codebooks"]))


def _map_width(groups: int, n: int) -> np.ndarray:
    return np.full(n, math.ceil(math.log2(groups)), dtype=np.uint8)


def pack_bits(codes: np.ndarray, widths: np.ndarray) -> torch.Tensor:
    """Concatenate each ``codes[i]`` in ``widths[i]`` bits (most significant first) into bytes.

    The result has ``ceil(sum(widths) / 8)`` bytes; the last is padded with zeros.
    """
    widths = widths.astype(np.int64)
    starts = np.cumsum(widths) - widths
    stream = np.zeros(int(widths.sum()), dtype=np.uint8)
    for j in range(8):
        has = widths > j
        stream[starts[has] + j] = (codes[has] >> (widths[has] - 1 - j)) & 1
    return torch.from_numpy(np.packbits(stream))


def unpack_bits(packed: torch.Tensor, widths: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_bits`; ``widths`` must be the ones used to pack."""
    widths = widths.astype(np.int64)
    total = int(widths.sum())
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or \
            packed.numel() != math.ceil(total / 8):
        raise ValueError(f"packed codes: expected {math.ceil(total / 8)} bytes")
    stream = np.unpackbits(packed.numpy(), count=total)
    starts = np.cumsum(widths) - widths
    codes = np.zeros(len(widths), dtype=np.uint8)
    for j in range(8):
        has = widths > j
        codes[has] = (codes[has] << 1) | stream[starts[has] + j]
    return codes


class QuantizedNet:
    """A network whose Linear/Conv weights are integer codes into small codebooks.

    The result type of every quantizer in :mod:`pqnet.quantize`. ``layers`` maps a module
    path (as in ``Posterior.layers``) to its :class:`QuantizedLayer`; ``module`` is the plain
    network holding everything else (biases, BatchNorm parameters and statistics) in float32,
    with the quantized weights written in as their codebook values. Biases are *not*
    quantized: they stay float32 and are counted as such.

    Accounting (DESIGN conventions), over the quantized weights ``w_1..w_N`` of widths ``b_i``:

    - ``avg_bits = sum_i b_i / N``;
    - ``size_bytes = sum_layers [ceil(sum_i b_i / 8) + bit_map + codebooks] + 4 * F``,
      with the bit map and codebook bytes of :meth:`QuantizedLayer.byte_counts` and ``F``
      the number of entries of every other tensor in ``module.state_dict()`` (biases,
      BatchNorm, ...), all at float32. Names, shapes and the list of widths are metadata
      and not counted. :meth:`save` writes exactly these packed bytes (plus that metadata);
    - ``unique_values`` and ``entropy_bits = -sum_v p_v log2 p_v`` of the pooled values.

    ``method`` and ``config`` record the quantizer and its parameters, including those it
    solved for (e.g. the ``k`` that meets an ``avg_bits`` budget).
    """

    def __init__(self, layers: dict[str, QuantizedLayer], module: nn.Module, method: str,
                 config: dict | None = None) -> None:
        if not isinstance(module, nn.Module):
            raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
        if not layers:
            raise ValueError("layers: a QuantizedNet needs at least one quantized layer")
        module = copy.deepcopy(module).cpu()
        for path, layer in layers.items():
            try:
                owner = module.get_submodule(path)
                current = owner.weight
            except AttributeError as err:
                raise ValueError(f"layers: module has no weight at {path!r}") from err
            if current.numel() and tuple(current.shape) != layer.shape:
                raise ValueError(f"layers: {weight_name(path)} has shape {layer.shape}, the "
                                 f"module's weight {tuple(current.shape)}")
            owner.weight = nn.Parameter(layer.values())
        self.layers = dict(layers)
        self.module = module
        self.method = method
        self.config = dict(config or {})

    def __repr__(self) -> str:
        return (f"QuantizedNet(method={self.method!r}, layers={len(self.layers)}, "
                f"avg_bits={self.avg_bits:.3f}, size_bytes={self.size_bytes})")

    # -- weights -----------------------------------------------------------------------------

    def weights(self) -> dict[str, torch.Tensor]:
        """``{"features.0.weight": float32 tensor}``: every quantized weight's codebook values."""
        return {weight_name(path): layer.values() for path, layer in self.layers.items()}

    def to_module(self) -> nn.Module:
        """A plain ``nn.Module`` (a fresh copy) whose quantized weights are the codebook values."""
        return copy.deepcopy(self.module)

    # -- accounting --------------------------------------------------------------------------

    @property
    def num_weights(self) -> int:
        return sum(layer.numel for layer in self.layers.values())

    @property
    def avg_bits(self) -> float:
        """Total code bits of the quantized weights divided by their number."""
        return sum(layer.code_bits for layer in self.layers.values()) / self.num_weights

    @property
    def layer_bits(self) -> dict[str, float]:
        """Mean code width of each layer."""
        return {path: layer.code_bits / layer.numel for path, layer in self.layers.items()}

    @property
    def sizes(self) -> dict[str, int]:
        """``size_bytes`` by part: ``codes``, ``bit_map``, ``codebooks`` and ``float32``."""
        parts = {"codes": 0, "bit_map": 0, "codebooks": 0}
        for layer in self.layers.values():
            for key, value in layer.byte_counts().items():
                parts[key] += value
        quantized = {weight_name(path) for path in self.layers}
        parts["float32"] = FLOAT_BYTES * sum(
            t.numel() for k, t in self.module.state_dict().items() if k not in quantized)
        return parts

    @property
    def size_bytes(self) -> int:
        """Bytes of the packed codes, bit maps, codebooks and float32 rest (see the class)."""
        return sum(self.sizes.values())

    def _pooled_counts(self) -> torch.Tensor:
        values = torch.cat([w.reshape(-1) for w in self.weights().values()])
        return values.unique(return_counts=True)[1]

    @property
    def unique_values(self) -> int:
        """Number of distinct values among all quantized weights of the network."""
        return len(self._pooled_counts())

    @property
    def entropy_bits(self) -> float:
        """Shannon entropy (bits per weight) of the pooled quantized weight values."""
        p = self._pooled_counts().double() / self.num_weights
        return float(-(p * p.log2()).sum())

    def summary(self) -> list[dict]:
        """One dict per quantized layer: ``layer``, ``weight``, ``shape``, ``bits`` (mean
        width), ``widths``, ``codebook_size`` (codebook entries), ``unique_values``, ``bytes``."""
        return [{"layer": path, "weight": weight_name(path), "shape": layer.shape,
                 "bits": layer.code_bits / layer.numel, "widths": layer.widths,
                 "codebook_size": sum(c.numel() for c in layer.codebooks.values()),
                 "unique_values": len(layer.values().unique()),
                 "bytes": sum(layer.byte_counts().values())}
                for path, layer in self.layers.items()]

    # -- files -------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write to ``path`` atomically (``torch.save``): the bit-packed codes and bit maps,
        the codebooks (grid scales only for grids) and the network without its quantized
        weights. The network is pickled, so its class must be importable on load."""
        skeleton = copy.deepcopy(self.module)
        for layer_path in self.layers:  # the codes carry these weights
            skeleton.get_submodule(layer_path).weight = nn.Parameter(torch.empty(0))
        state = {"format": FORMAT, "version": VERSION, "method": self.method,
                 "config": self.config, "module": skeleton,
                 "layers": {p: layer.packed() for p, layer in self.layers.items()}}
        return save_torch(state, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> QuantizedNet:
        """Read a file written by :meth:`save`; a ``ValueError`` naming ``path`` for anything
        else (corrupt, truncated, foreign or of another format version)."""
        state = load_torch(path, "quantized network", FORMAT, VERSION)
        try:
            layers = {p: QuantizedLayer.unpacked(d) for p, d in state["layers"].items()}
            return cls(layers, state["module"], state["method"], state["config"])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as err:
            raise ValueError(f"path: {path} holds a malformed quantized network: {err}") from err
