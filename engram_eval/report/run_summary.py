"""The typed summary of a run: what `summarize` returns and what every renderer reads.

One dataclass per section the notebook user asks for (headline per kind, questions, cells, chunk dominance, controls,
side effects, calibration, generation, the semantic sink), each table a polars frame. Its `record` is every number of
the report, unrounded, the body of `report --format json` (versioned by SCHEMA_VERSION, described by the JSON Schema
report.schema.json beside this module, SCHEMA_PATH); `summary["controls"]` reads that record, as the JSON does."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from importlib.resources import files
from typing import Any

import polars as pl

SCHEMA_VERSION = 1  # of report --format json: bump when a key is renamed or removed (and the schema with it)
SCHEMA_PATH = files(__package__) / "report.schema.json"  # shipped in the wheel


def table(rows: list[dict] | None, nested_lists: tuple[str, ...] = ()) -> pl.DataFrame:
    """Rows of nested dicts -> one flat frame: a nested dict's keys joined with "_" (best -> best_layer), a 95% interval
    as its _ci_low and _ci_high columns; the keys in nested_lists kept as list columns; every row read for the schema."""
    return pl.DataFrame([_flat(row, nested_lists) for row in rows or []], infer_schema_length=None)


def _flat(row: dict, nested_lists: tuple[str, ...], prefix: str = "") -> dict:
    flat: dict[str, Any] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and key not in nested_lists:
            flat.update(_flat(value, nested_lists, f"{name}_"))
        elif key == "ci95":
            flat[f"{prefix}ci_low"], flat[f"{prefix}ci_high"] = value if value else (None, None)
        elif isinstance(value, dict):
            flat[name] = [{"key": k, "value": v} for k, v in value.items()]
        else:
            flat[name] = value
    return flat


@dataclass(frozen=True)
class Rate:
    """k of n, with its 95% Wilson interval (None when n = 0)."""

    k: int
    n: int
    rate: float | None
    ci95: tuple[float, float] | None

    @classmethod
    def of(cls, record: dict) -> Rate:
        return cls(record["k"], record["n"], record["rate"], tuple(record["ci95"]) if record["ci95"] else None)


@dataclass(frozen=True)
class Header:
    """What was run: model, bank, grid, scoring, size, status."""

    run_id: str
    model: str
    model_fingerprint: str
    bank: str
    layers: list[int]
    strengths: list[float]
    chunks: int | list[int]
    scoring: str
    injection: str
    cells: int
    questions: int
    conditions: int
    duration_seconds: float | None
    status: str
    partial: dict | None
    subject: str
    off_distribution: dict[str, str]

    @classmethod
    def of(cls, record: dict) -> Header:
        return cls(**{f.name: record[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class Headline:
    """The first screen: per engram kind (the relevant engram or vector first, then each control kind) the share of
    baseline-wrong questions that flip somewhere and of baseline-correct ones that break somewhere, the paired test's
    verdict against the relevant engram, the side effects at its best cell and the anti-steerable fraction."""

    by_kind: pl.DataFrame
    conclusion: str
    question_flip_rate: Rate
    question_clean_flip_rate: Rate
    question_fragile_correct_rate: Rate
    best_cell: dict | None
    side_effect_measure: str


@dataclass(frozen=True)
class SideEffects:
    """Controls at equal disturbance: the paired tests at each target dose, the strength each kind needs, and (with the
    neutral probe, sweep --neutral) each kind's median KL and perplexity ratio per layer and strength."""

    dose: str
    tests: pl.DataFrame
    strength_needed: pl.DataFrame
    by_cell: pl.DataFrame | None


@dataclass(frozen=True)
class Calibration:
    """Do label-free signals predict a correct baseline: AUROC per signal, their paired differences, selective
    accuracy."""

    questions: int
    positives: int
    too_few: bool
    signals: pl.DataFrame
    differences: pl.DataFrame
    selective: dict


@dataclass(frozen=True)
class Generation:
    """The probability verdict against the generated text: the confusion counts, per engram kind, and every text."""

    confusion: pl.DataFrame
    by_kind: pl.DataFrame
    texts: pl.DataFrame


@dataclass(frozen=True)
class Sink:
    """The semantic sink per answer: Δ log p of the correct, related-wrong and unrelated-wrong answers per kind, the
    paired tests per cell, and the comparison at equal dose."""

    questions: int
    by_kind: pl.DataFrame
    tests: pl.DataFrame
    at_equal_dose: pl.DataFrame | None


@dataclass(frozen=True)
class RunSummary:
    """Every number of a run's report. Tables are polars frames; `record` holds them all (and the sections without a
    field here: heatmaps, per-cell tests, effect sizes, the held-out cell, attention, RAG, variability) as
    `report --format json` writes them."""

    header: Header
    headline: Headline
    questions: pl.DataFrame
    cells: pl.DataFrame
    chunk_dominance: pl.DataFrame
    controls: pl.DataFrame
    side_effects: SideEffects | None
    calibration: Calibration | None
    generation: Generation | None
    sink: Sink | None
    record: dict = field(repr=False)
    schema_version: int = SCHEMA_VERSION

    @classmethod
    def build(cls, record: dict, cells: pl.DataFrame) -> RunSummary:
        """From summarize's record and the rows it was computed on (per context condition, primary rows)."""
        headline, dose, calibration = record["headline"], record.get("dose_matched"), record.get("calibration")
        generation, sink = record.get("generation"), record.get("sink")
        shares = record["header"]["largest_chunk_share"]
        return cls(
            header=Header.of(record["header"]),
            headline=Headline(
                by_kind=table(headline["by_kind"]), conclusion=headline["conclusion"],
                question_flip_rate=Rate.of(headline["question_flip_rate"]),
                question_clean_flip_rate=Rate.of(headline["question_clean_flip_rate"]),
                question_fragile_correct_rate=Rate.of(headline["question_fragile_correct_rate"]),
                best_cell=headline["best_cell"], side_effect_measure=headline["side_effect_measure"]),
            questions=table(record["questions"], nested_lists=("cases",)),
            cells=cells,
            chunk_dominance=pl.DataFrame(
                [{"engram": name, "layer": int(layer), "largest_chunk_share": share}
                 for name, by_layer in sorted(shares.items()) for layer, share in sorted(by_layer.items(), key=lambda i: int(i[0]))],
                schema={"engram": pl.String, "layer": pl.Int64, "largest_chunk_share": pl.Float64}),
            controls=table(record["controls"]),
            side_effects=None if dose is None else SideEffects(
                dose["dose"], table(dose["entries"]), table(dose["strength_needed"]),
                None if dose["side_effects"] is None else table(dose["side_effects"])),
            calibration=None if calibration is None else Calibration(
                calibration["questions"], calibration["positives"], calibration["too_few"], table(calibration["signals"]),
                table(calibration["differences"]), calibration["selective"]),
            generation=None if generation is None else Generation(
                pl.DataFrame([{"probability": p, **verdicts} for p, verdicts in generation["confusion"].items()]),
                table(generation["by_kind"]), table(generation["texts"])),
            sink=None if sink is None else Sink(
                sink["questions"], table(sink["by_kind"]), table(sink["tests"]),
                None if sink["dose_matched"] is None else table(sink["dose_matched"])),
            record=record,
        )

    def replaced(self, **record: Any) -> RunSummary:
        """The same summary with these record keys replaced (a header marked partial, say)."""
        return RunSummary.build({**self.record, **record}, self.cells)

    def __getitem__(self, key: str) -> Any:
        return self.record[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.record.get(key, default)

    def to_dict(self) -> dict:
        """The JSON body: the schema version and every number."""
        return {"schema_version": self.schema_version, **self.record}
