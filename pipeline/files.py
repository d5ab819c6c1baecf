"""Atomic file writes: outputs appear whole or not at all, and a failed write names the file it was for."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

# Write failures the machine causes, not the code, each with what the user can do about it. Only errors that
# writing alone raises: a permission error inside the block might come from reading some other file.
_WRITE_FAILURES = {
    errno.ENOSPC: "free space on that disk",
    errno.EDQUOT: "free space within your disk quota",
    errno.EFBIG: "raise the file size limit (ulimit -f) or write to another disk",
    errno.EROFS: "remount that disk writable",
}


class WriteFailed(PipelineError):
    """An output could not be written (disk full, quota, read-only disk); the message names it, not its temp file."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.errno = code


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path beside `path` and renames it onto `path` once the block succeeds.

    A full disk, a quota, a file size limit or a read-only disk raises WriteFailed naming `path`.
    """
    path = Path(path)
    tmp_path = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Keep the suffix so writers that dispatch on it (np.savez, keras.saving, PIL) see the right one.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
        os.close(fd)
        tmp_path = Path(tmp)
        yield tmp_path
        # mkstemp makes the file 0600; give it the mode a plain open() would have, so other users
        # of a shared machine or CI cache can read outputs as they read the rest.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
    except OSError as e:
        if e.errno not in _WRITE_FAILURES:
            raise
        # The writer's own message names the temporary file, which is gone by the time anyone reads it.
        raise WriteFailed(f"cannot write {path}: {os.strerror(e.errno)}; {_WRITE_FAILURES[e.errno]} "
                          f"({path.parent.resolve()}) and run `dvc repro` again", e.errno) from e
    finally:
        if tmp_path is not None:
            tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    """Returns the process's umask (reading it means setting it: it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json(path: str | Path, data: Any) -> None:
    """Writes `data` as indented JSON, atomically."""
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """Writes `text`, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
