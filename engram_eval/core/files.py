"""Reading and writing the project's files: one clear error on read, atomic replacement on write."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import EngramEvalError

if TYPE_CHECKING:
    import polars as pl


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


def atomic_write_text(path: Path, text: str) -> None:
    """Write beside the target, then rename over it: readers never see a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def atomic_write_parquet(path: Path, frame: pl.DataFrame) -> None:
    """The same for a Parquet file."""
    tmp = path.with_name(f".{path.name}.tmp")
    frame.write_parquet(tmp)
    os.replace(tmp, path)
