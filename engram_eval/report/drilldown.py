"""Drill-down: one question, cell by cell — what the engram did to each answer's probability.

The seeds' hyperthermia table is the model: P(dantrolene) x2.4 while P(cooling) x110. Per cell, the boost of each
side against the baseline (p / baseline p), the top variants, and the sink score log boost(incorrect) - log
boost(correct): positive when the engram helps the wrong answer more than the right one."""

from __future__ import annotations

import math

import polars as pl

from ..core.errors import EngramEvalError
from ..run.results import primary_rows


def question_drilldown(frame: pl.DataFrame, question_id: str, generations: pl.DataFrame | None = None) -> dict:
    """frame: a run's rows (not relabelled per context condition). -> per context condition, the baseline and every
    computed cell of every engram (relevant first; a null prefix computed once for every layer is one cell with
    `every_layer`), and the generated texts of the question when there are any."""
    known = sorted(frame["question_id"].unique().to_list())
    if question_id not in known:
        raise EngramEvalError(f"--question: no question '{question_id}' in this run (known: {', '.join(known)})")
    rows = frame.filter((pl.col("question_id") == question_id) & primary_rows())  # paraphrases: the variability section
    return _drilldown(question_id, rows, None if generations is None else generations.filter(pl.col("question_id") == question_id))


def question_drilldowns(frame: pl.DataFrame, generations: pl.DataFrame | None = None) -> list[dict]:
    """Every question's drill-down, in the run's order (one partition of the rows, not one filter per question)."""
    rows = frame.filter(primary_rows()).partition_by("question_id", as_dict=True, maintain_order=True)
    texts = {} if generations is None else generations.partition_by("question_id", as_dict=True)
    return [_drilldown(question_id, group, texts.get((question_id,), None if generations is None else generations.clear()))
            for (question_id,), group in rows.items()]


def _drilldown(question_id: str, rows: pl.DataFrame, generations: pl.DataFrame | None) -> dict:
    conditions = []
    for (context,), condition in rows.group_by(["context"], maintain_order=True):
        base = condition.filter(pl.col("role") == "baseline").row(0, named=True)
        steered = condition.filter(pl.col("role") != "baseline")
        repeated = steered.filter(pl.col("repeated")).select("engram", "strength", "chunks").unique()
        cells = (steered.filter(~pl.col("repeated"))  # each computed cell once: a null prefix the same at every layer
                 .join(repeated.with_columns(every_layer=pl.lit(True)), on=["engram", "strength", "chunks"], how="left")
                 .with_columns(every_layer=pl.col("every_layer").fill_null(False),
                               order=pl.when(pl.col("role") == "relevant").then(0).otherwise(1))
                 .sort("order", "engram", "chunks", "layer", "strength"))
        conditions.append({
            "context": context,
            "baseline": {key: base[key] for key in ("p_correct", "p_incorrect", "ratio", "top_correct_variant",
                                                    "top_incorrect_variant", "top_token", "p_top")},
            "cells": [_cell(r, base) for r in cells.iter_rows(named=True)],
        })
    texts = [] if generations is None else [
        {key: r[key] for key in ("role", "engram", "layer", "strength", "chunks", "context", "first_answer", "verdict", "text")}
        for r in generations.iter_rows(named=True)]
    return {"question_id": question_id, "conditions": conditions, "texts": texts}


def _cell(row: dict, base: dict) -> dict:
    boost_correct = _boost(row["p_correct"], base["p_correct"])
    boost_incorrect = _boost(row["p_incorrect"], base["p_incorrect"])
    sink = None if boost_correct is None or boost_incorrect is None else math.log(boost_incorrect) - math.log(boost_correct)
    return {
        **{key: row[key] for key in ("engram", "role", "control_kind", "layer", "strength", "chunks", "p_correct", "p_incorrect",
                                     "ratio", "top_correct_variant", "top_incorrect_variant", "top_token", "p_top", "case",
                                     "every_layer")},
        "boost_correct": boost_correct, "boost_incorrect": boost_incorrect, "sink_score": sink,
    }


def _boost(p: float, baseline: float) -> float | None:
    return None if not baseline or not p else p / baseline
