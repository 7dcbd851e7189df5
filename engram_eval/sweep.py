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

import torch

from .bank import NULL_PREFIXES, Bank, Question
from .engram import DEFAULT_MAX_TOKENS, Extraction, check_chunks, check_layers, chunk_shares
from .errors import EngramEvalError, EngramEvalWarning
from .injection import NULL_KIND, check_injection, null_prefix
from .model import LoadedModel
from .prompts import PreparedQuestion, prepare_question, variant_token_warnings
from .results import question_frame
from .rundir import (SweepSettings, mark_stopped, merge_parts, one_line, package_versions, part_paths, prepare_out, write_part,
                     write_run_json)
from .scoring import SCORINGS, auto_batch_size, score_cells
from .store import EngramStore, StoredEngram, engram_warnings

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
    engram: str  # a bank source's name, or a null prefix's ~name
    engram_key: str | None  # the store key (None for a null prefix)
    role: str  # relevant or control
    control_kind: str | None
    layer: int
    strength: float
    chunks: int

    @property
    def is_null(self) -> bool:
        return self.control_kind == NULL_KIND


@dataclass
class SweepResult:
    out: Path
    results_path: Path
    run: dict = field(default_factory=dict)


def _cells(question: Question, bank: Bank, engrams: dict[str, StoredEngram], settings: SweepSettings) -> list[Cell]:
    cells = []
    for name, role in [(question.engram, "relevant"), *[(c, "control") for c in question.controls]]:
        null = name in NULL_PREFIXES
        kind = NULL_KIND if null else bank.sources[name].kind if role == "control" else None
        key = None if null else engrams[name].key
        for layer in settings.layers:
            for strength in settings.strengths:
                cells.append(Cell(name, key, role, kind, layer, strength, settings.chunks))
    return cells


def _raw_vectors(lm: LoadedModel, bank: Bank, engrams: dict[str, StoredEngram], settings: SweepSettings) -> dict[tuple[str, int, int], torch.Tensor]:
    """Every engram's unscaled vectors by (name, layer, k); a null prefix is the same at every layer."""
    raw = {(name, layer, settings.chunks): stored.engram.layers[layer] for name, stored in engrams.items() for layer in settings.layers}
    nulls = {name for q in bank.questions for name in q.controls if name in NULL_PREFIXES}
    for name in nulls:
        vectors = null_prefix(name, lm, settings.chunks)
        raw.update({(name, layer, settings.chunks): vectors for layer in settings.layers})
    return raw


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
    scaling: str = "global",
    extraction: Extraction | None = None,
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

    injection, scaling and extraction (pooling, skip_tokens, window) default to the seed's method. questions limits the
    run to these question ids. warn receives what a researcher must read before trusting the
    numbers (bank mistakes, truncated or dominated engrams); by default Python's warnings machinery
    (EngramEvalWarning), one line each. strict makes the bank's mistakes errors, raised before any model work.
    before_question runs before each question is computed, outside the sweep's timings (the benchmark measures the
    machine there, under the same contention as the sweep). An interrupted or failed run says so in run.json.
    """
    if scoring not in SCORINGS:
        raise EngramEvalError(f"--scoring: unknown '{scoring}' (one of: {', '.join(SCORINGS)})")
    check_injection(injection, scaling)
    check_layers(layers, lm.num_layers)
    check_strengths(strengths)
    check_chunks(chunks)
    extraction = (extraction or Extraction(max_tokens=max_tokens)).check([chunks])
    if questions is not None:
        bank = bank.select(questions)
    out = Path(out)
    started = time.perf_counter()
    prepared = [prepare_question(lm, q, scoring, bank.path) for q in bank.questions]  # before any model work
    if injection == "add":
        for p in prepared:
            if len(p.prompt_ids) < chunks:
                raise EngramEvalError(f"{bank.path}: question '{p.question.id}': --injection add needs a prompt of at least "
                                      f"k = {chunks} tokens; this one has {len(p.prompt_ids)}")
    bank_warnings = bank.lint() + [w for p in prepared for w in variant_token_warnings(lm, p, bank.path)]
    if strict and bank_warnings:
        raise EngramEvalError(f"{bank_warnings[0]} (--strict)")
    for warning in bank_warnings:
        warn(warning)
    settings = SweepSettings(
        model=lm.name, model_fingerprint=lm.fingerprint, bank=bank.name, bank_sha256=bank.sha256,
        layers=list(layers), strengths=list(strengths), chunks=chunks, scoring=scoring, injection=injection,
        questions=[q.id for q in bank.questions], max_tokens=extraction.max_tokens, pooling=extraction.pooling,
        skip_tokens=extraction.skip_tokens, window=extraction.window, scaling=scaling,
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
    needed = list(dict.fromkeys(name for q in bank.questions for name in (q.engram, *q.controls) if name not in NULL_PREFIXES))
    engrams: dict[str, StoredEngram] = {}
    build_started = time.perf_counter()
    for name in needed:
        (stored, status), = store.ensure_all(lm, name, bank.sources[name].text, layers, [chunks], settings.extraction).values()
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
    raw = _raw_vectors(lm, bank, engrams, settings)
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
            prefix = chunks if settings.injection == "prefix" else 0
            requested = batch_size or auto_batch_size(lm, prefix + len(p.prompt_ids), len(cells))
            scores, size = score_cells(lm, p, cells, raw, settings.scoring, settings.injection, settings.scaling,
                                       min(requested, fits or requested), on_batch=bar.update)
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
