"""Null prefixes (`~gaussian`, `~mean-token`): engrams without a source text, for controls with no content at all."""

from __future__ import annotations

import torch

from .bank import NULL_PREFIXES
from .errors import EngramEvalError
from .model import LoadedModel

NULL_KIND = "null"  # control_kind of the null prefixes


def null_prefix(name: str, lm: LoadedModel, chunks: int) -> torch.Tensor:
    """The raw vectors [chunks, hidden] of a null prefix; like any engram's, they are scaled before injection."""
    if name == "~gaussian":
        return torch.randn(chunks, lm.hidden_size, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
    if name == "~mean-token":
        mean = lm.model.get_input_embeddings().weight.detach().float().mean(dim=0).cpu()
        return mean.expand(chunks, -1).clone()
    raise EngramEvalError(f"unknown null prefix '{name}' (one of: {', '.join(NULL_PREFIXES)})")
