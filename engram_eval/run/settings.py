"""A run's identity: every setting that determines its numbers, and the run id hashed from them."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace

from ..core.spec import SEED_EXTRACTION, SEED_METHOD, Extraction, Grid, Method, SweepSpec

# run.json's `settings`, in the order it has always written them: the identity, the grid, the method, the extraction
RECORD_ORDER = ("model", "model_fingerprint", "bank", "bank_sha256", "layers", "strengths", "chunks", "scoring", "injection",
                "questions", "max_tokens", "pooling", "skip_tokens", "window", "scaling", "context", "record_attention",
                "positions", "learn_objective", "learn_steps", "learn_lr", "learn_seed", "learn_probes", "samples",
                "sample_seed", "reextract", "prefix_at", "vector", "vector_sha256")
FIRST_DEFAULTED = RECORD_ORDER.index("max_tokens")  # the settings from here on have defaults: what an older run meant


@dataclass(frozen=True)
class SweepSettings:
    """Everything that determines the numbers of a run (batch size does not): the spec (what it computes, with the
    questions it computes it for), the model, the bank and, for `sweep --vector`, the vector's checksum.

    `record()` is run.json's `settings` as it has always been written (flat, in RECORD_ORDER), so the run id hashed
    from it does not move; `from_record` reads one back, its absent fields at their defaults."""

    spec: SweepSpec
    model: str
    model_fingerprint: str
    bank: str
    bank_sha256: str
    vector_sha256: str | None = None

    @classmethod
    def of(cls, spec: SweepSpec, *, model: str, model_fingerprint: str, bank: str, bank_sha256: str,
           questions: list[str], vector_sha256: str | None = None) -> SweepSettings:
        return cls(replace(spec, questions=tuple(questions)), model, model_fingerprint, bank, bank_sha256, vector_sha256)

    @classmethod
    def from_record(cls, record: dict) -> SweepSettings:
        values = {**defaults(), **record}
        chunks = values["chunks"]
        extraction = Extraction(values["pooling"], values["skip_tokens"], values["window"], values["max_tokens"],
                                learn_objective=values["learn_objective"], learn_steps=values["learn_steps"],
                                learn_lr=values["learn_lr"], learn_seed=values["learn_seed"],
                                learn_probes=None if values["learn_probes"] is None else tuple(values["learn_probes"]))
        spec = SweepSpec(Grid(tuple(values["layers"]), tuple(values["strengths"]),
                              (chunks,) if isinstance(chunks, int) else tuple(chunks), values["samples"], values["sample_seed"]),
                         Method(values["injection"], values["scaling"], values["scoring"], values["context"],
                                values["record_attention"], values["positions"], values["reextract"], values["prefix_at"],
                                values["vector"]),
                         extraction, tuple(values["questions"]))
        return cls(spec, values["model"], values["model_fingerprint"], values["bank"], values["bank_sha256"],
                   values["vector_sha256"])

    @property
    def method(self) -> Method:
        return self.spec.method

    @property
    def extraction(self) -> Extraction:
        return self.spec.extraction

    @property
    def layers(self) -> list[int]:
        return list(self.spec.grid.layers)

    @property
    def strengths(self) -> list[float]:
        return list(self.spec.grid.strengths)

    @property
    def chunk_list(self) -> list[int]:
        return list(self.spec.grid.chunks)

    @property
    def questions(self) -> list[str]:
        return list(self.spec.questions or ())

    def steers_last_block(self, num_layers: int) -> bool:
        """actadd at the last layer: its direction is taken from the last block's output (where it adds), not from the
        final norm's."""
        return self.method.mode.hooks_blocks and num_layers in self.spec.grid.layers

    def extraction_for(self, num_layers: int) -> Extraction:
        """How this run's engrams are extracted from a model of this depth."""
        return replace(self.extraction, block_output=self.steers_last_block(num_layers))

    def flat(self) -> dict:
        """Every setting by its run.json name, in RECORD_ORDER (one k as an int, a chunk-count grid as a list)."""
        grid, method, extraction = self.spec.grid, self.spec.method, self.spec.extraction
        values = {
            "model": self.model, "model_fingerprint": self.model_fingerprint, "bank": self.bank, "bank_sha256": self.bank_sha256,
            "layers": list(grid.layers), "strengths": list(grid.strengths),
            "chunks": grid.chunks[0] if len(grid.chunks) == 1 else list(grid.chunks),
            "scoring": method.scoring, "injection": method.injection, "questions": self.questions,
            "max_tokens": extraction.max_tokens, "pooling": extraction.pooling, "skip_tokens": extraction.skip_tokens,
            "window": extraction.window, "scaling": method.scaling, "context": method.context,
            "record_attention": method.record_attention, "positions": method.positions,
            "learn_objective": extraction.learn_objective, "learn_steps": extraction.learn_steps,
            "learn_lr": extraction.learn_lr, "learn_seed": extraction.learn_seed,
            "learn_probes": None if extraction.learn_probes is None else list(extraction.learn_probes),
            "samples": grid.samples, "sample_seed": grid.sample_seed, "reextract": method.reextract,
            "prefix_at": method.prefix_at, "vector": method.vector, "vector_sha256": self.vector_sha256,
        }
        return {name: values[name] for name in RECORD_ORDER}

    def record(self) -> dict:
        """run.json's `settings`: every field, except those added later while they hold their default (a run that does
        not use them keeps the record, and the run id, it always had)."""
        return {name: value for name, value in self.flat().items()
                if not (name in RECORDED_WHEN_SET and value == RECORDED_WHEN_SET[name])}

    @property
    def run_id(self) -> str:
        return hashlib.sha256(json.dumps(self.record(), sort_keys=True).encode()).hexdigest()[:12]


def defaults() -> dict:
    """The settings that have defaults (the seed method's), by run.json name: what a run recorded before they existed
    meant."""
    seed = SweepSettings(SweepSpec(extraction=SEED_EXTRACTION, method=SEED_METHOD), "", "", "", "").flat()
    return {name: seed[name] for name in RECORD_ORDER[FIRST_DEFAULTED:]}


RECORDED_WHEN_SET = {"positions": SEED_METHOD.positions, "learn_objective": SEED_EXTRACTION.learn_objective,
                     "learn_steps": SEED_EXTRACTION.learn_steps, "learn_lr": SEED_EXTRACTION.learn_lr,
                     "learn_seed": SEED_EXTRACTION.learn_seed, "learn_probes": None, "samples": 0, "sample_seed": 0,
                     "reextract": False, "prefix_at": SEED_METHOD.prefix_at,
                     "vector": None, "vector_sha256": None}
