"""Variability across paraphrased sources: does an effect survive rewording the source, and how far do engrams sampled
from the paraphrases spread it? (a source with `files: [...]`; `sweep --sample`)."""

from __future__ import annotations

import polars as pl

from ..run.results import engram_kind, primary_rows
from .statistics import rate

BEST_CELL_ORDER = (["ratio", "chunks", "layer", "strength"], [True, False, False, False])  # as the questions table picks it


def variability_summary(frame: pl.DataFrame) -> dict | None:
    """Per engram kind whose source has paraphrases: per question, the spread of the effect over the paraphrases (and,
    with --sample, over the samples) at the question's best cell of the relevant engram's own text (min / median / max
    log-improvement there) and the share of paraphrases (samples) that flip the question at any cell; over the bank,
    the "survives rewording" rate: baseline-wrong questions flipped with every paraphrase over those flipped with any.
    None when no row is another paraphrase's or a sample's. frame: every row, per context condition."""
    if frame.filter(~primary_rows()).is_empty():
        return None
    variants = frame.filter(pl.col("paraphrase").is_not_null() | pl.col("sample").is_not_null()).with_columns(engram_kind())
    best = (frame.filter(primary_rows() & (pl.col("role") == "relevant"))
            .sort(BEST_CELL_ORDER[0], descending=BEST_CELL_ORDER[1])
            .group_by("question_id", maintain_order=True).first()
            .select("question_id", best_layer="layer", best_strength="strength", best_chunks="chunks"))
    kinds = sorted(variants["kind"].unique().to_list(), key=lambda kind: (kind != "relevant", kind))
    return {"paraphrases": [_spread(variants.filter(pl.col("kind") == kind), best, kind, "paraphrase") for kind in kinds
                            if variants.filter((pl.col("kind") == kind) & pl.col("paraphrase").is_not_null()).height],
            "samples": [_spread(variants.filter(pl.col("kind") == kind), best, kind, "sample") for kind in kinds
                        if variants.filter((pl.col("kind") == kind) & pl.col("sample").is_not_null()).height]}


def _spread(rows: pl.DataFrame, best: pl.DataFrame, kind: str, variant: str) -> dict:
    """One kind's paraphrases (variant = 'paraphrase') or samples ('sample'), per question and over the bank."""
    rows = rows.filter(pl.col(variant).is_not_null())
    flips = rows.group_by("question_id", "engram", variant).agg(flipped=pl.col("flipped").any(),
                                                                 wrong_before=(~pl.col("correct_before")).all())
    at_best = (rows.join(best, on="question_id")
               .filter((pl.col("layer") == pl.col("best_layer")) & (pl.col("strength") == pl.col("best_strength"))
                       & (pl.col("chunks") == pl.col("best_chunks"))))
    questions = []
    for (qid, engram), group in flips.sort("question_id", "engram", variant).group_by("question_id", "engram", maintain_order=True):
        effects = at_best.filter((pl.col("question_id") == qid) & (pl.col("engram") == engram))["log_improvement"]
        wrong = bool(group["wrong_before"].all())
        flipped = int(group["flipped"].sum())
        questions.append({
            "question_id": qid, "engram": engram, "variants": group.height, "baseline_wrong": wrong,
            "log_improvement_min": effects.min(), "log_improvement_median": effects.median(),
            "log_improvement_max": effects.max(), "flipped": flipped if wrong else None,
            "flip_share": flipped / group.height if wrong else None,
        })
    wrong = [q for q in questions if q["baseline_wrong"]]
    any_flip = [q for q in wrong if q["flipped"]]
    every_flip = [q for q in any_flip if q["flipped"] == q["variants"]]
    effects = at_best["log_improvement"]
    return {"kind": kind, "variant": variant, "questions": questions,
            "flip_with_any": len(any_flip), "flip_with_every": len(every_flip),
            "survives": rate(len(every_flip), len(any_flip)),
            "log_improvement_quantiles": None if effects.is_empty() else
            {str(q): effects.quantile(q, interpolation="linear") for q in (0.05, 0.5, 0.95)}}
