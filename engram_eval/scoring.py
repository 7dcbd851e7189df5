"""Scoring: log-probabilities of the answer variants after [engram; prompt], batched, with out-of-memory back-off."""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Callable

import torch

from .injection import scale_engram
from .model import LoadedModel
from .prompts import PreparedQuestion

if TYPE_CHECKING:
    from .sweep import Cell

SCORINGS = ("first-token", "sequence", "sequence-max")
CPU_TOKENS_PER_BATCH = 1024  # measured: larger CPU batches fall out of cache and get slower (docs/performance.md)


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
