"""Sweep: question bank x engrams x layers x strengths -> scored cells -> results.parquet (batched, resumable).

Orchestration only: prompts, injection, scoring, results and the run directory each live in their own module.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .bank import Bank, Question, Source
from .engram import DEFAULT_MAX_TOKENS, check_chunks, check_layers, chunk_shares
from .errors import EngramEvalError, EngramEvalWarning
from .model import LoadedModel
from .prompts import PreparedQuestion, prepare_question, variant_token_warnings
from .results import question_frame
from .rundir import (SweepSettings, mark_stopped, merge_parts, one_line, package_versions, part_paths, prepare_out, write_part,
                     write_run_json)
from .scoring import SCORINGS, auto_batch_size, score_cells
from .store import EngramStore, StoredEngram, engram_warnings

INJECTIONS = ("prefix",)


def check_strengths(strengths: list[float]) -> list[float]:
    if not strengths:
        raise EngramEvalError("--strengths: no strengths given")
    for strength in strengths:
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) or strength <= 0:
            raise EngramEvalError(f"--strengths: {strength} is not allowed; strengths must be finite and > 0")
    return strengths


def parse_strengths(text: str) -> list[float]:
    try:
        strengths = [float(part) for part in text.split(",")]
    except ValueError:
        raise EngramEvalError(f"--strengths: malformed '{text}' (expected numbers like '0.5,1,2,5,10,20')") from None
    return sorted(set(check_strengths(strengths)))


@dataclass(frozen=True)
class Cell:
    source: Source
    stored: StoredEngram
    role: str
    layer: int
    strength: float


@dataclass
class SweepResult:
    out: Path
    results_path: Path
    run: dict = field(default_factory=dict)


def _cells(question: Question, bank: Bank, engrams: dict[str, StoredEngram], settings: SweepSettings) -> list[Cell]:
    cells = []
    for name, role in [(question.engram, "relevant"), *[(c, "control") for c in question.controls]]:
        for layer in settings.layers:
            for strength in settings.strengths:
                cells.append(Cell(bank.sources[name], engrams[name], role, layer, strength))
    return cells


def run_sweep(
    lm: LoadedModel,
    bank: Bank,
    store: EngramStore,
    out: str | Path,
    *,
    layers: list[int],
    strengths: list[float],
    chunks: int = 16,
    scoring: str = "first-token",
    injection: str = "prefix",
    questions: list[str] | None = None,
    batch_size: int | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    force: bool = False,
    strict: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
    warn: Callable[[str], None] = lambda message: warnings.warn(message, EngramEvalWarning, stacklevel=3),
    before_question: Callable[[Question], None] = lambda question: None,
) -> SweepResult:
    """Run the grid; each finished question lands atomically in out/parts, so a rerun resumes where it stopped.

    questions limits the run to these question ids. warn receives what a researcher must read before trusting the
    numbers (bank mistakes, truncated or dominated engrams); by default Python's warnings machinery
    (EngramEvalWarning), one line each. strict makes the bank's mistakes errors, raised before any model work.
    before_question runs before each question is computed, outside the sweep's timings (the benchmark measures the
    machine there, under the same contention as the sweep). An interrupted or failed run says so in run.json.
    """
    if scoring not in SCORINGS:
        raise EngramEvalError(f"--scoring: unknown '{scoring}' (one of: {', '.join(SCORINGS)})")
    if injection not in INJECTIONS:
        raise EngramEvalError(f"--injection: unknown '{injection}' (one of: {', '.join(INJECTIONS)})")
    check_layers(layers, lm.num_layers)
    check_strengths(strengths)
    check_chunks(chunks)
    if questions is not None:
        bank = bank.select(questions)
    out = Path(out)
    started = time.perf_counter()
    prepared = [prepare_question(lm, q, scoring, bank.path) for q in bank.questions]  # before any model work
    bank_warnings = bank.lint() + [w for p in prepared for w in variant_token_warnings(lm, p, bank.path)]
    if strict and bank_warnings:
        raise EngramEvalError(f"{bank_warnings[0]} (--strict)")
    for warning in bank_warnings:
        warn(warning)
    settings = SweepSettings(
        model=lm.name, model_fingerprint=lm.fingerprint, bank=bank.name, bank_sha256=bank.sha256,
        layers=list(layers), strengths=list(strengths), chunks=chunks, scoring=scoring, injection=injection,
        questions=[q.id for q in bank.questions], max_tokens=max_tokens,
    )
    run = prepare_out(out, settings, force)
    run.update(bank_path=str(bank.path), model_description=lm.description, versions=package_versions(),
               device=str(lm.device), dtype=str(lm.dtype).removeprefix("torch."), batch_size=batch_size or "auto")
    write_run_json(out, run)
    try:
        _run_grid(lm, bank, store, out, settings, run, prepared, batch_size, progress, log, warn, before_question)
    except KeyboardInterrupt:
        mark_stopped(out, run, "interrupted")
        raise
    except Exception as exc:
        mark_stopped(out, run, "failed", one_line(exc))
        raise
    run["timings"]["total_seconds"] = round(time.perf_counter() - started, 3)
    write_run_json(out, run)
    return SweepResult(out=out, results_path=out / "results.parquet", run=run)


def _run_grid(lm: LoadedModel, bank: Bank, store: EngramStore, out: Path, settings: SweepSettings, run: dict,
              prepared: list[PreparedQuestion], batch_size: int | None, progress: bool, log: Callable[[str], None],
              warn: Callable[[str], None], before_question: Callable[[Question], None]) -> None:
    """Build what the store lacks, score every question not yet in out/parts, merge; fills run in place."""
    from tqdm import tqdm

    layers, chunks = settings.layers, settings.chunks
    needed = list(dict.fromkeys(name for q in bank.questions for name in (q.engram, *q.controls)))
    engrams: dict[str, StoredEngram] = {}
    build_started = time.perf_counter()
    for name in needed:
        stored, status = store.ensure(lm, name, bank.sources[name].text, layers, chunks, settings.max_tokens)
        if stored.engram.layers[layers[0]].shape[-1] != lm.hidden_size:
            raise EngramEvalError(f"store file {stored.path}: hidden size differs from {lm.name}'s {lm.hidden_size}")
        if status != "cached":
            for warning in engram_warnings(name, stored.restricted(layers)):
                warn(warning)
        log(f"engram {name}: {status} ({stored.path})")
        engrams[name] = stored
    build_seconds = time.perf_counter() - build_started
    run.update(
        engram_keys={name: stored.key for name, stored in engrams.items()},
        engram_files={name: str(stored.path) for name, stored in engrams.items()},
        largest_chunk_share={name: {str(layer): round(chunk_shares(stored.engram.layers[layer]).max().item(), 4) for layer in layers}
                             for name, stored in engrams.items()},
    )
    write_run_json(out, run)

    grid = {p.question.id: _cells(p.question, bank, engrams, settings) for p in prepared}
    total = sum(len(cells) + 1 for cells in grid.values())
    parts = part_paths(out, [p.question.id for p in prepared])
    done = sum(len(grid[p.question.id]) + 1 for p, part in zip(prepared, parts) if part.exists())
    sweep_started = time.perf_counter()
    bar = tqdm(total=total, initial=done, unit="cell", desc="sweep", disable=not progress or None, dynamic_ncols=True)
    fits: int | None = None  # the largest batch size known to fit, after an out-of-memory back-off
    paused = 0.0
    with bar:
        for p, part in zip(prepared, parts):
            if part.exists():
                continue
            pause_started = time.perf_counter()
            before_question(p.question)
            paused += time.perf_counter() - pause_started
            cells = grid[p.question.id]
            requested = batch_size or auto_batch_size(lm, chunks + len(p.prompt_ids), len(cells))
            scores, size = score_cells(lm, p, cells, settings.scoring, min(requested, fits or requested), on_batch=bar.update)
            if size < requested:
                fits = size
            write_part(part, question_frame(settings, bank, p, cells, scores))
    sweep_seconds = time.perf_counter() - sweep_started - paused

    merge_parts(out, parts)
    run.update(
        status="complete",
        cells={"total": total, "resumed": done, "computed": total - done, "questions": len(prepared)},
        timings={
            "build_seconds": round(build_seconds, 3),
            "sweep_seconds": round(sweep_seconds, 3),
            "cells_per_second": round((total - done) / sweep_seconds, 3) if sweep_seconds > 0 else None,
        },
    )
