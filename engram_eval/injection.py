"""Injection: raw engram vectors -> the scaled vectors a cell puts in front of the prompt."""

from __future__ import annotations

import torch


def mean_row_norm(x: torch.Tensor) -> torch.Tensor:
    return x.float().norm(dim=1).mean()


def scale_engram(vectors: torch.Tensor, embedding_norm: float, strength: float) -> torch.Tensor:
    """Seed scaling: one scalar so the engram's mean row norm equals the embeddings', times strength."""
    vectors = vectors.float()
    return vectors * (embedding_norm / mean_row_norm(vectors)) * strength
