"""Atomic file writes: a reader never sees half a file, and a failed write keeps the old one."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it onto ``path``.

    The rename is atomic on POSIX, so ``path`` holds either its old content or the new one,
    even when the process is killed mid-write; the file and the folder entry are flushed to
    disk (``fsync``) before and after the rename, so that holds across a power cut too.
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
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _fsync(path: str | os.PathLike) -> None:
    """Flush ``path`` (a file or a folder) to disk; best effort where a file system cannot."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_torch(path: str | os.PathLike, what: str, file_format: str, version: int,
               map_location: str | torch.device = "cpu", argument: str = "path") -> dict:
    """Read a pqnet file (a dict with ``format`` and ``version`` fields) written by
    :func:`save_torch`; a ``FileNotFoundError`` or ``ValueError`` whose message starts with
    ``argument`` otherwise (missing, corrupt, truncated, foreign or another format version).

    The file holds a pickled ``nn.Module``, so the full unpickler is needed: load only files
    you trust, as with any ``torch.save`` of a module.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{argument}: no {what} file at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # unpickling damaged bytes can raise any exception type
        raise ValueError(f"{argument}: {path} is not a readable pqnet {what} "
                         f"(corrupt or truncated?): {type(err).__name__}: {err}") from err
    return _checked_header(state, path, what, file_format, version, argument)


def _checked_header(obj: Any, path: Path, what: str, file_format: str, version: int,
                    argument: str) -> dict:
    """``obj`` when it is a dict whose ``format`` and ``version`` fields are these."""
    if not isinstance(obj, dict) or obj.get("format") != file_format:
        raise ValueError(f"{argument}: {path} is not a pqnet {what} file")
    if obj.get("version") != version:
        raise ValueError(f"{argument}: {path} has {what} format version "
                         f"{obj.get('version')!r}; this pqnet reads version {version}")
    return obj


def save_json(obj: Any, path: str | os.PathLike, file_format: str | None = None,
              version: int | None = None) -> Path:
    """Write ``obj`` as indented JSON to ``path``, atomically. With ``file_format`` and
    ``version`` (a dict ``obj`` only) the file starts with those two fields, which
    :func:`load_json` checks."""
    if file_format is not None:
        if not isinstance(obj, dict) or version is None:
            raise ValueError("file_format: needs a dict obj and a version")
        obj = {"format": file_format, "version": version, **obj}

    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")

    return atomic_write(path, write)


def load_json(path: str | os.PathLike, what: str, file_format: str, version: int,
              argument: str = "path") -> dict:
    """Read a JSON file written by :func:`save_json` with ``file_format`` and ``version``;
    a ``FileNotFoundError`` or ``ValueError`` whose message starts with ``argument`` for a
    missing, unreadable, foreign or other-version file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{argument}: no {what} file at {path}")
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"{argument}: {path} is not a readable pqnet {what} "
                         f"(corrupt or truncated?): {err}") from err
    return _checked_header(obj, path, what, file_format, version, argument)
