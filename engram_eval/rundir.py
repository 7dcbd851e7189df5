"""The run directory: settings that determine a run's numbers, run.json, per-question parts and their merge."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import polars as pl

from . import __version__
from .engram import DEFAULT_MAX_TOKENS
from .errors import EngramEvalError
from .files import atomic_write_text
from .results import RESULT_SCHEMA


@dataclass
class SweepSettings:
    """Everything that determines the numbers of a run (batch size does not)."""

    model: str
    model_fingerprint: str
    bank: str
    bank_sha256: str
    layers: list[int]
    strengths: list[float]
    chunks: int
    scoring: str
    injection: str
    questions: list[str]
    max_tokens: int = DEFAULT_MAX_TOKENS

    @property
    def run_id(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def write_run_json(out: Path, data: dict) -> None:
    atomic_write_text(out / "run.json", json.dumps(data, indent=2, sort_keys=True) + "\n")


def package_versions() -> dict[str, str]:
    names = ("torch", "transformers", "safetensors", "polars", "pyarrow", "numpy")
    return {"engram-eval": __version__, "python": platform.python_version(), **{n: version(n) for n in names}}


def prepare_out(out: Path, settings: SweepSettings, force: bool) -> dict:
    """Create or reopen a run directory; refuse one that holds a run with other settings."""
    run_path = out / "run.json"
    if run_path.exists():
        try:
            previous = json.loads(run_path.read_text())["settings"]
        except (ValueError, KeyError):
            previous = None
        if previous != asdict(settings):
            if not force:
                changed = sorted(k for k in asdict(settings) if (previous or {}).get(k) != asdict(settings)[k])
                raise EngramEvalError(
                    f"--out {out} holds a run with different settings ({', '.join(changed)}); "
                    "use another --out, or --force to replace it"
                )
            shutil.rmtree(out / "parts", ignore_errors=True)
            (out / "results.parquet").unlink(missing_ok=True)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    return {"settings": asdict(settings), "run_id": settings.run_id, "status": "running"}


def part_paths(out: Path, question_ids: list[str]) -> list[Path]:
    return [out / "parts" / f"{i:05d}-{qid}.parquet" for i, qid in enumerate(question_ids)]


def write_part(part: Path, frame: pl.DataFrame) -> None:
    tmp = part.with_name(f".{part.name}.tmp")
    try:
        frame.write_parquet(tmp)
        os.replace(tmp, part)
    except OSError as exc:
        raise EngramEvalError(
            f"{part}: write failed ({exc.strerror or exc}); finished questions are kept, rerun to resume"
        ) from None


def merge_parts(out: Path, parts: list[Path]) -> Path:
    """Stream the parts, in bank order, into results.parquet (atomically)."""
    results_path = out / "results.parquet"
    tmp = out / ".results.parquet.tmp"
    pl.scan_parquet(parts, schema=RESULT_SCHEMA).sink_parquet(tmp, maintain_order=True)
    os.replace(tmp, results_path)
    return results_path
