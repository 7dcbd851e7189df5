"""Scoring: log-probabilities of the answer variants after [engram; prompt], batched, with out-of-memory back-off."""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Iterator

import torch

from ..backend.model import LoadedModel
from ..core.registry import SCORINGS
from ..core.spec import Method
from .grid import distinct_injections
from .injection import CellVectors, Steering
from .prompts import PreparedQuestion

if TYPE_CHECKING:
    from .grid import Cell

CPU_TOKENS_PER_BATCH = 1024  # measured: larger CPU batches fall out of cache and get slower (docs/performance.md)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in str(exc) or "out of memory" in str(exc)


class Scoring:
    """A scoring (`--scoring`): how a variant's tokens become its log-probability, and a side's variants one number."""

    name: ClassVar[str]
    summary: ClassVar[str]  # its --scoring help
    first_token_only: ClassVar[bool] = False  # scores each variant's first token alone (one forward pass)

    def variant(self, token_logps: torch.Tensor) -> torch.Tensor:
        """A variant's per-token log-probabilities [batch, tokens] -> its log-probability [batch]."""
        return token_logps.sum(dim=-1)

    def side(self, logprobs: torch.Tensor) -> torch.Tensor:
        """A side's variants [batch, variants] -> the side's log-probability [batch]: the best variant's, by default."""
        return logprobs.max(dim=1).values


@SCORINGS.register
class FirstToken(Scoring):
    name = "first-token"
    summary = "seed mode, max over variants of their first token's probability."
    first_token_only = True


@SCORINGS.register
class Sequence(Scoring):
    name = "sequence"
    summary = "summed log-probability of each variant's tokens, logsumexp per side."

    def side(self, logprobs: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(logprobs, dim=1)


@SCORINGS.register
class SequenceMax(Scoring):
    name = "sequence-max"
    summary = "the same, max per side."


@SCORINGS.register
class SequenceMean(Scoring):
    name = "sequence-mean"
    summary = "mean per-token log-probability (long answers are not penalised), max per side."

    def variant(self, token_logps: torch.Tensor) -> torch.Tensor:
        return token_logps.mean(dim=-1)


@dataclass
class Scores:
    """One batch's scores: per variant log-probabilities [batch, n_variants], the most likely next token after the
    prompt (the full distribution's top-1) with its log-probability [batch], and that next-token distribution's
    log-probabilities over the whole vocabulary [batch, vocab] (float32)."""

    variants: torch.Tensor
    top_id: torch.Tensor
    top_logp: torch.Tensor
    next_logp: torch.Tensor
    attention: torch.Tensor | None = None  # [batch, positions]: the last prompt position's attention, mean of heads and layers


@torch.inference_mode()
def variant_logprobs(
    lm: LoadedModel,
    steering: Steering | None,
    prompt_ids: tuple[int, ...],
    variants: tuple[tuple[int, ...], ...],
    scoring: str,
    record_attention: bool = False,
) -> Scores:
    """Log-probability of each variant after the prompt with a batch of cells' steering in it, in float32.

    first-token: one forward pass, logits only at the last position; log-probabilities as the variants' logits minus
    the logsumexp over the vocabulary (no full log-softmax is written).
    sequence*: one pass per variant over [prefix; prompt; variant[:-1]], summing its tokens' log-probs
    (sequence-mean: their mean, so long answers are not penalised for their length).
    steering=None is the baseline (no engram). record_attention (eager attention only) also returns the last prompt
    position's attention over every position, averaged over heads and layers, from the first pass.
    """
    attention: list[torch.Tensor] = []
    backend = lm.backend
    embed = backend.embed
    prompt = embed(torch.tensor(prompt_ids, device=lm.device))
    batch = 1 if steering is None else steering.vectors.shape[0]

    def forward(tail_ids: tuple[int, ...], keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> float32 logits [batch, keep, vocab] and their logsumexp [batch, keep, 1]."""
        parts = [prompt] if not tail_ids else [prompt, embed(torch.tensor(tail_ids, device=lm.device))]
        body = torch.cat(parts).unsqueeze(0).expand(batch, -1, -1)
        record = record_attention and not attention
        with attention_recorded(lm, attention, -keep) if record else nullcontext():
            if steering is None:
                hidden = backend.last_hidden(body)
            else:
                with steering.active(backend):
                    hidden = backend.last_hidden(steering.inputs(body))
        # The LM head on a contiguous [batch * keep, hidden] slice: transformers' logits_to_keep slice is strided
        # and turns the head into a slow batched matmul over an expanded weight.
        last = hidden[:, -keep:, :].reshape(-1, hidden.shape[-1]).contiguous()
        logits = backend.logits(last).view(batch, keep, -1)
        return logits, torch.logsumexp(logits, dim=-1, keepdim=True)

    def after_prompt(logits: torch.Tensor, normalizer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next-token distribution after the prompt -> its top token, that token's log-prob, every log-prob."""
        logp = logits - normalizer
        best, index = logp.max(dim=-1)
        return index, best, logp

    def mean_attention() -> torch.Tensor | None:
        return torch.stack(attention).mean(dim=(0, 2)) if attention else None  # [layers, batch, heads, kv] -> [batch, kv]

    mode = SCORINGS[scoring]
    if mode.first_token_only:
        logits, normalizer = forward((), 1)
        return Scores(logits[:, -1, [variant[0] for variant in variants]] - normalizer[:, -1],
                      *after_prompt(logits[:, -1], normalizer[:, -1]), mean_attention())
    columns, next_token = [], None
    for variant in variants:
        logits, normalizer = forward(variant[:-1], len(variant))
        if next_token is None:  # position 0 of the kept logits is the prompt's last position
            next_token = after_prompt(logits[:, 0], normalizer[:, 0])
        targets = torch.tensor(variant, device=lm.device).expand(batch, -1).unsqueeze(-1)
        token_logps = (logits.gather(-1, targets) - normalizer).squeeze(-1)
        columns.append(mode.variant(token_logps))
    return Scores(torch.stack(columns, dim=1), *next_token, mean_attention())


def kl_divergence(reference: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(p_reference || p) in nats over the last axis, from float32 log-probabilities (reference broadcasts against
    logp: the baseline's [vocab] against a batch's [batch, vocab]). A token the reference gives no probability adds
    nothing; rounding below 0 is clipped (KL is never negative)."""
    p_reference = reference.exp()
    return torch.where(p_reference > 0, p_reference * (reference - logp), 0.0).sum(dim=-1).clamp_min(0.0)


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """The entropy in nats over the last axis, from log-probabilities."""
    p = logp.exp()
    return -torch.special.xlogy(p, p).sum(dim=-1)


@contextmanager
def attention_recorded(lm: LoadedModel, into: list[torch.Tensor], query: int) -> Iterator[None]:
    """While the model runs, keep each layer's attention weights of one query position, [batch, heads, kv] (eager
    attention returns its weights; the others do not compute them)."""
    def hook(module, args, output):
        into.append(output[1][:, :, query, :].float())

    handles = [attention.register_forward_hook(hook) for attention in lm.backend.attention_modules()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def combine_side(logprobs: torch.Tensor, scoring: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per side: the scoring's side log-prob (max over variants, seed) and the index of the top variant."""
    return SCORINGS[scoring].side(logprobs), logprobs.argmax(dim=1)


def auto_batch_size(lm: LoadedModel, seq_len: int, n_cells: int, cpu_token_budget: bool = True) -> int:
    """Largest batch whose activations fit in half the free memory (a rough upper bound per sequence); on CPU
    also at most CPU_TOKENS_PER_BATCH tokens when cpu_token_budget (prefill-sized work; decoding one token per row
    is bound by reading the weights, so it wants every row it can get)."""
    per_sequence = lm.backend.bytes_per_sequence(seq_len)
    free = lm.backend.free_memory()
    if lm.device.type != "cuda" and cpu_token_budget:
        n_cells = min(n_cells, max(1, CPU_TOKENS_PER_BATCH // seq_len))
    return max(1, min(n_cells, int(free * 0.5 // per_sequence)))


def in_batches(lm: LoadedModel, cells: list[Cell], batch_size: int, work: Callable[[list[Cell]], None],
               on_batch: Callable[[int], None] = lambda n: None) -> tuple[list[int], int]:
    """Run work on batches of cells that share a prefix length (k), at most batch_size each, split evenly; on
    out-of-memory the batch size halves and the batch is retried -> the cells' indices in the order work saw them, and
    the batch size that fit."""
    order = sorted(range(len(cells)), key=lambda i: cells[i].chunks)  # one prefix length per batch
    size, start = batch_size, 0
    while start < len(order):
        group = [i for i in order[start:] if cells[i].chunks == cells[order[start]].chunks]
        # Even batches: 120 cells at size 13 run as 10 x 12, not 9 x 13 + a slow 3-cell remainder.
        batch = group[: math.ceil(len(group) / math.ceil(len(group) / size))]
        try:
            work([cells[i] for i in batch])
        except (torch.OutOfMemoryError, RuntimeError) as exc:
            if not _is_oom(exc) or size == 1:
                raise
            size = max(1, size // 2)  # back off and retry this batch
            if lm.device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        start += len(batch)
        on_batch(len(batch))
    return order, size


def score_cells(
    lm: LoadedModel,
    prepared: PreparedQuestion,
    cells: list[Cell],
    raw: dict[tuple[str, int, int], torch.Tensor],
    method: Method,
    batch_size: int,
    on_batch: Callable[[int], None] = lambda n: None,
    baseline_chunks: int = 16,
) -> tuple[dict[str, list], int]:
    """Baseline row first, then one row per cell -> (raw score columns, the batch size that fit; `repeated` marks a
    row that repeats an earlier cell's, computed once).

    raw holds each cell's unscaled vectors by (engram, layer, k). Cells that inject the same thing (a null prefix at
    another layer, for prefix and add) are computed once. Batches hold cells of one prefix length. On out-of-memory
    the batch size halves and the batch is retried; callers pass the size back in for the next question so it does
    not start over from the size that failed.
    """
    prompt_ids = prepared.prompt_ids
    columns: dict[str, list] = {
        "logp_correct": [], "logp_incorrect": [], "top_correct": [], "top_incorrect": [], "top_token": [], "logp_top": [],
        "attn_prefix_share": [], "attn_first_share": [], "kl_next": [], "entropy_next": [], "answer_logps": [],
    }
    variants = tuple(ids for _, _, ids in prepared.answers)  # correct, incorrect, then unrelated (scored, in no side)
    n_correct, n_incorrect = len(prepared.correct_ids), len(prepared.incorrect_ids)

    reference: list[torch.Tensor] = []  # the baseline's next-token log-probabilities: what kl_next compares with

    def score(steering: Steering | None, chunks: list[int]) -> None:
        scores = variant_logprobs(lm, steering, prompt_ids, variants, method.scoring, method.record_attention)  # both sides from one pass
        if not reference:
            reference.append(scores.next_logp[0])
        kl = kl_divergence(reference[0], scores.next_logp)
        columns["kl_next"].extend([0.0] if steering is None else kl.cpu().tolist())
        columns["entropy_next"].extend(entropy(scores.next_logp).cpu().tolist())
        if scores.attention is None:
            columns["attn_prefix_share"].extend([None] * len(chunks))
            columns["attn_first_share"].extend([None] * len(chunks))
        else:  # the k engram positions (prefix) or the first k prompt positions (add, actadd, baseline), and position 0
            start = 0 if steering is None else steering.start  # after a BOS the tokenizer put first
            columns["attn_prefix_share"].extend(scores.attention[i, start:start + k].sum().item() for i, k in enumerate(chunks))
            columns["attn_first_share"].extend(scores.attention[:, 0].tolist())
        for side, part, names in (
            ("correct", scores.variants[:, :n_correct], prepared.question.correct),
            ("incorrect", scores.variants[:, n_correct:n_correct + n_incorrect], prepared.question.incorrect),
        ):
            logp, top = combine_side(part, method.scoring)
            columns[f"logp_{side}"].extend(logp.double().cpu().tolist())
            columns[f"top_{side}"].extend(names[i] for i in top.cpu().tolist())
        columns["answer_logps"].extend(scores.variants.double().cpu().tolist())
        columns["top_token"].extend(lm.tokenizer.decode([token]) for token in scores.top_id.cpu().tolist())
        columns["logp_top"].extend(scores.top_logp.double().cpu().tolist())

    score(None, [baseline_chunks])
    on_batch(1)
    vectors = CellVectors(lm, raw, method, prompt_ids, cells)

    unique, index = distinct_injections(cells, method)  # a null prefix at another layer: computed once
    computed = len(columns["logp_correct"])
    order, size = in_batches(lm, unique, batch_size, lambda batch: score(vectors.steering(batch), [c.chunks for c in batch]),
                             on_batch)
    # Rows came out in batch order, one per unique cell: put them back in cell order, repeating shared ones.
    position = {i: computed + n for n, i in enumerate(order)}
    rows = [position[i] for i in index]
    for name, values in columns.items():
        columns[name] = values[:computed] + [values[row] for row in rows]
    seen: set[int] = set()
    columns["repeated"] = [False] * computed
    for i in index:
        columns["repeated"].append(i in seen)
        seen.add(i)
    skipped = len(cells) - len(unique)
    if skipped:
        on_batch(skipped)
    return columns, size
