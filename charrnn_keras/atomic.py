"""Atomic writes: every file or folder we write appears whole under its name, or not at all.

One convention for every writer: the data goes to ``.<name>.tmp<pid><suffix>`` beside the
target, then ``os.replace`` (``os.rename`` for a folder) puts it under the real name. The
process id tells a temporary left by a killed process (``remove_stale``) from one still being
written. ``suffix`` keeps ``.weights.h5``, the only names Keras writes weights under. Any
``OSError`` of the file system (full disk, read-only folder, permissions) becomes one
``StorageError`` naming the folder, the free space and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from charrnn_keras.errors import StorageError

logger = logging.getLogger(__name__)

WEIGHTS_SUFFIX = ".weights.h5"
_TEMP = re.compile(r"\.(?P<name>.+)\.tmp(?P<pid>\d+)(?P<suffix>\.weights\.h5)?")


def temp_path(path: str | Path) -> Path:
    """Returns the temporary name this process writes ``path`` under."""
    path = Path(path)
    suffix = WEIGHTS_SUFFIX if path.name.endswith(WEIGHTS_SUFFIX) else ""
    stem = path.name.removesuffix(suffix) if suffix else path.name
    return path.with_name(f".{stem}.tmp{os.getpid()}{suffix}")


def is_temp(name: str) -> bool:
    """Whether ``name`` is a temporary name of ``temp_path``'s form."""
    return _TEMP.fullmatch(name) is not None


def storage_error(e: OSError, path: str | Path) -> StorageError:
    """Turns a file system error while writing ``path`` into one line saying what to do."""
    folder = Path(path).parent
    reason = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f"{shutil.disk_usage(folder).free / 2**20:,.1f} MiB free"
        except OSError:
            free = "free space unknown"
        return StorageError(
            f"cannot write {path}: {folder} is full ({free}); free some space there or "
            f"choose another folder, then run the command again"
        )
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return StorageError(
            f"cannot write {path}: {reason}; make {folder} writable or choose another folder"
        )
    return StorageError(f"cannot write {path}: {reason}")


@contextlib.contextmanager
def replacing(path: str | Path, folder: bool = False) -> Iterator[Path]:
    """Yields a temporary path to write; on success it becomes ``path``, else it is removed.

    Args:
        path: the final name.
        folder: write a folder (created with the umask's permissions, as ``mkdir`` does); it
            is renamed into place only if ``path`` does not exist or is an empty folder, so a
            folder written by another process at the same time is never replaced.

    Yields:
        The temporary path (for ``folder``, an existing empty folder).
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        if folder:
            tmp.mkdir()
        yield tmp
        (os.rename if folder else os.replace)(tmp, path)
    except OSError as e:
        if folder and path.exists() and e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        raise storage_error(e, path) from None
    finally:
        if folder:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    """Writes UTF-8 ``text`` atomically; newlines are written as given (CSV rows end in \\r\\n)."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")


def write_json(path: str | Path, obj) -> None:
    """Writes ``obj`` as indented UTF-8 JSON atomically."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def copy(src: str | Path, dst: str | Path) -> None:
    """Copies a file atomically."""
    with replacing(dst) as tmp:
        shutil.copyfile(src, tmp)


def remove_stale(directory: str | Path) -> list[Path]:
    """Deletes temporaries that killed processes left in ``directory``; live writers' stay.

    Returns:
        The deleted paths.
    """
    directory = Path(directory)
    removed = []
    for path in directory.iterdir() if directory.is_dir() else ():
        m = _TEMP.fullmatch(path.name)
        if not m or _alive(int(m.group("pid"))):
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
        logger.info("removed %s, left by an interrupted write", path)
    return removed


def _alive(pid: int) -> bool:
    """Whether another process with this id is running (ids are reused, e.g. in containers)."""
    if pid == os.getpid():
        return False  # called while setting up, when this process has no write in flight
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. another user's process: alive
        return True
    return True
