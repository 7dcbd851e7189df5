"""Generation: greedy text from a finished sweep's cells -> RUN/generations.parquet (batched, resumable).

The cell's injection enters exactly as in the sweep: prefix and add in the prefill only (later tokens attend to the
prefix through the KV cache; nothing is re-injected), actadd at every prompt and generated position. The selected
cells of one question and context condition share their prefill length, so they decode as one batch with no
padding, each row stopping at EOS."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import polars as pl
import torch

from ..backend.model import LoadedModel
from ..bank.answers import AnswerMatcher
from ..bank.banks import Bank, load_bank
from ..core.errors import EngramEvalError
from ..core.files import atomic_write_text, file_sha256
from ..core.progress import progress_bar
from ..core.spec import Ensembling, RayOptions
from ..engram.extraction import source_ids
from ..engram.store import EngramStore, bank_engrams
from ..steer.decoding import Generated, Row, generate_in_batches
from ..steer.ensemble import EnsembleJob
from ..steer.grid import Cell, raw_vectors
from ..steer.injection import CellVectors
from ..vectors.controls import vector_raw
from ..vectors.store import StoredVector
from ..vectors.vector import SteeringVector
from ..steer.prompts import prepare_question, prompt_token_ids
from ..steer.scoring import auto_batch_size
from .executors import Task, open_executor
from .results import CELL_SETTING_COLUMNS, computed_cells, engram_kind, primary_rows
from .rundir import (
    PART_CHECKSUMS,
    GenerationFiles,
    check_results_format,
    merge_parts,
    one_line,
    part_paths,
    read_run_json,
    run_lock,
    stop_status,
    trusted_parts,
    verify_results,
    write_part,
)
from .settings import SweepSettings

SELECTIONS = ("default", "all", "baseline", "flips")
GENERATION_BATCH_CPU = 64  # rows decoded together on a CPU; decoding reads every weight once per step whatever the batch
DEFAULT_MAX_NEW_TOKENS = 48
KEY_COLUMNS = ("question_id", "role", "engram", "control_kind", "layer", "strength", "chunks", "pooling", "skip_tokens",
               "window", "scaling", "injection", "positions", "prefix_at", "context")

GENERATION_SCHEMA = pl.Schema(
    {
        "run_id": pl.String,
        "question_id": pl.String,
        "role": pl.String,
        "engram": pl.String,
        "control_kind": pl.String,
        **CELL_SETTING_COLUMNS,
        "ratio": pl.Float64,
        "flipped": pl.Boolean,
        "broken": pl.Boolean,
        "text": pl.String,
        "token_ids": pl.List(pl.Int64),
        "n_tokens": pl.Int32,
        "stop": pl.String,
        "says_correct": pl.Boolean,
        "says_incorrect": pl.Boolean,
        "first_answer": pl.String,
        "verdict": pl.String,
        "ensemble": pl.Int32,
        "ensemble_decay": pl.Float64,
        "reextract": pl.Boolean,
    }
)


def select_cells(frame: pl.DataFrame, selection: str) -> pl.DataFrame:
    """The rows to generate from. default: per question and context condition, the baseline, every cell of the relevant
    engram that flipped or broke, and the best and worst cell (by ratio) of the relevant engram and of each control kind.
    all: every row. baseline: the baseline rows. flips: the baseline and every flipped or broken cell of any engram.
    A row that repeats another cell's computation (a null prefix at another layer) is not generated again, nor is another
    paraphrase's or a sample's (the source's own text stands for them)."""
    if selection not in SELECTIONS:
        raise EngramEvalError(f"--cells: unknown '{selection}' (one of: {', '.join(SELECTIONS)})")
    frame = frame.with_row_index("row").filter(computed_cells() & primary_rows())
    baseline = pl.col("role") == "baseline"
    moved = pl.col("flipped") | pl.col("broken")
    if selection == "all":
        return frame
    if selection == "baseline":
        return frame.filter(baseline)
    if selection == "flips":
        return frame.filter(baseline | moved)
    condition = ["question_id", "context", "kind"]
    cells = frame.filter(~baseline).with_columns(engram_kind())
    ranked = cells.with_columns(
        best=pl.col("row") == pl.col("row").sort_by("ratio", descending=True).first().over(condition),
        worst=pl.col("row") == pl.col("row").sort_by("ratio").first().over(condition),
    )
    keep = ranked.filter(pl.col("best") | pl.col("worst") | ((pl.col("role") == "relevant") & moved))["row"]
    return frame.filter(baseline | pl.col("row").is_in(keep.implode()))


@dataclass
class GenerateResult:
    out: Path
    generations_path: Path
    info: dict


def run_generate(
    lm: LoadedModel,
    run_dir: str | Path,
    *,
    cells: str = "default",
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int | None = None,
    force: bool = False,
    progress: bool = True,
    ray: RayOptions | None = None,
    wait: bool = False,
    warn: Callable[[str], None] = lambda message: None,
    ensembling: Ensembling = Ensembling(),
) -> GenerateResult:
    """Generate from a finished sweep's selected cells; each question lands atomically in RUN/generation-parts, so a
    rerun resumes. A run holding generations with other settings is refused unless force. ray: batches of whole
    questions go to a Ray cluster's workers. One writer at a time (the run directory's lock): `wait` waits for another
    sweep or generate to finish instead of failing; warn receives the lock's messages. ensembling (--ensemble,
    --reextract) other than plain writes its own files (RUN/generations-ensemble.parquet, generation-ensemble.json,
    generation-ensemble-parts), so a run holds plain and ensembled texts of the same cells side by side."""

    out = Path(run_dir)
    ensembling.check()
    files = GenerationFiles(out, ensembling.plain)
    if max_new_tokens < 1:
        raise EngramEvalError(f"--max-new-tokens: must be at least 1 (got {max_new_tokens})")
    if not (out / "results.parquet").is_file():
        raise EngramEvalError(f"{out}: no results.parquet (finish the sweep with `engram-eval sweep ... --out {out}` first)")
    with run_lock(out, wait, warn):
        run = read_run_json(out)
        results = out / "results.parquet"
        if run is None or not results.is_file():
            raise EngramEvalError(f"{out}: no results.parquet (finish the sweep with `engram-eval sweep ... --out {out}` first)")
        check_results_format(out, run)
        verify_results(out, run)
        settings, bank, raw = reopen_run(lm, out, run)
        selected = select_cells(pl.read_parquet(results), cells)
        lengths = {q.id: len(prompt_token_ids(lm, q, bank.path, context=True)) for q in bank.questions}
        longest = max(settings.chunk_list) + max(lengths.values())
        if lm.max_positions is not None and longest + max_new_tokens > lm.max_positions:
            qid = max(lengths, key=lengths.__getitem__)
            raise EngramEvalError(f"{bank.path}: question '{qid}': its prompt is {lengths[qid]} tokens; with the engram's "
                                  f"{max(settings.chunk_list)} positions and --max-new-tokens {max_new_tokens} that is "
                                  f"{longest + max_new_tokens} positions, more than the model's {lm.max_positions}")
        info = {"settings": {"cells": cells, "max_new_tokens": max_new_tokens, "run_id": run["run_id"],
                             "ensemble": ensembling.size, "ensemble_decay": ensembling.decay, "reextract": ensembling.reextract},
                "status": "running", "threads": torch.get_num_threads()}
        previous_info = _previous_info(files)
        _prepare_generation_dir(files, info, force)
        parts = part_paths(files.parts, settings.questions)
        info[PART_CHECKSUMS] = _previous_checksums(previous_info, info["settings"], parts)
        trusted = trusted_parts(parts, info[PART_CHECKSUMS], warn)
        waiting = [(question, part, selected.filter(pl.col("question_id") == question.id)) for question, part in zip(bank.questions, parts)]
        waiting = [(question, part, rows) for question, part, rows in waiting if rows.height and part not in trusted]
        size = batch_size or min(GENERATION_BATCH_CPU if lm.device.type == "cpu" or ray else selected.height,
                                 auto_batch_size(lm, longest + max_new_tokens, selected.height, cpu_token_budget=False))
        groups = []  # whole questions, as many as fill a batch: each lands in its part once its batch is done
        while waiting:
            group, count = [], 0
            while waiting and (not group or count + waiting[0][2].height <= size):
                group.append(waiting.pop(0))
                count += group[-1][2].height
            groups.append(group)
        bar = progress_bar(selected.height, "generate", "cell", enabled=progress,
                           initial=selected.height - sum(rows.height for group in groups for _, _, rows in group))
        executor = open_executor(lm, ray)
        if executor.description is not None:
            info["distributed"] = executor.description
        started, generated_tokens = time.perf_counter(), 0

        def tasks() -> Iterator[Task]:
            for group in groups:
                prepared = [(question, part, *question_rows(lm, question, bank, rows, raw, settings, ensembling))
                            for question, part, rows in group]
                todo = [row for *_, rows in prepared for row in rows]
                prepared_groups[group[0][0].id] = prepared
                yield Task(group[0][0].id, generate_on_worker, (todo, max_new_tokens, size), len(todo))

        def finish(task: Task, generated: list[Generated]) -> None:
            nonlocal generated_tokens
            for question, part, rows, todo in prepared_groups.pop(task.name):
                mine, generated = generated[: len(todo)], generated[len(todo):]
                generated_tokens += sum(len(g.token_ids) for g in mine)
                frame = _generation_frame(lm, question, rows, mine).with_columns(
                    run_id=pl.lit(run["run_id"]), ensemble=pl.lit(ensembling.size, pl.Int32),
                    ensemble_decay=pl.lit(ensembling.decay, pl.Float64), reextract=pl.lit(ensembling.reextract))
                info[PART_CHECKSUMS][part.name] = write_part(part, frame.select(list(GENERATION_SCHEMA)))
            _write_info(files, info)
            bar.set_postfix(tokens_per_s=f"{generated_tokens / (time.perf_counter() - started):.0f}")

        prepared_groups: dict[str, list] = {}  # a task's questions, their rows and what they generate, until it finishes
        try:
            with bar:
                executor.map(tasks(), finish, bar.update)
        except KeyboardInterrupt as exc:
            _write_info(files, {**info, "status": stop_status(exc)})
            raise
        except Exception as exc:
            _write_info(files, {**info, "status": "failed", "reason": one_line(exc)})
            raise
        finally:
            executor.close()
        seconds = time.perf_counter() - started
        generations = files.parquet
        info["generations_sha256"] = merge_parts(generations, [part for part in parts if part.exists()], info[PART_CHECKSUMS],
                                                 files.info, GENERATION_SCHEMA)
        info.update(status="complete", generations=selected.height,
                    timings={"seconds": round(seconds, 3), "tokens": generated_tokens,
                             "tokens_per_second": round(generated_tokens / seconds, 2) if seconds > 0 else None})
        if not generated_tokens and previous_info.get("status") == "complete" and isinstance(previous_info.get("timings"), dict):
            info["timings"] = previous_info["timings"]  # a resume with nothing left keeps the timings of the work
        _write_info(files, info)
    return GenerateResult(out=out, generations_path=generations, info=info)


def reopen_run(lm: LoadedModel, out: Path, run: dict) -> tuple[SweepSettings, Bank, dict]:
    """A finished sweep's settings, its bank (unchanged since) and its engrams' raw vectors, for this model."""
    settings = SweepSettings.from_record(run["settings"])
    if lm.fingerprint != settings.model_fingerprint:
        raise EngramEvalError(f"{out} was swept with model {settings.model} ({settings.model_fingerprint[:12]}), "
                              f"not {lm.name} ({lm.short_fingerprint}): pass the run's --model")
    bank = load_bank(run["bank_path"], allow_outside_paths=True).select(settings.questions)
    if bank.sha256 != settings.bank_sha256:
        raise EngramEvalError(f"{run['bank_path']}: the bank changed since {out} was swept; sweep again before generating")
    if settings.method.vector is not None:
        return settings, bank, vector_raw(swept_vector(out, run, settings).vector, settings.method.vector, settings.layers)
    engrams = bank_engrams(lm, bank, EngramStore(run["store"]), settings.layers, settings.chunk_list, settings.extraction_for(lm.num_layers))
    return settings, bank, raw_vectors(lm, bank, engrams, settings.layers, settings.chunk_list)


def swept_vector(out: Path, run: dict, settings: SweepSettings) -> StoredVector:
    """The stored vector a `sweep --vector` run steered with, unchanged since (its checksum in the run's settings)."""
    record = run.get("vector") or {}
    path = Path(record.get("file", ""))
    if not path.is_file():
        raise EngramEvalError(f"{out}: the vector it was swept with ({path}) is gone; import it again under its name")
    stored = StoredVector(settings.method.vector, SteeringVector.load(path), path)
    if stored.vector.sha256 != settings.vector_sha256:
        raise EngramEvalError(f"{path}: the vector changed since {out} was swept; sweep again before generating")
    return stored


def question_rows(lm: LoadedModel, question, bank: Bank, rows: pl.DataFrame, raw: dict, settings: SweepSettings,
                  ensembling: Ensembling = Ensembling()) -> tuple[pl.DataFrame, list[Row]]:
    """One question's selected results rows (baseline first in each context condition) and what to generate for each."""
    ordered, todo = [], []
    for (context,), group in rows.group_by(["context"], maintain_order=True):
        prepared = prepare_question(lm, question, settings.method.scoring, bank.path, context)
        baseline = group.filter(pl.col("role") == "baseline")
        cell_rows = group.filter(pl.col("role") != "baseline")
        cells = [Cell(r["engram"], None, r["role"], r["control_kind"], r["layer"], r["strength"], r["chunks"], r["context"])
                 for r in cell_rows.iter_rows(named=True)]
        todo += [Row(prepared.prompt_ids)] * baseline.height
        if cells and not ensembling.plain and settings.method.vector is not None:
            raise EngramEvalError("--ensemble, --reextract: average and re-extract engrams; this run steers with the vector "
                                  f"'{settings.method.vector}'")
        if cells and not ensembling.plain:
            todo += [Row(prepared.prompt_ids, ensemble=ensemble_job(lm, bank, cell, raw, settings, ensembling)) for cell in cells]
        elif cells:
            vectors = CellVectors(lm, raw, settings.method, prepared.prompt_ids, cells)
            todo += [Row(prepared.prompt_ids, vectors.steering([cell])) for cell in cells]
        ordered += [baseline, cell_rows]
    return pl.concat(ordered), todo


def ensemble_job(lm: LoadedModel, bank: Bank, cell: Cell, raw: dict, settings: SweepSettings,
                 ensembling: Ensembling) -> EnsembleJob:
    """What an ensembled generation of a cell needs: its sweep-time vectors and, to re-extract, its sources' ids."""
    extraction = settings.extraction_for(lm.num_layers)
    job = EnsembleJob(cell, raw[(cell.vectors_name, cell.layer, cell.chunks)], settings.method, ensembling, extraction)
    if not ensembling.reextract or cell.is_null:
        return job
    expression = bank.expression(cell.engram)
    return replace(job, expression=expression,
                   source_ids={name: source_ids(lm, bank.sources[name].text, extraction) for name in expression.names})


def _generation_frame(lm: LoadedModel, question, rows: pl.DataFrame, generated: list[Generated]) -> pl.DataFrame:
    matcher = AnswerMatcher.for_question(question)
    texts = [lm.tokenizer.decode(g.token_ids, skip_special_tokens=True) for g in generated]
    judged = [matcher.judge(text) for text in texts]
    return rows.select(*KEY_COLUMNS, "ratio", "flipped", "broken").with_columns(
        text=pl.Series(texts, dtype=pl.String),
        token_ids=pl.Series([g.token_ids for g in generated], dtype=pl.List(pl.Int64)),
        n_tokens=pl.Series([len(g.token_ids) for g in generated], dtype=pl.Int32),
        stop=pl.Series([g.stop for g in generated], dtype=pl.String),
        **{key: pl.Series([j[key] for j in judged]) for key in ("says_correct", "says_incorrect", "first_answer", "verdict")},
    )


def generate_on_worker(lm: LoadedModel, todo: list[Row], max_new_tokens: int, batch_size: int, *,
                       progress: Callable[[int], None]) -> list[Generated]:
    """A batch of whole questions' generations as an executor's task; on a worker, whose device may differ from the
    driver's."""
    return generate_in_batches(lm, [row.to(lm.device) for row in todo], max_new_tokens, batch_size, progress)


def _prepare_generation_dir(files: GenerationFiles, info: dict, force: bool) -> None:
    out, path = files.out, files.info
    if path.exists():
        try:
            previous = json.loads(path.read_text()).get("settings")
        except (OSError, ValueError):
            previous = None
        if previous != info["settings"]:
            if not force:
                changed = sorted(k for k in info["settings"] if (previous or {}).get(k) != info["settings"][k])
                raise EngramEvalError(f"{out} holds generations with other settings ({', '.join(changed)}); "
                                      "use --force to replace them")
            shutil.rmtree(files.parts, ignore_errors=True)
            files.parquet.unlink(missing_ok=True)
    files.parts.mkdir(exist_ok=True)
    _write_info(files, info)


def _previous_info(files: GenerationFiles) -> dict:
    try:
        info = json.loads(files.info.read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _previous_checksums(previous: dict, settings: dict, parts: list[Path]) -> dict[str, str]:
    """The generation parts' checksums a resume carries over (an older generation.json without them: its parts as
    they are)."""
    if previous.get("settings") != settings:
        return {}
    if isinstance(previous.get(PART_CHECKSUMS), dict):
        return dict(previous[PART_CHECKSUMS])
    return {part.name: file_sha256(part) for part in parts if part.exists()}


def _write_info(files: GenerationFiles, info: dict) -> None:
    atomic_write_text(files.info, json.dumps(info, indent=2, sort_keys=True) + "\n")
