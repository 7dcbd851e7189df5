"""A run's identity: every setting that determines its numbers, and the run id hashed from them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, replace

from ..core.registry import INJECTIONS
from ..core.spec import DEFAULT_MAX_TOKENS, SEED_EXTRACTION, SEED_METHOD, Extraction, Grid, Method, SweepSpec


@dataclass
class SweepSettings:
    """Everything that determines the numbers of a run (batch size does not): the spec, the model and the bank.

    Its fields are run.json's `settings` as they have always been written, so the run id hashed from them does not move;
    the defaults read a run written before a field existed."""

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
    pooling: str = SEED_EXTRACTION.pooling
    skip_tokens: int = SEED_EXTRACTION.skip_tokens
    window: int | None = SEED_EXTRACTION.window
    scaling: str = SEED_METHOD.scaling
    context: str = SEED_METHOD.context
    record_attention: bool = SEED_METHOD.record_attention
    positions: str = SEED_METHOD.positions
    learn_objective: str = SEED_EXTRACTION.learn_objective
    learn_steps: int = SEED_EXTRACTION.learn_steps
    learn_lr: float = SEED_EXTRACTION.learn_lr
    learn_seed: int = SEED_EXTRACTION.learn_seed
    learn_probes: list[str] | None = None
    samples: int = 0
    sample_seed: int = 0
    reextract: bool = False
    prefix_at: str = SEED_METHOD.prefix_at
    vector: str | None = None  # sweep --vector: the stored vector's name and checksum
    vector_sha256: str | None = None

    @classmethod
    def of(cls, spec: SweepSpec, *, model: str, model_fingerprint: str, bank: str, bank_sha256: str,
           questions: list[str], vector_sha256: str | None = None) -> SweepSettings:
        grid, method, extraction = spec.grid, spec.method, spec.extraction
        return cls(
            model=model, model_fingerprint=model_fingerprint, bank=bank, bank_sha256=bank_sha256,
            layers=list(grid.layers), strengths=list(grid.strengths),
            chunks=grid.chunks[0] if len(grid.chunks) == 1 else list(grid.chunks),
            scoring=method.scoring, injection=method.injection, questions=list(questions),
            max_tokens=extraction.max_tokens, pooling=extraction.pooling, skip_tokens=extraction.skip_tokens,
            window=extraction.window, scaling=method.scaling, context=method.context,
            record_attention=method.record_attention, positions=method.positions,
            learn_objective=extraction.learn_objective, learn_steps=extraction.learn_steps, learn_lr=extraction.learn_lr,
            learn_seed=extraction.learn_seed,
            learn_probes=None if extraction.learn_probes is None else list(extraction.learn_probes),
            samples=grid.samples, sample_seed=grid.sample_seed, reextract=method.reextract, prefix_at=method.prefix_at,
            vector=method.vector, vector_sha256=vector_sha256,
        )

    @property
    def spec(self) -> SweepSpec:
        return SweepSpec(Grid(tuple(self.layers), tuple(self.strengths), tuple(self.chunk_list), self.samples, self.sample_seed),
                         Method(self.injection, self.scaling, self.scoring, self.context, self.record_attention, self.positions,
                                self.reextract, self.prefix_at, self.vector),
                         self.extraction, tuple(self.questions))

    @property
    def chunk_list(self) -> list[int]:
        return [self.chunks] if isinstance(self.chunks, int) else list(self.chunks)

    @property
    def extraction(self) -> Extraction:
        return Extraction(pooling=self.pooling, skip_tokens=self.skip_tokens, window=self.window, max_tokens=self.max_tokens,
                          learn_objective=self.learn_objective, learn_steps=self.learn_steps, learn_lr=self.learn_lr,
                          learn_seed=self.learn_seed,
                          learn_probes=None if self.learn_probes is None else tuple(self.learn_probes))

    def steers_last_block(self, num_layers: int) -> bool:
        """actadd at the last layer: its direction is taken from the last block's output (where it adds), not from the
        final norm's."""
        return INJECTIONS[self.injection].hooks_blocks and num_layers in self.layers

    def extraction_for(self, num_layers: int) -> Extraction:
        """How this run's engrams are extracted from a model of this depth."""
        return replace(self.extraction, block_output=self.steers_last_block(num_layers))

    def record(self) -> dict:
        """run.json's `settings`: every field, except those added later while they hold their default (a run that does
        not use them keeps the record, and the run id, it always had)."""
        return {name: value for name, value in asdict(self).items()
                if not (name in RECORDED_WHEN_SET and value == RECORDED_WHEN_SET[name])}

    @property
    def run_id(self) -> str:
        return hashlib.sha256(json.dumps(self.record(), sort_keys=True).encode()).hexdigest()[:12]


RECORDED_WHEN_SET = {"positions": SEED_METHOD.positions, "learn_objective": SEED_EXTRACTION.learn_objective,
                     "learn_steps": SEED_EXTRACTION.learn_steps, "learn_lr": SEED_EXTRACTION.learn_lr,
                     "learn_seed": SEED_EXTRACTION.learn_seed, "learn_probes": None, "samples": 0, "sample_seed": 0,
                     "reextract": False, "prefix_at": SEED_METHOD.prefix_at,
                     "vector": None, "vector_sha256": None}
