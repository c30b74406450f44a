"""Atomic file writes: a reader never sees half a file, and a failed write keeps the old one."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it onto ``path``.

    The rename is atomic on POSIX, so ``path`` holds either its old content or the new one.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"path: {path} is a directory; expected a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it 0600; a result file is an ordinary file
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_torch(path: str | os.PathLike, what: str, file_format: str, version: int,
               map_location: str | torch.device = "cpu") -> dict:
    """Read a pqnet file (a dict with ``format`` and ``version`` fields) written by
    :func:`save_torch`; a ``FileNotFoundError`` or ``ValueError`` naming ``path`` otherwise.

    The file holds a pickled ``nn.Module``, so the full unpickler is needed: load only files
    you trust, as with any ``torch.save`` of a module.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no {what} file at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError,
            OSError, AttributeError, ImportError) as err:
        raise ValueError(f"path: {path} is not a readable pqnet {what} "
                         f"(corrupt or truncated?): {err}") from err
    if not isinstance(state, dict) or state.get("format") != file_format:
        raise ValueError(f"path: {path} is not a pqnet {what} file")
    if state.get("version") != version:
        raise ValueError(f"path: {path} has {what} format version {state.get('version')!r}; "
                         f"this pqnet reads version {version}")
    return state


def save_json(obj: Any, path: str | os.PathLike) -> Path:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")

    return atomic_write(path, write)
