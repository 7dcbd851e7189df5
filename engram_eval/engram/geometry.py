"""Geometry: how alike two engrams are — the seeds' cosine and "difference signal", and what confounds them.

The seeds read 99.95% cosine between engrams of opposite texts as "engrams encode topic, not direction". Two things
inflate that number: texts that share their first tokens have identical states there (causal attention), and every
residual-stream state carries a component common to all texts (the first token's massive activation above all). So
beside the raw cosine this module gives the cosine without chunk 0, a centred cosine (a reference set's mean engram
subtracted first) with and without chunk 0, chunk-by-chunk cosines, the number of leading tokens the two sources
share and their token counts. Centring does not remove the confounds: chunk 0 and the sources' lengths (the chunk
sizes) still drive it, so a pair whose token counts differ by more than 20% is flagged."""

from __future__ import annotations

import itertools
import math

import polars as pl
import torch

from ..backend.model import LoadedModel
from ..bank.banks import Bank
from ..bank.expressions import MalformedExpression, parse_expression
from ..core.chunks import chunk_bounds
from ..core.errors import EngramEvalError
from ..core.registry import NULL_PREFIXES
from .extraction import Extraction, source_ids
from .nulls import null_prefix
from .store import EngramStore

GEOMETRY_COLUMNS = ("cosine", "angle_deg", "difference_signal", "chunk_cosine_min", "chunk_cosine_median", "norm_ratio",
                    "centered_cosine", "cosine_without_first_chunk", "centered_cosine_without_first_chunk")
TOKEN_COUNT_TOLERANCE = 0.2  # sources whose token counts differ by more (of the longer) get engrams of other chunk sizes


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of the flattened tensors, in float64."""
    a, b = a.double().flatten(), b.double().flatten()
    return (a @ b / (a.norm() * b.norm())).item()


def pair_geometry(a: torch.Tensor, b: torch.Tensor, reference_mean: torch.Tensor | None = None, names: tuple[str, str] = ("a", "b")) -> dict:
    """Two engrams [k, hidden] at one layer -> the geometry columns. reference_mean: the mean engram of the reference set
    at that layer (centred_cosine is None without it)."""
    if a.shape != b.shape:
        raise EngramEvalError(f"engram '{names[0]}' is {tuple(a.shape)} and '{names[1]}' is {tuple(b.shape)} (k x hidden size): "
                              "they cannot be compared")
    value = cosine(a, b)
    rows = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1)
    return {
        "cosine": value,
        "angle_deg": math.degrees(math.acos(max(-1.0, min(1.0, value)))),
        "difference_signal": 100 * (1 - value),
        "chunk_cosine_min": rows.min().item(),
        "chunk_cosine_median": torch.quantile(rows, 0.5).item(),  # the middle, or the mean of the two middles
        "norm_ratio": (a.double().norm() / b.double().norm()).item(),
        "centered_cosine": None if reference_mean is None else cosine(a - reference_mean, b - reference_mean),
        "cosine_without_first_chunk": cosine(a[1:], b[1:]) if a.shape[0] > 1 else None,
        "centered_cosine_without_first_chunk": None if reference_mean is None or a.shape[0] < 2 else
        cosine((a - reference_mean)[1:], (b - reference_mean)[1:]),
    }


def token_counts_differ(a: int | None, b: int | None) -> bool | None:
    """The two sources' token counts differ by more than TOKEN_COUNT_TOLERANCE of the longer (None for a null prefix)."""
    if a is None or b is None:
        return None
    return abs(a - b) > TOKEN_COUNT_TOLERANCE * max(a, b)


def shared_prefix_tokens(a: list[int], b: list[int]) -> int:
    """How many leading tokens two sources share (their hidden states there are identical under causal attention)."""
    shared = 0
    for x, y in zip(a, b):
        if x != y:
            break
        shared += 1
    return shared


def first_chunk_size(n_tokens: int, chunks: int) -> int:
    """Tokens in chunk 0 under the seed rule."""
    start, end = chunk_bounds(n_tokens, chunks)[0]
    return end - start


def bank_pairs(bank: Bank, names: list[str]) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """(source texts by name, pairs) of a bank: every pair of the named sources (null prefixes and expressions over the
    sources, `a - b`, allowed), or without names each question's relevant engram against each of its controls."""
    known = set(bank.sources) | set(NULL_PREFIXES)
    canonical = []
    for name in names:
        if name not in known:
            try:
                expression = parse_expression(name)
            except MalformedExpression:
                expression = None
            if expression is None or not set(expression.names) <= set(bank.sources):
                raise EngramEvalError(f"{bank.path}: no source named '{name}' (known: {', '.join(sorted(bank.sources))}, "
                                      f"{', '.join(NULL_PREFIXES)}; or an expression over the sources such as 'a - b')")
            name = str(expression)
        canonical.append(name)
    if names:
        pairs = list(itertools.combinations(dict.fromkeys(canonical), 2))
    else:
        pairs = list(dict.fromkeys((q.engram, control) for q in bank.questions for control in q.controls))
    if not pairs:
        raise EngramEvalError("compare: give at least two sources (nothing to compare)")
    return {name: source.text for name, source in bank.sources.items()}, pairs


def compare_engrams(lm: LoadedModel, texts: dict[str, str], pairs: list[tuple[str, str]], layers: list[int],
                    chunks: list[int], extraction: Extraction, store: EngramStore) -> pl.DataFrame:
    """Every pair at every layer and k -> one row of geometry. The reference set for the centred cosine is every source
    in `texts` (all sources of the bank, or all given files); null prefixes and expressions over the sources (their raw
    vectors combined chunk by chunk) are compared, never part of the reference, and have no tokens to count or centre."""
    engrams: dict[tuple[str, int], torch.Tensor] = {}
    ids: dict[str, list[int]] = {}
    for name, text in texts.items():
        for k, (stored, _) in store.ensure_all(lm, name, text, layers, chunks, extraction).items():
            engrams[(name, k)] = stored
        ids[name] = source_ids(lm, text, extraction)[0]
    rows = []
    for k in chunks:
        for layer in layers:
            reference = torch.stack([engrams[(name, k)].engram.layers[layer] for name in texts]).mean(dim=0)

            def vectors(name: str) -> torch.Tensor:
                if name in NULL_PREFIXES:
                    return null_prefix(name, lm, k)
                if name in texts:
                    return engrams[(name, k)].engram.layers[layer]
                return parse_expression(name).combine(lambda source: engrams[(source, k)].engram.layers[layer])

            for a, b in pairs:
                shared = None if a not in texts or b not in texts else shared_prefix_tokens(ids[a], ids[b])
                first = None if shared is None else extraction.skip_tokens + min(
                    first_chunk_size(len(ids[name]) - extraction.skip_tokens, k) for name in (a, b))
                centred = None if shared is None else reference  # a null prefix is no residual-stream state: nothing to centre
                tokens = [len(ids[name]) if name in texts else None for name in (a, b)]
                rows.append({"model": lm.name, "a": a, "b": b, "layer": layer, "chunks": k, "pooling": extraction.pooling,
                             "skip_tokens": extraction.skip_tokens, **pair_geometry(vectors(a), vectors(b), centred, (a, b)),
                             "tokens_a": tokens[0], "tokens_b": tokens[1], "token_counts_differ": token_counts_differ(*tokens),
                             "shared_prefix_tokens": shared,
                             "shared_prefix_covers_a_chunk": None if shared is None else shared >= first})
    return pl.DataFrame(rows, schema_overrides={"centered_cosine": pl.Float64, "cosine_without_first_chunk": pl.Float64,
                                                "centered_cosine_without_first_chunk": pl.Float64, "tokens_a": pl.Int64,
                                                "tokens_b": pl.Int64, "token_counts_differ": pl.Boolean,
                                                "shared_prefix_tokens": pl.Int64, "shared_prefix_covers_a_chunk": pl.Boolean})
