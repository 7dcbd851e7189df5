"""A sweep's neutral-text probe (`--neutral`): every (engram, layer, strength, k) cell of the grid once, however many
questions use it, one task per engram on the executor, each landing in RUN/side-effect-parts/ (resumable like the
question parts) -> RUN/side_effects.parquet. The probe is not a setting of the run: adding it to a finished run, or
changing its passage, leaves results.parquet and the run id as they are."""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterator

import polars as pl

from ..backend.model import LoadedModel
from ..core.progress import progress_bar
from ..core.spec import Observer
from ..steer.grid import Cell, distinct_injections
from ..bank.passages import NeutralPassage
from ..steer.side_effects import side_effects
from .executors import Executor, Task
from .rundir import PART_CHECKSUMS, SIDE_EFFECTS, SIDE_EFFECTS_FILE, SIDE_EFFECTS_PARTS, merge_parts, trusted_parts, write_part, write_run_json
from .settings import SweepSettings

SIDE_EFFECT_SCHEMA = pl.Schema({
    "run_id": pl.String,
    "engram": pl.String,
    "engram_key": pl.String,
    "layer": pl.Int32,
    "strength": pl.Float64,
    "chunks": pl.Int32,
    "injection": pl.String,
    "scaling": pl.String,
    "neutral_kl": pl.Float64,
    "neutral_ppl_ratio": pl.Float64,
    "passage_sha256": pl.String,
    "passage_tokens": pl.Int32,
})


def probe_cells(grid: list[list[list[Cell]]]) -> dict[str, list[Cell]]:
    """The grid's distinct (engram, layer, strength, k) cells, by engram, in grid order (context conditions and
    questions that share a cell share its row); a source's own text only, not its other paraphrases or samples."""
    by_engram: dict[str, dict[tuple, Cell]] = {}
    for question in grid:
        for cells in question:
            for cell in (cell for cell in cells if not cell.is_variant):  # paraphrases and samples: not probed
                key = (cell.layer, cell.strength, cell.chunks)
                by_engram.setdefault(cell.engram, {}).setdefault(key, replace(cell, context=None))
    return {name: list(cells.values()) for name, cells in by_engram.items()}


def engram_rows(lm: LoadedModel, settings: SweepSettings, cells: list[Cell], raw: dict, ids: tuple[int, ...],
                passage_sha256: str, batch_size: int | None, *, progress: Callable[[int], None]) -> object:
    """One engram's task for an executor: its cells' side effects as an Arrow table, each injection computed once."""
    unique, rows = distinct_injections(cells, settings.method)
    computed = side_effects(lm, unique, raw, settings.method, ids, batch_size, progress)
    if len(cells) > len(unique):
        progress(len(cells) - len(unique))
    frame = pl.DataFrame({
        "run_id": settings.run_id,
        "engram": [c.engram for c in cells],
        "engram_key": [c.engram_key for c in cells],
        "layer": [c.layer for c in cells],
        "strength": [c.strength for c in cells],
        "chunks": [c.chunks for c in cells],
        "injection": settings.method.injection,
        "scaling": settings.method.scaling,
        "neutral_kl": [computed["neutral_kl"][i] for i in rows],
        "neutral_ppl_ratio": [computed["neutral_ppl_ratio"][i] for i in rows],
        "passage_sha256": passage_sha256,
        "passage_tokens": len(ids),
    }, schema=SIDE_EFFECT_SCHEMA)
    return frame.to_arrow()


def part_name(index: int, engram: str) -> str:
    return f"{index:05d}-{re.sub(r'[^A-Za-z0-9_.~-]', '_', engram)}.parquet"


def run_probe(out: Path, settings: SweepSettings, run: dict, grid: list[list[list[Cell]]], raw: object,
              passage: NeutralPassage, ids: tuple[int, ...], batch_size: int | None, executor: Executor,
              observer: Observer) -> float:
    """Compute what out/side-effect-parts lacks for this passage, merge it into out/side_effects.parquet; records the
    passage and the parts' checksums in run (written as each part lands) -> the seconds it took."""

    folder, record = out / SIDE_EFFECTS_PARTS, run.get(SIDE_EFFECTS)
    if not isinstance(record, dict) or record.get("passage_sha256") != passage.sha256 or record.get("tokens") != len(ids):
        if folder.exists() or (out / SIDE_EFFECTS_FILE).exists():
            observer.warn(f"--neutral {passage.label}: another passage than the run's side effects were computed on; "
                          "computing them again")
            shutil.rmtree(folder, ignore_errors=True)
            (out / SIDE_EFFECTS_FILE).unlink(missing_ok=True)
        record = {"passage": passage.label, "passage_sha256": passage.sha256, "tokens": len(ids), PART_CHECKSUMS: {}}
    record["passage"] = passage.label
    run[SIDE_EFFECTS] = record
    folder.mkdir(parents=True, exist_ok=True)
    engrams = probe_cells(grid)
    parts = [folder / part_name(i, name) for i, name in enumerate(engrams)]
    trusted = trusted_parts(parts, record[PART_CHECKSUMS], observer.warn)
    sizes = [len(cells) for cells in engrams.values()]
    todo = [(part, name, cells) for part, (name, cells) in zip(parts, engrams.items()) if part not in trusted]
    started = time.perf_counter()

    def tasks() -> Iterator[Task]:
        for part, name, cells in todo:
            yield Task(part.name, engram_rows, (settings, cells, raw, ids, passage.sha256, batch_size), len(cells))

    def finished(task: Task, table: object) -> None:
        record[PART_CHECKSUMS][task.name] = write_part(folder / task.name, pl.from_arrow(table))
        write_run_json(out, run)

    write_run_json(out, run)
    done = sum(size for size, part in zip(sizes, parts) if part in trusted)
    bar = progress_bar(sum(sizes), "side effects", "cell", enabled=observer.progress, initial=done)
    with bar:
        executor.map(tasks(), finished, bar.update)
    seconds = time.perf_counter() - started
    record["sha256"] = merge_parts(out / SIDE_EFFECTS_FILE, parts, record[PART_CHECKSUMS], out / "run.json", SIDE_EFFECT_SCHEMA)
    record["cells"] = {"total": sum(sizes), "resumed": done, "computed": sum(sizes) - done}
    return seconds
