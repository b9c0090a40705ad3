"""Crash-safe JSON files: the registry's only persistence primitive.

Every write goes to a temporary file in the same directory, is flushed and ``fsync``-ed, then
``os.replace``-d over the target (atomic on POSIX) and the directory is ``fsync``-ed, so a reader
or a crash mid-write sees either the old file or the new one, never half of one. Writers that
read-modify-write hold an exclusive ``flock`` on a lock file so two processes cannot interleave
and lose each other's update; readers need no lock because replacement is atomic. A process killed
between creating its temporary file and the rename leaves that file behind; since every write
happens under the lock, :func:`sweep_temp_files` (called under the same lock) can only find such
orphans, never a write in progress.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

#: Suffix of :func:`write_json_atomic`'s temporary files (``.<name>.<random>.tmp``).
TEMP_SUFFIX = ".tmp"


class DamagedFileError(ValueError):
    """A file that is not the JSON this module wrote: its writes are atomic, so it was truncated or
    edited outside it. The message names the file; ``path`` is it."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = Path(path)
        super().__init__(f"{path}: damaged, {reason}. Its writer replaces it atomically, so it was changed "
                         "outside it (an edit, a copy cut short): restore it from a backup, or remove the "
                         "resource it describes")


def read_json(path: Path, default: Any = None) -> Any:
    """The parsed file, or ``default`` when it does not exist; :class:`DamagedFileError` if it is
    not JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return default
    except json.JSONDecodeError as e:
        raise DamagedFileError(path, f"not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError:
        raise DamagedFileError(path, "not UTF-8 text") from None


def write_json_atomic(path: Path, value: Any, indent: int = 2) -> None:
    """Replace ``path`` with ``value`` as JSON such that a crash at any point leaves a valid file."""
    write_text_atomic(path, json.dumps(value, indent=indent, sort_keys=False) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` such that a crash at any point leaves the old file or the new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(directory: Path) -> None:
    """Persist the directory entry of a rename, so the new file survives a power cut too."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock (across processes) for a read-modify-write."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def sweep_temp_files(directory: Path) -> list[Path]:
    """Remove the temporary files killed writers left under ``directory``; returns what was removed.
    Call it holding the lock every writer holds, so no live write can lose its file."""
    removed = []
    for path in Path(directory).rglob(f".*{TEMP_SUFFIX}"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    return removed
