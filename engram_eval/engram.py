"""Extraction: source text -> hidden states of every requested layer (one forward pass) -> k chunk means."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from .errors import EngramEvalError
from .model import LoadedModel

DEFAULT_CHUNKS = 16
DEFAULT_MAX_TOKENS = 2048
DOMINANCE_THRESHOLD = 0.5  # one chunk holding more than this share of the summed row norms dominates the engram


@dataclass
class Engram:
    """Raw (unscaled) chunk means of one source text, per layer: layer index -> float32 tensor [chunks, hidden]."""

    layers: dict[int, torch.Tensor]
    n_tokens: int
    truncated: bool
    chunks: int


def chunk_shares(vectors: torch.Tensor) -> torch.Tensor:
    """Each chunk's row norm as a share of the engram's summed row norms, at one layer -> [chunks]."""
    norms = vectors.float().norm(dim=1)
    return norms / norms.sum()


def dominated_layers(engram: Engram, threshold: float = DOMINANCE_THRESHOLD) -> dict[int, tuple[int, float]]:
    """Layers at which one chunk holds more than `threshold` of the summed row norms -> {layer: (chunk, share)}.

    On most LLMs the first token's hidden state is orders of magnitude larger than the rest (a massive activation),
    so the chunk that holds it dominates the seed's one-scalar scaling and every engram looks alike."""
    dominated = {}
    for layer, vectors in engram.layers.items():
        shares = chunk_shares(vectors)
        if shares.max().item() > threshold:
            dominated[layer] = (int(shares.argmax()), shares.max().item())
    return dominated


def dominance_warning(name: str, engram: Engram) -> str | None:
    """One line naming the layers where a single chunk dominates the engram, or None."""
    dominated = dominated_layers(engram)
    if not dominated:
        return None
    layer, (chunk, share) = max(dominated.items(), key=lambda item: item[1][1])
    chunks = sorted({c for c, _ in dominated.values()})
    return (f"source '{name}': one chunk holds more than half of the engram's summed row norms at layers "
            f"{format_layers(sorted(dominated))} (chunk {', '.join(map(str, chunks))}; {100 * share:.0f}% at layer {layer}): "
            "a massive activation dominates this engram, so relevant and control engrams look alike there")


def format_layers(layers: list[int]) -> str:
    """[0, 1, 2, 3, 8, 10, 11] -> '0-3, 8, 10-11'."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def _valid_layers(num_layers: int) -> str:
    return f"valid layers are 0..{num_layers} (0 = embedding output, {num_layers} = last)"


def check_layers(layers: list[int], num_layers: int, option: str = "--layers") -> list[int]:
    """The library's check of layer indices, with the command line's message."""
    if not layers:
        raise EngramEvalError(f"{option}: no layers given; {_valid_layers(num_layers)}")
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= num_layers:
            raise EngramEvalError(f"{option}: layer {layer} is out of range; {_valid_layers(num_layers)}")
    return layers


def parse_layers(text: str, num_layers: int, option: str = "--layers") -> list[int]:
    """'all', '4,8,12', '10-20' or a mix -> sorted layer indices; layer L is hidden_states[L], 0..num_layers."""
    valid = _valid_layers(num_layers)
    if text.strip() == "all":
        return list(range(num_layers + 1))
    layers: set[int] = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise EngramEvalError(f"{option}: malformed '{text}' (expected 'all', '4,8,12' or '10-20'); {valid}")
        low = int(match[1])
        high = int(match[2]) if match[2] is not None else low
        if low > high:
            raise EngramEvalError(f"{option}: range '{part.strip()}' runs backwards; {valid}")
        if high > num_layers:
            raise EngramEvalError(f"{option}: layer {high} is out of range; {valid}")
        layers.update(range(low, high + 1))
    return sorted(layers)


def check_chunks(chunks: int) -> int:
    if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
        raise EngramEvalError(f"--chunks: must be at least 1 (got {chunks})")
    return chunks


def chunk_mean(hidden: torch.Tensor, chunks: int) -> torch.Tensor:
    """Seed-exact chunk averaging over the token axis (-2): [..., n, h] -> [..., chunks, h].

    size = max(1, n // chunks); chunk i covers [i*size, i*size + size), the last chunk runs to n; a chunk
    that would start at or past n is the last token's state (so n < chunks still yields `chunks` vectors).
    """
    n = hidden.shape[-2]
    size = max(1, n // chunks)
    means = []
    for i in range(chunks):
        start = i * size
        if start >= n:
            means.append(hidden[..., n - 1, :])
        else:
            end = n if i == chunks - 1 else start + size
            means.append(hidden[..., start:end, :].mean(dim=-2))
    return torch.stack(means, dim=-2)


def tokenize_source(lm: LoadedModel, text: str, max_tokens: int = DEFAULT_MAX_TOKENS) -> tuple[list[int], bool]:
    """Token ids with the tokenizer's default special tokens, cut at max_tokens -> (ids, truncated)."""
    ids = lm.tokenizer(text)["input_ids"]
    if not ids:
        raise EngramEvalError("source text produced no tokens")
    return ids[:max_tokens], len(ids) > max_tokens


@torch.inference_mode()
def extract_engram(
    lm: LoadedModel,
    text: str,
    layers: list[int],
    chunks: int = DEFAULT_CHUNKS,
    max_tokens: int = DEFAULT_MAX_TOKENS,
) -> Engram:
    """Every requested layer from ONE forward pass with output_hidden_states, chunk-averaged in float32."""
    check_chunks(chunks)
    check_layers(layers, lm.num_layers)
    ids, truncated = tokenize_source(lm, text, max_tokens)
    input_ids = torch.tensor([ids], device=lm.device)
    hidden_states = lm.model(input_ids=input_ids, output_hidden_states=True, use_cache=False).hidden_states
    stacked = torch.stack([hidden_states[layer][0] for layer in layers]).float()
    means = chunk_mean(stacked, chunks).cpu()
    return Engram(layers={layer: means[i] for i, layer in enumerate(layers)}, n_tokens=len(ids), truncated=truncated, chunks=chunks)
