"""Atomic file writes: a reader (or a resume after kill -9 or power loss) sees either the old
file or the whole new one, never half of one.

Every file a run writes goes through :func:`atomic_write`: the content is written to a
temporary file in the same folder (so the rename cannot cross file systems), flushed and
fsync'ed, renamed onto the final name with ``os.replace`` (atomic on POSIX and Windows), and
the folder is fsync'ed so the rename itself survives a power loss. A write that fails (disk
full, read-only folder) removes its temporary file, leaves the previous file, if any, as it
was, and becomes a one-line :class:`UserError`. Temporary files a kill left behind are
removed by :func:`remove_stale_temps` when a run starts or resumes.

Temporary names keep the real suffix (``.mesh.glb.k3j9x.tmp.glb``) because some writers
(imageio, ffmpeg) choose the format from it.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
from pathlib import Path
from typing import Callable, Iterable, List, Union

from engine.errors import UserError

#: temporary names: a dot, the final name, a random tag, ``.tmp``, then the final suffix
TEMP_RE = re.compile(r"^\..+\.[0-9a-z]{8}\.tmp(\.[A-Za-z0-9]+)?$")

# errors the user can fix (space, permissions, a read-only mount), as opposed to our bugs
USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
               errno.EFBIG, errno.ENAMETOOLONG}

PathLike = Union[str, Path]


class WriteFailed(UserError):
    """A file could not be written for a reason the user can fix; nothing partial is left
    under its name, and the files written before it are intact."""

    def __init__(self, path: Path, exc: OSError):
        self.path = Path(path)
        self.errno = exc.errno
        super().__init__(f"cannot write {self.path}: {exc.strerror or exc}; files written "
                         "before it are intact")


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}")


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass    # some file systems (and Windows) refuse to fsync a folder; nothing to do
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` to write the content, then move it onto ``path`` atomically
    and durably. An OSError the user can fix becomes :class:`WriteFailed` (one line)."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink()
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.errno in USER_ERRNOS:
            raise WriteFailed(path, exc) from None
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
    return atomic_write(path, write)


def atomic_write_text(path: PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def remove_stale_temps(folder: PathLike) -> List[Path]:
    """Delete the temporary files that interrupted writes left anywhere under ``folder``
    (call it only while holding the folder's lock: a live writer's temp looks the same)."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in _walk(folder):
        if TEMP_RE.match(p.name) or _legacy_temp(p):
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def _walk(folder: Path) -> Iterable[Path]:
    for root, _, files in os.walk(folder):
        for name in files:
            yield Path(root) / name


def _legacy_temp(p: Path) -> bool:
    """Temporary files of the engine's earlier writer (``.NAME.RANDOM.tmp``, mkstemp)."""
    return p.name.startswith(".") and p.name.endswith(".tmp")
