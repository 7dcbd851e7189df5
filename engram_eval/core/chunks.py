"""The seed's chunk rule: which tokens each of the k chunks averages (pure Python: the report uses it too)."""

from __future__ import annotations


def chunk_bounds(n: int, chunks: int) -> list[tuple[int, int]]:
    """chunk_mean's [start, end) per chunk: size = max(1, n // k), the remainder in the last chunk; a padded chunk
    (start >= n) is (n - 1, n)."""
    size = max(1, n // chunks)
    bounds = []
    for i in range(chunks):
        start = i * size
        bounds.append((n - 1, n) if start >= n else (start, n if i == chunks - 1 else start + size))
    return bounds
