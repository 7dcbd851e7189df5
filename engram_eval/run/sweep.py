"""Sweep: question bank x engrams x layers x strengths -> scored cells -> results.parquet (batched, resumable).

Orchestration only: prompts, injection, scoring, results and the run directory each live in their own module.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import polars as pl
import torch

from ..backend.model import LoadedModel
from ..bank.banks import Bank
from ..core.errors import EngramEvalError
from ..core.progress import progress_bar
from ..core.registry import NULL_PREFIXES
from ..core.spec import Execution, Observer, SweepSpec
from ..engram.dominance import chunk_shares
from ..engram.geometry import pair_geometry
from ..engram.store import EngramStore, StoredEngram, bank_engrams, engram_label
from ..steer.grid import Cell, engram_vectors, question_cells, raw_vectors, vector_cells
from ..vectors.controls import vector_raw
from ..vectors.store import StoredVector, check_vector_layers
from ..steer.prompts import PreparedQuestion, check_lengths, context_conditions, end_tokens, multi_token_warning, prepare_question, variant_token_warnings
from ..steer.injection import check_strengths_fit, engram_start
from ..steer.scoring import auto_batch_size, score_cells
from ..bank.passages import NeutralPassage
from ..steer.side_effects import passage_ids
from .executors import Executor, Task, open_executor
from .results import check_finite, off_distribution, off_distribution_warning, question_frame
from .rundir import (
    ANSWERS_FILE,
    PART_CHECKSUMS,
    mark_stopped,
    merge_answers,
    merge_parts,
    one_line,
    package_versions,
    part_paths,
    prepare_out,
    run_lock,
    stop_status,
    trusted_parts,
    write_part,
    write_run_json,
)
from .settings import SweepSettings
from .side_effects import run_probe

RawVectors = dict[tuple[str, int, int], torch.Tensor]  # an engram's unscaled vectors by (vectors name, layer, k)


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
    spec: SweepSpec,
    *,
    execution: Execution = Execution(),
    force: bool = False,
    strict: bool = False,
    wait: bool = False,
    neutral: NeutralPassage | None = None,
    observer: Observer = Observer(),
    vector: StoredVector | None = None,
) -> SweepResult:
    """Run the spec's grid over the bank; each finished question lands atomically in out/parts, so a rerun resumes where
    it stopped.

    The spec (engram_eval.core.spec) says what is computed: the extraction, the layer x strength x k grid, the method
    (injection, scaling, scoring; context: questions with a retrieved context run `with` it, `without` it, or `both`,
    each condition with its own baseline row; record_attention adds, per row, the share of the last prompt position's
    attention on the k engram positions and on position 0) and which questions. execution says how (batch size; torch's
    CPU threads; Ray shards the questions over a cluster's workers, results identical). strict makes the bank's
    mistakes errors, raised before any model work. One writer at a time: a second sweep or generate on the same
    directory fails naming the holder, or with `wait` waits for it. neutral adds the neutral-text probe's side effects
    of every cell (RUN/side_effects.parquet; engram_eval.run.side_effects), resumable, outside the run's settings. observer receives the progress, the log and the warnings a researcher must read before
    trusting the numbers (bank mistakes, truncated or dominated engrams). An interrupted or failed run says so in
    run.json. vector (with spec.method.vector its name): the run steers with a stored steering vector and its
    controls (engram_eval.vectors) instead of the bank's engrams, at the layers it carries.
    """
    spec.check(lm.num_layers)
    if vector is not None:
        check_vector_layers(vector, lm.num_layers, lm.hidden_size, list(spec.grid.layers))
    check_strengths_fit(list(spec.grid.strengths), lm.embedding_norm, lm.dtype)
    execution.check()
    method, chunk_list = spec.method, list(spec.grid.chunks)
    warn = observer.warn
    if spec.questions is not None:
        bank = bank.select(list(spec.questions))
    out = Path(out)
    started = time.perf_counter()
    prepared = [[prepare_question(lm, q, method.scoring, bank.path, condition) for condition in context_conditions(q, method.context)]
                for q in bank.questions]  # before any model work
    injection = method.injection
    prefix = method.prefix_length(chunk_list)
    check_lengths([p for conditions in prepared for p in conditions], lm.max_positions, bank.path, prefix,
                  f" and the engram's {prefix} prefix positions" if prefix else "")
    if method.mode.needs_k_prompt_tokens:
        for p in (p for conditions in prepared for p in conditions):
            start = engram_start(lm, method, p.prompt_ids)
            if len(p.prompt_ids) - start < max(chunk_list):
                raise EngramEvalError(f"{bank.path}: question '{p.question.id}': --injection {injection} needs a prompt of at least "
                                      f"k = {max(chunk_list)} tokens{' after its BOS' if start else ''}; this one has "
                                      f"{len(p.prompt_ids) - start}")
    if neutral is not None and method.reextract:
        raise EngramEvalError("--neutral: the probe measures each cell's engram once for all questions; with --reextract "
                              "every question has engrams of its own (probe a run without it)")
    neutral_ids = None if neutral is None else passage_ids(lm, neutral, method, chunk_list)
    bank_warnings = bank.lint() + [w for conditions in prepared for w in variant_token_warnings(lm, conditions[0], bank.path)]
    if method.context == "both" and not any(q.context for q in bank.questions):
        bank_warnings.append(f"{bank.path}: --context both, but no question has a context: every question runs once")
    if strict and bank_warnings:
        raise EngramEvalError(f"{bank_warnings[0]} (--strict)")
    for warning in bank_warnings:
        warn(warning)
    if advice := multi_token_warning(lm, [p for conditions in prepared for p in conditions], method.scoring, bank.path):
        warn(advice)  # advice on the scoring, not a mistake in the bank: --strict lets it pass
    if spec.grid.samples and not any(bank.paraphrases(name) > 1 for q in bank.questions for name in (q.engram, *q.controls)):
        raise EngramEvalError(f"--sample: no engram the questions of {bank.path} use has paraphrases to fit a Gaussian to "
                              "(a source needs `files: [a.txt, b.txt, ...]`, at least 2)")
    settings = SweepSettings.of(spec, model=lm.name, model_fingerprint=lm.fingerprint, bank=bank.name,
                                bank_sha256=bank.sha256, questions=[q.id for q in bank.questions],
                                vector_sha256=None if vector is None else vector.vector.sha256)
    with run_lock(out, wait, observer.warn):
        executor = open_executor(lm, execution.ray)  # Ray: the workers started, their models loaded and checked
        try:
            run = prepare_out(out, settings, force, lm.num_layers, warn)
        except BaseException:
            executor.close()
            raise
        threads = torch.get_num_threads()
        run.update(bank_path=str(bank.path.resolve()), store=str(store.root.resolve()), model_description=lm.description,
                   versions=package_versions(), device=str(lm.device), dtype=str(lm.dtype).removeprefix("torch."),
                   batch_size=execution.batch_size or "auto", threads=execution.threads or threads,
                   model_spec=lm.spec, embedding_scale=lm.embedding_scale.record(),
                   prefix_placement={"prefix_at": method.prefix_at, "tokenizer_adds_bos": lm.adds_bos,
                                     "bos_token": lm.tokenizer.bos_token if lm.adds_bos else None})
        if vector is not None:
            run.update(vector=vector.record())
        write_run_json(out, run)
        try:
            torch.set_num_threads(execution.threads or threads)
            with lm.backend.eager_attention() if method.record_attention else nullcontext():  # the kernel that gives its weights
                _run_grid(lm, bank, store, out, settings, run, prepared, execution, executor, observer,
                          None if neutral is None else (neutral, neutral_ids), vector)
        except KeyboardInterrupt as exc:
            mark_stopped(out, run, stop_status(exc))
            raise
        except Exception as exc:
            mark_stopped(out, run, "failed", one_line(exc))
            raise
        finally:
            executor.close()
            torch.set_num_threads(threads)
        run["timings"]["total_seconds"] = round(time.perf_counter() - started, 3)
        run["off_distribution"] = off_distribution(pl.read_parquet(out / "results.parquet"), end_tokens(lm))
        if off := run["off_distribution"]:
            observer.warn(off_distribution_warning(bank.path, off, frame_questions(out)))
        write_run_json(out, run)
    return SweepResult(out=out, results_path=out / "results.parquet", run=run)


def frame_questions(out: Path) -> int:
    """Questions (per context condition) of a finished run: its baseline rows."""
    return pl.scan_parquet(out / "results.parquet").filter(pl.col("role") == "baseline").select(pl.len()).collect().item()


def anti_difference_signals(bank: Bank, engrams: dict[tuple[str, int], StoredEngram], layers: list[int],
                            chunks: list[int]) -> list[dict]:
    """The seeds' difference signal between each question's relevant engram and its anti-content controls, per k and
    layer (the chunk-count section of the report reads these)."""
    signals = []
    for q in bank.questions:
        for anti in (c for c in q.controls if c not in NULL_PREFIXES and bank.kind_of(c) == "anti"):
            for k in chunks:
                for layer in layers:
                    a, b = (engram_vectors(bank, name, layer, k, engrams) for name in (q.engram, anti))
                    signals.append({"question_id": q.id, "anti": anti, "chunks": k, "layer": layer,
                                    "difference_signal": pair_geometry(a, b)["difference_signal"]})
    return signals


def score_question(lm: LoadedModel, settings: SweepSettings, bank: Bank, conditions: list[PreparedQuestion], grid: list[list[Cell]],
                   raw: RawVectors | list[RawVectors], batch_size: int | None, fits: int | None = None,
                   on_batch: Callable[[int], None] = lambda n: None) -> tuple[pl.DataFrame, int | None]:
    """One question's rows, every context condition: its baseline then its cells -> (frame, the batch size known to fit
    after an out-of-memory back-off, for the next question). raw: the engrams' vectors, one dict for every condition or
    (--reextract) one per condition."""
    chunks = settings.chunk_list
    frames = []
    for condition, (prepared, cells) in enumerate(zip(conditions, grid)):
        vectors = raw[condition] if isinstance(raw, list) else raw
        prefix = settings.method.prefix_length(chunks)
        requested = batch_size or auto_batch_size(lm, prefix + len(prepared.prompt_ids), len(cells))
        scores, size = score_cells(lm, prepared, cells, vectors, settings.method, min(requested, fits or requested),
                                   on_batch=on_batch, baseline_chunks=chunks[0])
        if size < requested:
            fits = size
        frame = question_frame(settings, bank, prepared, cells, scores)
        check_finite(frame, prepared.question.id)
        frames.append(frame)
    return pl.concat(frames), fits


def question_rows(lm: LoadedModel, settings: SweepSettings, bank: Bank, conditions: list[PreparedQuestion],
                  grid: list[list[Cell]], raw: RawVectors | list[RawVectors], batch_size: int | None,
                  fits: int | None, *, progress: Callable[[int], None]) -> tuple[object, int | None]:
    """A question's task for an executor: score_question's rows as an Arrow table (what travels back from a worker)."""
    frame, fits = score_question(lm, settings, bank, conditions, grid, raw, batch_size, fits, progress)
    return frame.to_arrow(), fits


def question_engrams(lm: LoadedModel, bank: Bank, store: EngramStore, settings: SweepSettings, prepared: PreparedQuestion,
                     log: Callable[[str], None], on_ready: Callable[[str, int, StoredEngram], None]) -> dict[tuple[str, int], StoredEngram]:
    """--reextract: the engrams of one question's sources (relevant, controls, paraphrases), each read after the
    question's prompt in this context condition; the bank-wide engrams' warnings were already said."""
    one = bank.select([prepared.question.id])
    where = prepared.question.id + ("" if prepared.context is None else " +context" if prepared.context else " -context")
    return bank_engrams(lm, one, store, settings.layers, settings.chunk_list, settings.extraction_for(lm.num_layers),
                        log=lambda message: log(f"{message}, read after question {where}"),
                        on_ready=lambda name, k, stored: on_ready(f"{name} after {where}", k, stored), state=prepared.prompt_ids)


def _run_grid(lm: LoadedModel, bank: Bank, store: EngramStore, out: Path, settings: SweepSettings, run: dict,
              prepared: list[list[PreparedQuestion]], execution: Execution, executor: Executor, observer: Observer,
              neutral: tuple[NeutralPassage, tuple[int, ...]] | None, vector: StoredVector | None = None) -> None:
    """Build what the store lacks, score every question not yet in out/parts on the executor, merge, then (neutral:
    the passage and its ids) probe each cell's side effects; fills run in place. vector: its cells and raw vectors
    instead of the bank's engrams."""
    layers, chunks = settings.layers, settings.chunk_list
    build_started = time.perf_counter()
    if vector is not None:
        grid = [[vector_cells(vector.name, vector.vector.sha256[:16], layers, settings.strengths, p.context) for p in conditions]
                for conditions in prepared]
        raw = vector_raw(vector.vector, vector.name, layers)
        build_seconds = time.perf_counter() - build_started
        run.update(engram_keys={}, engram_files={}, num_layers=lm.num_layers)
        _score_grid(lm, bank, out, settings, run, prepared, execution, executor, observer, neutral, grid, raw, {},
                    build_seconds)
        return
    run["engram_keys"] = {}

    def record_engram(name: str, k: int, stored: StoredEngram) -> None:  # at once, so a concurrent `store gc` keeps it
        run["engram_keys"][engram_label(name, k, chunks)] = stored.key
        write_run_json(out, run)

    engrams = bank_engrams(lm, bank, store, layers, chunks, settings.extraction_for(lm.num_layers), observer.warn, observer.log, record_engram)
    build_seconds = time.perf_counter() - build_started
    labels = {(name, k): engram_label(name, k, chunks) for name, k in engrams}
    run.update(
        engram_files={labels[key]: str(stored.path) for key, stored in engrams.items()},
        largest_chunk_share={labels[key]: {str(layer): round(float(chunk_shares(stored.engram.layers[layer]).max()), 4)
                                           for layer in layers} for key, stored in engrams.items()},
        num_layers=lm.num_layers,
        engram_tokens={name: stored.engram.n_tokens for (name, _), stored in engrams.items()},
        anti_difference_signal=anti_difference_signals(bank, engrams, layers, chunks),
    )
    write_run_json(out, run)

    conditioned: dict[tuple[str, bool | None], dict[tuple[str, int], StoredEngram]] = {}
    if settings.method.reextract:  # every question's own engrams: the sources read after its prompt (in each context condition)
        for conditions in prepared:
            for p in conditions:
                conditioned[(p.question.id, p.context)] = question_engrams(lm, bank, store, settings, p, observer.log, record_engram)
    grid = [[question_cells(p.question, bank, {key: stored.key for key, stored in conditioned.get((p.question.id, p.context), engrams).items()},
                            layers, settings.strengths, chunks, p.context, settings.spec.grid.samples, settings.spec.grid.sample_seed)
             for p in conditions] for conditions in prepared]
    # --reextract: every question brings its own vectors (its task's), so none are shared
    raw = {} if settings.method.reextract else raw_vectors(lm, bank, engrams, layers, chunks, settings.spec.grid.samples,
                                                           settings.spec.grid.sample_seed)
    _score_grid(lm, bank, out, settings, run, prepared, execution, executor, observer, neutral, grid, raw, conditioned,
                build_seconds)


def _score_grid(lm: LoadedModel, bank: Bank, out: Path, settings: SweepSettings, run: dict,
                prepared: list[list[PreparedQuestion]], execution: Execution, executor: Executor, observer: Observer,
                neutral: tuple[NeutralPassage, tuple[int, ...]] | None, grid: list[list[list[Cell]]], raw: RawVectors,
                conditioned: dict, build_seconds: float) -> None:
    """Score every question not yet in out/parts on the executor, merge, probe the side effects (neutral)."""

    layers, chunks = settings.layers, settings.chunk_list
    rows = [sum(len(cells) + 1 for cells in question) for question in grid]
    parts = part_paths(out / "parts", [conditions[0].question.id for conditions in prepared])
    trusted = trusted_parts(parts, run[PART_CHECKSUMS], observer.warn)
    done = sum(n for n, part in zip(rows, parts) if part in trusted)
    if executor.description is not None:
        run.update(distributed=executor.description)
    fits: int | None = None  # the largest batch size known to fit, after an out-of-memory back-off
    paused = 0.0

    def tasks(shared_raw: object) -> Iterator[Task]:
        nonlocal paused
        todo = [i for i, part in enumerate(parts) if part not in trusted]
        for i in sorted(todo, key=lambda i: -rows[i]) if executor.parallel else todo:
            pause_started = time.perf_counter()
            observer.before_question(prepared[i][0].question)
            paused += time.perf_counter() - pause_started
            own = [raw_vectors(lm, bank, conditioned[(p.question.id, p.context)], layers, chunks, settings.spec.grid.samples,
                               settings.spec.grid.sample_seed) for p in prepared[i]] if settings.method.reextract else shared_raw
            yield Task(prepared[i][0].question.id, question_rows,
                       (settings, bank, prepared[i], grid[i], own, execution.batch_size, fits), rows[i])

    def finished(task: Task, result: tuple) -> None:
        nonlocal fits
        table, fits = result
        part = parts[index[task.name]]
        run[PART_CHECKSUMS][part.name] = write_part(part, pl.from_arrow(table))
        write_run_json(out, run)

    index = {conditions[0].question.id: i for i, conditions in enumerate(prepared)}
    sweep_started = time.perf_counter()
    bar = progress_bar(sum(rows), "sweep", "cell", enabled=observer.progress, initial=done)
    shared_raw = executor.share(raw)
    with bar:
        executor.map(tasks(shared_raw), finished, bar.update)
    sweep_seconds = time.perf_counter() - sweep_started - paused

    run["results_sha256"] = merge_parts(out / "results.parquet", parts, run[PART_CHECKSUMS], out / "run.json")
    run["answers_sha256"] = merge_answers(out / ANSWERS_FILE, parts, observer.warn)
    probe_seconds = None if neutral is None else run_probe(out, settings, run, grid, shared_raw, *neutral,
                                                           execution.batch_size, executor, observer)
    total = sum(rows)
    run.update(
        status="complete",
        cells={"total": total, "resumed": done, "computed": total - done, "questions": len(prepared)},
        timings={
            "build_seconds": round(build_seconds, 3),
            "sweep_seconds": round(sweep_seconds, 3),
            "cells_per_second": round((total - done) / sweep_seconds, 3) if sweep_seconds > 0 else None,
            **({} if probe_seconds is None else {"side_effects_seconds": round(probe_seconds, 3)}),
        },
    )
