"""What a report section is (title, columns, rows) and the figures a section can carry; every renderer reads these."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KindRates:
    """The headline's figure: per engram kind, the share of baseline-wrong questions that flip somewhere and of
    baseline-correct ones that break somewhere, each with its Wilson interval (the summary's headline.by_kind)."""

    by_kind: list


@dataclass(frozen=True)
class CountHeatmap:
    """A layer x strength grid of flip (or break) counts: the summary's heatmap and which measure."""

    heatmap: dict
    measure: str  # flip | break


@dataclass(frozen=True)
class EffectHeatmap:
    """A layer x strength grid of mean log-improvements: the summary's effects for one k and which map."""

    effects: dict
    label: str


@dataclass(frozen=True)
class RocCurves:
    """The calibration section's ROC curves, one per signal: name -> [false positive rate, true positive rate] points."""

    curves: dict


@dataclass(frozen=True)
class DoseCurves:
    """The dose-matched section's figures: per engram kind, [{strength, dose, mean_log_improvement, flip_rate}] along
    the grid's strengths (drawn as log-improvement against dose, and as the flip rate against dose: the trade-off),
    and the target doses."""

    curves: dict
    targets: list[float]
    measure: str


@dataclass(frozen=True)
class SinkBars:
    """The semantic-sink section's figure: per engram kind, Δ log p of the correct, related wrong and unrelated wrong
    answers (the summary's sink.by_kind), each with its interval."""

    by_kind: list


@dataclass(frozen=True)
class Section:
    key: str  # stable within one report: what a renderer or a test looks a section up by
    title: str
    columns: list[str]
    rows: list[list[str]]
    figure: KindRates | CountHeatmap | EffectHeatmap | RocCurves | DoseCurves | SinkBars | None = None
    right_aligned: bool = False  # a grid of counts: the terminal aligns its cells right

    def as_dict(self) -> dict:
        return {"key": self.key, "title": self.title, "columns": self.columns, "rows": self.rows}
