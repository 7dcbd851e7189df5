"""The neutral passage of the side-effect probe (`sweep --neutral FILE|default`): text read and checked before any
model loads."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from ..core.errors import EngramEvalError

DEFAULT = "default"  # `--neutral default`: the bundled passage


@dataclass(frozen=True)
class NeutralPassage:
    label: str  # "default", or the file it was read from
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


def read_passage(value: str) -> NeutralPassage:
    """`--neutral FILE` (UTF-8 text), or `default` for the bundled everyday passage (about 200 tokens)."""
    if value == DEFAULT:
        return NeutralPassage(DEFAULT, files(__package__).joinpath("neutral.txt").read_text(encoding="utf-8"))
    path = Path(value)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EngramEvalError(f"--neutral {value}: no such file (or `default` for the bundled passage)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EngramEvalError(f"--neutral {value}: cannot read it as UTF-8 text ({exc.__class__.__name__})") from None
    if not text.strip():
        raise EngramEvalError(f"--neutral {value}: the file is empty")
    return NeutralPassage(str(path), text)
