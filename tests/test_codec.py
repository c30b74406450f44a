"""The quantized-network file: its length is the size, it round-trips bit-exactly, it codes
near the entropy, and it refuses what it did not write."""

import math
import struct
import zlib

import numpy as np
import pytest
import torch
from torch import nn

import pqnet
from pqnet.quantize import QuantizedLayer, QuantizedNet, codec
from tests.test_quantize import DATA_FREE, assert_same, make_posterior, small_net


def linear_3_2() -> nn.Linear:
    layer = nn.Linear(3, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.9, -0.3, 0.1], [-0.6, 0.2, -0.9]]))
        layer.bias.copy_(torch.tensor([0.5, -0.5]))
    return layer


@pytest.fixture(scope="module")
def small():
    return make_posterior(small_net())


@pytest.fixture(scope="module")
def lenet():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return make_posterior(pqnet.models.lenet5())


def skewed_layer(n: int, probs: list[float], seed: int = 0) -> QuantizedLayer:
    rng = np.random.default_rng(seed)
    codes = torch.from_numpy(rng.choice(len(probs), size=(1, n), p=probs).astype(np.uint8))
    width = max(1, math.ceil(math.log2(len(probs))))
    return QuantizedLayer.from_grid(codes, torch.full((1, n), width, dtype=torch.uint8),
                                    {width: torch.tensor([1.0])})


# --------------------------------------------------------------------------- the size is a file


@pytest.mark.parametrize("method", [*DATA_FREE, "sigma-code"])
def test_every_method_round_trips_and_its_size_is_its_files_length(small, method, tmp_path):
    options = {"k": 2.0} if method == "sigma-code" else {"avg_bits": 2.5} if method == "kmeans" \
        else {"avg_bits": 2.5, "per_channel": True}
    qnet = pqnet.quantize(small, method, prune=0.5, **options)
    path = qnet.save(tmp_path / "q.pqn")
    assert path.stat().st_size == qnet.size_bytes == sum(qnet.sizes.values())
    assert qnet.bits_per_weight == 8 * qnet.size_bytes / qnet.num_weights
    loaded = QuantizedNet.load(path, module=small_net(seed=1))
    assert_same(qnet, loaded, torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert path.read_bytes() == loaded.encoded.data  # and writes the same bytes again


def test_a_pqnet_model_is_rebuilt_from_the_file_alone(lenet, tmp_path):
    qnet = pqnet.quantize(lenet, "kmeans", k=8)
    loaded = QuantizedNet.load(qnet.save(tmp_path / "lenet.pqn"))
    assert type(loaded.module) is type(lenet.module)
    assert_same(qnet, loaded, torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)))


def test_parts_of_a_tiny_file_by_hand():
    qnet = pqnet.quantize(make_posterior(linear_3_2()), "uniform", bits=2)
    # 2-bit grid, half-range max|w| = 0.9: levels -0.9, -0.3, 0.3, 0.9; codes 3 1 2 / 0 2 0
    assert qnet.layers[""].codes.tolist() == [[3, 1, 2], [0, 2, 0]]
    sizes = qnet.sizes
    assert sizes["codebooks"] == 4  # one float32 grid scale
    assert sizes["code_model"] == 4  # counts 2, 1, 2, 1 of the 4 symbols: one varint each
    assert sizes["float"] == 8 and sizes["checksum"] == 4  # two float32 biases
    words = (sizes["codes"] - 1) // 4  # a one-byte word count, then 32-bit words
    assert sizes["codes"] == 1 + 4 * words and words >= 1
    counts = np.array([2, 1, 2, 1])
    assert qnet.code_entropy_bits == pytest.approx(codec.entropy_bits(counts))
    assert qnet.code_entropy_bits == pytest.approx(-(2 * (1 / 3) * math.log2(1 / 3)
                                                     + 2 * (1 / 6) * math.log2(1 / 6)))
    # k-means with k = 3 stores its 3 centres as values
    assert pqnet.quantize(make_posterior(linear_3_2()), "kmeans", k=3).sizes["codebooks"] == 12


def test_the_coder_spends_within_one_percent_of_the_code_entropy_on_a_large_layer():
    layer = skewed_layer(200_000, [0.6, 0.2, 0.1, 0.05, 0.03, 0.01, 0.005, 0.005])
    qnet = QuantizedNet({"": layer}, nn.Linear(200_000, 1, bias=False), "by-hand")
    bound_bytes = qnet.code_entropy_bits * qnet.num_weights / 8
    assert qnet.sizes["codes"] <= 1.01 * bound_bytes + 8
    assert qnet.sizes["codes"] >= bound_bytes  # no coder beats the entropy of its model
    # a fixed-width packing would take 3 bits per weight; the entropy is 1.83
    assert qnet.bits_per_weight < 0.65 * 3


def test_per_weight_widths_are_paid_for_inside_the_code():
    """The symbol of (width, code) joins the widths' codebooks end to end, so a width map
    costs its entropy: six weights at widths 1, 1, 2, 2, 3, 3 with distinct codes take
    log2(6) bits each, and the symbols decode to the same widths and codes."""
    codes = torch.tensor([[1, 0, 3], [0, 5, 2]], dtype=torch.uint8)
    bits = torch.tensor([[1, 1, 2], [2, 3, 3]], dtype=torch.uint8)
    scales = {1: torch.tensor([0.5]), 2: torch.tensor([0.9]), 3: torch.tensor([0.9])}
    layer = QuantizedLayer.from_grid(codes, bits, scales)
    symbols = codec.to_symbols(codes, bits, codec.levels_of(layer))
    assert symbols.tolist() == [1, 0, 2 + 3, 2 + 0, 6 + 5, 6 + 2]
    back_codes, back_bits = codec.from_symbols(symbols, codec.levels_of(layer))
    assert back_codes.tolist() == codes.reshape(-1).tolist()
    assert back_bits.tolist() == bits.reshape(-1).tolist()
    qnet = QuantizedNet({"": layer}, linear_3_2(), "by-hand")
    assert qnet.code_entropy_bits == pytest.approx(math.log2(6))
    assert qnet.sizes["codebooks"] == 12 and qnet.sizes["code_model"] == 2 + 4 + 8
    assert qnet.summary()[0]["code_entropy_bits"] == pytest.approx(math.log2(6))


def test_pruned_weights_are_width_zero_and_nearly_free(lenet, tmp_path):
    qnet = pqnet.quantize(lenet, "uniform", bits=4)
    mask = {p: torch.rand(layer.shape, generator=torch.Generator().manual_seed(0)) < 0.9
            for p, layer in qnet.layers.items()}
    pruned = QuantizedNet({p: layer.pruned(mask[p]) for p, layer in qnet.layers.items()},
                          qnet.module, "pruned")
    for path, layer in pruned.layers.items():
        assert bool((layer.values()[mask[path]] == 0).all())
        assert torch.equal(layer.values()[~mask[path]], qnet.layers[path].values()[~mask[path]])
    assert pruned.avg_bits == pytest.approx(0.1 * 4, abs=0.02)
    # 90 % zeros: about H(0.9) + 0.1 * 4 = 0.87 bits per weight, against 4
    assert pruned.code_entropy_bits < 0.25 * qnet.code_entropy_bits
    loaded = QuantizedNet.load(pruned.save(tmp_path / "p.pqn"))
    assert_same(pruned, loaded, torch.randn(2, 1, 28, 28))


# --------------------------------------------------------------------------- refusals


def _with_checksum(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_corrupt_truncated_foreign_and_future_files_are_refused(small, tmp_path):
    good = pqnet.quantize(small, "uniform", bits=2).save(tmp_path / "good.pqn")
    data = good.read_bytes()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    future = bytearray(data[:-4])
    future[4] = codec.VERSION + 1
    cases = {"truncated": (data[: len(data) // 2], "checksum"),
             "flipped": (bytes(flipped), "checksum"),
             "garbage": (b"not a pqnet file" * 10, "not a pqnet quantized-network file"),
             "empty": (b"", "not a pqnet"),
             "future": (_with_checksum(bytes(future)),
                        f"format version {codec.VERSION + 1}; this pqnet reads version 1"),
             "trailing": (_with_checksum(data[:-4] + b"\0"), "1 bytes follow")}
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.pqn"
        path.write_bytes(content)
        with pytest.raises(ValueError, match=f"path: {path}.*{message}"):
            QuantizedNet.load(path, module=small_net())
    torch.save({"weights": torch.ones(3)}, tmp_path / "foreign.pt")
    posterior_file = small.save(tmp_path / "posterior.pt")
    for path in (tmp_path / "foreign.pt", posterior_file):
        with pytest.raises(ValueError, match="not a pqnet quantized-network file"):
            QuantizedNet.load(path, module=small_net())
    with pytest.raises(FileNotFoundError, match="path"):
        QuantizedNet.load(tmp_path / "missing.pqn")


def test_a_network_of_another_layout_or_none_is_refused(small, tmp_path):
    path = pqnet.quantize(small, "uniform", bits=2).save(tmp_path / "q.pqn")
    with pytest.raises(ValueError, match="pass module="):
        QuantizedNet.load(path)  # not a pqnet.models network: the file cannot rebuild it
    other = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(ValueError, match="module: .*differ"):
        QuantizedNet.load(path, module=other)
    with pytest.raises(TypeError, match="module: expected a torch.nn.Module"):
        QuantizedNet.load(path, module="lenet5")


def test_a_failed_write_keeps_the_old_file(small, tmp_path, monkeypatch):
    path = pqnet.quantize(small, "uniform", bits=2).save(tmp_path / "q.pqn")
    before = path.read_bytes()

    def full_disk(self, data):
        raise OSError("disk full")

    monkeypatch.setattr(type(path), "write_bytes", full_disk)
    with pytest.raises(OSError, match="disk full"):
        pqnet.quantize(small, "uniform", bits=4).save(path)
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]


def test_config_is_stored_as_json_and_refused_when_it_cannot_be(small, tmp_path):
    qnet = pqnet.quantize(small, "uniform", bits=2)
    tagged = QuantizedNet(qnet.layers, qnet.module, "uniform",
                          {"pair": (1, 2), "t": torch.tensor([0.5]), "nested": {3: "x"}})
    loaded = QuantizedNet.load(tagged.save(tmp_path / "c.pqn"), module=small_net())
    assert loaded.config == {"pair": [1, 2], "t": [0.5], "nested": {"3": "x"}}
    odd = QuantizedNet(qnet.layers, qnet.module, "uniform", {"when": object()})
    with pytest.raises(TypeError, match="config: object values cannot be stored"):
        odd.save(tmp_path / "odd.pqn")
    assert not (tmp_path / "odd.pqn").exists()


def test_the_coder_stays_near_the_entropy_on_a_sparse_255_level_alphabet():
    """A fine grid whose 255 levels are mostly unused (as sigma-code leaves them): the stored
    counts keep the model exact, and the codes stay within 1 % of the entropy."""
    rng = np.random.default_rng(1)
    probs = np.zeros(255)
    probs[rng.choice(255, size=30, replace=False)] = rng.dirichlet(np.full(30, 0.3))
    codes = torch.from_numpy(rng.choice(255, size=(1, 100_000), p=probs).astype(np.uint8))
    layer = QuantizedLayer(codes, torch.full((1, 100_000), 8, dtype=torch.uint8),
                           {8: torch.linspace(-1, 1, 255).reshape(1, -1)})
    qnet = QuantizedNet({"": layer}, nn.Linear(100_000, 1, bias=False), "by-hand")
    bound = qnet.code_entropy_bits * qnet.num_weights / 8
    assert bound <= qnet.sizes["codes"] <= 1.01 * bound + 8


def test_scales_that_do_not_rebuild_their_codebook_are_refused():
    codes = torch.zeros(2, 2, dtype=torch.uint8)
    bits = torch.full((2, 2), 2, dtype=torch.uint8)
    book = {2: torch.tensor([[-1.0, -0.2, 0.2, 1.0]])}
    with pytest.raises(ValueError, match="scales: the 2-bit scale"):
        QuantizedLayer(codes, bits, book, {2: torch.tensor([1.0])})
    with pytest.raises(ValueError, match="scales: the 2-bit scale"):
        QuantizedLayer(codes, bits, {2: codec_grid(2)},
                       {2: torch.tensor([1.0], dtype=torch.float64)})


def codec_grid(width: int) -> torch.Tensor:
    return torch.linspace(-1.0, 1.0, 2 ** width).reshape(1, -1)


def test_a_malformed_header_with_a_valid_checksum_is_refused(small, tmp_path):
    data = pqnet.quantize(small, "uniform", bits=2).encoded.data
    reader = codec.Reader(data[:-4])
    header = codec.read_header(reader)
    rest = data[reader.at:-4]
    for name, bad in {"counts": {**header, "layers": [{**header["layers"][0],
                                                       "shape": [1, 1]},
                                                      *header["layers"][1:]]},
                      "keys": {k: v for k, v in header.items() if k != "layers"},
                      "symbols": {**header, "layers": [{**header["layers"][0], "symbols": 1},
                                                       *header["layers"][1:]]},
                      "past the end": {**header, "layers": [{**header["layers"][0],
                                                             "levels": {"2": 100_000}},
                                                            *header["layers"][1:]]}}.items():
        path = tmp_path / f"{name}.pqn"
        path.write_bytes(_with_checksum(codec.header_bytes(bad) + rest))
        message = {"symbols": "decode to other symbols than were written",
                   "past the end": "truncated: the file ends inside a record"}.get(name, "")
        with pytest.raises(ValueError, match=f"path: {path}.*{message}"):
            QuantizedNet.load(path, module=small_net())
    path = tmp_path / "json.pqn"
    junk = zlib.compress(b"{not json")
    path.write_bytes(_with_checksum(codec.MAGIC + bytes([codec.VERSION])
                                    + codec.varint(len(junk)) + junk + rest))
    with pytest.raises(ValueError, match="its header does not decode"):
        QuantizedNet.load(path, module=small_net())


def test_loading_onto_a_given_module_leaves_it_as_it_was(small, tmp_path):
    path = pqnet.quantize(small, "uniform", bits=2).save(tmp_path / "q.pqn")
    module = small_net(seed=3)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    loaded = QuantizedNet.load(path, module=module)
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())
    assert not torch.equal(loaded.module.state_dict()["0.weight"], before["0.weight"])


def test_a_layer_of_one_symbol_needs_no_code_and_decodes(tmp_path):
    """Every weight the same (one level used): the counts say it all, no words are coded."""
    codes = torch.ones(4, 6, dtype=torch.uint8)  # symbol 1 of 2: not the first
    layer = QuantizedLayer(codes, torch.ones(4, 6, dtype=torch.uint8),
                           {1: torch.tensor([[-0.5, 0.5]])})
    qnet = QuantizedNet({"": layer}, nn.Linear(6, 4), "by-hand")
    assert qnet.sizes["codes"] == 1  # a word count of 0, no words
    loaded = QuantizedNet.load(qnet.save(tmp_path / "one.pqn"), module=nn.Linear(6, 4))
    assert torch.equal(loaded.layers[""].codes, codes)
    assert loaded.layers[""].codes.dtype == torch.uint8


def test_a_pqnet_model_built_with_other_arguments_comes_back_the_same(tmp_path):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = pqnet.models.lenet5(num_classes=7)
    posterior = make_posterior(net)
    loaded = QuantizedNet.load(pqnet.quantize(posterior, "uniform", bits=3).save(
        tmp_path / "seven.pqn"))
    assert loaded.module.fc3.out_features == 7


def test_raw_bytes_of_an_unquantized_net():
    lenet = pqnet.models.lenet5()
    assert codec.raw_bytes(lenet.state_dict().values()) == 4 * 61_706
    assert codec.raw_bytes([torch.zeros(3, dtype=torch.int64)]) == 24


# A file written by this version of the format: later builds must read it to the same net, and
# write the same layer records (the header holds library versions, so it may differ).
GOLDEN = bytes.fromhex(
    "50514e5101820278da75ce3d6bc3301006e0bf126e6a410d922cdbb220432974ecd23164506cf90314c9c872"
    "8b31feef3d071a44a1e3ddcb3df7ae7033b1f70d28b82e2fbd760d10a8bd6b870ed40ace478351e76d631c6c"
    "0474a8fb219a3ace0103375b4bc0eac5cf11542672c9caac2c77a131010f519a6218ea387877a0c7fc480faf"
    "1f9fe4f0a6a3e93c06da3e8d26b4089edeb59dcc33dc3d132650e715461d7b64286ea75e8ff8f22c487621d0"
    "85013bc7301b4c96dbd55b3c6095e455990b8686f932fb6a050e4a60f1e0bf7f47b66de441b384e6443ce876"
    "6f93d89964b4a0546422c519289ee0ec0fce539c12feaf2e2a5914959032c5056a45a28bbb7ed97e00666b85"
    "f60000403f0304030202b00afe600d070000000000bf0000003f0206010000c01e000000c0deddddbfbcbbbb"
    "bf999999bfeeee6ebfaaaa2abfcaccccbe828808be8288083ecacccc3eaaaa2a3feeee6e3f9999993fbcbbbb"
    "3fdedddd3f0000004001000504010a0306000001020304000005664c3492f46ce48b9073b6704aaa922bb331"
    "02000000003f000080be0000003e0000803f000080bf790d65bff21a4abf6c282fbfe53514bfbc86f2beafa1"
    "bcbea2bc86be28af21be349457bd3494573d28af213ea2bc863eafa1bc3ebc86f23ee535143f6c282f3ff21a"
    "4a3f790d653f0000803fc8796cfa")


GOLDEN_CODES = [6, 12, 13, 5, 7, 5, 7, 5, 5, 12, 3, 7, 2, 11, 10, 4, 12, 2, 5, 2, 6, 11, 3, 0,
                5, 3, 2, 7, 5, 7, 3, 13, 5, 2, 7, 13, 5, 13, 6, 5]  # a skewed 16-level layer


def golden_module() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2, bias=False), nn.Linear(2, 20))


def golden_net() -> QuantizedNet:
    net = golden_module()
    with torch.no_grad():
        net[0].bias.copy_(torch.tensor([0.5, -0.25, 0.125, 1.0]))
        net[2].bias.copy_(torch.linspace(-1, 1, 20))
    first = QuantizedLayer.from_grid(
        torch.tensor([[3, 1, 2], [0, 2, 0], [1, 1, 1], [2, 3, 0]], dtype=torch.uint8),
        torch.full((4, 3), 2, dtype=torch.uint8), {2: torch.tensor([0.75])})
    second = QuantizedLayer(torch.tensor([[1, 0, 1, 1], [0, 1, 1, 1]], dtype=torch.uint8),
                            torch.ones(2, 4, dtype=torch.uint8), {1: torch.tensor([[-0.5, 0.5]])})
    third = QuantizedLayer(torch.tensor(GOLDEN_CODES, dtype=torch.uint8).reshape(20, 2),
                           torch.full((20, 2), 4, dtype=torch.uint8),
                           {4: torch.linspace(-2, 2, 16).reshape(1, -1)})
    return QuantizedNet({"0": first, "1": second, "2": third}, net, "by-hand",
                        {"note": "golden"})


def test_a_file_of_this_format_version_still_reads_and_is_written_the_same(tmp_path):
    path = tmp_path / "golden.pqn"
    path.write_bytes(GOLDEN)
    loaded, expected = QuantizedNet.load(path, module=golden_module()), golden_net()
    assert_same(loaded, expected, torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))
    assert loaded.config == {"note": "golden"}
    header = codec.Reader(GOLDEN)
    codec.read_header(header)
    body = codec.Reader(expected.encoded.data)
    codec.read_header(body)
    assert expected.encoded.data[body.at:-4] == GOLDEN[header.at:-4]


def test_code_entropy_is_the_count_weighted_mean_over_layers():
    net = golden_net()
    per_layer = [(layer.numel, codec.entropy_bits(codec.symbol_counts(layer)[1]))
                 for layer in net.layers.values()]
    expected = sum(n * h for n, h in per_layer) / sum(n for n, _ in per_layer)
    assert net.code_entropy_bits == pytest.approx(expected)
    assert len({h for _, h in per_layer}) == 3  # the layers differ, so a slip would show
