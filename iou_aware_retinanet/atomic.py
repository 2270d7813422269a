"""Atomic file writing, the package's one implementation.

    with atomic_write(path) as f:          # text, utf-8
        json.dump(obj, f)
    with atomic_write(path, "wb") as f:    # bytes, e.g. torch.save(state, f)
        f.write(data)

The data goes to a private temporary file in ``path``'s folder, is flushed to
disk, then renamed over ``path`` (``os.replace``, atomic on POSIX and
Windows): a reader, a crash or a kill at any moment sees either the old file
or the complete new one. When the block raises, the temporary file is removed
and ``path`` is left as it was.
"""
import contextlib
import os
import secrets
from typing import IO, Iterator

__all__ = ["atomic_write"]

_MODES = ("w", "wb")


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", fsync: bool = True) -> Iterator[IO]:
    """A file object for ``mode`` ("w": utf-8 text, "wb": bytes) that replaces ``path`` on success.

    ``fsync=False`` skips forcing the data to disk before the rename (still
    atomic for readers; for many small files, e.g. generated images, whose loss
    in a power cut only means generating them again).
    """
    if mode not in _MODES:
        raise ValueError(f"atomic_write mode={mode!r}; supported: {', '.join(repr(m) for m in _MODES)}")
    # Unique per process and call: several processes (ranks, pool workers) may write
    # the same file at once. "x" creates it with the usual permissions (umask), which
    # tempfile.mkstemp (0600) would not.
    tmp = f"{path}.{os.getpid()}-{secrets.token_hex(4)}.tmp"
    try:
        with open(tmp, mode.replace("w", "x"), encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
