"""Generation: greedy text from a finished sweep's cells -> RUN/generations.parquet (batched, resumable).

The cell's injection enters exactly as in the sweep: prefix and add in the prefill only (later tokens attend to the
prefix through the KV cache; nothing is re-injected), actadd at every prompt and generated position. The selected
cells of one question and context condition share their prefill length, so they decode as one batch with no
padding, each row stopping at EOS."""

from __future__ import annotations

import json
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import polars as pl
import torch

from .answers import AnswerMatcher
from .bank import load_bank
from .errors import EngramEvalError
from .files import atomic_write_text
from .grid import Cell, raw_vectors
from .injection import CellVectors, Steering
from .model import LoadedModel
from .prompts import prepare_question
from .rundir import SweepSettings, merge_parts, one_line, read_run_json, write_part
from .scoring import auto_batch_size
from .store import EngramStore
from .sweep import build_engrams

SELECTIONS = ("default", "all", "baseline", "flips")
DEFAULT_MAX_NEW_TOKENS = 48
KEY_COLUMNS = ("question_id", "role", "engram", "control_kind", "layer", "strength", "chunks", "pooling", "skip_tokens",
               "window", "scaling", "injection", "context")

GENERATION_SCHEMA = pl.Schema(
    {
        "run_id": pl.String,
        "question_id": pl.String,
        "role": pl.String,
        "engram": pl.String,
        "control_kind": pl.String,
        "layer": pl.Int32,
        "strength": pl.Float64,
        "chunks": pl.Int32,
        "pooling": pl.String,
        "skip_tokens": pl.Int32,
        "window": pl.Int32,
        "scaling": pl.String,
        "injection": pl.String,
        "context": pl.Boolean,
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
    }
)


@dataclass
class Generated:
    token_ids: list[int]
    stop: str  # eos | length


def eos_token_ids(lm: LoadedModel) -> set[int]:
    configured = getattr(lm.model.generation_config, "eos_token_id", None)
    if configured is None:
        configured = lm.tokenizer.eos_token_id
    return set(configured if isinstance(configured, list) else [] if configured is None else [configured])


@torch.inference_mode()
def generate_batch(lm: LoadedModel, prompt_ids: tuple[int, ...], steering: Steering | None, max_new_tokens: int) -> list[Generated]:
    """Greedy decoding of a batch of cells that share a prompt (steering None: one unsteered row). The EOS token ends a
    row and is not part of its tokens; rows that ended keep decoding (their output unused) until all have."""
    embed = lm.model.get_input_embeddings()
    batch = 1 if steering is None else steering.vectors.shape[0]
    body = embed(torch.tensor(prompt_ids, device=lm.device)).unsqueeze(0).expand(batch, -1, -1)
    stops = eos_token_ids(lm)
    tokens: list[list[int]] = [[] for _ in range(batch)]
    ended = [False] * batch
    with steering.active(lm.model) if steering is not None else nullcontext():
        output = lm.model(inputs_embeds=body if steering is None else steering.inputs(body), use_cache=True, logits_to_keep=1)
        for step in range(max_new_tokens):
            next_ids = output.logits[:, -1].float().argmax(dim=-1)
            for row, token in enumerate(next_ids.tolist()):
                if not ended[row]:
                    if token in stops:
                        ended[row] = True
                    else:
                        tokens[row].append(token)
            if all(ended) or step == max_new_tokens - 1:
                break
            embeds = embed(next_ids).unsqueeze(1)
            output = lm.model(inputs_embeds=embeds if steering is None else steering.next_inputs(embeds),
                              past_key_values=output.past_key_values, use_cache=True, logits_to_keep=1)
    return [Generated(row_tokens, "eos" if row_ended else "length") for row_tokens, row_ended in zip(tokens, ended)]


def select_cells(frame: pl.DataFrame, selection: str) -> pl.DataFrame:
    """The rows to generate from. default: per question and context condition, the baseline, every cell of the relevant
    engram that flipped or broke, and the best and worst cell (by ratio) of the relevant engram and of each control kind.
    all: every row. baseline: the baseline rows. flips: the baseline and every flipped or broken cell of any engram."""
    if selection not in SELECTIONS:
        raise EngramEvalError(f"--cells: unknown '{selection}' (one of: {', '.join(SELECTIONS)})")
    frame = frame.with_row_index("row")
    baseline = pl.col("role") == "baseline"
    moved = pl.col("flipped") | pl.col("broken")
    if selection == "all":
        return frame
    if selection == "baseline":
        return frame.filter(baseline)
    if selection == "flips":
        return frame.filter(baseline | moved)
    condition = ["question_id", "context", pl.coalesce(pl.col("control_kind"), pl.col("role")).alias("kind")]
    cells = frame.filter(~baseline).with_columns(kind=pl.coalesce(pl.col("control_kind"), pl.col("role")))
    ranked = cells.with_columns(
        best=pl.col("row") == pl.col("row").sort_by("ratio", descending=True).first().over(condition[:2] + ["kind"]),
        worst=pl.col("row") == pl.col("row").sort_by("ratio").first().over(condition[:2] + ["kind"]),
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
) -> GenerateResult:
    """Generate from a finished sweep's selected cells; each question lands atomically in RUN/generation-parts, so a
    rerun resumes. A run holding generations with other settings is refused unless force."""
    from tqdm import tqdm

    out = Path(run_dir)
    if max_new_tokens < 1:
        raise EngramEvalError(f"--max-new-tokens: must be at least 1 (got {max_new_tokens})")
    run = read_run_json(out)
    results = out / "results.parquet"
    if run is None or not results.is_file():
        raise EngramEvalError(f"{out}: no results.parquet (finish the sweep with `engram-eval sweep ... --out {out}` first)")
    settings = SweepSettings(**run["settings"])
    if lm.fingerprint != settings.model_fingerprint:
        raise EngramEvalError(f"{out} was swept with model {settings.model} ({settings.model_fingerprint[:12]}), "
                              f"not {lm.name} ({lm.short_fingerprint}): pass the run's --model")
    bank = load_bank(run["bank_path"], allow_outside_paths=True).select(settings.questions)
    if bank.sha256 != settings.bank_sha256:
        raise EngramEvalError(f"{run['bank_path']}: the bank changed since {out} was swept; sweep again before generating")
    selected = select_cells(pl.read_parquet(results), cells)
    info = {"settings": {"cells": cells, "max_new_tokens": max_new_tokens, "run_id": run["run_id"]}, "status": "running"}
    _prepare_generation_dir(out, info, force)

    engrams = build_engrams(lm, bank, EngramStore(run["store"]), settings)
    raw = raw_vectors(lm, bank, engrams, settings.layers, settings.chunks)
    started, generated_tokens = time.perf_counter(), 0
    parts_dir = out / "generation-parts"
    parts = [parts_dir / f"{i:05d}-{qid}.parquet" for i, qid in enumerate(settings.questions)]
    bar = tqdm(total=selected.height, unit="cell", desc="generate", disable=not progress or None, dynamic_ncols=True)
    try:
        with bar:
            for question, part in zip(bank.questions, parts):
                rows = selected.filter(pl.col("question_id") == question.id)
                if part.exists() or rows.is_empty():
                    bar.update(rows.height)
                    continue
                frame, tokens = _generate_question(lm, question, bank.path, rows, raw, settings, max_new_tokens, batch_size,
                                                   on_rows=bar.update)
                generated_tokens += tokens
                bar.set_postfix(tokens_per_s=f"{generated_tokens / (time.perf_counter() - started):.0f}")
                write_part(part, frame.with_columns(run_id=pl.lit(run["run_id"])).select(list(GENERATION_SCHEMA)))
    except KeyboardInterrupt:
        _write_info(out, {**info, "status": "interrupted"})
        raise
    except Exception as exc:
        _write_info(out, {**info, "status": "failed", "reason": one_line(exc)})
        raise
    seconds = time.perf_counter() - started
    generations = merge_parts(out / "generations.parquet", [part for part in parts if part.exists()], GENERATION_SCHEMA)
    info.update(status="complete", generations=selected.height,
                timings={"seconds": round(seconds, 3), "tokens": generated_tokens,
                         "tokens_per_second": round(generated_tokens / seconds, 2) if seconds > 0 else None})
    _write_info(out, info)
    return GenerateResult(out=out, generations_path=generations, info=info)


def _generate_question(lm: LoadedModel, question, bank_path: Path, rows: pl.DataFrame, raw: dict, settings: SweepSettings,
                       max_new_tokens: int, batch_size: int | None, on_rows: Callable[[int], None]) -> tuple[pl.DataFrame, int]:
    """Every selected row of one question, batched per context condition (one prompt, one prefill length)."""
    matcher = AnswerMatcher.for_question(question)
    frames, tokens = [], 0
    for (context,), group in rows.group_by(["context"], maintain_order=True):
        prepared = prepare_question(lm, question, settings.scoring, bank_path, context)
        generated: list[Generated] = []
        baseline = group.filter(pl.col("role") == "baseline")
        cells_rows = group.filter(pl.col("role") != "baseline")
        if baseline.height:
            generated += generate_batch(lm, prepared.prompt_ids, None, max_new_tokens)
        cells = [Cell(r["engram"], None, r["role"], r["control_kind"], r["layer"], r["strength"], r["chunks"], r["context"])
                 for r in cells_rows.iter_rows(named=True)]
        if cells:
            vectors = CellVectors(lm, raw, settings.injection, settings.scaling, prepared.prompt_ids, cells)
            prefix = settings.chunks if settings.injection == "prefix" else 0
            size = batch_size or auto_batch_size(lm, prefix + len(prepared.prompt_ids) + max_new_tokens, len(cells))
            for start in range(0, len(cells), size):
                batch = cells[start : start + size]
                generated += generate_batch(lm, prepared.prompt_ids, vectors.steering(batch), max_new_tokens)
                on_rows(len(batch))
        on_rows(baseline.height)
        texts = [lm.tokenizer.decode(g.token_ids, skip_special_tokens=True) for g in generated]
        judged = [matcher.judge(text) for text in texts]
        frames.append(pl.concat([baseline, cells_rows]).select(*KEY_COLUMNS, "ratio", "flipped", "broken").with_columns(
            text=pl.Series(texts, dtype=pl.String),
            token_ids=pl.Series([g.token_ids for g in generated], dtype=pl.List(pl.Int64)),
            n_tokens=pl.Series([len(g.token_ids) for g in generated], dtype=pl.Int32),
            stop=pl.Series([g.stop for g in generated], dtype=pl.String),
            **{key: pl.Series([j[key] for j in judged]) for key in ("says_correct", "says_incorrect", "first_answer", "verdict")},
        ))
        tokens += sum(len(g.token_ids) for g in generated)
    return pl.concat(frames), tokens


def _prepare_generation_dir(out: Path, info: dict, force: bool) -> None:
    path = out / "generation.json"
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
            shutil.rmtree(out / "generation-parts", ignore_errors=True)
            (out / "generations.parquet").unlink(missing_ok=True)
    (out / "generation-parts").mkdir(exist_ok=True)
    _write_info(out, info)


def _write_info(out: Path, info: dict) -> None:
    atomic_write_text(out / "generation.json", json.dumps(info, indent=2, sort_keys=True) + "\n")
