"""Sweep: question bank x engrams x layers x strengths -> scored cells -> results.parquet (batched, resumable).

Orchestration only: prompts, injection, scoring, results and the run directory each live in their own module.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import polars as pl
import torch

from .bank import NULL_PREFIXES, Bank, Question
from .engram import DEFAULT_MAX_TOKENS, Extraction, check_chunks, check_layers, chunk_shares
from .errors import EngramEvalError, EngramEvalWarning
from .geometry import pair_geometry
from .grid import Cell, question_cells, raw_vectors
from .injection import DEFAULT_INJECTION, INJECTIONS, check_injection
from .model import LoadedModel
from .prompts import PreparedQuestion, context_conditions, prepare_question, variant_token_warnings
from .results import question_frame
from .rundir import (
    mark_stopped,
    merge_parts,
    one_line,
    package_versions,
    part_paths,
    prepare_out,
    write_part,
    write_run_json,
)
from .scoring import SCORINGS, auto_batch_size, score_cells
from .settings import SweepSettings
from .store import EngramStore, StoredEngram, bank_engrams, engram_label

if TYPE_CHECKING:
    from .distributed import RayOptions
    from .distributed import WorkerPool as RayPool

CONTEXTS = ("with", "without", "both")


def check_chunk_list(chunks: int | list[int]) -> list[int]:
    """One k, or the chunk-count grid: each at least 1, none repeated."""
    values = [chunks] if isinstance(chunks, int) else list(chunks)
    if not values:
        raise EngramEvalError("--chunks: no chunk count given")
    for k in values:
        check_chunks(k)
        if values.count(k) > 1:
            raise EngramEvalError(f"--chunks: {k} is repeated")
    return values


def check_strengths(strengths: list[float]) -> list[float]:
    if not strengths:
        raise EngramEvalError("--strengths: no strengths given")
    for strength in strengths:
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) or strength <= 0:
            raise EngramEvalError(f"--strengths: {strength} is not allowed; strengths must be finite and > 0")
    return strengths


@dataclass
class SweepResult:
    out: Path
    results_path: Path
    run: dict = field(default_factory=dict)


def run_sweep(
    lm: LoadedModel,
    bank: Bank,
    store: EngramStore,
    out: str | Path,
    *,
    layers: list[int],
    strengths: list[float],
    chunks: int | list[int] = 16,
    scoring: str = "first-token",
    injection: str = DEFAULT_INJECTION,
    scaling: str = "global",
    extraction: Extraction | None = None,
    context: str = "with",
    record_attention: bool = False,
    ray: RayOptions | None = None,
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

    injection, scaling and extraction (pooling, skip_tokens, window) default to the seed's method. context: questions
    with a retrieved context run `with` it, `without` it, or `both` (each condition with its own baseline row).
    record_attention adds, per row, the share of the last prompt position's attention (mean over heads and layers) on
    the k engram positions and on position 0 (eager attention while the sweep runs). ray shards the questions over a
    Ray cluster's workers (results identical). questions limits the run to these question ids. warn receives what a researcher must read before trusting the
    numbers (bank mistakes, truncated or dominated engrams); by default Python's warnings machinery
    (EngramEvalWarning), one line each. strict makes the bank's mistakes errors, raised before any model work.
    before_question runs before each question is computed, outside the sweep's timings (the benchmark measures the
    machine there, under the same contention as the sweep). An interrupted or failed run says so in run.json.
    """
    if scoring not in SCORINGS:
        raise EngramEvalError(f"--scoring: unknown '{scoring}' (one of: {', '.join(SCORINGS)})")
    if context not in CONTEXTS:
        raise EngramEvalError(f"--context: unknown '{context}' (one of: {', '.join(CONTEXTS)})")
    check_injection(injection, scaling)
    check_layers(layers, lm.num_layers)
    check_strengths(strengths)
    chunk_list = check_chunk_list(chunks)
    extraction = (extraction or Extraction(max_tokens=max_tokens)).check(chunk_list)
    if questions is not None:
        bank = bank.select(questions)
    if ray is not None:
        from .distributed import plan_workers

        plan_workers(ray)
    out = Path(out)
    started = time.perf_counter()
    prepared = [[prepare_question(lm, q, scoring, bank.path, condition) for condition in context_conditions(q, context)]
                for q in bank.questions]  # before any model work
    if INJECTIONS[injection].needs_k_prompt_tokens:
        for p in (p for conditions in prepared for p in conditions):
            if len(p.prompt_ids) < max(chunk_list):
                raise EngramEvalError(f"{bank.path}: question '{p.question.id}': --injection {injection} needs a prompt of at least "
                                      f"k = {max(chunk_list)} tokens; this one has {len(p.prompt_ids)}")
    bank_warnings = bank.lint() + [w for conditions in prepared for w in variant_token_warnings(lm, conditions[0], bank.path)]
    if context == "both" and not any(q.context for q in bank.questions):
        bank_warnings.append(f"{bank.path}: --context both, but no question has a context: every question runs once")
    if strict and bank_warnings:
        raise EngramEvalError(f"{bank_warnings[0]} (--strict)")
    for warning in bank_warnings:
        warn(warning)
    settings = SweepSettings(
        model=lm.name, model_fingerprint=lm.fingerprint, bank=bank.name, bank_sha256=bank.sha256,
        layers=list(layers), strengths=list(strengths), chunks=chunk_list[0] if len(chunk_list) == 1 else chunk_list,
        scoring=scoring, injection=injection,
        questions=[q.id for q in bank.questions], max_tokens=extraction.max_tokens, pooling=extraction.pooling,
        skip_tokens=extraction.skip_tokens, window=extraction.window, scaling=scaling, context=context,
        record_attention=record_attention,
    )
    run = prepare_out(out, settings, force)
    run.update(bank_path=str(bank.path), store=str(store.root), model_description=lm.description, versions=package_versions(),
               device=str(lm.device), dtype=str(lm.dtype).removeprefix("torch."), batch_size=batch_size or "auto")
    write_run_json(out, run)
    attention = lm.model.config._attn_implementation
    try:
        if record_attention:
            lm.model.set_attn_implementation("eager")  # the only kernel that gives its attention weights
        _run_grid(lm, bank, store, out, settings, run, prepared, batch_size, progress, log, warn, before_question, ray)
    except KeyboardInterrupt:
        mark_stopped(out, run, "interrupted")
        raise
    except Exception as exc:
        mark_stopped(out, run, "failed", one_line(exc))
        raise
    finally:
        lm.model.set_attn_implementation(attention)
    run["timings"]["total_seconds"] = round(time.perf_counter() - started, 3)
    write_run_json(out, run)
    return SweepResult(out=out, results_path=out / "results.parquet", run=run)


def anti_difference_signals(bank: Bank, engrams: dict[tuple[str, int], StoredEngram], layers: list[int],
                            chunks: list[int]) -> list[dict]:
    """The seeds' difference signal between each question's relevant engram and its anti-content controls, per k and
    layer (the chunk-count section of the report reads these)."""
    signals = []
    for q in bank.questions:
        for anti in (c for c in q.controls if c not in NULL_PREFIXES and bank.sources[c].kind == "anti"):
            for k in chunks:
                for layer in layers:
                    a, b = engrams[(q.engram, k)].engram.layers[layer], engrams[(anti, k)].engram.layers[layer]
                    signals.append({"question_id": q.id, "anti": anti, "chunks": k, "layer": layer,
                                    "difference_signal": pair_geometry(a, b)["difference_signal"]})
    return signals


def score_question(lm: LoadedModel, settings: SweepSettings, bank: Bank, conditions: list[PreparedQuestion], grid: list[list[Cell]],
                   raw: dict[tuple[str, int, int], torch.Tensor], batch_size: int | None, fits: int | None = None,
                   on_batch: Callable[[int], None] = lambda n: None) -> tuple[pl.DataFrame, int | None]:
    """One question's rows, every context condition: its baseline then its cells -> (frame, the batch size known to fit
    after an out-of-memory back-off, for the next question)."""
    chunks = settings.chunk_list
    frames = []
    for prepared, cells in zip(conditions, grid):
        prefix = max(chunks) if INJECTIONS[settings.injection].prefix_positions else 0
        requested = batch_size or auto_batch_size(lm, prefix + len(prepared.prompt_ids), len(cells))
        scores, size = score_cells(lm, prepared, cells, raw, settings.scoring, settings.injection, settings.scaling,
                                   min(requested, fits or requested), on_batch=on_batch,
                                   record_attention=settings.record_attention, baseline_chunks=chunks[0])
        if size < requested:
            fits = size
        frames.append(question_frame(settings, bank, prepared, cells, scores))
    return pl.concat(frames), fits


def score_question_table(lm: LoadedModel, settings: SweepSettings, bank: Bank, conditions: list[PreparedQuestion],
                         grid: list[list[Cell]], raw: dict[tuple[str, int, int], torch.Tensor],
                         batch_size: int | None) -> tuple[object, int | None]:
    """score_question on a worker: its rows as an Arrow table (what travels back to the driver)."""
    frame, fits = score_question(lm, settings, bank, conditions, grid, raw, batch_size)
    return frame.to_arrow(), fits


def _sweep_on_ray(pool: RayPool, settings: SweepSettings, bank: Bank, prepared: list[list[PreparedQuestion]], grid: list[list[list[Cell]]],
                  raw: dict, rows: list[int], parts: list[Path], batch_size: int | None, bar) -> None:
    """Questions to the workers, largest first (a short tail); each finished question lands in its part file here."""
    raw_ref = pool.ray.put(raw)
    todo = sorted((i for i, part in enumerate(parts) if not part.exists()), key=lambda i: -rows[i])

    def submit(i: int) -> Callable:
        question_id = prepared[i][0].question.id
        return lambda worker: worker.call.remote(question_id, score_question_table, settings, bank, prepared[i], grid[i],
                                                 raw_ref, batch_size)

    def finished(key: str, result: tuple) -> None:
        i = int(key.split(":")[0])
        write_part(parts[i], pl.from_arrow(result[0]))
        bar.update(rows[i])

    pool.run([(f"{i}:{prepared[i][0].question.id}", submit(i)) for i in todo], finished)


def _run_grid(lm: LoadedModel, bank: Bank, store: EngramStore, out: Path, settings: SweepSettings, run: dict,
              prepared: list[list[PreparedQuestion]], batch_size: int | None, progress: bool, log: Callable[[str], None],
              warn: Callable[[str], None], before_question: Callable[[Question], None], ray: RayOptions | None) -> None:
    """Build what the store lacks, score every question not yet in out/parts, merge; fills run in place."""
    from tqdm import tqdm

    layers, chunks = settings.layers, settings.chunk_list
    build_started = time.perf_counter()
    engrams = bank_engrams(lm, bank, store, layers, chunks, settings.extraction, warn, log)
    build_seconds = time.perf_counter() - build_started
    labels = {(name, k): engram_label(name, k, chunks) for name, k in engrams}
    run.update(
        engram_keys={labels[key]: stored.key for key, stored in engrams.items()},
        engram_files={labels[key]: str(stored.path) for key, stored in engrams.items()},
        largest_chunk_share={labels[key]: {str(layer): round(chunk_shares(stored.engram.layers[layer]).max().item(), 4)
                                           for layer in layers} for key, stored in engrams.items()},
        num_layers=lm.num_layers,
        engram_tokens={name: stored.engram.n_tokens for (name, _), stored in engrams.items()},
        anti_difference_signal=anti_difference_signals(bank, engrams, layers, chunks),
    )
    write_run_json(out, run)

    keys = {key: stored.key for key, stored in engrams.items()}
    grid = [[question_cells(p.question, bank, keys, layers, settings.strengths, chunks, p.context) for p in conditions]
            for conditions in prepared]
    raw = raw_vectors(lm, bank, engrams, layers, chunks)
    rows = [sum(len(cells) + 1 for cells in question) for question in grid]
    parts = part_paths(out / "parts", [conditions[0].question.id for conditions in prepared])
    done = sum(n for n, part in zip(rows, parts) if part.exists())
    pool = None
    if ray is not None:
        from .distributed import WorkerPool

        pool = WorkerPool(lm, ray)  # started, models loaded and checked before the sweep's clock starts
        run.update(distributed={"ray": pool.version, "workers": pool.size, "gpus_per_worker": ray.gpus_per_worker,
                                "threads_per_worker": ray.threads_per_worker})
    sweep_started = time.perf_counter()
    bar = tqdm(total=sum(rows), initial=done, unit="cell", desc="sweep", disable=not progress or None, dynamic_ncols=True)
    fits: int | None = None  # the largest batch size known to fit, after an out-of-memory back-off
    paused = 0.0
    with bar:
        if pool is not None:
            try:
                _sweep_on_ray(pool, settings, bank, prepared, grid, raw, rows, parts, batch_size, bar)
            finally:
                pool.shutdown()
        for conditions, question_grid, part in zip(prepared, grid, parts):
            if part.exists():
                continue
            pause_started = time.perf_counter()
            before_question(conditions[0].question)
            paused += time.perf_counter() - pause_started
            frame, fits = score_question(lm, settings, bank, conditions, question_grid, raw, batch_size, fits, bar.update)
            write_part(part, frame)
    sweep_seconds = time.perf_counter() - sweep_started - paused

    merge_parts(out / "results.parquet", parts)
    total = sum(rows)
    run.update(
        status="complete",
        cells={"total": total, "resumed": done, "computed": total - done, "questions": len(prepared)},
        timings={
            "build_seconds": round(build_seconds, 3),
            "sweep_seconds": round(sweep_seconds, 3),
            "cells_per_second": round((total - done) / sweep_seconds, 3) if sweep_seconds > 0 else None,
        },
    )
