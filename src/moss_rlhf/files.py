"""Atomic, durable writes: a file or a whole directory either appears complete or not at all, and survives a power
cut once written (every file and directory is fsynced before the rename that publishes it). Checkpoints, final
models, configs, metrics rewrites and exports all go through here."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory, fsynced, then renamed."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same directory, fsynced, then renamed. A path that
    cannot be written (a directory, no permission, a full disk) is a user error naming it, never a traceback."""
    from moss_rlhf.config import UserError  # config imports this module

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a directory; expected the path of a file to write")
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, (FileExistsError, NotADirectoryError)):  # from mkdir: a parent is a file
            raise UserError(f"cannot write {path}: a parent of it is a file, not a directory") from None
        if isinstance(e, OSError):
            raise UserError(f"cannot write {path}: {e.strerror or e}") from None
        raise


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike):
    """Write a directory atomically: yields a temporary sibling to fill; on success it is fsynced and takes
    ``path``'s place (an existing directory is swapped out, then removed); on failure it is deleted and ``path`` is
    left as it was. A crash between the two renames of a swap leaves the old directory beside ``path``:
    :func:`recover_directory` (called here first, and by run directories) puts it back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    tmp, old = staging_path(path), _old_of(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_directory(path: str | os.PathLike) -> None:
    """If a swap by :func:`atomic_directory` was interrupted after the old directory moved aside, move it back."""
    path = Path(path)
    old = _old_of(path)
    if not path.exists() and old.is_dir():
        os.replace(old, path)
    shutil.rmtree(staging_path(path), ignore_errors=True)


def fsync_tree(root: Path) -> None:
    """fsync every file below ``root`` and every directory, deepest first."""
    for folder, _, names in os.walk(root, topdown=False):
        for name in names:
            with open(os.path.join(folder, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(folder))


def checksums(root: Path) -> dict[str, str]:
    """SHA-256 of every file below ``root``, by path relative to it."""
    out = {}
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with file.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        out[str(file.relative_to(root))] = digest.hexdigest()
    return out


def staging_path(path: Path) -> Path:
    """Where :func:`atomic_directory` fills ``path`` before publishing it (other processes write there too)."""
    return path.with_name(f".{path.name}.tmp")


def _old_of(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
