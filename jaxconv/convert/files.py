"""Writing output files safely: the path checked before any work, the content written to a
temporary file in the same folder and renamed into place only when complete (a killed process
never leaves a partial file under the final name), with the mode a plain open() would give."""
from __future__ import annotations

import contextlib
import os
import tempfile

from jaxconv.convert.state import ConversionError


def check_output(path, extensions: tuple[str, ...], what: str = "output") -> str:
    """Raise ConversionError unless `path` ends with one of `extensions` and its folder exists
    and is writable; return the path as a string."""
    path = os.fspath(path)
    if not path.endswith(extensions):
        raise ConversionError(f"{what}: expected a file name ending in {' or '.join(extensions)}, "
                              f"got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ConversionError(f"{what}: the folder {folder!r} of {path!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConversionError(f"{what}: the folder {folder!r} of {path!r} is not writable")
    if os.path.isdir(path):
        raise ConversionError(f"{what}: {path!r} is a directory")
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path):
    """Yield a temporary path next to `path`; on success it becomes `path` (mode 0666 & ~umask,
    as open() would create), on any failure it is removed."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
