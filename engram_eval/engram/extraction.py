"""Extraction: source text -> hidden states of every requested layer (one forward pass) -> k chunk means."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..backend.model import LoadedModel
from ..core.errors import EngramEvalError
from ..core.registry import POOLINGS
from ..core.spec import DEFAULT_CHUNKS, DEFAULT_MAX_TOKENS, SEED_EXTRACTION, Extraction, check_chunks, check_layers
from .learned import Objective, learn_vectors, objective_for
from .pooling import check_pooled_length

@dataclass
class Engram:
    """Raw (unscaled) pooled vectors of one source text, per layer: layer index -> float32 tensor [chunks, hidden]."""

    layers: dict[int, torch.Tensor]
    n_tokens: int
    truncated: bool
    chunks: int
    extraction: Extraction = SEED_EXTRACTION
    windows: int = 1
    learning: dict[int, LearningRecord] | None = None  # --pooling learned: per layer, how its optimisation went


@dataclass(frozen=True)
class LearningRecord:
    steps: int
    loss_init: float
    loss_final: float


CHARS_PER_TOKEN_GUESS = 8  # a generous first guess: a prefix this long usually holds more tokens than are kept
TOKEN_MARGIN = 16  # tokens past the cut that must agree, so the prefix's end cannot change the ids kept


def tokenize_source(lm: LoadedModel, text: str, max_tokens: int | None = DEFAULT_MAX_TOKENS) -> tuple[list[int], bool]:
    """Token ids with the tokenizer's default special tokens, cut at max_tokens (None: never) -> (ids, truncated).

    Only as much of the text is tokenized as the cut needs: a prefix, doubled until it holds max_tokens + a margin of
    tokens and a prefix twice as long agrees on the ids kept (a 50 MB source costs what its first pages cost)."""
    chars = None if max_tokens is None else max(256, (max_tokens + TOKEN_MARGIN) * CHARS_PER_TOKEN_GUESS)
    while chars is not None and 2 * chars < len(text):
        ids = lm.tokenizer(text[:chars])["input_ids"]
        if len(ids) > max_tokens + TOKEN_MARGIN and lm.tokenizer(text[: 2 * chars])["input_ids"][:max_tokens] == ids[:max_tokens]:
            return ids[:max_tokens], True
        chars *= 2
    ids = lm.tokenizer(text)["input_ids"]
    if not ids:
        raise EngramEvalError("source text produced no tokens")
    if max_tokens is None:
        return ids, False
    return ids[:max_tokens], len(ids) > max_tokens


def source_ids(lm: LoadedModel, text: str, extraction: Extraction) -> tuple[list[int], bool]:
    """The ids an extraction runs: with --window the whole source (in windows), else cut at --max-tokens."""
    return tokenize_source(lm, text, None if extraction.window else extraction.max_tokens)


def separator_ids(lm: LoadedModel) -> list[int]:
    """What stands between a state and the source read after it (--reextract): a blank line."""
    return lm.tokenizer.encode("\n\n", add_special_tokens=False)


def read_after(lm: LoadedModel, state: tuple[int, ...] | list[int], ids: list[int],
               extraction: Extraction) -> tuple[list[int], Extraction]:
    """--reextract: the source's ids read after the state (state + a blank line + source) and the extraction that pools
    only the source's positions (the state's run, as --skip-tokens' do, but are left out)."""
    before = [*state, *separator_ids(lm)]
    return before + ids, replace(extraction, skip_tokens=extraction.skip_tokens + len(before))


@torch.inference_mode()
def extract_engrams(
    lm: LoadedModel,
    ids: list[int],
    truncated: bool,
    layers: list[int],
    chunks: list[int],
    extraction: Extraction = SEED_EXTRACTION,
    source: str = "source",
) -> dict[int, Engram]:
    """Every requested layer and every k from one forward pass per window (the backend's hidden states), pooled in
    float32. With a window, the source runs as consecutive independent windows whose states are pooled in order."""
    for k in chunks:
        check_chunks(k)
    check_layers(layers, lm.num_layers)
    extraction.check(chunks)
    n = len(ids)
    pooled = n - extraction.skip_tokens
    for k in chunks:
        check_pooled_length(source, pooled, k, extraction.pooling, extraction.skip_tokens)
    size = extraction.window or n
    windowed = size < n
    poolers = {k: POOLINGS[extraction.pooling](pooled, k, windowed) for k in chunks}
    for start in range(0, n, size):
        window = torch.tensor([ids[start : start + size]], device=lm.device)
        hidden_states = forward_states(lm, window, extraction.block_output and lm.num_layers in layers)
        keep = max(0, extraction.skip_tokens - start)  # --skip-tokens: positions run, but are left out of the pooling
        if keep >= window.shape[1]:
            continue
        states = torch.stack([hidden_states[layer][0, keep:] for layer in layers]).float().cpu()
        for pooler in poolers.values():
            pooler.add(states)
    windows = -(-n // size)
    engrams = {
        k: Engram(layers={layer: vectors[i] for i, layer in enumerate(layers)}, n_tokens=n, truncated=truncated,
                  chunks=k, extraction=extraction, windows=windows)
        for k, vectors in ((k, pooler.result()) for k, pooler in poolers.items())
    }
    if not extraction.learns:
        return engrams
    objective = objective_for(lm, ids, extraction)  # one per source: distill's teacher passes run once
    return {k: learned(lm, engram, objective, source) for k, engram in engrams.items()}


def learned(lm: LoadedModel, engram: Engram, objective: Objective, source: str) -> Engram:
    """--pooling learned: each layer's chunk means, optimised against the model (engram_eval.engram.learned)."""
    layers, records = {}, {}
    for layer, initial in engram.layers.items():
        result = learn_vectors(lm, initial, objective, engram.extraction, f"learn {source} L{layer} k{engram.chunks}")
        layers[layer] = result.vectors
        records[layer] = LearningRecord(result.steps, result.loss_init, result.loss_final)
    return replace(engram, layers=layers, learning=records)


def forward_states(lm: LoadedModel, window: torch.Tensor, last_block_output: bool) -> list[torch.Tensor]:
    """The hidden states of every layer 0..num_layers; with last_block_output, the last one is the last block's output
    (before the final norm) rather than the final norm's."""
    if not last_block_output:
        return list(lm.backend.hidden_states(window))
    captured: list[torch.Tensor] = []

    def capture(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = lm.backend.blocks()[-1].register_forward_hook(capture)
    try:
        states = list(lm.backend.hidden_states(window))
    finally:
        handle.remove()
    states[-1] = captured[-1]
    return states


def extract_engram(
    lm: LoadedModel,
    text: str,
    layers: list[int],
    chunks: int = DEFAULT_CHUNKS,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    extraction: Extraction | None = None,
) -> Engram:
    """One source text -> its engram at these layers (the seed's method unless `extraction` says otherwise)."""
    extraction = extraction or Extraction(max_tokens=max_tokens)
    check_chunks(chunks)
    ids, truncated = source_ids(lm, text, extraction)
    return extract_engrams(lm, ids, truncated, layers, [chunks], extraction)[chunks]
