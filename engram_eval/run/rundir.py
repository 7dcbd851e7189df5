"""The run directory: run.json, per-question parts and their merge."""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import polars as pl

from .._version import __version__
from ..core.errors import EngramEvalError, Terminated
from ..core.files import atomic_replace, atomic_write_parquet, atomic_write_text
from ..core.locks import FileLock
from .results import RESULT_SCHEMA
from .settings import SweepSettings


def write_run_json(out: Path, data: dict) -> None:
    atomic_write_text(out / "run.json", json.dumps(data, indent=2, sort_keys=True) + "\n")


def package_versions() -> dict[str, str]:
    names = ("torch", "transformers", "safetensors", "polars", "pyarrow", "numpy")
    return {"engram-eval": __version__, "python": platform.python_version(), **{n: version(n) for n in names}}


# The part files' columns, as a short hash: resuming from parts of another format would mix schemas.
RESULTS_FORMAT = hashlib.sha256(str(list(RESULT_SCHEMA.items())).encode()).hexdigest()[:8]

# What a run directory holds that derives from its settings: --force on other settings removes all of it.
DERIVED = ("parts", "results.parquet", "report.html", "generations.parquet", "generation-parts", "generation.json")


def read_run_json(out: Path) -> dict | None:
    """A run directory's run.json, None when there is none; an unreadable one is named as such."""
    path = out / "run.json"
    if not path.exists():
        return None
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(run, dict):
            raise ValueError("not a JSON object")
        return run
    except (OSError, ValueError) as exc:
        raise EngramEvalError(f"{path}: unreadable run.json ({one_line(exc)})") from None


def check_results_format(out: Path, run: dict) -> None:
    """Refuse a run whose rows have other columns than this engram-eval writes (one clear line, not a crash)."""
    if run.get("results_format") != RESULTS_FORMAT:
        raise EngramEvalError(f"{out} was written by another engram-eval version (results format "
                              f"{run.get('results_format', 'unrecorded')}, now {RESULTS_FORMAT}); rerun its sweep with --force")


def prepare_out(out: Path, settings: SweepSettings, force: bool) -> dict:
    """Create or reopen a run directory; refuse one that holds a run with other settings unless forced, and then
    remove everything derived from the old run."""
    try:
        previous_run = read_run_json(out) or {}
    except EngramEvalError:
        if not force:
            raise EngramEvalError(f"{out / 'run.json'}: unreadable run.json; use --force to replace the run in {out}") from None
        previous_run = {}
    previous = previous_run.get("settings")
    older_format = previous is not None and previous_run.get("results_format") != RESULTS_FORMAT
    if (out / "run.json").exists() and (previous != asdict(settings) or older_format):
        if not force:
            if older_format:
                raise EngramEvalError(f"--out {out} holds parts written by another engram-eval version (results format "
                                      f"{previous_run.get('results_format', 'unrecorded')}, now {RESULTS_FORMAT}); "
                                      "use --force to recompute the run")
            changed = sorted(k for k in asdict(settings) if (previous or {}).get(k) != asdict(settings)[k])
            raise EngramEvalError(
                f"--out {out} holds a run with different settings ({', '.join(changed)}); "
                "use another --out, or --force to replace it"
            )
        for name in DERIVED:
            target = out / name
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)
    (out / "parts").mkdir(parents=True, exist_ok=True)
    return {"settings": asdict(settings), "run_id": settings.run_id, "status": "running", "results_format": RESULTS_FORMAT}


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if isinstance(exc, EngramEvalError) else f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def mark_stopped(out: Path, run: dict, status: str, reason: str | None = None) -> None:
    """Record in run.json that the run stopped before the end, and how far it got (finished parts are kept). Best
    effort: when even run.json cannot be written (a full disk), the error that stopped the run is the one to report."""
    run.update(status=status, questions_done=len(list((out / "parts").glob("*.parquet"))))
    if reason is not None:
        run["reason"] = reason
    try:
        write_run_json(out, run)
    except EngramEvalError:
        pass


def stop_status(interrupt: KeyboardInterrupt) -> str:
    return "terminated" if isinstance(interrupt, Terminated) else "interrupted"


LOCK_NAME = ".lock"


def run_lock(out: Path, wait: bool, on_message: Callable[[str], None]) -> FileLock:
    """The one-writer lock of a run directory (sweep and generate hold it; gc reads it)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EngramEvalError(f"--out {out}: cannot create the run directory ({exc.strerror})") from None
    return FileLock(out / LOCK_NAME, f"run directory {out}", wait=wait, hint=", or pass --wait", on_message=on_message)


def part_paths(folder: Path, question_ids: list[str]) -> list[Path]:
    """One part file per question, in bank order (a sweep's parts/, generate's generation-parts/)."""
    return [folder / f"{i:05d}-{qid}.parquet" for i, qid in enumerate(question_ids)]


def write_part(part: Path, frame: pl.DataFrame) -> None:
    try:
        atomic_write_parquet(part, frame)
    except EngramEvalError as exc:
        raise EngramEvalError(f"{exc}; finished questions are kept, rerun to resume") from None


def merge_parts(target: Path, parts: list[Path], schema: pl.Schema = RESULT_SCHEMA) -> Path:
    """Stream the parts, in bank order, into one Parquet file (atomically)."""
    atomic_replace(target, lambda tmp: pl.scan_parquet(parts, schema=schema).sink_parquet(tmp, maintain_order=True))
    return target
