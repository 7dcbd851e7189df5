"""Pooling: a source's hidden states (streamed window by window) -> k vectors per layer.

`mean` is the seed's chunk averaging; `last` keeps the last k states; `pca` keeps the k leading right-singular vectors
of the centred states. Poolers take the states of consecutive windows of the source, so a long source never holds more
than one window's activations, and one forward pass can feed several poolers (several k)."""

from __future__ import annotations

import torch

from typing import ClassVar

from ..core.chunks import chunk_bounds
from ..core.errors import EngramEvalError
from ..core.registry import POOLINGS


def chunk_mean(hidden: torch.Tensor, chunks: int) -> torch.Tensor:
    """Seed-exact chunk averaging over the token axis (-2): [..., n, h] -> [..., chunks, h].

    size = max(1, n // chunks); chunk i covers [i*size, i*size + size), the last chunk runs to n; a chunk
    that would start at or past n is the last token's state (so n < chunks still yields `chunks` vectors).
    """
    return torch.stack([hidden[..., start:end, :].mean(dim=-2) for start, end in chunk_bounds(hidden.shape[-2], chunks)], dim=-2)


def pca_vectors(states: torch.Tensor, chunks: int) -> torch.Tensor:
    """The k leading right-singular vectors of the centred states [layers, n, h], each signed so that its dot
    product with the mean state is >= 0 -> [layers, k, h]."""
    mean = states.mean(dim=-2, keepdim=True)
    _, _, vh = torch.linalg.svd(states - mean, full_matrices=False)
    return _signed(vh[..., :chunks, :], mean)


def _signed(vectors: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    signs = torch.where((vectors * mean).sum(dim=-1, keepdim=True) < 0, -1.0, 1.0)
    return vectors * signs


class Pooler:
    """Receives the pooled positions' states [layers, t, h] (float32) window by window, in order -> [layers, k, h].

    A source in one window is pooled from all its states at once, exactly as METHOD.md writes it; a windowed source
    streams (`stream`, `streamed`) so that memory stays bounded by one window. A pooling is a subclass registered in
    POOLINGS under its `--pooling` name."""

    name: ClassVar[str]
    summary: ClassVar[str]  # its --pooling help

    def __init__(self, n: int, chunks: int, windowed: bool):
        self.n, self.chunks, self.windowed = n, chunks, windowed
        self.whole_states: list[torch.Tensor] = []

    def add(self, states: torch.Tensor) -> None:
        self.stream(states) if self.windowed else self.whole_states.append(states)

    def result(self) -> torch.Tensor:
        return self.streamed() if self.windowed else self.whole(torch.cat(self.whole_states, dim=-2))

    def whole(self, states: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def stream(self, states: torch.Tensor) -> None:
        raise NotImplementedError

    def streamed(self) -> torch.Tensor:
        raise NotImplementedError

    @classmethod
    def check_length(cls, source: str, pooled: int, chunks: int, skipped: str) -> None:
        """What the pooling needs of a source's pooled positions (nothing, unless it overrides this)."""


@POOLINGS.register
class MeanPooler(Pooler):
    """The seed's chunk means; streamed as per-chunk float64 sums."""

    name = "mean"
    summary = "the seed's chunk means."

    def __init__(self, n: int, chunks: int, windowed: bool):
        super().__init__(n, chunks, windowed)
        self.bounds, self.seen = chunk_bounds(n, chunks), 0
        self.sums: torch.Tensor | None = None

    def whole(self, states: torch.Tensor) -> torch.Tensor:
        return chunk_mean(states, self.chunks)

    def stream(self, states: torch.Tensor) -> None:
        if self.sums is None:
            self.sums = states.new_zeros(states.shape[0], self.chunks, states.shape[-1], dtype=torch.float64)
        start, end = self.seen, self.seen + states.shape[-2]
        for i, (low, high) in enumerate(self.bounds):
            a, b = max(low, start), min(high, end)
            if a < b:
                self.sums[:, i] += states[:, a - start : b - start].double().sum(dim=-2)
        self.seen = end

    def streamed(self) -> torch.Tensor:
        counts = torch.tensor([high - low for low, high in self.bounds], dtype=torch.float64).view(1, -1, 1)
        return (self.sums / counts).float()


@POOLINGS.register
class LastPooler(Pooler):
    """The last k states, in order."""

    name = "last"
    summary = "the last k states."

    @classmethod
    def check_length(cls, source: str, pooled: int, chunks: int, skipped: str) -> None:
        if pooled < chunks:
            raise EngramEvalError(f"source '{source}': {pooled} tokens{skipped}, fewer than k = {chunks}: --pooling last needs at least k")

    def __init__(self, n: int, chunks: int, windowed: bool):
        super().__init__(n, chunks, windowed)
        self.tail: torch.Tensor | None = None

    def whole(self, states: torch.Tensor) -> torch.Tensor:
        return states[..., -self.chunks :, :]

    def stream(self, states: torch.Tensor) -> None:
        joined = states if self.tail is None else torch.cat([self.tail, states], dim=-2)
        self.tail = joined[..., -self.chunks :, :].clone()

    def streamed(self) -> torch.Tensor:
        return self.tail


@POOLINGS.register
class PcaPooler(Pooler):
    """The SVD of the centred states (METHOD.md); streamed as the eigenvectors of their covariance, accumulated in
    float64 (the same vectors, up to float error; memory stays [layers, h, h] whatever the source's length)."""

    name = "pca"
    summary = "the k leading right-singular vectors of the centred states, signed towards the mean state."

    @classmethod
    def check_length(cls, source: str, pooled: int, chunks: int, skipped: str) -> None:
        if pooled <= chunks:
            raise EngramEvalError(f"source '{source}': {pooled} tokens{skipped}, at most k = {chunks}: --pooling pca needs more "
                                  "than k (the centred states have rank n - 1)")

    def __init__(self, n: int, chunks: int, windowed: bool):
        super().__init__(n, chunks, windowed)
        self.total: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None

    def whole(self, states: torch.Tensor) -> torch.Tensor:
        return pca_vectors(states, self.chunks)

    def stream(self, states: torch.Tensor) -> None:
        x = states.double()
        if self.gram is None:
            self.total = x.new_zeros(x.shape[0], x.shape[-1])
            self.gram = x.new_zeros(x.shape[0], x.shape[-1], x.shape[-1])
        self.total += x.sum(dim=-2)
        self.gram += x.transpose(-1, -2) @ x

    def streamed(self) -> torch.Tensor:
        mean = (self.total / self.n).unsqueeze(-2)
        covariance = self.gram - self.n * mean.transpose(-1, -2) @ mean
        _, eigenvectors = torch.linalg.eigh(covariance)  # ascending eigenvalues
        leading = eigenvectors.flip(-1)[..., : self.chunks].transpose(-1, -2)
        return _signed(leading, mean).float()


def check_pooled_length(source: str, pooled: int, chunks: int, pooling: str, skip_tokens: int) -> None:
    """What each pooling needs of the source's pooled positions (after --skip-tokens); one line naming the source."""
    skipped = f" after --skip-tokens {skip_tokens}" if skip_tokens else ""
    if skip_tokens and pooled < chunks:
        raise EngramEvalError(f"source '{source}': --skip-tokens {skip_tokens} leaves {pooled} tokens, fewer than k = {chunks}")
    POOLINGS[pooling].check_length(source, pooled, chunks, skipped)


@POOLINGS.register
class LearnedPooler(MeanPooler):
    """The seed's chunk means as the starting point; engram_eval.engram.learned then optimises them against the model
    (the extraction does, since it needs the model: a pooler only sees states)."""

    name = "learned"
    summary = ("k vectors in the input-embedding space, initialised from the chunk means at the seed's scale and optimised "
               "against the frozen model (--learn-objective reconstruct: the source's tokens given the vectors; distill: "
               "the model's predictions on probe prompts after the source).")
