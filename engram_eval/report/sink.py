"""The semantic sink, measured: does the relevant engram raise a related wrong answer more than an unrelated one, and
more than its controls do?

From RUN/answers.parquet (each answer variant's log-probability per cell): per question and cell, each answer role's
log-probability (the scoring's side rule over its variants: max; logsumexp under `sequence`) minus the question's
baseline, then sink = Δ log p(related wrong) - Δ log p(unrelated wrong). Only questions whose incorrect answer is
related (`related_wrong: true`) and that list `incorrect_unrelated` are measured. Per kind: the mean over questions
of each question's mean over its cells, with a bootstrap interval. Per cell and control kind: the relevant engram's
sink (and Δ log p(correct)) minus the control's, paired over questions (sign-flip test), BH over the section."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from ..core.spec import LOGSUMEXP_SIDES
from ..run.results import condition_label, engram_kind, primary_rows
from ..run.rundir import ANSWERS_FILE, verify_file
from .dose import DEFAULT_DOSES, dose_series, dosed_cells
from .statistics import PairedTests, bootstrap_mean_ci, judge

CELL = ("layer", "strength", "chunks")
MEASURES = ("sink", "correct")  # what the paired tests compare: the sink, and Δ log p(correct)


def load_answers(run_dir: str | Path, run: dict) -> pl.DataFrame | None:
    """RUN/answers.parquet, checked against run.json's answers_sha256; None for a run that has none."""
    path = Path(run_dir) / ANSWERS_FILE
    if not path.is_file() or not run.get("answers_sha256"):
        return None
    verify_file(path, run["answers_sha256"], Path(run_dir) / "run.json", "rerun the sweep's command to merge it again")
    return pl.read_parquet(path)


def deltas(answers: pl.DataFrame) -> pl.DataFrame:
    """Per question (condition), kind and cell: Δ log p of the correct, related wrong and unrelated wrong answers
    against the question's baseline, and the sink; questions without both wrong roles left out."""
    rows = answers.filter(primary_rows() & pl.col("answer_role").is_in(["correct", "related wrong", "unrelated wrong"]))
    rows = rows.with_columns(condition_label(), engram_kind())
    keys = ["question_id", "kind", "role", "engram", *CELL]
    side = pl.col("logp").logsumexp() if rows["scoring"].first() in LOGSUMEXP_SIDES else pl.col("logp").max()
    per_role = rows.group_by([*keys, "answer_role"], maintain_order=True).agg(side.alias("logp"))
    wide = per_role.pivot(on="answer_role", index=keys, values="logp")
    if not {"related wrong", "unrelated wrong"} <= set(wide.columns):
        return pl.DataFrame()
    base = wide.filter(pl.col("role") == "baseline").select(
        "question_id", *[pl.col(role).alias(f"base {role}") for role in ("correct", "related wrong", "unrelated wrong")])
    cells = wide.filter(pl.col("role") != "baseline").join(base, on="question_id")
    return cells.with_columns(
        correct=pl.col("correct") - pl.col("base correct"),
        related=pl.col("related wrong") - pl.col("base related wrong"),
        unrelated=pl.col("unrelated wrong") - pl.col("base unrelated wrong"),
    ).with_columns(sink=pl.col("related") - pl.col("unrelated")).drop_nulls("sink").select(
        "question_id", "kind", "engram", *CELL, "correct", "related", "unrelated", "sink")


def sink_summary(answers: pl.DataFrame | None, frame: pl.DataFrame | None = None,
                 side_effects: pl.DataFrame | None = None, targets: tuple[float, ...] = DEFAULT_DOSES,
                 tests: PairedTests | None = None) -> dict | None:
    """The measurement, or None when the run has no answers table or no question can be measured. frame (the run's
    results, per condition) and side_effects give each cell its dose, for the comparison at equal dose. tests: the
    summary's batch of sign-flip tests (p-values and verdicts filled when it runs); without one, run here."""
    if answers is None:
        return None
    cells = deltas(answers)
    if cells.is_empty():
        return None
    kinds = ["relevant", *sorted(k for k in cells["kind"].unique().to_list() if k != "relevant")]
    by_kind = []
    for kind in kinds:
        per_question = (cells.filter(pl.col("kind") == kind).group_by("question_id")
                        .agg(pl.col("correct", "related", "unrelated", "sink").mean()).sort("question_id"))
        entry = {"kind": kind, "questions": per_question.height}
        for measure in ("correct", "related", "unrelated", "sink"):
            values = per_question[measure].to_list()
            entry[measure] = {"mean": sum(values) / len(values), "ci95": bootstrap_mean_ci(values)}
        by_kind.append(entry)
    batch = tests or PairedTests()
    summary = {"questions": cells["question_id"].n_unique(), "by_kind": by_kind, "tests": _paired_tests(cells, kinds, batch),
               "dose_matched": None if frame is None else _at_equal_dose(cells, frame, side_effects, kinds, targets, batch)}
    if tests is None:
        batch.run()
    return summary


def _at_equal_dose(cells: pl.DataFrame, frame: pl.DataFrame, side_effects: pl.DataFrame | None, kinds: list[str],
                   targets: tuple[float, ...], tests: PairedTests) -> list[dict]:
    """The relevant engram's sink against each control's at equal dose (the dose section's: kl_next, or the neutral
    probe's KL; interpolated in log strength along each series' positive strengths), paired over questions, BH."""
    doses = dosed_cells(frame, side_effects).select("question_id", "engram", *CELL, "dose").unique()
    dosed = cells.filter(pl.col("strength") > 0).join(doses, on=["question_id", "engram", *CELL], how="left")
    series = dose_series(dosed, targets, "sink").drop_nulls("sink")
    at = series.filter(pl.col("kind") == "relevant").select("question_id", "target", "layer", "chunks", relevant="sink")
    entries = []
    for target in targets:
        for kind in kinds[1:]:
            control = series.filter((pl.col("kind") == kind) & (pl.col("target") == target))
            per_question = (control.join(at.filter(pl.col("target") == target), on=["question_id", "layer", "chunks"], nulls_equal=True)
                            .group_by("question_id").agg(difference=(pl.col("relevant") - pl.col("sink")).mean()).sort("question_id"))
            differences = per_question["difference"].to_list()
            entries.append({"dose": target, "control": kind, "questions": len(differences),
                            "mean_difference": sum(differences) / len(differences) if differences else None,
                            "ci95": bootstrap_mean_ci(differences)})
            tests.add(entries[-1], differences)
    tests.then(lambda: judge(entries))
    return entries


def _paired_tests(cells: pl.DataFrame, kinds: list[str], tests: PairedTests) -> list[dict]:
    """Per cell, control kind and measure: relevant minus control over the questions that have both there (several
    controls of one kind in a question: their mean), the sign-flip p, the mean and its interval; BH over all."""
    per_kind = cells.group_by(["question_id", "kind", *CELL]).agg(pl.col(*MEASURES).mean())
    relevant = per_kind.filter(pl.col("kind") == "relevant").drop("kind")
    entries = []
    for kind in kinds[1:]:
        paired = relevant.join(per_kind.filter(pl.col("kind") == kind).drop("kind"), on=["question_id", *CELL],
                               suffix="_control").sort([*CELL, "question_id"], nulls_last=True)
        for cell, group in paired.group_by(list(CELL), maintain_order=True):
            for measure in MEASURES:
                differences = (group[measure] - group[f"{measure}_control"]).to_list()
                entries.append({"control": kind, **dict(zip(CELL, cell)), "measure": measure, "questions": len(differences),
                                "mean_difference": sum(differences) / len(differences),
                                "ci95": bootstrap_mean_ci(differences)})
                tests.add(entries[-1], differences)
    tests.then(lambda: judge(entries))
    return entries


def sink_line(sink: dict, steered: str) -> str:
    """The first screen's one line."""
    def interval(entry: dict) -> str:
        ci = entry["sink"]["ci95"]
        return f"{entry['sink']['mean']:+.3f}" + ("" if ci is None else f" (95% CI {ci[0]:+.3f} to {ci[1]:+.3f})")

    relevant, controls = sink["by_kind"][0], sink["by_kind"][1:]
    text = (f"semantic sink: related wrong answers rose {interval(relevant)} nats more than unrelated ones under "
            f"{steered} ({relevant['questions']} questions)")
    return text + ("; controls: " + ", ".join(f"{c['kind']} {interval(c)}" for c in controls) if controls else "")
