"""``QuantizedNet``: integer codes and codebooks per layer; its size is its file's length."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from .._io import atomic_write
from . import codec
from .codec import weight_name

MAX_WIDTH = 8  # codes are uint8


def grid_levels(scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The symmetric ``bits``-bit grid of half-range ``scale`` (rows,): shape (rows, 2**bits),

    ``level_j = scale * (-1 + 2j / (2^b - 1))``, ``j = 0..2^b - 1``: evenly spaced from
    ``-scale`` to ``scale``. A grid is stored as its scale; this rebuilds its values exactly.
    Width 0 is the pruned weight: the single level 0.
    """
    if bits == 0:
        return torch.zeros(scale.numel(), 1)
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
    bits : uint8 tensor of the weight's shape, each in ``0..8``: the width of the weight's
        code. Width 0 is a pruned weight: its codebook is the single value 0.
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
        if self.codes.shape != self.bits.shape or self.codes.numel() == 0:
            raise ValueError(f"bits: shape {tuple(self.bits.shape)} does not match codes "
                             f"{tuple(self.codes.shape)}")
        if set(self.bits.unique().tolist()) != set(self.codebooks):
            raise ValueError(f"codebooks: widths {sorted(self.codebooks)} do not match the "
                             f"widths used in bits {sorted(self.bits.unique().tolist())}")
        for width, levels in self.codebooks.items():
            if not 0 <= width <= MAX_WIDTH:
                raise ValueError(f"bits: widths must lie in 0..{MAX_WIDTH}, got {width}")
            if width == 0 and bool(levels.any()):
                raise ValueError("codebooks: the 0-bit (pruned) codebook must be the value 0")
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
        if self.scales is not None:
            self._check_scales()

    def _check_scales(self) -> None:
        """A grid's stored scales must rebuild its codebooks exactly: the file keeps only them."""
        if set(self.scales) != set(self.codebooks):
            raise ValueError("scales: must have one entry per codebook")
        for width, scale in self.scales.items():
            if scale.dtype != torch.float32 or scale.dim() != 1 or \
                    not torch.equal(grid_levels(scale, width), self.codebooks[width]):
                raise ValueError(f"scales: the {width}-bit scale (float32, one per row) must "
                                 "rebuild its codebook, scale * linspace(-1, 1, 2**width)")

    @classmethod
    def from_grid(cls, codes: torch.Tensor, bits: torch.Tensor,
                  scales: dict[int, torch.Tensor]) -> QuantizedLayer:
        """A layer whose codebooks are symmetric grids, built from their half-ranges."""
        scales = {b: s.float().reshape(-1) for b, s in scales.items()}
        return cls(codes, bits, {b: grid_levels(s, b) for b, s in scales.items()}, scales)

    def pruned(self, mask: torch.Tensor) -> QuantizedLayer:
        """This layer with the weights where ``mask`` is true set to 0 at width 0."""
        bits = torch.where(mask, 0, self.bits).to(torch.uint8)
        codes = torch.where(mask, 0, self.codes).to(torch.uint8)
        used = set(bits.unique().tolist())
        zero = torch.zeros(1, 1)
        codebooks = {w: c for w, c in {**self.codebooks, 0: zero}.items() if w in used}
        scales = None if self.scales is None else \
            {w: s for w, s in {**self.scales, 0: zero[0]}.items() if w in used}
        return QuantizedLayer(codes, bits, codebooks, scales)

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


class QuantizedNet:
    """A network whose Linear/Conv weights are integer codes into small codebooks.

    The result type of every quantizer in :mod:`pqnet.quantize`. ``layers`` maps a module
    path (as in ``Posterior.layers``) to its :class:`QuantizedLayer`; ``module`` is the plain
    network holding everything else (biases, BatchNorm parameters and statistics), with the
    quantized weights written in as their codebook values. Biases are *not* quantized.

    Accounting, over the ``N`` quantized weights (DESIGN: size is a file):

    - ``size_bytes``: the length of the file :meth:`save` writes (:mod:`~pqnet.quantize.codec`:
      header, codebooks, code model, entropy-coded codes, the float rest, a checksum), and
      ``sizes`` the same bytes by part;
    - ``bits_per_weight = 8 * size_bytes / N``: the headline figure, everything included;
    - ``code_entropy_bits``: ``sum_l n_l H_l / N`` with ``H_l`` the Shannon entropy of layer
      ``l``'s (width, code) symbols, the bound an ideal order-0 coder of the codes meets
      (``sizes["codes"]`` is what the ANS coder spends on them);
    - ``avg_bits = sum_i b_i / N``: the fixed-width code bits, which leave out codebooks,
      floats and the width map; kept as the budget the quantizers are asked for;
    - ``unique_values`` and ``value_entropy_bits`` of the pooled values (network-wide).

    ``method`` and ``config`` record the quantizer and its parameters, including those it
    solved for (e.g. the ``k`` that meets an ``avg_bits`` budget). A QuantizedNet is not
    meant to change after it is built: its file is encoded once and kept.
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
                f"size_bytes={self.size_bytes}, bits_per_weight={self.bits_per_weight:.3f})")

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

    @cached_property
    def encoded(self) -> codec.Encoded:
        """This network's file, as :meth:`save` writes it."""
        return codec.encode(self.layers, self.module, self.method, self.config)

    @property
    def sizes(self) -> dict[str, int]:
        """``size_bytes`` by part of the file (see :mod:`pqnet.quantize.codec`)."""
        return dict(self.encoded.parts)

    @property
    def size_bytes(self) -> int:
        """The length of this network's file."""
        return len(self.encoded.data)

    @property
    def bits_per_weight(self) -> float:
        """``8 * size_bytes / N``: everything in the file, per quantized weight."""
        return 8 * self.size_bytes / self.num_weights

    @property
    def code_entropy_bits(self) -> float:
        """Count-weighted mean over layers of the Shannon entropy of the (width, code)
        symbols, in bits per weight: what an ideal order-0 coder of the codes spends."""
        return self.encoded.code_entropy_bits / self.num_weights

    def _pooled_counts(self) -> torch.Tensor:
        values = torch.cat([w.reshape(-1) for w in self.weights().values()])
        return values.unique(return_counts=True)[1]

    @property
    def unique_values(self) -> int:
        """Number of distinct values among all quantized weights of the network."""
        return len(self._pooled_counts())

    @property
    def value_entropy_bits(self) -> float:
        """Shannon entropy (bits per weight) of the pooled quantized weight values."""
        p = self._pooled_counts().double() / self.num_weights
        return float(-(p * p.log2()).sum())

    def summary(self) -> list[dict]:
        """One dict per quantized layer: ``layer``, ``weight``, ``shape``, ``bits`` (mean
        width), ``widths``, ``codebook_size`` (codebook entries), ``unique_values`` and
        ``code_entropy_bits`` (per weight of the layer)."""
        return [{"layer": path, "weight": weight_name(path), "shape": layer.shape,
                 "bits": layer.code_bits / layer.numel, "widths": layer.widths,
                 "codebook_size": sum(c.numel() for c in layer.codebooks.values()),
                 "unique_values": len(layer.values().unique()),
                 "code_entropy_bits": codec.layer_entropy_bits(layer)}
                for path, layer in self.layers.items()]

    # -- files -------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write this network's file (:mod:`pqnet.quantize.codec`) to ``path`` atomically:
        ``path`` holds the old file or the new one whole, never a part."""
        data = self.encoded.data
        return atomic_write(path, lambda tmp: tmp.write_bytes(data))

    @classmethod
    def load(cls, path: str | os.PathLike, module: nn.Module | None = None) -> QuantizedNet:
        """Read a file written by :meth:`save`, bit-exactly.

        The network is rebuilt from the :mod:`pqnet.models` factory the file names; for any
        other network pass ``module``, one of the same architecture (its weights are
        replaced; it is copied, not changed). A ``FileNotFoundError``, or a ``ValueError``
        naming ``path`` (or ``module``) for a corrupt, truncated, foreign or other-version
        file, or a ``module`` of another layout.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"path: no quantized network file at {path}")
        if module is not None and not isinstance(module, nn.Module):
            raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
        try:
            file = codec.decode(path.read_bytes(), copy.deepcopy(module))
            layers = {p: _layer(*record) for p, record in file.layers.items()}
            return cls(layers, file.module, file.method, file.config)
        except ValueError as err:
            if str(err).startswith("module:"):
                raise ValueError(f"module: does not fit the network stored in {path}: "
                                 f"{str(err).removeprefix('module: ')}") from err
            raise ValueError(f"path: {path} is not a readable pqnet quantized network: "
                             f"{err}") from err


def _layer(codes: torch.Tensor, bits: torch.Tensor, tables: dict[int, torch.Tensor],
           grid: bool) -> QuantizedLayer:
    return QuantizedLayer.from_grid(codes, bits, tables) if grid else \
        QuantizedLayer(codes, bits, tables)
