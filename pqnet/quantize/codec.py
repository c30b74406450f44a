"""The quantized-network file: one compact binary format, the one place bytes are counted.

A :class:`~pqnet.quantize.QuantizedNet`'s size is the length of this file. Layout (all
integers little-endian; ``varint`` is LEB128): the header, then each layer's three records
(codebooks, code model, codes) in turn, then the float rest and the checksum;
``QuantizedNet.sizes`` sums each part over the layers.

======================= ========================================================================
part                    content
======================= ========================================================================
``header``              ``b"PQNQ"``, the format version (1 byte), then a zlib-compressed JSON
                        object: method, config, the architecture (a :mod:`pqnet.models` factory
                        and its arguments, or ``null``), a CRC-32 of the network's layout, the
                        coder and its version, and per quantized layer its path, shape,
                        widths, codebook rows and levels, and a CRC-32 of its symbols
``codebooks``           per layer and width (ascending; none for width 0, the value 0): the
                        grid's half-ranges (one float32 per row) or the codebook values (rows
                        x levels float32)
``code_model``          per layer: the count of each symbol of its alphabet, as varints
``codes``               per layer: its symbols, ANS-coded (``constriction``) under the
                        categorical model of those counts; a varint word count, then the words
``float``               every other tensor of ``module.state_dict()`` (biases, BatchNorm, ...),
                        raw, in its own dtype, in state-dict order
``checksum``            CRC-32 of everything before it
======================= ========================================================================

A layer's **alphabet** joins its codebooks: the symbol of a weight of width ``b`` and code ``c``
is ``offset_b + c``, with the widths' codebooks laid end to end. So one code carries both the
width and the code, and a per-weight width map costs what its entropy says, not a fixed
``ceil(log2 G)`` bits (no uncounted map). The ANS coder spends within a few bytes of
``n * H(symbols)`` per layer (Duda 2013; constriction, Bamler 2022); the counts it needs are
stored, so the file decodes alone.

The network's architecture is code, not data: the file names the :mod:`pqnet.models` factory
that built it (recorded on the module by that factory); any other network is read back onto a
``module`` of the same layout that the caller passes to :func:`decode`. The symbols' CRC
catches a decoder whose model differs from the encoder's (another constriction release).
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass
from importlib.metadata import version

import constriction
import numpy as np
import torch
from torch import nn

from .. import models

MAGIC = b"PQNQ"
CODER = f"constriction {version('constriction')} ANS, Categorical(perfect=False)"
VERSION = 1
PARTS = ("header", "codebooks", "code_model", "codes", "float", "checksum")


class FormatError(ValueError):
    """The bytes are not a quantized network this pqnet can read."""


# -- alphabets: a layer's (width, code) pairs as one symbol --------------------------------


def alphabet_offsets(levels: dict[int, int]) -> dict[int, int]:
    """``{width: first symbol}``: the widths' codebooks laid end to end, ascending width."""
    offsets, start = {}, 0
    for width in sorted(levels):
        offsets[width] = start
        start += levels[width]
    return offsets


def to_symbols(codes: torch.Tensor, bits: torch.Tensor, levels: dict[int, int]) -> np.ndarray:
    """Flat int32 symbols ``offset[bits_i] + codes_i`` of a layer."""
    offsets = alphabet_offsets(levels)
    table = np.zeros(max(levels) + 1, dtype=np.int32)
    for width, start in offsets.items():
        table[width] = start
    flat_bits = bits.reshape(-1).numpy()
    return table[flat_bits] + codes.reshape(-1).numpy().astype(np.int32)


def from_symbols(symbols: np.ndarray, levels: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`to_symbols`: flat uint8 ``(codes, bits)``."""
    widths = np.asarray(sorted(levels), dtype=np.uint8)
    starts = np.asarray([alphabet_offsets(levels)[int(w)] for w in widths])
    group = np.searchsorted(starts, symbols, side="right") - 1
    return (symbols - starts[group]).astype(np.uint8), widths[group]


def levels_of(layer) -> dict[int, int]:
    """``{width: codebook levels}`` of a ``QuantizedLayer``."""
    return {w: int(c.shape[1]) for w, c in layer.codebooks.items()}


def symbol_counts(layer) -> tuple[np.ndarray, np.ndarray]:
    """A layer's flat symbols and the count of each symbol of its alphabet."""
    levels = levels_of(layer)
    symbols = to_symbols(layer.codes, layer.bits, levels)
    return symbols, np.bincount(symbols, minlength=sum(levels.values()))


def layer_entropy_bits(layer) -> float:
    """Shannon entropy of a layer's symbols, bits per weight."""
    return entropy_bits(symbol_counts(layer)[1])


def entropy_bits(counts: np.ndarray) -> float:
    """Shannon entropy ``-sum_s p_s log2 p_s`` (bits per symbol) of symbol ``counts``."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


# -- the entropy coder ------------------------------------------------------------------------


def _model(counts: np.ndarray) -> constriction.stream.model.Categorical:
    # encoder and decoder build it from the same integer counts, so it is the same model
    return constriction.stream.model.Categorical(counts.astype(np.float64), perfect=False)


def encode_symbols(symbols: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """uint32 ANS words of ``symbols`` under the categorical model of ``counts``; none when
    a single symbol is used (it is known from the counts)."""
    if np.count_nonzero(counts) <= 1:
        return np.zeros(0, dtype=np.uint32)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(symbols.astype(np.int32), _model(counts))
    return coder.get_compressed()


def decode_symbols(words: np.ndarray, counts: np.ndarray, n: int) -> np.ndarray:
    if np.count_nonzero(counts) <= 1:
        return np.full(n, int(np.argmax(counts)), dtype=np.int32)
    return np.asarray(constriction.stream.stack.AnsCoder(words).decode(_model(counts), n),
                      dtype=np.int32)


# -- primitive writers and a bounds-checked reader ------------------------------------------


def varint(n: int) -> bytes:
    """LEB128: 7 bits per byte, high bit set on all but the last."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class Reader:
    """Reads a byte string front to back; running past its end is a :class:`FormatError`."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.at + n > len(self.data):
            raise FormatError("truncated: the file ends inside a record")
        chunk = self.data[self.at:self.at + n]
        self.at += n
        return chunk

    def varint(self) -> int:
        value, shift = 0, 0
        while True:
            byte = self.take(1)[0]
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift > 63:
                raise FormatError("a varint runs past 64 bits")

    def array(self, dtype: np.dtype | str, count: int) -> np.ndarray:
        dtype = np.dtype(dtype).newbyteorder("<")
        return np.frombuffer(self.take(dtype.itemsize * count), dtype=dtype).copy()


# -- the network's layout: what must match between writer and reader -----------------------


def layout_crc(module: nn.Module) -> int:
    """CRC-32 of every state-dict entry's name, shape and dtype: the file's fingerprint of
    the architecture, so a wrong ``module`` is refused rather than filled with wrong bytes."""
    text = ";".join(f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in module.state_dict().items())
    return zlib.crc32(text.encode())


def architecture(module: nn.Module) -> dict | None:
    """The :mod:`pqnet.models` factory and arguments that built ``module``, if one did."""
    return getattr(module, models.ARCHITECTURE_ATTR, None)


def build(spec: dict) -> nn.Module:
    """The module a :mod:`pqnet.models` factory builds from a file's architecture record."""
    try:
        return models.get(spec["name"], **spec["kwargs"])
    except (KeyError, TypeError, ValueError) as err:
        raise FormatError(f"its architecture {spec!r} is not a pqnet model: {err}") from None


def jsonable(obj):
    """``obj`` with tensors, numpy values and tuples turned into JSON types."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (torch.Tensor, np.ndarray, np.generic)):
        return jsonable(obj.tolist())
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"config: {type(obj).__name__} values cannot be stored; expected numbers, "
                    "strings, lists, dicts or tensors")


def float_rest(module: nn.Module, quantized: set[str]) -> list[tuple[str, torch.Tensor]]:
    """The state-dict entries that are not quantized weights, in state-dict order."""
    return [(k, v) for k, v in module.state_dict().items() if k not in quantized]


def raw_bytes(tensors) -> int:
    """Bytes of ``tensors`` stored raw: e.g. an unquantized net's ``state_dict().values()``."""
    return sum(t.numel() * t.element_size() for t in tensors)


def weight_name(layer: str) -> str:
    """The state-dict name of ``layer``'s weight: ``"fc1"`` → ``"fc1.weight"``."""
    return f"{layer}.weight" if layer else "weight"


# -- writing ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoded:
    """A network's file: its bytes, and how many of them each part takes (:data:`PARTS`)."""

    data: bytes
    parts: dict[str, int]
    code_entropy_bits: float  # sum over layers of n_l * H(layer's symbols), in bits


def encode(layers: dict, module: nn.Module, method: str, config: dict) -> Encoded:
    """The file of a quantized network: ``layers`` maps a module path to an object with
    ``shape``, ``codes``, ``bits``, ``codebooks`` and ``scales`` (a ``QuantizedLayer``);
    ``module`` holds every other tensor. Each layer's records follow one another."""
    sizes = dict.fromkeys(PARTS, 0)
    metas, records, entropy = [], [], 0.0
    for path, layer in layers.items():
        meta, parts, bits = _layer_record(path, layer)
        metas.append(meta)
        records += parts.values()
        for part, chunk in parts.items():
            sizes[part] += len(chunk)
        entropy += bits
    quantized = {weight_name(p) for p in layers}
    floats = b"".join(_tensor_bytes(v) for _, v in float_rest(module, quantized))
    header = header_bytes({
        "method": method, "config": jsonable(config),
        "architecture": jsonable(architecture(module)), "layout": layout_crc(module),
        "coder": CODER, "layers": metas})
    body = b"".join([header, *records, floats])
    sizes.update(header=len(header), float=len(floats), checksum=4)
    return Encoded(body + crc(body), sizes, entropy)


def _layer_record(path: str, layer) -> tuple[dict, dict[str, bytes], float]:
    """A layer's header entry, its records by part, and its symbols' total entropy (bits)."""
    widths, levels = sorted(layer.codebooks), levels_of(layer)
    grid = layer.scales is not None
    tables = b"".join(_tensor_bytes((layer.scales if grid else layer.codebooks)[w])
                      for w in widths if w > 0)  # width 0 (pruned) is the value 0: no table
    symbols, counts = symbol_counts(layer)
    model = b"".join(varint(int(c)) for c in counts)
    words = encode_symbols(symbols, counts)
    meta = {"path": path, "shape": list(layer.shape), "grid": grid,
            "symbols": zlib.crc32(symbols.astype("<i4").tobytes()),
            "levels": {str(w): levels[w] for w in widths},
            "rows": {str(w): layer.codebooks[w].shape[0] for w in widths}}
    parts = {"codebooks": tables, "code_model": model,
             "codes": varint(len(words)) + words.astype("<u4").tobytes()}
    return meta, parts, len(symbols) * entropy_bits(counts)


def _tensor_bytes(t: torch.Tensor) -> bytes:
    array = t.detach().cpu().contiguous().numpy()
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()


def crc(data: bytes) -> bytes:
    return struct.pack("<I", zlib.crc32(data))


def header_bytes(header: dict) -> bytes:
    packed = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    return MAGIC + bytes([VERSION]) + varint(len(packed)) + packed


# -- reading ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Decoded:
    """What a file holds: ``layers`` maps a path to ``(codes, bits, tables, grid)``, uint8
    tensors of the layer's shape and ``{width: float32 scales or codebook}``."""

    layers: dict[str, tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor], bool]]
    module: nn.Module
    method: str
    config: dict


def decode(data: bytes, module: nn.Module | None = None) -> Decoded:
    """Read :func:`encode`'s bytes back; the network is rebuilt from the file's architecture
    record, or is ``module`` (filled in place) when given. A :class:`FormatError` for anything
    else: foreign, corrupt, truncated, another version, or a ``module`` of another layout."""
    reader = Reader(_checked(data))
    header = read_header(reader)
    try:
        module = _target(header, module)
        layers = {meta["path"]: _read_layer(reader, meta, header["coder"])
                  for meta in header["layers"]}
        method, config = header["method"], header["config"]
    except (KeyError, TypeError, AttributeError) as err:
        raise FormatError(f"its header is malformed: {err!r}") from None
    _read_float_rest(reader, module, {weight_name(p) for p in layers})
    if reader.at != len(reader.data):
        raise FormatError(f"{len(reader.data) - reader.at} bytes follow the last record")
    return Decoded(layers, module, method, config)


def _checked(data: bytes) -> bytes:
    """``data`` less its checksum, once magic, version and checksum are right."""
    if len(data) < len(MAGIC) + 5 or data[:len(MAGIC)] != MAGIC:
        raise FormatError("not a pqnet quantized-network file")
    if data[len(MAGIC)] != VERSION:
        raise FormatError(f"format version {data[len(MAGIC)]}; this pqnet reads version "
                          f"{VERSION}")
    if crc(data[:-4]) != data[-4:]:
        raise FormatError("corrupt or truncated: its checksum does not match")
    return data[:-4]


def read_header(reader: Reader) -> dict:
    reader.take(len(MAGIC) + 1)
    try:
        header = json.loads(zlib.decompress(reader.take(reader.varint())))
    except (zlib.error, ValueError) as err:
        raise FormatError(f"its header does not decode: {err}") from None
    if not isinstance(header, dict):
        raise FormatError("its header is not a record")
    return header


def _target(header: dict, module: nn.Module | None) -> nn.Module:
    if module is None:
        if header["architecture"] is None:
            raise FormatError("it names no pqnet.models architecture; pass module=, a network "
                              "of the same architecture")
        module = build(header["architecture"])
    if layout_crc(module) != header["layout"]:
        raise FormatError("module: its layers or shapes differ from the stored network's")
    return module


def _read_layer(reader: Reader, meta: dict, coder: str):
    shape = tuple(int(d) for d in meta["shape"])
    levels = {int(w): int(n) for w, n in meta["levels"].items()}
    rows = {int(w): int(r) for w, r in meta["rows"].items()}
    tables = {}
    for w in sorted(levels):
        count = rows[w] if meta["grid"] else rows[w] * levels[w]
        table = torch.from_numpy(reader.array("<f4", count)) if w > 0 else torch.zeros(count)
        tables[w] = table if meta["grid"] else table.reshape(rows[w], levels[w])
    counts = np.asarray([reader.varint() for _ in range(sum(levels.values()))], dtype=np.int64)
    n = math.prod(shape)
    if counts.sum() != n:
        raise FormatError(f"layer {meta['path']!r}: its code model counts {counts.sum()} "
                          f"symbols for {n} weights")
    words = reader.array("<u4", reader.varint())
    symbols = decode_symbols(words, counts, n)
    if zlib.crc32(symbols.astype("<i4").tobytes()) != meta["symbols"]:
        raise FormatError(f"layer {meta['path']!r}: its codes decode to other symbols than were "
                          f"written (written by {coder}; this pqnet codes with {CODER})")
    codes, bits = from_symbols(symbols, levels)
    return (torch.from_numpy(codes).reshape(shape), torch.from_numpy(bits).reshape(shape),
            tables, bool(meta["grid"]))


def _read_float_rest(reader: Reader, module: nn.Module, quantized: set[str]) -> None:
    with torch.no_grad():
        for _, tensor in float_rest(module, quantized):
            dtype = torch.empty(0, dtype=tensor.dtype).numpy().dtype
            values = reader.array(dtype, tensor.numel())
            tensor.copy_(torch.from_numpy(values).reshape(tensor.shape))
