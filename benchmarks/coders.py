"""Which entropy coder the quantized-network file uses: ANS against the alternatives.

The same per-layer symbols (a layer's (width, code) pairs, as the file codes them) of
LeNet-5 quantized several ways are coded by

- ``ans``: constriction's ANS stack coder under the stored categorical model (the file's coder);
- ``range``: constriction's range coder under the same model;
- ``huffman``: constriction's Huffman coder built from the same counts;
- ``zstd`` (level 19), ``lzma`` and ``zlib`` (level 9) on the symbols as bytes (uint8, or
  uint16 when an alphabet exceeds 256), which need no stored model;

against the bound ``n H / 8`` bytes. The model-based coders also need the counts (the file's
``code_model``), listed once; the dictionary coders carry their own. Bytes are summed over
the layers; seconds are encode + decode of all layers, the best of ``--repeat`` runs (Huffman
codes symbol by symbol from Python, so its seconds measure that loop, not the coder).

    python benchmarks/coders.py --data-dir ../shared/data/mnist --json benchmarks/coders.json
"""

from __future__ import annotations

import argparse
import lzma
import os
import time
import zlib

import constriction
import numpy as np
import torch
import zstandard

import pqnet
from pqnet._io import save_json
from pqnet.diagnostics.table import format_table
from pqnet.quantize import codec

VARIANTS = [("uniform 2 bits", "uniform", {"bits": 2}), ("uniform 4 bits", "uniform", {"bits": 4}),
            ("uniform 8 bits", "uniform", {"bits": 8}), ("kmeans k=16", "kmeans", {"k": 16}),
            ("sigma-bits 2", "sigma-bits", {"avg_bits": 2.0}),
            ("sigma-code code_bits=1.5", "sigma-code", {"code_bits": 1.5}),
            ("uniform 4 bits, pruned 0.9", "uniform", {"bits": 4, "prune": 0.9})]


def _ans(symbols: np.ndarray, counts: np.ndarray) -> int:
    words = codec.encode_symbols(symbols, counts)
    assert np.array_equal(codec.decode_symbols(words, counts, len(symbols)), symbols)
    return 4 * len(words)


def _range(symbols: np.ndarray, counts: np.ndarray) -> int:
    model = constriction.stream.model.Categorical(counts.astype(np.float64), perfect=False)
    encoder = constriction.stream.queue.RangeEncoder()
    encoder.encode(symbols.astype(np.int32), model)
    words = encoder.get_compressed()
    decoded = constriction.stream.queue.RangeDecoder(words).decode(model, len(symbols))
    assert np.array_equal(decoded, symbols)
    return 4 * len(words)


def _huffman(symbols: np.ndarray, counts: np.ndarray) -> int:
    if np.count_nonzero(counts) <= 1:
        return 0
    probs = counts.astype(np.float64)
    tree = constriction.symbol.huffman.EncoderHuffmanTree(probs)
    encoder = constriction.symbol.QueueEncoder()
    for s in symbols.tolist():
        encoder.encode_symbol(int(s), tree)
    words, _ = encoder.get_compressed()
    decoder = constriction.symbol.QueueDecoder(words)
    back = constriction.symbol.huffman.DecoderHuffmanTree(probs)
    assert all(decoder.decode_symbol(back) == s for s in symbols.tolist())
    return 4 * len(words)


def _bytes_of(symbols: np.ndarray, counts: np.ndarray) -> bytes:
    return symbols.astype(np.uint8 if len(counts) <= 256 else np.uint16).tobytes()


DICTIONARY = {"zstd": (lambda b: zstandard.ZstdCompressor(level=19).compress(b),
                       lambda c: zstandard.ZstdDecompressor().decompress(c)),
              "lzma": (lzma.compress, lzma.decompress),
              "zlib": (lambda b: zlib.compress(b, 9), zlib.decompress)}
MODEL_CODERS = {"ans": _ans, "range": _range, "huffman": _huffman}


def _dictionary(name: str):
    compress, decompress = DICTIONARY[name]

    def code(symbols: np.ndarray, counts: np.ndarray) -> int:
        raw = _bytes_of(symbols, counts)
        packed = compress(raw)
        assert decompress(packed) == raw
        return len(packed)

    return code


CODERS = {**MODEL_CODERS, **{name: _dictionary(name) for name in DICTIONARY}}


def measure(qnet: pqnet.QuantizedNet, repeat: int) -> dict:
    layers = [codec.symbol_counts(layer) for layer in qnet.layers.values()]
    row = {"bound": sum(len(s) * codec.entropy_bits(c) for s, c in layers) / 8,
           "code_model": sum(len(codec.varint(int(x))) for _, c in layers for x in c)}
    for name, code in CODERS.items():
        best = float("inf")
        for _ in range(repeat):
            start = time.perf_counter()
            size = sum(code(s, c) for s, c in layers)
            best = min(best, time.perf_counter() - start)
        row[name], row[f"{name}_s"] = size, best
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default="../shared/data/mnist")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", default="benchmarks/coders.json")
    args = parser.parse_args()
    train, _ = pqnet.data.load("mnist", root=args.data_dir)
    torch.manual_seed(0)
    posterior = pqnet.fit(pqnet.bayesian(pqnet.models.lenet5()), train, epochs=args.epochs,
                          seed=0, progress=False)
    rows = []
    for label, method, options in VARIANTS:
        qnet = pqnet.quantize(posterior, method, **options)
        row = {"variant": label, "weights": qnet.num_weights, **measure(qnet, args.repeat)}
        row["ans_overhead"] = row["ans"] / row["bound"] - 1
        rows.append(row)
        print(format_table([row], ["variant", "bound", "code_model", *CODERS, "ans_overhead"]),
              flush=True)
    print(format_table(rows, ["variant", "bound", "code_model", *CODERS, "ans_overhead"]))
    print(format_table(rows, ["variant", *[f"{c}_s" for c in CODERS]]))
    save_json({"config": vars(args), "load": os.getloadavg(), "torch": torch.__version__,
               "coder": codec.CODER, "rows": rows}, args.json)


if __name__ == "__main__":
    main()
