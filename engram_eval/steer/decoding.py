"""Decoding: greedy text from prompts, each with a cell's steering or its ensembled generation (rows of one prefill
length in one batch with the KV cache; left-padded batches otherwise). `generate` (engram_eval.run.generation)
decodes a run's cells with these."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Callable

import torch

from ..backend.model import LoadedModel
from .ensemble import EnsembleJob, ensembled_tokens
from .injection import Steering

@dataclass
class Generated:
    token_ids: list[int]
    stop: str  # eos | length


@dataclass
class Row:
    """One text to generate: a prompt, and the cell's one-row steering (None: the baseline, nothing injected), or its
    ensembled generation (--ensemble, --reextract; engram_eval.steer.ensemble)."""

    prompt_ids: tuple[int, ...]
    steering: Steering | None = None
    ensemble: EnsembleJob | None = None

    def to(self, device: torch.device) -> Row:
        steering = None if self.steering is None else replace(self.steering, vectors=self.steering.vectors.to(device))
        return Row(self.prompt_ids, steering, None if self.ensemble is None else self.ensemble.to(device))


@torch.inference_mode()
def generate_rows(lm: LoadedModel, rows: list[Row], max_new_tokens: int) -> list[Generated]:
    """Greedy decoding of rows in one batch with the KV cache. Rows of one length run exactly as they would alone; rows
    of several lengths are left-padded, masked, and given their own positions. The EOS token ends a row and is not part
    of its tokens; rows that ended keep decoding (their output unused) until all have."""
    backend = lm.backend
    embed = backend.embed
    inputs = []
    for row in rows:
        body = embed(torch.tensor(row.prompt_ids, device=lm.device)).unsqueeze(0)
        inputs.append((body if row.steering is None else row.steering.inputs(body))[0])
    longest = max(len(x) for x in inputs)
    padded = torch.stack([torch.cat([x.new_zeros(longest - len(x), x.shape[-1]), x]) for x in inputs])
    mask = positions = None
    if any(len(x) != longest for x in inputs):
        mask = torch.stack([torch.arange(longest, device=lm.device) >= longest - len(x) for x in inputs]).long()
        positions = (mask.cumsum(dim=-1) - 1).clamp_min(0)
    hooks = _block_hooks(rows, longest)
    stops = backend.eos_token_ids()
    tokens: list[list[int]] = [[] for _ in rows]
    ended = [False] * len(rows)
    with hooks.active(backend) if hooks is not None else nullcontext():
        logits, cache = backend.prefill(padded, mask, positions)
        if hooks is not None:
            hooks.prompt_end = 0  # from here on every position is a generated one
        for step in range(max_new_tokens):
            next_ids = logits.argmax(dim=-1)
            for i, token in enumerate(next_ids.tolist()):
                if not ended[i]:
                    if token in stops:
                        ended[i] = True
                    else:
                        tokens[i].append(token)
            if all(ended) or step == max_new_tokens - 1:
                break
            embeds = embed(next_ids).unsqueeze(1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                positions = positions[:, -1:] + 1
            logits, cache = backend.decode(embeds if hooks is None else hooks.next_inputs(embeds), mask, positions, cache)
    return [Generated(row_tokens, "eos" if row_ended else "length") for row_tokens, row_ended in zip(tokens, ended)]


def _block_hooks(rows: list[Row], prompt_end: int) -> Steering | None:
    """One steering for a batch's block hooks (a mode that hooks blocks, actadd): each row's vector at its layer; a
    baseline row adds exact zeros. The prompts, left-padded, end at prompt_end."""
    steered = [row.steering for row in rows if row.steering is not None]
    if not steered or not steered[0].injection.hooks_blocks:
        return None
    template = steered[0].vectors
    vectors = [row.steering.vectors[0] if row.steering is not None else template.new_zeros(template.shape[1:]) for row in rows]
    layers = [row.steering.layers[0] if row.steering is not None else 0 for row in rows]
    return Steering(steered[0].mode, torch.stack(vectors), layers, steered[0].positions, prompt_end)


def generate_in_batches(lm: LoadedModel, todo: list[Row], max_new_tokens: int, batch_size: int,
                        on_rows: Callable[[int], None] = lambda n: None) -> list[Generated]:
    """Rows in batches of similar prefill length (less padding), results back in the rows' order; an ensembled row on
    its own (its M engrams are its batch)."""
    results: dict[int, Generated] = {}
    for i, row in enumerate(todo):
        if row.ensemble is not None:
            tokens, ended = ensembled_tokens(lm, row.prompt_ids, row.ensemble, max_new_tokens)
            results[i] = Generated(tokens, "eos" if ended else "length")
            on_rows(1)
    plain = [i for i, row in enumerate(todo) if row.ensemble is None]
    lengths = {i: len(todo[i].prompt_ids) + (todo[i].steering.prefix_length if todo[i].steering is not None else 0) for i in plain}
    order = sorted(plain, key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        for i, generated in zip(batch, generate_rows(lm, [todo[i] for i in batch], max_new_tokens)):
            results[i] = generated
        on_rows(len(batch))
    return [results[i] for i in range(len(todo))]
