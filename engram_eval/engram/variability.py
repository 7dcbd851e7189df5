"""Variability across paraphrased sources: engrams drawn from a Gaussian fitted to a source's paraphrases
(`sweep --sample N --sample-seed S`; the seeds' "learn a latent distribution over activation styles")."""

from __future__ import annotations

import hashlib
import math

import torch

from ..core.errors import EngramEvalError


def sample_draws(seed: int, source: str, samples: int, paraphrases: int) -> torch.Tensor:
    """z ~ N(0, 1), [samples, paraphrases] float32, from a generator seeded by (seed, source): the same seed gives the
    same draws for a source whatever else the bank holds. One row per sample, shared by every layer, chunk and k (a
    sample is one point of the paraphrases' span, not independent noise per vector)."""
    derived = int(hashlib.sha256(f"{seed}|{source}".encode()).hexdigest()[:15], 16)
    return torch.randn((samples, paraphrases), generator=torch.Generator().manual_seed(derived), dtype=torch.float32)


def sampled_engram(paraphrases: list[torch.Tensor], z: torch.Tensor) -> torch.Tensor:
    """mean + sum_j z_j (v_j - mean) / sqrt(P - 1): a draw from the Gaussian whose mean and covariance are the
    paraphrases' own (their span), per layer and chunk. paraphrases: P >= 2 tensors [chunks, hidden]; z: [P]."""
    if len(paraphrases) < 2:
        raise EngramEvalError("--sample: a Gaussian over paraphrases needs at least 2 of them")
    stacked = torch.stack([v.float() for v in paraphrases])
    mean = stacked.mean(dim=0)
    return mean + torch.einsum("p,pch->ch", z.float(), stacked - mean) / math.sqrt(len(paraphrases) - 1)
