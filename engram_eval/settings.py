"""A run's identity: every setting that determines its numbers, and the run id hashed from them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from .engram import DEFAULT_MAX_TOKENS, Extraction


@dataclass
class SweepSettings:
    """Everything that determines the numbers of a run (batch size does not)."""

    model: str
    model_fingerprint: str
    bank: str
    bank_sha256: str
    layers: list[int]
    strengths: list[float]
    chunks: int | list[int]  # one k (an int, as the seed's runs record it) or the chunk-count grid
    scoring: str
    injection: str
    questions: list[str]
    max_tokens: int = DEFAULT_MAX_TOKENS
    pooling: str = "mean"
    skip_tokens: int = 0
    window: int | None = None
    scaling: str = "global"
    context: str = "with"
    record_attention: bool = False  # eager attention: its float rounding differs slightly from the default kernel

    @property
    def chunk_list(self) -> list[int]:
        return [self.chunks] if isinstance(self.chunks, int) else list(self.chunks)

    @property
    def extraction(self) -> Extraction:
        return Extraction(pooling=self.pooling, skip_tokens=self.skip_tokens, window=self.window, max_tokens=self.max_tokens)

    @property
    def run_id(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]
