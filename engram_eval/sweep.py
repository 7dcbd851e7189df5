"""Sweep: question bank x engrams x layers x strengths -> scored cells -> results.parquet (batched, resumable)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import time
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import polars as pl
import torch

from . import __version__
from .bank import Bank, Question, Source
from .engram import DEFAULT_MAX_TOKENS
from .errors import EngramEvalError
from .files import atomic_write_text
from .model import LoadedModel
from .store import EngramStore, StoredEngram

SCORINGS = ("first-token", "sequence", "sequence-max")
INJECTIONS = ("prefix",)

CASES = (
    "HIGH_CONFIDENCE_CORRECT",
    "CORRECT_WEAKENED",
    "FRAGILE_CORRECT",
    "HIGH_CONFIDENCE_INCORRECT",
    "RECOVERED_KNOWLEDGE",
    "TIE",
    "UNSCORABLE",
)

RESULT_SCHEMA = pl.Schema(
    {
        "run_id": pl.String,
        "model": pl.String,
        "model_fingerprint": pl.String,
        "bank": pl.String,
        "question_id": pl.String,
        "tags": pl.List(pl.String),
        "related_wrong": pl.Boolean,
        "engram": pl.String,
        "engram_key": pl.String,
        "role": pl.String,
        "control_kind": pl.String,
        "layer": pl.Int32,
        "strength": pl.Float64,
        "chunks": pl.Int32,
        "injection": pl.String,
        "scoring": pl.String,
        "p_correct": pl.Float64,
        "p_incorrect": pl.Float64,
        "log_ratio": pl.Float64,
        "ratio": pl.Float64,
        "baseline_ratio": pl.Float64,
        "improvement": pl.Float64,
        "log_improvement": pl.Float64,
        "correct_before": pl.Boolean,
        "correct_after": pl.Boolean,
        "flipped": pl.Boolean,
        "broken": pl.Boolean,
        "case": pl.String,
        "top_correct_variant": pl.String,
        "top_incorrect_variant": pl.String,
    }
)


def parse_strengths(text: str) -> list[float]:
    try:
        strengths = [float(part) for part in text.split(",")]
    except ValueError:
        raise EngramEvalError(f"--strengths: malformed '{text}' (expected numbers like '0.5,1,2,5,10,20')") from None
    for strength in strengths:
        if not math.isfinite(strength) or strength <= 0:
            raise EngramEvalError(f"--strengths: {strength} is not allowed; strengths must be finite and > 0")
    return sorted(set(strengths))


# ---------------------------------------------------------------- questions -> token ids


@dataclass(frozen=True)
class PreparedQuestion:
    question: Question
    prompt_ids: tuple[int, ...]
    correct_ids: tuple[tuple[int, ...], ...]
    incorrect_ids: tuple[tuple[int, ...], ...]


def prompt_token_ids(lm: LoadedModel, question: Question, bank_path: Path | str = "bank") -> list[int]:
    """Default special tokens; with chat, the tokenizer's chat template (generation prompt added) first."""
    text = question.prompt
    if question.chat:
        if not getattr(lm.tokenizer, "chat_template", None):
            raise EngramEvalError(
                f"{bank_path}: question '{question.id}': chat: true, but {lm.name}'s tokenizer has no chat template"
            )
        messages = [{"role": "user", "content": question.prompt}]
        text = lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return lm.tokenizer(text)["input_ids"]


def prepare_question(lm: LoadedModel, question: Question, scoring: str, bank_path: Path | str = "bank") -> PreparedQuestion:
    """Tokenize prompt and variants; refuse variants that cannot be scored apart."""
    tokenizer = lm.tokenizer

    def encode(variants: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
        encoded = []
        for variant in variants:
            ids = tuple(tokenizer.encode(variant, add_special_tokens=False))
            if not ids:
                raise EngramEvalError(f"{bank_path}: question '{question.id}': variant {variant!r} has no tokens")
            encoded.append(ids)
        return tuple(encoded)

    correct, incorrect = encode(question.correct), encode(question.incorrect)
    for c_text, c_ids in zip(question.correct, correct):
        for i_text, i_ids in zip(question.incorrect, incorrect):
            same = c_ids[0] == i_ids[0] if scoring == "first-token" else c_ids == i_ids
            if same:
                token = tokenizer.convert_ids_to_tokens(c_ids[0])
                what = "first token" if scoring == "first-token" else "tokens"
                raise EngramEvalError(
                    f"{bank_path}: question '{question.id}': correct {c_text!r} and incorrect {i_text!r} share their "
                    f"{what} ({token!r}, id {c_ids[0]}), so {scoring} scoring cannot tell them apart"
                )
    return PreparedQuestion(question, tuple(prompt_token_ids(lm, question, bank_path)), correct, incorrect)


# ---------------------------------------------------------------- injection and scoring


def mean_row_norm(x: torch.Tensor) -> torch.Tensor:
    return x.float().norm(dim=1).mean()


def scale_engram(vectors: torch.Tensor, embedding_norm: float, strength: float) -> torch.Tensor:
    """Seed scaling: one scalar so the engram's mean row norm equals the embeddings', times strength."""
    vectors = vectors.float()
    return vectors * (embedding_norm / mean_row_norm(vectors)) * strength


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc) or "out of memory" in str(exc)


@torch.inference_mode()
def variant_logprobs(
    lm: LoadedModel,
    prefixes: torch.Tensor | None,
    prompt_ids: tuple[int, ...],
    variants: tuple[tuple[int, ...], ...],
    scoring: str,
) -> torch.Tensor:
    """Log-probability of each variant after [prefix; prompt] -> float32 [batch, n_variants].

    first-token: one forward pass, logits only at the last position; log-probabilities in float32 as the variants'
    logits minus the logsumexp over the vocabulary (no full log-softmax is written).
    sequence: one pass per variant over [prefix; prompt; variant[:-1]], summing its tokens' log-probs.
    prefixes=None is the baseline (no engram).
    """
    embed = lm.model.get_input_embeddings()
    prompt = embed(torch.tensor(prompt_ids, device=lm.device))
    batch = 1 if prefixes is None else prefixes.shape[0]

    def forward(tail_ids: tuple[int, ...], keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> float32 logits [batch, keep, vocab] and their logsumexp [batch, keep, 1]."""
        parts = [prompt] if not tail_ids else [prompt, embed(torch.tensor(tail_ids, device=lm.device))]
        body = torch.cat(parts).unsqueeze(0).expand(batch, -1, -1)
        inputs = body if prefixes is None else torch.cat([prefixes.to(lm.dtype), body], dim=1)
        hidden = lm.model.base_model(inputs_embeds=inputs, use_cache=False).last_hidden_state
        # The LM head on a contiguous [batch * keep, hidden] slice: transformers' logits_to_keep slice is strided
        # and turns the head into a slow batched matmul over an expanded weight.
        last = hidden[:, -keep:, :].reshape(-1, hidden.shape[-1]).contiguous()
        logits = lm.model.get_output_embeddings()(last).float().view(batch, keep, -1)
        if cap := getattr(lm.model.config, "final_logit_softcapping", None):
            logits = torch.tanh(logits / cap) * cap
        return logits, torch.logsumexp(logits, dim=-1, keepdim=True)

    if scoring == "first-token":
        logits, normalizer = forward((), 1)
        return logits[:, -1, [variant[0] for variant in variants]] - normalizer[:, -1]
    columns = []
    for variant in variants:
        logits, normalizer = forward(variant[:-1], len(variant))
        targets = torch.tensor(variant, device=lm.device).expand(batch, -1).unsqueeze(-1)
        columns.append((logits.gather(-1, targets) - normalizer).squeeze(-1).sum(dim=-1))
    return torch.stack(columns, dim=1)


def combine_side(logprobs: torch.Tensor, scoring: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per side: max over variants (seed), or logsumexp for `sequence` -> (side log-prob, index of top variant)."""
    top = logprobs.argmax(dim=1)
    side = torch.logsumexp(logprobs, dim=1) if scoring == "sequence" else logprobs.max(dim=1).values
    return side, top


# ---------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Cell:
    source: Source
    stored: StoredEngram
    role: str
    layer: int
    strength: float


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


@dataclass
class SweepResult:
    out: Path
    results_path: Path
    run: dict = field(default_factory=dict)


CPU_TOKENS_PER_BATCH = 1024  # measured: larger CPU batches fall out of cache and get slower (docs/performance.md)


def auto_batch_size(lm: LoadedModel, seq_len: int, n_cells: int) -> int:
    """Largest batch whose activations fit in half the free memory (a rough upper bound per sequence); on CPU
    also at most CPU_TOKENS_PER_BATCH tokens."""
    config = lm.model.config
    bytes_per = torch.finfo(lm.dtype).bits // 8
    heads = getattr(config, "num_attention_heads", 1)
    intermediate = getattr(config, "intermediate_size", 4 * lm.hidden_size)
    per_sequence = bytes_per * seq_len * (8 * lm.hidden_size + 3 * intermediate + 2 * heads * seq_len) + 8 * config.vocab_size
    if lm.device.type == "cuda":
        free = torch.cuda.mem_get_info(lm.device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        n_cells = min(n_cells, max(1, CPU_TOKENS_PER_BATCH // seq_len))
    return max(1, min(n_cells, int(free * 0.5 // per_sequence)))


def _cells(question: Question, bank: Bank, engrams: dict[str, StoredEngram], settings: SweepSettings) -> list[Cell]:
    cells = []
    for name, role in [(question.engram, "relevant"), *[(c, "control") for c in question.controls]]:
        for layer in settings.layers:
            for strength in settings.strengths:
                cells.append(Cell(bank.sources[name], engrams[name], role, layer, strength))
    return cells


def score_cells(
    lm: LoadedModel,
    prepared: PreparedQuestion,
    cells: list[Cell],
    scoring: str,
    batch_size: int,
    on_batch: Callable[[int], None] = lambda n: None,
) -> tuple[dict[str, list], int]:
    """Baseline row first, then one row per cell -> (raw score columns, the batch size that fit).

    On out-of-memory the batch size halves and the batch is retried; callers pass the size back in for the next
    question so it does not start over from the size that failed.
    """
    prompt_ids = prepared.prompt_ids
    columns: dict[str, list] = {"logp_correct": [], "logp_incorrect": [], "top_correct": [], "top_incorrect": []}

    variants = prepared.correct_ids + prepared.incorrect_ids
    n_correct = len(prepared.correct_ids)

    def score(prefixes: torch.Tensor | None) -> None:
        logprobs = variant_logprobs(lm, prefixes, prompt_ids, variants, scoring)  # both sides from one pass
        for side, part, names in (
            ("correct", logprobs[:, :n_correct], prepared.question.correct),
            ("incorrect", logprobs[:, n_correct:], prepared.question.incorrect),
        ):
            logp, top = combine_side(part, scoring)
            columns[f"logp_{side}"].extend(logp.double().cpu().tolist())
            columns[f"top_{side}"].extend(names[i] for i in top.cpu().tolist())

    score(None)
    on_batch(1)
    unit: dict[tuple[str, int], torch.Tensor] = {}  # engram scaled to strength 1, per (source, layer)
    for cell in cells:
        key = (cell.source.name, cell.layer)
        if key not in unit:
            unit[key] = scale_engram(cell.stored.engram.layers[cell.layer], lm.embedding_norm, 1.0).to(lm.device)
    size = batch_size
    start = 0
    while start < len(cells):
        remaining = len(cells) - start
        # Even batches: 120 cells at size 13 run as 10 x 12, not 9 x 13 + a slow 3-cell remainder.
        batch = cells[start : start + math.ceil(remaining / math.ceil(remaining / size))]
        prefixes = torch.stack([unit[(c.source.name, c.layer)] * c.strength for c in batch])
        try:
            score(prefixes)
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not _is_oom(exc) or size == 1:
                raise
            size = max(1, size // 2)  # back off and retry this batch
            if lm.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        start += len(batch)
        on_batch(len(batch))
    return columns, size


def case_expr() -> pl.Expr:
    """METHOD.md's calibration cases from (baseline_ratio, ratio); ties and unscorable cells are their own cases."""
    b, r = pl.col("baseline_ratio"), pl.col("ratio")
    unscorable = ~(b.is_finite() & r.is_finite() & (b > 0) & (r > 0))
    return (
        pl.when(pl.col("role") == "baseline").then(None)
        .when(unscorable).then(pl.lit("UNSCORABLE"))
        .when((b == 1) | (r == 1)).then(pl.lit("TIE"))
        .when((b > 1) & (r > b)).then(pl.lit("HIGH_CONFIDENCE_CORRECT"))
        .when((b > 1) & (r >= 1)).then(pl.lit("CORRECT_WEAKENED"))
        .when(b > 1).then(pl.lit("FRAGILE_CORRECT"))
        .when(r < 1).then(pl.lit("HIGH_CONFIDENCE_INCORRECT"))
        .otherwise(pl.lit("RECOVERED_KNOWLEDGE"))
    )


def question_frame(settings: SweepSettings, bank: Bank, prepared: PreparedQuestion, cells: list[Cell], scores: dict[str, list]) -> pl.DataFrame:
    question = prepared.question
    n = len(cells) + 1
    raw = pl.DataFrame(
        {
            "run_id": [settings.run_id] * n,
            "model": [settings.model] * n,
            "model_fingerprint": [settings.model_fingerprint] * n,
            "bank": [bank.name] * n,
            "question_id": [question.id] * n,
            "tags": [list(question.tags)] * n,
            "related_wrong": [question.related_wrong] * n,
            "engram": [None] + [c.source.name for c in cells],
            "engram_key": [None] + [c.stored.key for c in cells],
            "role": ["baseline"] + [c.role for c in cells],
            "control_kind": [None] + [c.source.kind if c.role == "control" else None for c in cells],
            "layer": [None] + [c.layer for c in cells],
            "strength": [None] + [c.strength for c in cells],
            "chunks": [settings.chunks] * n,
            "injection": [settings.injection] * n,
            "scoring": [settings.scoring] * n,
            "logp_correct": scores["logp_correct"],
            "logp_incorrect": scores["logp_incorrect"],
            "top_correct_variant": scores["top_correct"],
            "top_incorrect_variant": scores["top_incorrect"],
        },
        schema_overrides={k: RESULT_SCHEMA[k] for k in ("tags", "related_wrong", "engram", "engram_key", "control_kind", "layer", "strength", "chunks")},
    )
    log_ratio = pl.col("logp_correct") - pl.col("logp_incorrect")
    unscorable = pl.col("case") == "UNSCORABLE"
    frame = (
        raw.with_columns(
            p_correct=pl.col("logp_correct").exp(),
            p_incorrect=pl.col("logp_incorrect").exp(),
            log_ratio=log_ratio,
            ratio=log_ratio.exp(),
        )
        .with_columns(baseline_ratio=pl.col("ratio").first(), baseline_log_ratio=pl.col("log_ratio").first())
        .with_columns(
            improvement=(pl.col("log_ratio") - pl.col("baseline_log_ratio")).exp(),
            log_improvement=pl.col("log_ratio") - pl.col("baseline_log_ratio"),
            correct_before=pl.col("baseline_ratio") > 1,
            correct_after=pl.col("ratio") > 1,
            case=case_expr(),
        )
        .with_columns(
            flipped=(pl.col("baseline_ratio") < 1) & (pl.col("ratio") > 1) & unscorable.not_().fill_null(True),
            broken=(pl.col("baseline_ratio") > 1) & (pl.col("ratio") < 1) & unscorable.not_().fill_null(True),
        )
    )
    return frame.select([pl.col(name).cast(dtype) for name, dtype in RESULT_SCHEMA.items()])


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def _package_versions() -> dict[str, str]:
    names = ("torch", "transformers", "safetensors", "polars", "pyarrow", "numpy")
    return {"engram-eval": __version__, "python": platform.python_version(), **{n: version(n) for n in names}}


def _prepare_out(out: Path, settings: SweepSettings, force: bool) -> dict:
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
    batch_size: int | None = None,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda message: None,
    before_question: Callable[[Question], None] = lambda question: None,
) -> SweepResult:
    """Run the grid; each finished question lands atomically in out/parts, so a rerun resumes where it stopped.

    before_question runs before each question is computed, outside the sweep's timings (the benchmark measures the
    machine there, under the same contention as the sweep).
    """
    from tqdm import tqdm

    if scoring not in SCORINGS:
        raise EngramEvalError(f"--scoring: unknown '{scoring}' (one of: {', '.join(SCORINGS)})")
    if injection not in INJECTIONS:
        raise EngramEvalError(f"--injection: unknown '{injection}' (one of: {', '.join(INJECTIONS)})")
    for layer in layers:
        if not 0 <= layer <= lm.num_layers:
            raise EngramEvalError(f"--layers: layer {layer} is out of range; valid layers are 0..{lm.num_layers}")
    out = Path(out)
    started = time.perf_counter()
    prepared = [prepare_question(lm, q, scoring, bank.path) for q in bank.questions]  # before any model work
    settings = SweepSettings(
        model=lm.name, model_fingerprint=lm.fingerprint, bank=bank.name, bank_sha256=bank.sha256,
        layers=list(layers), strengths=list(strengths), chunks=chunks, scoring=scoring, injection=injection,
        questions=[q.id for q in bank.questions], max_tokens=max_tokens,
    )
    run = _prepare_out(out, settings, force)
    _write_json(out / "run.json", run)

    needed = list(dict.fromkeys(name for q in bank.questions for name in (q.engram, *q.controls)))
    engrams: dict[str, StoredEngram] = {}
    build_started = time.perf_counter()
    for name in needed:
        stored, status = store.ensure(lm, name, bank.sources[name].text, layers, chunks, max_tokens)
        if stored.engram.layers[layers[0]].shape[-1] != lm.hidden_size:
            raise EngramEvalError(f"store file {stored.path}: hidden size differs from {lm.name}'s {lm.hidden_size}")
        if stored.engram.truncated:
            log(f"warning: source '{name}' was truncated to {stored.engram.n_tokens} tokens (--max-tokens)")
        log(f"engram {name}: {status} ({stored.path})")
        engrams[name] = stored
    build_seconds = time.perf_counter() - build_started

    grid = {p.question.id: _cells(p.question, bank, engrams, settings) for p in prepared}
    total = sum(len(cells) + 1 for cells in grid.values())
    parts = [out / "parts" / f"{i:05d}-{p.question.id}.parquet" for i, p in enumerate(prepared)]
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
            scores, size = score_cells(lm, p, cells, scoring, min(requested, fits or requested), on_batch=bar.update)
            if size < requested:
                fits = size
            frame = question_frame(settings, bank, p, cells, scores)
            tmp = part.with_name(f".{part.name}.tmp")
            try:
                frame.write_parquet(tmp)
                os.replace(tmp, part)
            except OSError as exc:
                raise EngramEvalError(
                    f"{part}: write failed ({exc.strerror or exc}); finished questions are kept, rerun to resume"
                ) from None
    sweep_seconds = time.perf_counter() - sweep_started - paused

    results_path = out / "results.parquet"
    tmp = out / ".results.parquet.tmp"
    pl.scan_parquet(parts, schema=RESULT_SCHEMA).sink_parquet(tmp, maintain_order=True)
    os.replace(tmp, results_path)
    run.update(
        status="complete",
        bank_path=str(bank.path),
        engram_keys={name: stored.key for name, stored in engrams.items()},
        engram_files={name: str(stored.path) for name, stored in engrams.items()},
        versions=_package_versions(),
        device=str(lm.device),
        dtype=str(lm.dtype).removeprefix("torch."),
        batch_size=batch_size or "auto",
        cells={"total": total, "resumed": done, "computed": total - done, "questions": len(prepared)},
        timings={
            "build_seconds": round(build_seconds, 3),
            "sweep_seconds": round(sweep_seconds, 3),
            "total_seconds": round(time.perf_counter() - started, 3),
            "cells_per_second": round((total - done) / sweep_seconds, 3) if sweep_seconds > 0 else None,
        },
    )
    _write_json(out / "run.json", run)
    return SweepResult(out=out, results_path=results_path, run=run)
