"""Dataset loading in pqnet.data: digits, MNIST from IDX files, the IDX reader, errors."""

import gzip
import importlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from pqnet import data

MNIST_DIR = Path(__file__).parents[2] / "shared/data/mnist"


def write_idx(path: Path, array: np.ndarray, code: int = 0x08) -> Path:
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


# --------------------------------------------------------------------------- digits


def test_digits_split_and_standardisation():
    train, test = data.load("digits")
    assert (len(train), len(test)) == (1347, 450)
    for ds in (train, test):
        assert ds.x.shape[1:] == (1, 8, 8) and ds.input_shape == (1, 8, 8)
        assert ds.x.dtype == torch.float32 and ds.y.dtype == torch.int64
        assert ds.num_classes == 10 and ds.name == "digits"
        assert set(ds.y.tolist()) == set(range(10))
    assert abs(train.x.mean().item()) < 1e-4
    assert abs(train.x.std().item() - 1.0) < 1e-2
    # stratified: every class makes up the same share of both splits (to within one image)
    share_train = torch.bincount(train.y) / len(train)
    share_test = torch.bincount(test.y) / len(test)
    assert torch.allclose(share_train, share_test, atol=1 / len(test) + 1e-6)


def test_single_split_and_bad_split():
    test = data.load("digits", split="test")
    assert isinstance(test, data.TensorData) and len(test) == 450
    with pytest.raises(ValueError, match=r"^split:"):
        data.load("digits", split="validation")


def test_unknown_name():
    with pytest.raises(ValueError, match=r"^name: unknown dataset 'svhn'.*digits, mnist"):
        data.load("svhn")


# --------------------------------------------------------------------------- MNIST


@pytest.fixture(scope="module")
def mnist():
    if not MNIST_DIR.is_dir():
        pytest.skip(f"no MNIST folder at {MNIST_DIR}")
    return data.load("mnist", root=MNIST_DIR)


def test_mnist_from_the_shared_folder(mnist):
    train, test = mnist
    assert (len(train), len(test)) == (5000, 10000)
    assert train.input_shape == test.input_shape == (1, 28, 28)
    assert "train5k" in train.note and "t10k" in test.note
    assert torch.bincount(train.y, minlength=10).tolist() == [500] * 10
    # normalised with the standard MNIST statistics: roughly zero mean, unit std
    assert abs(test.x.mean().item()) < 0.05 and abs(test.x.std().item() - 1) < 0.05


def test_missing_root_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^root:.*does-not-exist"):
        data.load("mnist", root=tmp_path / "does-not-exist")
    with pytest.raises(FileNotFoundError, match=r"^root:"):
        data.load("mnist")


def test_full_training_files_are_preferred(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("train5k", 4), ("t10k", 3)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", images)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n, dtype=np.uint8))
    train, test = data.load("fashion-mnist", root=tmp_path)
    assert (len(train), len(test)) == (6, 3)
    assert "train5k" not in train.note and train.name == "fashion-mnist"


# --------------------------------------------------------------------------- IDX reader


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trip(tmp_path, suffix):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / f"images-idx3-ubyte{suffix}", images)
    np.testing.assert_array_equal(data.read_idx(path), images)
    ints = np.array([-5, 0, 70000], dtype=">i4")
    back = data.read_idx(write_idx(tmp_path / f"ints{suffix}", ints, code=0x0C))
    np.testing.assert_array_equal(back, ints)


def test_truncated_idx_file(tmp_path):
    path = write_idx(tmp_path / "labels-idx1-ubyte", np.zeros(100, dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"labels-idx1-ubyte.*truncated"):
        data.read_idx(path)
    gz = write_idx(tmp_path / "labels-idx1-ubyte.gz", np.zeros(100, dtype=np.uint8))
    gz.write_bytes(gz.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"labels-idx1-ubyte\.gz"):
        data.read_idx(gz)


def test_bad_magic(tmp_path):
    path = tmp_path / "not-idx"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(ValueError, match=r"not-idx: not an IDX file"):
        data.read_idx(path)


# --------------------------------------------------------------------------- CIFAR-10


def test_cifar10_without_torchvision(tmp_path):
    try:
        importlib.import_module("torchvision")
    except Exception:
        pass
    else:
        pytest.skip("torchvision is importable")
    with pytest.raises(ImportError, match=r"pqnet\[vision\]"):
        data.load("cifar10", root=tmp_path)


# --------------------------------------------------------------------------- TensorData


def test_tensor_data_validation():
    x, y = torch.zeros(4, 1, 2, 2), torch.tensor([0, 1, 2, 1])
    ds = data.TensorData(x, y, name="toy", num_classes=3, note="made up")
    assert ds.input_shape == (1, 2, 2) and len(ds) == 4
    bad = x.clone()
    bad[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"^x:.*NaN"):
        data.TensorData(bad, y, name="toy", num_classes=3)
    with pytest.raises(ValueError, match=r"^y:"):
        data.TensorData(x, torch.tensor([0, 1, 3, 1]), name="toy", num_classes=3)
    with pytest.raises(ValueError, match=r"^y:"):
        data.TensorData(x, torch.tensor([0, -1, 2, 1]), name="toy", num_classes=3)
    with pytest.raises(ValueError, match=r"^y:.*3 labels"):
        data.TensorData(x, y[:3], name="toy", num_classes=3)
    with pytest.raises(ValueError, match=r"empty"):
        data.TensorData(x[:0], y[:0], name="toy", num_classes=3)
