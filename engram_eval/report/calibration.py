"""Confidence calibration (the seeds' Use Case 2): do label-free signals from the grid predict that the baseline's
answer is correct? Per question (per context condition): the baseline margin, the relevant engram's stability, each
control kind's stability and the fragile flag, scored by AUROC against `correct_before`, with paired bootstrap
intervals and the selective-prediction view (abstain on the fragile questions, or on as many lowest-margin ones)."""

from __future__ import annotations

import warnings

import numpy as np
import polars as pl

from ..run.results import computed_cells, engram_kind
from .experiments import kind_order
from .statistics import auroc, paired_bootstrap_ci

MIN_PER_CLASS = 10  # fewer correct (or wrong) baselines than this: "too few questions to tell", no AUROC


def question_signals(frame: pl.DataFrame) -> pl.DataFrame:
    """One row per question (condition) with a decided, finite baseline: question_id, correct_before, margin,
    stability, stability:KIND per control kind, fragile (bool). Each computed cell counts once; a kind a question lacks
    is null there."""
    base = (frame.filter((pl.col("role") == "baseline") & pl.col("log_ratio").is_finite() & (pl.col("log_ratio") != 0))
            .select("question_id", baseline_log_ratio="log_ratio"))
    cells = (frame.filter((pl.col("role") != "baseline") & computed_cells() & pl.col("log_ratio").is_finite())
             .with_columns(engram_kind()).join(base, on="question_id"))
    kept = cells.with_columns(keeps=(pl.col("log_ratio").sign() == pl.col("baseline_log_ratio").sign()))
    shares = kept.group_by("question_id", "kind").agg(share=pl.col("keeps").mean())
    wide = shares.pivot(on="kind", index="question_id", values="share") if shares.height else pl.DataFrame({"question_id": []})
    kinds = sorted((k for k in wide.columns if k not in ("question_id", "relevant")), key=kind_order)
    signals = base.join(wide, on="question_id", how="left").with_columns(
        correct_before=pl.col("baseline_log_ratio") > 0, margin=pl.col("baseline_log_ratio").abs())
    if "relevant" not in signals.columns:
        signals = signals.with_columns(relevant=pl.lit(None, pl.Float64))
    signals = signals.rename({"relevant": "stability", **{k: f"control_stability:{k}" for k in kinds}})
    return (signals.with_columns(fragile=pl.col("stability") < 1)
            .select("question_id", "correct_before", "margin", "stability", *[f"control_stability:{k}" for k in kinds], "fragile")
            .sort("question_id"))


def signal_names(signals: pl.DataFrame) -> list[str]:
    return ["margin", "stability", *[c for c in signals.columns if c.startswith("control_stability:")], "fragile"]


def signal_values(signals: pl.DataFrame, name: str) -> np.ndarray:
    """A signal as numbers, oriented so that higher means more likely correct (fragile: 0 fragile, 1 not)."""
    column = signals[name]
    return (~column).cast(pl.Float64).to_numpy() if name == "fragile" else column.cast(pl.Float64).to_numpy()


def roc_points(signal: np.ndarray, positive: np.ndarray) -> list[list[float]]:
    """The ROC curve as [false positive rate, true positive rate] points, thresholds from high to low."""
    points = [[0.0, 0.0]]
    n1, n0 = positive.sum(), (~positive).sum()
    for threshold in sorted(set(signal.tolist()), reverse=True):
        chosen = signal >= threshold
        points.append([float((chosen & ~positive).sum() / n0), float((chosen & positive).sum() / n1)])
    return points


def calibration_summary(frame: pl.DataFrame, seed: int = 0) -> dict | None:
    """The report's calibration section; None when the run has no relevant-engram cells."""
    signals = question_signals(frame).drop_nulls("stability")
    if signals.height == 0:
        return None
    positive = signals["correct_before"].to_numpy()
    positives, negatives = int(positive.sum()), int((~positive).sum())
    names = signal_names(signals)
    too_few = min(positives, negatives) < MIN_PER_CLASS
    summary = {"questions": signals.height, "positives": positives, "too_few": too_few, "signals": [], "differences": [],
               "selective": selective(signals), "roc": {}}
    if too_few:
        return summary
    values = {name: signal_values(signals, name) for name in names}
    for name in names:
        present = ~np.isnan(values[name])
        x, y = values[name][present], positive[present]
        enough = min(y.sum(), (~y).sum()) >= MIN_PER_CLASS
        summary["signals"].append({"name": name, "questions": int(present.sum()),
                                   "auroc": float(auroc(x, y)) if enough else None,
                                   "ci95": _interval(lambda s, t, axis=-1: auroc(s, t, axis=axis), (x, y)) if enough else None})
        if enough:
            summary["roc"][name] = roc_points(x, y)
    for other in [n for n in names if n == "margin" or n.startswith("control_stability:")]:
        present = ~np.isnan(values["stability"]) & ~np.isnan(values[other])
        a, b, y = values["stability"][present], values[other][present], positive[present]
        if min(y.sum(), (~y).sum()) < MIN_PER_CLASS:
            continue
        summary["differences"].append({
            "a": "stability", "b": other, "questions": int(present.sum()), "delta": float(auroc(a, y) - auroc(b, y)),
            "ci95": _interval(lambda s, t, u, axis=-1: auroc(s, u, axis=axis) - auroc(t, u, axis=axis), (a, b, y))})
    return summary


def _interval(statistic, arrays: tuple[np.ndarray, ...]) -> list[float] | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # resamples with one class only are undefined and left out
        interval = paired_bootstrap_ci(statistic, arrays)
    return None if interval is None else list(interval)


def selective(signals: pl.DataFrame) -> dict:
    """Accuracy on the questions kept when abstaining on the fragile ones, against abstaining on as many
    lowest-margin ones (ties broken by question id)."""
    abstained = int(signals["fragile"].sum())
    kept_fragile = signals.filter(~pl.col("fragile"))
    kept_margin = signals.sort("margin", "question_id").slice(abstained)

    def accuracy(kept: pl.DataFrame) -> float | None:
        return float(kept["correct_before"].mean()) if kept.height else None

    return {"abstained": abstained, "kept": signals.height - abstained, "accuracy_all": accuracy(signals),
            "accuracy_kept_fragile": accuracy(kept_fragile), "accuracy_kept_margin": accuracy(kept_margin)}
