"""Reading and writing the project's files: one clear error on read, atomic replacement on write."""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .errors import EngramEvalError, first_line

if TYPE_CHECKING:
    import polars as pl

# Libraries whose own write errors (polars' ComputeError, safetensors' SafetensorError) are I/O failures, not bugs.
WRITING_LIBRARIES = ("polars", "pyarrow", "safetensors")


def read_text(path: Path, what: str) -> str:
    """A UTF-8 text file, or one clear error naming the path and what the file was for."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EngramEvalError(f"{path}: {what} not found") from None
    except UnicodeDecodeError:
        raise EngramEvalError(f"{path}: {what} is not UTF-8 text") from None
    except OSError as exc:
        raise EngramEvalError(f"{path}: cannot read {what} ({exc.strerror})") from None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_write_error(exc: BaseException) -> bool:
    return isinstance(exc, OSError) or type(exc).__module__.split(".")[0] in WRITING_LIBRARIES


def write_failure(path: Path, exc: BaseException) -> str:
    """What went wrong writing `path`, in a few words: 'no space left on PATH', or the library's first line."""
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
    if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left" in text or "os error 28" in text:
        return f"no space left on {path.parent}"
    return f"cannot write {path} ({text})"


def atomic_replace(path: Path, write: Callable[[Path], None]) -> None:
    """`write` fills a temporary file of a unique name beside `path`, which is then renamed over it: readers never see a
    half-written file, two writers never share a temporary, and a failed or stopped write leaves none behind (one killed
    outright leaves `.tmp-PID-*`, which the store's gc recognises). A write error (the
    operating system's or the writing library's) is one EngramEvalError naming the file."""
    tmp: Path | None = None
    try:
        while tmp is None:
            # The name is known before the file exists, so a Ctrl-C or SIGTERM raised at any point after its creation
            # finds it in `tmp` and the finally below removes it (a signal mask cannot do this: it holds one thread,
            # and the kernel hands the signal to another).
            candidate = path.parent / f".tmp-{os.getpid()}-{path.name}.{secrets.token_hex(4)}.tmp"
            tmp = candidate
            try:
                create_exclusive(candidate)
            except FileExistsError:
                tmp = None
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except Exception as exc:
        if not is_write_error(exc):
            raise
        raise EngramEvalError(write_failure(path, exc)) from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def create_exclusive(path: Path) -> None:
    """An empty file at `path`, which must not exist yet."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    atomic_replace(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_parquet(path: Path, frame: pl.DataFrame) -> None:
    atomic_replace(path, frame.write_parquet)
