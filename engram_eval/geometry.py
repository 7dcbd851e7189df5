"""Geometry: how alike two engrams are — the seeds' cosine and "difference signal", and what confounds them.

The seeds read 99.95% cosine between engrams of opposite texts as "engrams encode topic, not direction". Two things
inflate that number: texts that share their first tokens have identical states there (causal attention), and every
residual-stream state carries a component common to all texts (the first token's massive activation above all). So
beside the raw cosine this module gives the cosine without chunk 0, a centred cosine (a reference set's mean engram
subtracted first), chunk-by-chunk cosines, and the number of leading tokens the two sources share."""

from __future__ import annotations

import math

import torch

from .errors import EngramEvalError

GEOMETRY_COLUMNS = ("cosine", "angle_deg", "difference_signal", "chunk_cosine_min", "chunk_cosine_median", "norm_ratio",
                    "centered_cosine", "cosine_without_first_chunk")


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
    }


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
    return max(1, n_tokens // chunks) if chunks > 1 else n_tokens
