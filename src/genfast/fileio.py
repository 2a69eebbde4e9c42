"""Atomic file writes: every file genfast writes appears whole or not at all.

A write goes to a temporary file beside the target (same folder, so the rename
cannot cross file systems), is flushed to disk, then renamed over the target. A
failure or an interrupt leaves the earlier file, if any, untouched and removes
the temporary one.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from genfast.errors import GenfastError


@contextmanager
def atomic_path(path: Path, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`.

    `durable` also flushes the file to disk before the rename (checkpoints, data);
    bulk image output skips that: the rename alone keeps files whole, and an fsync
    per image would cost more than making it.
    """
    path = Path(path)
    # The temporary name is the target's, cut so that the suffixes keep it within the
    # 255 bytes a file name may have (a legal target name must not fail for its temporary).
    stem = path.name.encode()[:200].decode(errors="ignore")
    tmp = path.with_name(f".{stem}.{uuid.uuid4().hex[:8]}.part")
    try:
        yield tmp
        with writing(path):  # its own steps; what the caller's block raises is the caller's to word
            if durable:
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            # Some writers (safetensors among them) create files owner-only; give the
            # final file the permissions any ordinary new file would get.
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """A file-system error while writing `path` (a full disk, a vanished folder) as one line."""
    try:
        yield
    except OSError as e:
        raise GenfastError(f"cannot write {path}: {e.strerror or e}; the previous file, if any, is unchanged") \
            from None


def ensure_dir(folder: Path) -> Path:
    """Create `folder` (and its parents) or say in one line why it cannot be."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GenfastError(f"cannot create folder {folder}: {e.strerror}; choose another location") from None
    return Path(folder)


def user_cache() -> Path:
    """genfast's folder in the user's cache: $XDG_CACHE_HOME/genfast, else ~/.cache/genfast
    (data sets, engine decisions and ONNX exports each keep a folder or file in it)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "genfast"


def write_bytes(path: Path, data: bytes) -> None:
    with writing(path), atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _umask() -> int:
    # The only portable way to read the umask is to set it and put it back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
