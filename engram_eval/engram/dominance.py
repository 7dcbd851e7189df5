"""Dominance: one chunk whose row norm outweighs the rest (a massive activation) makes every engram look alike.

NumPy only, so `store show` reads a file's norms without loading torch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..core.spec import format_layers

DOMINANCE_THRESHOLD = 0.5  # one chunk holding more than this share of the summed row norms dominates the engram


def chunk_norms(vectors: Any) -> np.ndarray:
    """Each chunk's row norm at one layer ([chunks, hidden] array or CPU tensor) -> [chunks], float64."""
    return np.linalg.norm(np.asarray(vectors, dtype=np.float64), axis=1)


def chunk_shares(vectors: Any) -> np.ndarray:
    """Each chunk's row norm as a share of the engram's summed row norms, at one layer -> [chunks]."""
    norms = chunk_norms(vectors)
    return norms / norms.sum()


def dominated_layers(layers: Mapping[int, Any], threshold: float = DOMINANCE_THRESHOLD) -> dict[int, tuple[int, float]]:
    """Layers at which one chunk holds more than `threshold` of the summed row norms -> {layer: (chunk, share)}.

    On most LLMs the first token's hidden state is orders of magnitude larger than the rest (a massive activation),
    so the chunk that holds it dominates the seed's one-scalar scaling and every engram looks alike."""
    dominated = {}
    for layer, vectors in layers.items():
        shares = chunk_shares(vectors)
        if shares.max() > threshold:
            dominated[layer] = (int(shares.argmax()), float(shares.max()))
    return dominated


def dominance(name: str, layers: Mapping[int, Any]) -> str | None:
    """Where a single chunk dominates the engram, for the merged warning: "'pheo' at layers 16 (chunk 0; 93% at layer
    16)", or None."""
    dominated = dominated_layers(layers)
    if not dominated:
        return None
    layer, (chunk, share) = max(dominated.items(), key=lambda item: item[1][1])
    chunks = sorted({c for c, _ in dominated.values()})
    return (f"'{name}' at layers {format_layers(sorted(dominated))} (chunk {', '.join(map(str, chunks))}; "
            f"{100 * share:.0f}% at layer {layer})")


def dominance_warning(dominated: list[str]) -> str | None:
    """One warning for every source whose engram one chunk dominates (a build of 14 such sources says it once)."""
    if not dominated:
        return None
    which = f"source {dominated[0]}" if len(dominated) == 1 else f"{len(dominated)} sources: {'; '.join(dominated)}"
    return (f"one chunk holds more than half of the engram's summed row norms in {which}: a massive activation "
            f"dominates {'this engram' if len(dominated) == 1 else 'these engrams'}, so relevant and control engrams look "
            "alike there")
