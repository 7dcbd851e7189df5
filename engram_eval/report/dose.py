"""Controls at equal disturbance: the dose-matched comparison, the strength each kind needs to reach a dose, and the
side-effect table.

A cell's dose is its neutral_kl (the neutral probe's mean KL on a passage, `sweep --neutral`) when the run has one,
else the question's kl_next (the KL of the next-token distribution after its prompt). Along one series (a question,
an engram, a layer, a k), the log-improvement at a target dose is interpolated linearly in log strength between the
two adjacent grid strengths whose doses bracket the target: no extrapolation, and a series whose dose is not monotone
in strength is flagged (its first crossing is used). Negative strengths (add, actadd: the engram subtracted) are series of
their own in the side-effect table and are left out of the interpolation and the curves, which run along the positive
strengths (a log strength needs one sign). At each target dose, the relevant engram is compared with each
control kind on the questions that have both there: the paired sign-flip test, BH over the section."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl

from ..core.errors import EngramEvalError
from ..run.results import engram_kind
from ..run.rundir import SIDE_EFFECTS, SIDE_EFFECTS_FILE, verify_file
from .experiments import kind_order
from .statistics import PairedTests, judge

DEFAULT_DOSES = (0.05, 0.2, 0.5, 1.0)  # nats
SERIES = ("question_id", "kind", "engram", "layer", "chunks")
CELL = ("engram", "layer", "strength", "chunks")


def load_side_effects(run_dir: str | Path, run: dict) -> pl.DataFrame | None:
    """RUN/side_effects.parquet when the sweep ran its neutral probe, checked against run.json; else None."""
    path = Path(run_dir) / SIDE_EFFECTS_FILE
    record = run.get(SIDE_EFFECTS)
    if not isinstance(record, dict) or not path.is_file():
        return None
    verify_file(path, record.get("sha256"), Path(run_dir) / "run.json", "rerun the sweep with --neutral to merge it again")
    try:
        return pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise EngramEvalError(f"{path}: unreadable ({' '.join(str(exc).split())[:200]})") from None


def parse_doses(text: str) -> tuple[float, ...]:
    """`--doses 0.05,0.2`: positive finite numbers (nats), in increasing order, each once."""
    try:
        doses = [float(part) for part in text.split(",")]
    except ValueError:
        doses = []
    if not doses or not all(math.isfinite(d) and d > 0 for d in doses):
        raise EngramEvalError(f"--doses {text}: give positive numbers of nats, comma-separated (for instance 0.05,0.2,0.5,1)")
    return tuple(sorted(set(doses)))


def at_dose(strengths: list[float], doses: list[float], values: list[float], target: float) -> tuple[float | None, float | None]:
    """One series, in increasing strength -> (value, strength) where its dose reaches target, linear in log strength
    between the first two adjacent strengths whose doses bracket it; (None, None) when none do."""
    for i in range(len(strengths) - 1):
        d0, d1 = doses[i], doses[i + 1]
        if min(d0, d1) <= target <= max(d0, d1):
            t = 0.0 if d1 == d0 else (target - d0) / (d1 - d0)
            log_s = math.log(strengths[i]) + t * (math.log(strengths[i + 1]) - math.log(strengths[i]))
            return values[i] + t * (values[i + 1] - values[i]), math.exp(log_s)
    if len(strengths) == 1 and doses[0] == target:
        return values[0], strengths[0]
    return None, None


def is_monotone(doses: list[float]) -> bool:
    return all(b >= a for a, b in zip(doses, doses[1:]))


def dosed_cells(frame: pl.DataFrame, side_effects: pl.DataFrame | None) -> pl.DataFrame:
    """The engram cells with their kind and dose (and, with the probe, the perplexity ratio)."""
    cells = frame.filter(pl.col("role") != "baseline").with_columns(engram_kind())
    if side_effects is None:
        return cells.with_columns(dose=pl.col("kl_next").cast(pl.Float64), ppl_ratio=pl.lit(None, pl.Float64))
    probe = side_effects.select(*CELL, dose="neutral_kl", ppl_ratio="neutral_ppl_ratio").unique(CELL)
    return cells.join(probe, on=list(CELL), how="left")


def dose_series(cells: pl.DataFrame, targets: tuple[float, ...], measure: str = "log_improvement") -> pl.DataFrame:
    """Per series and target dose: the interpolated measure (the log-improvement, by default) and strength (null where
    the grid never reaches the dose), and whether the series' dose is monotone in strength."""
    ordered = cells.drop_nulls("dose").sort(*SERIES, "strength")
    keys = ordered.select(SERIES).rows()
    strength, dose, value = (ordered[c].to_list() for c in ("strength", "dose", measure))
    rows = []
    start = 0
    for end in range(1, len(keys) + 1):
        if end < len(keys) and keys[end] == keys[start]:
            continue
        s, d, v = strength[start:end], dose[start:end], value[start:end]
        monotone = is_monotone(d)
        for target in targets:
            at, needed = at_dose(s, d, v, target)
            rows.append((*keys[start], target, at, needed, monotone))
        start = end
    schema = {**{k: ordered.schema[k] for k in SERIES}, "target": pl.Float64, measure: pl.Float64,
              "strength": pl.Float64, "monotone": pl.Boolean}
    return pl.DataFrame(rows, schema=schema, orient="row")


def dose_matched_summary(frame: pl.DataFrame, run: dict, side_effects: pl.DataFrame | None,
                         targets: tuple[float, ...] = DEFAULT_DOSES, tests: PairedTests | None = None) -> dict | None:
    """The report's dose-matched section; None without relevant-engram cells. tests: the summary's batch of sign-flip
    tests (p-values and verdicts filled when it runs); without one, run here."""
    if frame.filter(pl.col("role") == "relevant").is_empty():
        return None
    cells = dosed_cells(frame, side_effects)
    series = dose_series(cells.filter(pl.col("strength") > 0), targets)
    kinds = sorted(series["kind"].unique().to_list(), key=kind_order)
    relevant = series.filter((pl.col("kind") == "relevant") & pl.col("log_improvement").is_not_null())
    batch, entries = tests or PairedTests(), []
    for target in targets:
        at = relevant.filter(pl.col("target") == target).select("question_id", "layer", "chunks", relevant_value="log_improvement")
        for kind in (k for k in kinds if k != "relevant"):
            control = series.filter((pl.col("kind") == kind) & (pl.col("target") == target) & pl.col("log_improvement").is_not_null())
            per_question = (control.join(at, on=["question_id", "layer", "chunks"])
                            .group_by("question_id").agg(difference=(pl.col("relevant_value") - pl.col("log_improvement")).mean())
                            .sort("question_id"))
            differences = per_question["difference"].to_list()
            entries.append({"dose": target, "control": kind, "questions": len(differences),
                            "mean_difference": float(np.mean(differences)) if differences else None})
            batch.add(entries[-1], differences)
    batch.then(lambda: judge(entries))
    if tests is None:
        batch.run()
    probe = run.get(SIDE_EFFECTS) if side_effects is not None else None
    return {
        "dose": "neutral_kl" if probe else "kl_next",
        "dose_source": (f"neutral_kl: the mean KL over the {probe['tokens']} positions of the neutral passage "
                        f"{probe['passage']}" if probe else
                        "kl_next: the KL of the next-token distribution after each question's prompt (the run has no "
                        "neutral probe: sweep --neutral)"),
        "targets": list(targets),
        "series": series.select(SERIES).unique().height,
        "non_monotone": series.filter(~pl.col("monotone")).select(SERIES).unique().height,
        "entries": entries,
        "strength_needed": _strength_needed(series, kinds, targets),
        "curves": _curves(cells, kinds),
        "side_effects": None if side_effects is None else _side_effect_table(cells, kinds),
    }


def _strength_needed(series: pl.DataFrame, kinds: list[str], targets: tuple[float, ...]) -> list[dict]:
    """Per kind and target: the median over its series of the strength that reaches the dose, and how many do."""
    rows = []
    for kind in kinds:
        of_kind = series.filter(pl.col("kind") == kind)
        for target in targets:
            at = of_kind.filter(pl.col("target") == target)
            reached = at.drop_nulls("strength")
            rows.append({"kind": kind, "dose": target, "median_strength": reached["strength"].median(),
                         "series_reaching": reached.height, "series": at.height})
    return rows


def _curves(cells: pl.DataFrame, kinds: list[str]) -> dict[str, list[dict]]:
    """The figures' lines: per kind and grid strength, the median dose, the mean log-improvement, and the flip rate
    (flipped cells over baseline-wrong cells; None without a baseline-wrong cell)."""
    wrong = ~pl.col("correct_before")
    grouped = (cells.drop_nulls("dose").filter(pl.col("strength") > 0).group_by("kind", "strength")
               .agg(dose=pl.col("dose").median(), mean_log_improvement=pl.col("log_improvement").mean(),
                    flip_rate=pl.when(wrong.any()).then(pl.col("flipped").filter(wrong).sum() / wrong.sum())).sort("strength"))
    return {kind: grouped.filter(pl.col("kind") == kind).select("strength", "dose", "mean_log_improvement", "flip_rate").to_dicts()
            for kind in kinds}


def _side_effect_table(cells: pl.DataFrame, kinds: list[str]) -> list[dict]:
    """Per kind, layer and strength: the median neutral KL and perplexity ratio over the kind's distinct cells."""
    distinct = cells.drop_nulls("dose").unique(["kind", *CELL])
    grouped = distinct.group_by("kind", "layer", "strength").agg(
        cells=pl.len(), neutral_kl=pl.col("dose").median(), neutral_ppl_ratio=pl.col("ppl_ratio").median())
    return sorted(grouped.to_dicts(), key=lambda r: (kind_order(r["kind"]), r["layer"], r["strength"]))


def at_best_cell(frame: pl.DataFrame, side_effects: pl.DataFrame | None, best: dict | None) -> dict[str, dict]:
    """Per kind, the median dose (and perplexity ratio) at the relevant engram's best cell: what a flip rate there
    cost in side effects."""
    if best is None:
        return {}
    cells = dosed_cells(frame, side_effects).filter(
        (pl.col("layer") == best["layer"]) & (pl.col("strength") == best["strength"])
        & ((pl.col("chunks") == best["chunks"]) if best["chunks"] is not None else pl.lit(True)))
    distinct = cells.drop_nulls("dose") if side_effects is None else cells.drop_nulls("dose").unique(["kind", *CELL])
    grouped = distinct.group_by("kind").agg(dose=pl.col("dose").median(), ppl_ratio=pl.col("ppl_ratio").median())
    return {row["kind"]: {"dose": row["dose"], "ppl_ratio": row["ppl_ratio"]} for row in grouped.iter_rows(named=True)}
