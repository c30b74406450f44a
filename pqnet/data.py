"""Datasets as in-memory, normalised tensors.

:func:`load` returns :class:`TensorData` objects (a ``TensorDataset`` with ``x`` of shape
``(N, C, H, W)`` in float32, ``y`` int64 class labels and some metadata), ready for a
``DataLoader``:

``digits``
    scikit-learn's 8x8 handwritten digits (1,797 images), split 75/25 with a fixed stratified
    split and standardised with the training set's pixel mean and std. Always available.
``mnist``, ``fashion-mnist``
    Read from a folder of IDX files (``train-images-idx3-ubyte[.gz]`` etc.). If the full
    training files are absent but ``train5k-*`` subset files are present, the subset is used
    and ``note`` says so. A torchvision download folder also works.
``cifar10``
    Through ``torchvision.datasets.CIFAR10`` (never downloads); needs the ``vision`` extra.

Nothing here downloads anything.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = ["DATASETS", "TensorData", "load", "read_idx"]

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10")
_SPLITS = {"both": (True, False), "train": (True,), "test": (False,)}


class TensorData(TensorDataset):
    """A validated ``TensorDataset`` of images ``x`` (N, C, H, W) and labels ``y`` (N,).

    Attributes: ``x`` (float32), ``y`` (int64), ``name``, ``num_classes``, ``input_shape``
    (C, H, W) and ``note``, a human-readable account of where the data came from.
    """

    def __init__(self, x, y, *, name: str, num_classes: int, note: str = "") -> None:
        x = torch.as_tensor(x, dtype=torch.float32)
        y = torch.as_tensor(y)
        if x.ndim != 4:
            raise ValueError(f"x: expected a 4-D tensor (N, C, H, W), got shape {tuple(x.shape)}")
        if y.ndim != 1:
            raise ValueError(f"y: expected a 1-D tensor of labels, got shape {tuple(y.shape)}")
        if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise ValueError(f"y: expected integer class labels, got dtype {y.dtype}")
        if len(y) != len(x):
            raise ValueError(f"y: has {len(y)} labels but x has {len(x)} samples")
        if len(x) == 0:
            raise ValueError("x: the dataset is empty")
        if not torch.isfinite(x).all():
            raise ValueError("x: contains NaN or inf values")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes: expected a positive integer, got {num_classes!r}")
        y = y.to(torch.int64)
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"y: labels must lie in [0, {num_classes}), found values from {lo} to {hi}"
            )
        super().__init__(x, y)
        self.x, self.y = x, y
        self.name = name
        self.num_classes = num_classes
        self.input_shape: tuple[int, ...] = tuple(x.shape[1:])
        self.note = note

    def __repr__(self) -> str:
        return (
            f"TensorData(name={self.name!r}, n={len(self.x)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )


def load(name: str, root: str | Path | None = None, split: str = "both"):
    """Load dataset ``name`` (one of :data:`DATASETS`) from folder ``root``.

    Returns ``(train, test)`` for ``split="both"``, else the single :class:`TensorData` for
    ``"train"`` or ``"test"``. ``root`` is ignored for ``digits``.
    """
    if split not in _SPLITS:
        raise ValueError(f"split: expected 'both', 'train' or 'test', got {split!r}")
    parts = _SPLITS[split]
    if name == "digits":
        out = _digits(parts)
    elif name in _IDX_SETS:
        out = _idx_dataset(name, root, parts)
    elif name == "cifar10":
        out = _cifar10(root, parts)
    else:
        raise ValueError(f"name: unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return tuple(out) if split == "both" else out[0]


# --------------------------------------------------------------------------- digits


def _digits(parts: tuple[bool, ...]) -> list[TensorData]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.float32)[:, None] / 16.0
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    note = (
        f"digits: scikit-learn load_digits, stratified split (test_size=0.25, random_state=0): "
        f"{len(y_tr)} training / {len(y_te)} test images, standardised with the training "
        f"pixel mean {mean:.4f} and std {std:.4f}"
    )
    data = {True: (x_tr, y_tr), False: (x_te, y_te)}
    return [
        TensorData((data[t][0] - mean) / std, data[t][1], name="digits", num_classes=10, note=note)
        for t in parts
    ]


# --------------------------------------------------------------------------- IDX files

# IDX type codes (third magic byte) -> big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzip-compressed if its name ends in ``.gz``.

    The format: two zero bytes, a type code (``0x08`` uint8 ... ``0x0E`` float64), the
    number of dimensions ``d >= 1``, ``d`` big-endian uint32 sizes, then exactly
    ``prod(sizes) * itemsize`` bytes of big-endian data. Raises ``ValueError`` starting with
    ``path:`` and naming the file for anything else: a bad magic number, a truncated header or
    body, trailing bytes, or a corrupt gzip stream.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise
    except (OSError, EOFError, zlib.error) as e:  # bad or truncated gzip stream
        raise ValueError(f"path: {path}: cannot read the IDX data ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or raw[3] == 0:
        raise ValueError(
            f"path: {path}: not an IDX file; expected a magic number of two zero bytes, a type "
            f"code in {{{', '.join(f'0x{c:02X}' for c in _IDX_DTYPES)}}} and a dimension count "
            f">= 1, got {raw[:4].hex(' ') or 'an empty file'}"
        )
    dtype, ndim = _IDX_DTYPES[raw[2]], raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(
            f"path: {path}: truncated IDX header; expected {header} bytes for {ndim} "
            f"dimensions, got {len(raw)}"
        )
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(
            f"path: {path}: truncated or corrupt IDX file; shape {shape} of {dtype.name} needs "
            f"{expected} data bytes, found {len(raw) - header}"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="))  # native byte order, writable copy


_IDX_SETS = {
    # name: (title, pixel mean, pixel std, torchvision class / sub-folder)
    "mnist": ("MNIST", 0.1307, 0.3081, "MNIST"),
    "fashion-mnist": ("Fashion-MNIST", 0.2860, 0.3530, "FashionMNIST"),
}
_IDX_FILES = {
    True: [
        ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        ("train5k-images-idx3-ubyte", "train5k-labels-idx1-ubyte"),
    ],
    False: [("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")],
}


def _expected_files() -> str:
    pairs = [p for t in (True, False) for p in _IDX_FILES[t]]
    return ", ".join(f"{stem}[.gz]" for pair in pairs for stem in pair)


def _find(folder: Path, stem: str) -> Path | None:
    for candidate in (folder / stem, folder / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_idx_pair(folder: Path, train: bool) -> tuple[np.ndarray, np.ndarray, str] | None:
    """Images, labels and a description from the first complete file pair, or None."""
    for i, stems in enumerate(_IDX_FILES[train]):
        images, labels = (_find(folder, stem) for stem in stems)
        if images is None or labels is None:
            continue
        x, y = read_idx(images), read_idx(labels)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(
                f"root: {images}: expected N images of shape (H, W) matching the N labels in "
                f"{labels.name}, got images {x.shape} and labels {y.shape}"
            )
        if not train:
            what = f"{len(y)} official test images from {images.name}"
        elif i == 0:
            what = f"{len(y)} training images from {images.name}"
        else:
            what = (
                f"{len(y)} training images from {images.name} (a subset: the full "
                f"{_IDX_FILES[True][0][0]}[.gz] is not in {folder})"
            )
        return x, y, what
    return None


def _idx_dataset(name: str, root: str | Path | None, parts: tuple[bool, ...]) -> list[TensorData]:
    title, mean, std, subdir = _IDX_SETS[name]
    if root is None:
        raise FileNotFoundError(
            f"root: {name} is read from a folder of IDX files; pass root=<folder> holding "
            f"{_expected_files()}"
        )
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(
            f"root: folder {root} does not exist; expected a folder holding {_expected_files()}"
        )
    loaded = []
    for train in parts:
        # The folder itself, or torchvision's download layout <root>/<Class>/raw.
        found = _read_idx_pair(root, train) or _read_idx_pair(root / subdir / "raw", train)
        if found is None:
            found = _torchvision_idx(name, root, train)
        loaded.append(found)
    note = f"{title}: " + "; ".join(what for _, _, what in loaded)
    return [
        TensorData(
            ((x.astype(np.float32) / 255.0 - mean) / std)[:, None],
            y.astype(np.int64),
            name=name,
            num_classes=10,
            note=note,
        )
        for x, y, _ in loaded
    ]


def _torchvision_idx(name: str, root: Path, train: bool) -> tuple[np.ndarray, np.ndarray, str]:
    """Fallback for IDX files that are not in ``root``: torchvision's own loader."""
    title, _, _, cls_name = _IDX_SETS[name]
    split = "training" if train else "test"
    missing = FileNotFoundError(
        f"root: no {title} {split} files in {root}; expected "
        + " or ".join(" + ".join(f"{s}[.gz]" for s in pair) for pair in _IDX_FILES[train])
    )
    try:
        import torchvision
    except Exception:
        raise missing from None
    try:
        ds = getattr(torchvision.datasets, cls_name)(str(root), train=train, download=False)
    except RuntimeError:  # "Dataset not found"
        raise missing from None
    x, y = ds.data.numpy(), ds.targets.numpy()
    return x, y, f"{len(y)} {split} images via torchvision.datasets.{cls_name}"


# --------------------------------------------------------------------------- CIFAR-10

_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _cifar10(root: str | Path | None, parts: tuple[bool, ...]) -> list[TensorData]:
    try:
        import torchvision
    except Exception as e:
        raise ImportError(
            f"cifar10 needs torchvision, which is not installed or failed to import ({e}); "
            "install it with `pip install 'pqnet[vision]'`"
        ) from e
    if root is None or not Path(root).expanduser().is_dir():
        raise FileNotFoundError(
            f"root: cifar10 needs the folder holding torchvision's cifar-10-batches-py, "
            f"got {root!r}"
        )
    root = Path(root).expanduser()
    mean = torch.tensor(_CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_CIFAR10_STD).view(1, 3, 1, 1)
    out = []
    for train in parts:
        try:
            ds = torchvision.datasets.CIFAR10(str(root), train=train, download=False)
        except RuntimeError as e:  # "Dataset not found or corrupted"
            raise FileNotFoundError(
                f"root: no CIFAR-10 data in {root} ({e}); expected {root}/cifar-10-batches-py"
            ) from e
        x = torch.from_numpy(ds.data).permute(0, 3, 1, 2).float() / 255.0
        note = f"CIFAR-10: {len(ds.targets)} {'training' if train else 'test'} images from {root}"
        out.append(
            TensorData((x - mean) / std, ds.targets, name="cifar10", num_classes=10, note=note)
        )
    return out
