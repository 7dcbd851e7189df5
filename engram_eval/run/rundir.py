"""The run directory: run.json, per-question parts and their merge."""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import polars as pl

from .._version import __version__
from ..core.errors import EngramEvalError, Terminated
from ..core.files import atomic_replace, atomic_write_parquet, atomic_write_text, file_sha256
from ..core.locks import FileLock
from .results import ANSWER_LISTS, RESULT_SCHEMA, answer_rows
from .settings import SweepSettings


def write_run_json(out: Path, data: dict) -> None:
    atomic_write_text(out / "run.json", json.dumps(data, indent=2, sort_keys=True) + "\n")


def package_versions() -> dict[str, str]:
    names = ("torch", "transformers", "safetensors", "polars", "pyarrow", "numpy")
    return {"engram-eval": __version__, "python": platform.python_version(), **{n: version(n) for n in names}}


# The part files' columns, as a short hash: resuming from parts of another format would mix schemas.
ANSWERS_FILE = "answers.parquet"  # one row per cell and answer variant (results.ANSWER_SCHEMA); run.json: answers_sha256
RESULTS_FORMAT = hashlib.sha256(str(list(RESULT_SCHEMA.items())).encode()).hexdigest()[:8]
# A run that steers the last block's output (actadd at the last layer): its direction there moved from the final
# norm's output to that block's, so such a run written before cannot be resumed as it is.
LAST_BLOCK_SUFFIX = "+actadd-last-block"
READABLE_FORMATS = (RESULTS_FORMAT, RESULTS_FORMAT + LAST_BLOCK_SUFFIX)


def results_format(settings: SweepSettings, num_layers: int) -> str:
    """The results format a run of these settings on a model of this depth writes."""
    return RESULTS_FORMAT + LAST_BLOCK_SUFFIX if settings.steers_last_block(num_layers) else RESULTS_FORMAT

# The neutral-text probe's record in run.json, its merged file and its parts (engram_eval.run.side_effects).
SIDE_EFFECTS, SIDE_EFFECTS_FILE, SIDE_EFFECTS_PARTS = "side_effects", "side_effects.parquet", "side-effect-parts"


@dataclass(frozen=True)
class GenerationFiles:
    """Where a run's generations live: plain ones in RUN/generation.json, generation-parts, generations.parquet;
    ensembled ones (--ensemble, --reextract) beside them, named with -ensemble."""

    out: Path
    plain: bool = True

    @property
    def _tag(self) -> str:
        return "" if self.plain else "-ensemble"

    @property
    def info(self) -> Path:
        return self.out / f"generation{self._tag}.json"

    @property
    def parts(self) -> Path:
        return self.out / f"generation{self._tag}-parts"

    @property
    def parquet(self) -> Path:
        return self.out / f"generations{self._tag}.parquet"

    @property
    def paths(self) -> tuple[Path, Path, Path]:
        return self.parquet, self.parts, self.info


# What a run directory holds that derives from its settings: --force on other settings removes all of it.
DERIVED = ("parts", "results.parquet", ANSWERS_FILE, "report.html",
           *(path.name for plain in (True, False) for path in GenerationFiles(Path(), plain).paths),
           SIDE_EFFECTS_PARTS, SIDE_EFFECTS_FILE)


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


def recorded_model(run: dict) -> str | None:
    """How to load the model a run was swept with: what its --model said (run.json's model_spec; a run written before
    it was recorded: its model's name, which loads for an embedded model)."""
    return run.get("model_spec") or run.get("settings", {}).get("model")


def check_results_format(out: Path, run: dict) -> None:
    """Refuse a run whose rows have other columns than this engram-eval writes (one clear line, not a crash)."""
    if run.get("results_format") not in READABLE_FORMATS:
        raise EngramEvalError(f"{out} was written by another engram-eval version (results format "
                              f"{run.get('results_format', 'unrecorded')}, now {RESULTS_FORMAT}); rerun its sweep with --force")


def prepare_out(out: Path, settings: SweepSettings, force: bool, num_layers: int,
                warn: Callable[[str], None] = lambda message: None) -> dict:
    """Create or reopen a run directory; refuse one that holds a run with other settings unless forced, and then
    remove everything derived from the old run. The parts' checksums carry over to a resumed run. An unreadable
    run.json with force keeps the parts whose rows carry these settings' run id (a hash of the settings)."""
    current = results_format(settings, num_layers)
    fresh = {"settings": settings.record(), "run_id": settings.run_id, "status": "running", "results_format": current,
             "num_layers": num_layers, PART_CHECKSUMS: {}}
    try:
        previous_run = read_run_json(out) or {}
    except EngramEvalError:
        if not force:
            raise EngramEvalError(f"{out / 'run.json'}: unreadable run.json; rerun with --force to rewrite it: the parts "
                                  f"computed with the same settings are kept, the rest recomputed") from None
        fresh[PART_CHECKSUMS] = keep_parts_of(out, settings.run_id, warn)
        return fresh
    previous = previous_run.get("settings")
    older_format = previous is not None and previous_run.get("results_format") != current
    if (out / "run.json").exists() and (previous != settings.record() or older_format):
        if not force:
            if older_format:
                raise EngramEvalError(f"--out {out} holds parts written by another engram-eval version (results format "
                                      f"{previous_run.get('results_format', 'unrecorded')}, now {current}); "
                                      "use --force to recompute the run")
            record = settings.record()
            changed = sorted(k for k in record.keys() | (previous or {}).keys() if (previous or {}).get(k) != record.get(k))
            raise EngramEvalError(
                f"--out {out} holds a run with different settings ({', '.join(changed)}); "
                "use another --out, or --force to replace it"
            )
        remove_derived(out)
    elif isinstance(previous_run.get(PART_CHECKSUMS), dict):
        fresh[PART_CHECKSUMS] = dict(previous_run[PART_CHECKSUMS])
        if isinstance(previous_run.get(SIDE_EFFECTS), dict):  # kept for a rerun without --neutral, resumed by one with it
            fresh[SIDE_EFFECTS] = previous_run[SIDE_EFFECTS]
    elif previous_run:  # written before parts had checksums: the parts there are trusted as they were then
        fresh[PART_CHECKSUMS] = {part.name: file_sha256(part) for part in sorted((out / "parts").glob("*.parquet"))}
    (out / "parts").mkdir(parents=True, exist_ok=True)
    return fresh


def remove_derived(out: Path, keep: tuple[str, ...] = ()) -> None:
    for name in DERIVED:
        target = out / name
        if name not in keep:
            shutil.rmtree(target) if target.is_dir() else target.unlink(missing_ok=True)


def keep_parts_of(out: Path, run_id: str, warn: Callable[[str], None]) -> dict[str, str]:
    """After run.json was lost: the parts whose every row has this run id are kept (and their checksums recorded);
    every other part, and everything merged from them, is removed -> the kept parts' checksums."""
    remove_derived(out, keep=("parts",))
    kept: dict[str, str] = {}
    for part in sorted((out / "parts").glob("*.parquet")) if (out / "parts").is_dir() else []:
        try:
            ids = pl.read_parquet(part, columns=["run_id"])["run_id"]
            same = ids.len() > 0 and (ids == run_id).all()
        except (OSError, pl.exceptions.PolarsError):
            same = False
        if same:
            kept[part.name] = file_sha256(part)
        else:
            part.unlink()
    warn(f"{out / 'run.json'} was unreadable: rewritten; kept {len(kept)} part(s) computed with these settings (run id "
         f"{run_id}), the rest are recomputed")
    (out / "parts").mkdir(parents=True, exist_ok=True)
    return kept


PART_CHECKSUMS = "part_sha256"  # run.json (and generation.json): each part file's sha256, by file name


def verify_file(path: Path, expected: str | None, record: Path, hint: str) -> None:
    """A file against the sha256 its run recorded; none recorded (a run older than checksums): nothing to compare."""
    if expected is not None and file_sha256(path) != expected:
        raise EngramEvalError(f"{path}: checksum mismatch with {record} (the file changed after it was written); {hint}")


def verify_results(out: Path, run: dict) -> Path:
    """RUN/results.parquet, checked against the checksum run.json recorded when the sweep merged it."""
    results = out / "results.parquet"
    verify_file(results, run.get("results_sha256"), out / "run.json", "rerun the sweep's command to merge it again from its parts")
    return results


def trusted_parts(parts: list[Path], checksums: dict[str, str], warn: Callable[[str], None]) -> set[Path]:
    """The parts a resume may keep: present and matching their recorded checksum. A part that does not match (a
    flipped byte, a truncated file) or was never recorded (the writer stopped in between) is removed, to be computed
    again; a mismatch is said."""
    trusted = set()
    for part in parts:
        if not part.exists():
            continue
        expected = checksums.get(part.name)
        if expected is not None and file_sha256(part) == expected:
            trusted.add(part)
            continue
        if expected is not None:
            warn(f"{part}: checksum mismatch (corrupt); computing it again")
        checksums.pop(part.name, None)
        part.unlink()
    return trusted


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
    return _lock(out, wait, on_message)


def refuse_if_written(out: Path, wait: bool) -> None:
    """Before a command loads its model: without `wait`, fail as run_lock would when another process writes the run
    directory; creates and takes nothing."""
    _lock(out, wait, lambda message: None).refuse_if_held()


def _lock(out: Path, wait: bool, on_message: Callable[[str], None]) -> FileLock:
    return FileLock(out / LOCK_NAME, f"run directory {out}", wait=wait, hint=", or pass --wait", on_message=on_message)


def part_paths(folder: Path, question_ids: list[str]) -> list[Path]:
    """One part file per question, in bank order (a sweep's parts/, generate's generation-parts/)."""
    return [folder / f"{i:05d}-{qid}.parquet" for i, qid in enumerate(question_ids)]


def write_part(part: Path, frame: pl.DataFrame) -> str:
    """One question's rows, atomically -> the file's sha256 (for run.json)."""
    try:
        atomic_write_parquet(part, frame)
    except EngramEvalError as exc:
        raise EngramEvalError(f"{exc}; finished questions are kept, rerun to resume") from None
    return file_sha256(part)


def merge_parts(target: Path, parts: list[Path], checksums: dict[str, str], record: Path,
                schema: pl.Schema = RESULT_SCHEMA) -> str:
    """Verify each part against its recorded checksum, stream the parts in bank order into one Parquet file
    (atomically) -> its sha256."""
    for part in parts:
        verify_file(part, checksums.get(part.name), record, "rerun the same command to compute it again")
    atomic_replace(target, lambda tmp: pl.scan_parquet(parts, schema=schema, extra_columns="ignore").sink_parquet(
        tmp, maintain_order=True))  # a sweep's parts also carry the answers' lists: answers.parquet's (merge_answers)
    return file_sha256(target)


def merge_answers(target: Path, parts: list[Path], warn: Callable[[str], None]) -> str | None:
    """RUN/answers.parquet from the (verified) parts' answer lists, one row per cell and answer variant, atomically ->
    its sha256; None, with a warning, when a part was written before parts carried them (a run resumed from an older
    engram-eval: --force recomputes it)."""
    older = [part for part in parts if not set(ANSWER_LISTS) <= set(pl.read_parquet_schema(part))]
    if older:
        target.unlink(missing_ok=True)
        warn(f"{older[0].parent}: {len(older)} part(s) were written before parts carried each answer's log-probability, "
             f"so {target.name} is not written (rerun the sweep with --force to have it)")
        return None
    atomic_replace(target, lambda tmp: answer_rows(pl.scan_parquet(parts)).sink_parquet(tmp, maintain_order=True))
    return file_sha256(target)
