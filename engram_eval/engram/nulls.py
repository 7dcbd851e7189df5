"""Null prefixes (`~gaussian`, `~mean-token`): engrams without a source text, for controls with no content at all.
Each is a class registered in NULL_PREFIXES under the name a bank's `controls` use."""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from ..core.registry import NULL_PREFIXES

if TYPE_CHECKING:  # torch is imported where a vector is made: a bank's validation reads the names alone
    import torch

    from ..backend.model import LoadedModel

NULL_KIND = "null-prefix"  # control_kind of the null prefixes


class NullPrefix:
    name: ClassVar[str]  # starts with ~, so no bank source can be called the same
    summary: ClassVar[str]

    def vectors(self, lm: LoadedModel, chunks: int) -> torch.Tensor:
        """The raw vectors [chunks, hidden]; like any engram's, they are scaled before injection."""
        raise NotImplementedError


@NULL_PREFIXES.register
class Gaussian(NullPrefix):
    name = "~gaussian"
    summary = "k standard-normal vectors (seed 0)."

    def vectors(self, lm: LoadedModel, chunks: int) -> torch.Tensor:
        import torch

        return torch.randn(chunks, lm.hidden_size, generator=torch.Generator().manual_seed(0), dtype=torch.float32)


@NULL_PREFIXES.register
class MeanToken(NullPrefix):
    name = "~mean-token"
    summary = "the mean of the input embedding matrix's rows, k times."

    def vectors(self, lm: LoadedModel, chunks: int) -> torch.Tensor:
        mean = lm.backend.embedding_matrix().float().mean(dim=0).cpu()
        return mean.expand(chunks, -1).clone()


def null_prefix(name: str, lm: LoadedModel, chunks: int) -> torch.Tensor:
    """The raw vectors [chunks, hidden] of a null prefix."""
    return NULL_PREFIXES[name].vectors(lm, chunks)
