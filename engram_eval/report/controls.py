"""The controls: per control kind, the paired test against the relevant engram (or vector) on the cells both have,
each side's flips and breaks, the controls-adjusted flip rate; the headline's rates per engram kind and its one-line
conclusion; the anti-steerable fraction."""

from __future__ import annotations

import polars as pl

from ..run.results import computed_cells
from .experiments import CELL_KEYS
from .statistics import PairedTests, bootstrap_mean_ci, rate, verdict


def question_rates(rows: pl.DataFrame) -> dict:
    """Of one engram kind's rows: the baseline-wrong questions that flip somewhere (and those with a clean flip), and
    the baseline-correct ones that break somewhere."""
    per_question = rows.group_by("question_id").agg(
        correct=pl.col("correct_before").first(), flips=pl.col("flipped").any(), breaks=pl.col("broken").any(),
        clean_flips=(pl.col("flipped") & pl.col("p_correct_rose") & ~pl.col("collapsed")).any(),
    )
    wrong, correct = per_question.filter(~pl.col("correct")), per_question.filter(pl.col("correct"))
    return {
        "question_flip_rate": rate(int(wrong["flips"].sum()), wrong.height),
        "question_clean_flip_rate": rate(int(wrong["clean_flips"].sum()), wrong.height),
        "question_fragile_correct_rate": rate(int(correct["breaks"].sum()), correct.height),
    }


def control_kinds(frame: pl.DataFrame) -> list[str]:
    return sorted(frame.filter(pl.col("role") == "control")["control_kind"].unique().drop_nulls().to_list())


def controls_summary(frame: pl.DataFrame, tests: PairedTests) -> list[dict]:
    """Per control kind, on the cells it shares with the relevant engram: the paired sign-flip test of the per-question
    mean log-improvement difference, flips and breaks of each side (each computed cell once), and the controls-adjusted
    flip rate: over baseline-wrong questions, the mean of (share of the relevant cells that flip - share of the
    control's cells that flip), with a bootstrap interval over questions. The p-values and verdicts are filled when
    the summary's batch of tests runs."""
    relevant = frame.filter(pl.col("role") == "relevant")
    keys = ["question_id", *CELL_KEYS]
    rows = []
    for kind in control_kinds(frame):
        control = frame.filter((pl.col("role") == "control") & (pl.col("control_kind") == kind))
        paired = control.join(relevant.select(*keys, rel_log="log_improvement"), on=keys)
        per_question = (
            paired.group_by("question_id", maintain_order=True)
            .agg(difference=(pl.col("rel_log") - pl.col("log_improvement")).mean())
            .sort("question_id")
        )
        differences = per_question["difference"].to_list()
        relevant_cells = relevant.join(control.select(keys).unique(), on=keys, how="semi")
        control_cells = control.filter(computed_cells()).join(relevant.select(keys), on=keys, how="semi")
        rows.append(
            {
                "kind": kind,
                "questions": len(differences),
                "cells_relevant": relevant_cells.height,
                "cells_control": control_cells.height,
                "mean_log_improvement_relevant": relevant_cells["log_improvement"].mean(),
                "mean_log_improvement_control": control_cells["log_improvement"].mean(),
                "flips_relevant": int(relevant_cells["flipped"].sum()),
                "flips_control": int(control_cells["flipped"].sum()),
                "breaks_relevant": int(relevant_cells["broken"].sum()),
                "breaks_control": int(control_cells["broken"].sum()),
                "mean_difference": sum(differences) / len(differences) if differences else None,
                "p_value": None,
                "verdict": None,
                "adjusted_flip_difference": _adjusted_flip_difference(relevant_cells, control_cells),
            }
        )
        tests.add(rows[-1], differences)

    def judged() -> None:
        for row in rows:
            row["verdict"] = verdict(row["mean_difference"], row["p_value"], row["questions"])

    tests.then(judged)
    return rows


def _adjusted_flip_difference(relevant: pl.DataFrame, control: pl.DataFrame) -> dict:
    """Over the baseline-wrong questions both sides have: mean of (relevant flip share - control flip share)."""
    shares = [
        side.filter(~pl.col("correct_before")).group_by("question_id").agg(**{name: pl.col("flipped").mean()})
        for side, name in ((relevant, "relevant"), (control, "control"))
    ]
    per_question = shares[0].join(shares[1], on="question_id").sort("question_id")
    differences = (per_question["relevant"] - per_question["control"]).to_list()
    return {"difference": sum(differences) / len(differences) if differences else None,
            "ci95": bootstrap_mean_ci(differences), "questions": len(differences)}


def wrong_way() -> pl.Expr:
    """Per cell: whether it moves the answer's log-odds against the way its strength points (a positive strength
    should raise log(p_correct / p_incorrect), a negative one lower it): Tan et al. (2024)'s anti-steerable cells."""
    return (pl.col("strength").sign() * pl.col("log_improvement")) < 0


def anti_steerable(cells: pl.DataFrame) -> dict:
    """The anti-steerable fraction of a kind: per question, the share of its cells that move the wrong way; their
    mean over questions, and how many questions have at least half of their cells the wrong way."""
    shares = cells.group_by("question_id").agg(share=wrong_way().mean()).sort("question_id")["share"].drop_nulls()
    return {"mean": None if shares.is_empty() else float(shares.mean()), "questions": shares.len(),
            "mostly_wrong_way": int((shares >= 0.5).sum())}


def by_kind(frame: pl.DataFrame, controls: list[dict], at_best: dict[str, dict]) -> list[dict]:
    """The headline per engram kind: the questions that flip somewhere (over the baseline-wrong questions that have
    that kind), those that break somewhere (over the baseline-correct ones), a control's verdict against the
    relevant engram, and its side effects at the relevant engram's best cell."""
    tested = {c["kind"]: c for c in controls}
    entries = []
    for kind in ["relevant", *control_kinds(frame)]:
        cells = frame.filter((pl.col("role") == "relevant") if kind == "relevant" else (pl.col("control_kind") == kind))
        rates = question_rates(cells)
        entries.append({
            "kind": kind,
            "question_flip_rate": rates["question_flip_rate"],
            "question_fragile_correct_rate": rates["question_fragile_correct_rate"],
            "verdict": tested[kind]["verdict"] if kind in tested else None,
            "p_value": tested[kind]["p_value"] if kind in tested else None,
            "at_best_cell": at_best.get(kind),
            "anti_steerable": anti_steerable(cells),
        })
    return entries


VERDICT_PHRASES = (  # (how a verdict starts, how the conclusion says it)
    ("relevant beats controls", "beats {k} of {n} control kinds ({names})"),
    ("indistinguishable", "is indistinguishable from {k} of {n} control kinds ({names})"),
    ("controls beat relevant", "is beaten by {k} of {n} control kinds ({names})"),
    ("too few questions", "has too few questions to be told apart from {k} of {n} control kinds ({names})"),
    ("no data", "has no paired cells with {k} of {n} control kinds ({names})"),
)


def subject(run: dict) -> str:
    """What the run steers with, as the report names it: a stored vector (sweep --vector), else the relevant engram."""
    vector = run.get("vector")
    return f"the vector '{vector['name']}'" if isinstance(vector, dict) and vector.get("name") else "the relevant engram"


def conclusion(controls: list[dict], steered: str = "the relevant engram") -> str:
    """One line: what the paired tests say of the relevant engram (or vector) against each control kind."""
    if not controls:
        return f"no controls in this run: nothing says whether {steered}'s effect is its content"
    parts = []
    for start, phrase in VERDICT_PHRASES:
        names = [c["kind"] for c in controls if c["verdict"].startswith(start)]
        if names:
            parts.append(phrase.format(k=len(names), n=len(controls), names=", ".join(names)))
    return f"{steered} " + "; ".join(parts)
