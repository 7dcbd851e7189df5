"""The seeds' other experiments, summarized from a run: probability vs generated text, RAG priming, the chunk-count
table, and where the model looks (attention)."""

from __future__ import annotations

import polars as pl

from ..core.chunks import chunk_bounds
from ..core.errors import EngramEvalError
from ..run.results import engram_kind
from .statistics import bootstrap_mean_ci, mcnemar_exact, rate, too_few_questions

CELL_KEYS = ("layer", "strength", "chunks")  # a cell of a question: what pairs a control with the relevant engram


def kind_order(kind: str) -> tuple[int, str]:
    """Engram kinds in report order: the baseline, the relevant engram, then the control kinds by name."""
    return {"baseline": 0, "relevant": 1}.get(kind, 2), kind


def cell_label(row: dict) -> str:
    context = "" if row.get("context") is None else " with context" if row["context"] else " without context"
    if row["role"] == "baseline":
        return "baseline" + context
    return f"{row['engram']} L{row['layer']} x{row['strength']:g}" + (f",{context}" if context else "")


def generation_summary(generations: pl.DataFrame, examples: int = 4) -> dict:
    """Probability verdict (ratio > 1) against the text's verdict; per engram kind (the baseline, the relevant engram,
    each control kind), how often the text says the correct answer first, over all its rows and over its flipped
    cells (the seed's "generation flips"), and how often the probability calls it correct."""
    probability = (pl.when(pl.col("ratio") > 1).then(pl.lit("correct")).when(pl.col("ratio") < 1).then(pl.lit("incorrect"))
                   .otherwise(pl.lit("tie")))
    table = generations.with_columns(probability=probability).with_columns(engram_kind())
    confusion = {p: {v: 0 for v in ("correct", "incorrect", "both", "neither")} for p in ("correct", "incorrect", "tie")}
    for row in table.group_by("probability", "verdict").len().iter_rows(named=True):
        confusion[row["probability"]][row["verdict"]] = row["len"]
    flipped = table.filter(pl.col("flipped").fill_null(False))
    baseline = table.filter(pl.col("role") == "baseline")
    shown = pl.concat([flipped.head(examples // 2), baseline.head(examples - min(examples // 2, flipped.height))])
    kinds = sorted(table["kind"].unique().to_list(), key=kind_order)
    return {
        "cells": generations.height,
        "confusion": confusion,
        "by_kind": [_generation_kind(table.filter(pl.col("kind") == kind), kind) for kind in kinds],
        "examples": [{"question_id": r["question_id"], "cell": cell_label(r), "verdict": r["verdict"], "text": r["text"][:120]}
                     for r in shown.iter_rows(named=True)],
        "texts": [{"question_id": r["question_id"], "cell": cell_label(r), "ratio": r["ratio"], "verdict": r["verdict"],
                   "first_answer": r["first_answer"], "text": r["text"]} for r in table.iter_rows(named=True)],
    }


GENERATED_CELL = ("question_id", "role", "engram", "layer", "strength", "chunks", "context")  # one generated text


def ensemble_comparison(plain: pl.DataFrame, ensembled: pl.DataFrame) -> dict:
    """Plain greedy texts against ensembled ones (`generate --ensemble/--reextract`) on the cells both generated: per
    engram kind, how many texts differ and how often each says the correct answer first."""
    first = ensembled.row(0, named=True)
    joined = (plain.select(*GENERATED_CELL, "control_kind", "text", "first_answer")
              .join(ensembled.select(*GENERATED_CELL, text_ensembled="text", first_answer_ensembled="first_answer"),
                    on=GENERATED_CELL, how="inner", nulls_equal=True)
              .with_columns(engram_kind()))
    kinds = sorted(joined["kind"].unique().to_list(), key=kind_order)
    by_kind = []
    for kind in kinds:
        rows = joined.filter(pl.col("kind") == kind)
        by_kind.append({"kind": kind, "cells": rows.height,
                        "texts_differ": int((rows["text"] != rows["text_ensembled"]).sum()),
                        "plain_says_correct_first": rate(int((rows["first_answer"] == "correct").sum()), rows.height),
                        "ensembled_says_correct_first": rate(int((rows["first_answer_ensembled"] == "correct").sum()), rows.height)})
    return {"ensemble": first["ensemble"], "ensemble_decay": first["ensemble_decay"], "reextract": first["reextract"],
            "cells": joined.height, "by_kind": by_kind}


def _generation_kind(rows: pl.DataFrame, kind: str) -> dict:
    flipped = rows.filter(pl.col("flipped").fill_null(False))
    says_correct = pl.col("first_answer") == "correct"
    return {
        "kind": kind,
        "rows": rows.height,
        "says_correct_first": rate(int(rows.select(says_correct.sum()).item()), rows.height),
        "flipped_says_correct_first": None if kind == "baseline" else rate(int(flipped.select(says_correct.sum()).item()), flipped.height),
        "probability_correct": rate(int((rows["probability"] == "correct").sum()), rows.height),
    }


def rag_summary(frame: pl.DataFrame, run: dict | None = None, ladder: list[tuple[str, pl.DataFrame, dict]] = ()) -> dict | None:
    """With and without the retrieved context, with and without the engram: accuracy (share of questions correct) of
    the four conditions at the best cell for engram + context (chosen after looking) and at strength 1.0, and an exact
    McNemar test of engram + context against context alone over the same questions. Beside it the ladder (rag_ladder),
    with the engram rungs of the `ladder` runs (label, frame, run.json) on the same questions."""
    both = frame.filter(pl.col("context").is_not_null()).group_by("question_id").agg(n=pl.col("context").n_unique())
    questions = both.filter(pl.col("n") == 2)["question_id"].to_list()
    if not questions:
        return None
    rows = frame.filter(pl.col("question_id").is_in(questions))
    baseline = {(r["question_id"], r["context"]): r["correct_before"] for r in rows.filter(pl.col("role") == "baseline").iter_rows(named=True)}
    relevant = rows.filter(pl.col("role") == "relevant")
    accuracy = (relevant.filter(pl.col("context")).group_by("layer", "strength").agg(correct=pl.col("correct_after").sum())
                .sort(["correct", "layer", "strength"], descending=[True, False, False]))
    chosen = {"best cell (chosen after looking)": accuracy.row(0, named=True)}
    at_one = accuracy.filter(pl.col("strength") == 1.0)
    if at_one.height:
        chosen["strength 1.0 (its best layer)"] = at_one.row(0, named=True)
    conditions = []
    for label, cell in chosen.items():
        at = {(r["question_id"], r["context"]): r["correct_after"] for r in relevant.filter(
            (pl.col("layer") == cell["layer"]) & (pl.col("strength") == cell["strength"])).iter_rows(named=True)}
        engram_context_only = sum(at[(q, True)] and not baseline[(q, True)] for q in questions)
        context_only = sum(baseline[(q, True)] and not at[(q, True)] for q in questions)
        conditions.append({
            "cell": label, "layer": cell["layer"], "strength": cell["strength"],
            "no engram": rate(sum(baseline[(q, False)] for q in questions), len(questions)),
            "engram only": rate(sum(at[(q, False)] for q in questions), len(questions)),
            "context only": rate(sum(baseline[(q, True)] for q in questions), len(questions)),
            "engram + context": rate(sum(at[(q, True)] for q in questions), len(questions)),
            "engram_context_only": engram_context_only, "context_only": context_only,
            "p_value": mcnemar_exact(engram_context_only, context_only),
        })
    return {"questions": len(questions), "conditions": conditions, "ladder": rag_ladder(frame, run or {}, questions, ladder)}


def rag_ladder(frame: pl.DataFrame, run: dict, questions: list[str], others: list[tuple[str, pl.DataFrame, dict]]) -> list[dict]:
    """From nothing to the text itself, without the retrieved context unless the rung says so: the baseline, the
    best null-prefix cell (content-free vectors), the best cell of this run's engram and of each other run's (its
    pooling: mean, learned, ...), and the context in the prompt with no engram. Best cells are chosen after looking
    (the most questions correct); every rung counts the same questions."""
    def without_context(rows: pl.DataFrame) -> pl.DataFrame:
        return rows.filter((pl.col("context") == False) & pl.col("question_id").is_in(questions))  # noqa: E712

    rows = without_context(frame)
    baseline = frame.filter((pl.col("role") == "baseline") & pl.col("question_id").is_in(questions))
    rungs = [{"rung": "no engram", "cell": None, **rate(int(rows.filter(pl.col("role") == "baseline")["correct_before"].sum()), len(questions))}]
    nulls = rows.filter((pl.col("role") == "control") & pl.col("engram_key").is_null())  # null prefixes have no store key
    if not nulls.is_empty():
        rungs.append(_best_rung("null prefix", nulls, len(questions)))
    for label, other, other_run in [("this run", frame, run), *others]:
        engram = without_context(other).filter(pl.col("role") == "relevant")
        missing = set(questions) - set(engram["question_id"].unique().to_list())
        if missing:
            raise EngramEvalError(f"--ladder {label}: lacks questions {', '.join(sorted(missing)[:3])} of this run's with a context")
        pooling = (other_run.get("settings") or {}).get("pooling", "mean")
        rungs.append(_best_rung(f"{pooling} engram ({label})", engram, len(questions)))
    rungs.append({"rung": "context in the prompt, no engram", "cell": None,
                  **rate(int(baseline.filter(pl.col("context"))["correct_before"].sum()), len(questions))})
    return rungs


def _best_rung(name: str, cells: pl.DataFrame, questions: int) -> dict:
    best = (cells.group_by("engram", "layer", "strength", "chunks").agg(correct=pl.col("correct_after").sum())
            .sort(["correct", "engram", "layer", "strength"], descending=[True, False, False, False]).row(0, named=True))
    return {"rung": name, "cell": f"{best['engram']} L{best['layer']} x{best['strength']:g}", **rate(int(best["correct"]), questions)}


def attention_summary(frame: pl.DataFrame) -> list[dict] | None:
    """With --record-attention: per engram kind (the baseline included, for comparison), the mean share of the last
    prompt position's attention on the k engram positions (or the first k prompt positions) and on position 0."""
    recorded = frame.filter(pl.col("attn_prefix_share").is_not_null())
    if recorded.is_empty():
        return None
    kinds = recorded.with_columns(engram_kind())
    grouped = kinds.group_by("kind").agg(rows=pl.len(), attn_prefix_share=pl.col("attn_prefix_share").mean(),
                                         attn_first_share=pl.col("attn_first_share").mean())
    return sorted(grouped.iter_rows(named=True), key=lambda r: kind_order(r["kind"]))


def tokens_per_chunk(n_tokens: int, chunks: int) -> tuple[int, int]:
    """(smallest, largest) tokens in one chunk under the seed rule: chunks of n // k, the remainder in the last; with
    n < k, one token each (the rest repeat the last token)."""
    sizes = [end - start for start, end in chunk_bounds(n_tokens, chunks)]
    return min(sizes), max(sizes)


def chunk_count_summary(frame: pl.DataFrame, run: dict, chunks: list[int]) -> list[dict]:
    """The seed's chunk-count table, per k: tokens per chunk actually used, the relevant engram's mean log-improvement
    (bootstrap interval over questions), the difference signal relevant vs anti, and "directional steering": the share
    of cells where the relevant engram's ratio beats the anti engram's (YES above half, inverted below; with too few
    questions for any paired test to decide, as the controls table says, it says so instead)."""
    settings = run.get("settings", {})
    pooled = [n - settings.get("skip_tokens", 0) for n in run.get("engram_tokens", {}).values()]
    signals = run.get("anti_difference_signal", [])
    relevant = frame.filter(pl.col("role") == "relevant")
    anti = frame.filter(pl.col("control_kind") == "anti").join(
        relevant.select("question_id", *CELL_KEYS, rel_ratio="ratio"), on=["question_id", *CELL_KEYS])
    rows = []
    for k in chunks:
        per_question = relevant.filter(pl.col("chunks") == k).group_by("question_id").agg(pl.col("log_improvement").mean())
        values = per_question["log_improvement"].to_list()
        sizes = [tokens_per_chunk(n, k) for n in pooled] if settings.get("pooling", "mean") == "mean" else []
        at_k = anti.filter(pl.col("chunks") == k)
        beats = int((at_k["rel_ratio"] > at_k["ratio"]).sum())
        signal = [s["difference_signal"] for s in signals if s["chunks"] == k]
        share = beats / at_k.height if at_k.height else None
        questions = at_k["question_id"].n_unique()
        too_few = too_few_questions(questions)  # the controls table's rule
        rows.append({
            "chunks": k,
            "tokens_per_chunk": [min(a for a, _ in sizes), max(b for _, b in sizes)] if sizes else None,
            "mean_log_improvement": sum(values) / len(values) if values else None,
            "mean_log_improvement_ci95": bootstrap_mean_ci(values),
            "anti_difference_signal": sum(signal) / len(signal) if signal else None,
            "directional": {"k": beats, "n": at_k.height, "share": share, "questions": questions,
                            "verdict": None if share is None else f"too few questions to tell (n = {questions})" if too_few
                            else "YES" if share > 0.5 else "inverted" if share < 0.5 else "tied"},
        })
    return rows
