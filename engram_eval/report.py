"""Report: results.parquet -> one summary of every number the report shows (polars aggregations)."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from .errors import EngramEvalError
from .rundir import check_results_format, read_run_json
from .statistics import bootstrap_mean_ci, mcnemar_exact, rate, sign_flip_test, verdict

DECISION_STRENGTHS = (1.0, 5.0, 10.0, 15.0, 20.0)
CELL_KEYS = ("layer", "strength", "chunks")  # a cell of a question: what pairs a control with the relevant engram


def load_run(run_dir: str | Path) -> tuple[pl.DataFrame, dict]:
    """A run's rows and run.json. An unfinished run (no results.parquet yet) gives the questions finished so far,
    from its part files, with run["partial"] = {"questions_done", "questions"}."""
    run_dir = Path(run_dir)
    run = read_run_json(run_dir) or {}
    if run:
        check_results_format(run_dir, run)
    results = run_dir / "results.parquet"
    parts = sorted((run_dir / "parts").glob("*.parquet")) if not results.is_file() else []
    if not results.is_file() and not parts:
        raise EngramEvalError(f"{run_dir}: no results.parquet (run `engram-eval sweep` with --out {run_dir} first)")
    try:
        frame = pl.read_parquet(results if not parts else parts)
    except (OSError, ValueError, pl.exceptions.PolarsError) as exc:
        raise EngramEvalError(f"{results if not parts else run_dir / 'parts'}: cannot read ({exc})") from None
    if parts:
        run = {**run, "partial": {"questions_done": len(parts), "questions": len(run.get("settings", {}).get("questions", [])) or None}}
    return frame, run


def per_condition(frame: pl.DataFrame) -> pl.DataFrame:
    """A question run with and without its retrieved context is two units of analysis, labelled as such:
    `capital_france +context`, `capital_france -context` (questions without a context keep their id)."""
    suffix = pl.when(pl.col("context")).then(pl.lit(" +context")).otherwise(pl.lit(" -context"))
    return frame.with_columns(question_id=pl.when(pl.col("context").is_null()).then(pl.col("question_id"))
                              .otherwise(pl.col("question_id") + suffix))


def load_generations(run_dir: str | Path) -> pl.DataFrame | None:
    """RUN/generations.parquet when `engram-eval generate` has run, else None."""
    path = Path(run_dir) / "generations.parquet"
    if not path.is_file():
        return None
    try:
        return pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise EngramEvalError(f"{path}: cannot read ({exc})") from None


def cell_label(row: dict) -> str:
    if row["role"] == "baseline":
        return "baseline" + ("" if row.get("context") is None else " with context" if row["context"] else " without context")
    context = "" if row.get("context") is None else ", with context" if row["context"] else ", without context"
    return f"{row['engram']} L{row['layer']} x{row['strength']:g}{context}"


def _generation(generations: pl.DataFrame, examples: int = 4) -> dict:
    """Probability verdict (ratio > 1) against the text's verdict; for flipped cells and baseline rows, how often the
    text says the correct answer first (the seed's "generation flips")."""
    probability = (pl.when(pl.col("ratio") > 1).then(pl.lit("correct")).when(pl.col("ratio") < 1).then(pl.lit("incorrect"))
                   .otherwise(pl.lit("tie")))
    table = generations.with_columns(probability=probability)
    confusion = {p: {v: 0 for v in ("correct", "incorrect", "both", "neither")} for p in ("correct", "incorrect", "tie")}
    for row in table.group_by("probability", "verdict").len().iter_rows(named=True):
        confusion[row["probability"]][row["verdict"]] = row["len"]
    flipped = table.filter(pl.col("flipped").fill_null(False))
    baseline = table.filter(pl.col("role") == "baseline")
    shown = pl.concat([flipped.head(examples // 2), baseline.head(examples - min(examples // 2, flipped.height))])
    return {
        "cells": generations.height,
        "confusion": confusion,
        "flipped_says_correct_first": rate(int((flipped["first_answer"] == "correct").sum()), flipped.height),
        "baseline_says_correct_first": rate(int((baseline["first_answer"] == "correct").sum()), baseline.height),
        "baseline_probability_correct": rate(int((baseline["probability"] == "correct").sum()), baseline.height),
        "examples": [{"question_id": r["question_id"], "cell": cell_label(r), "verdict": r["verdict"], "text": r["text"][:120]}
                     for r in shown.iter_rows(named=True)],
        "texts": [{"question_id": r["question_id"], "cell": cell_label(r), "ratio": r["ratio"], "verdict": r["verdict"],
                   "first_answer": r["first_answer"], "text": r["text"]} for r in table.iter_rows(named=True)],
    }


def _rag(frame: pl.DataFrame) -> dict | None:
    """With and without the retrieved context, with and without the engram: accuracy (share of questions correct) of
    the four conditions at the best cell for engram + context (chosen after looking) and at strength 1.0, and an exact
    McNemar test of engram + context against context alone over the same questions."""
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
    return {"questions": len(questions), "conditions": conditions}


def decision_advice(baseline_ratio: float, related_wrong: bool | None, walk: list[tuple[float, float]], layer: int | None) -> str:
    """The practical guide's decision rule; `walk` is (strength, ratio) at the question's best layer."""
    if baseline_ratio > 10:
        advice = "confident and correct: don't use an engram"
    elif baseline_ratio > 1:
        advice = "correct, not confident: strength 1.0"
    elif baseline_ratio == 1:
        advice = "tie at baseline: first-token scoring cannot decide"
    else:
        searched = [(s, r) for s, r in walk if s in DECISION_STRENGTHS]
        advice = "wrong: search strengths 1-20 (none of them in this grid)"
        best = 0.0
        for strength, ratio in searched:
            if ratio > 1:
                advice = f"wrong: flips at layer {layer}, strength {strength:g}"
                break
            if ratio < 0.8 * best:
                advice = f"wrong: stop at strength {strength:g} (ratio falling), no flip at layer {layer}"
                break
            best = max(best, ratio)
        else:
            if searched:
                advice = f"wrong: no flip up to strength {searched[-1][0]:g} at layer {layer}"
    if related_wrong:
        advice += "; wrong answer is topic-related, engram likely hurts"
    return advice


def _flip_kinds() -> dict[str, pl.Expr]:
    """A flip is clean when p_correct rose and the answers kept their probability mass; the others only moved the
    ratio because p_incorrect fell faster, or because both answers' probability drained away (collapse)."""
    flipped = pl.col("flipped")
    return {
        "flips": flipped.sum(),
        "clean_flips": (flipped & pl.col("p_correct_rose") & ~pl.col("collapsed")).sum(),
        "flips_p_correct_fell": (flipped & ~pl.col("p_correct_rose")).sum(),
        "flips_collapsed": (flipped & pl.col("collapsed")).sum(),
    }


def _questions(frame: pl.DataFrame) -> list[dict]:
    relevant = frame.filter(pl.col("role") == "relevant")
    best = (
        relevant.sort(["question_id", "ratio", "chunks", "layer", "strength"], descending=[False, True, False, False, False])
        .group_by("question_id", maintain_order=True)
        .first()
        .select("question_id", best_layer="layer", best_strength="strength", best_chunks="chunks", best_ratio="ratio",
                best_p_correct="p_correct", best_p_incorrect="p_incorrect", best_mass_ratio="mass_ratio")
    )
    counts = relevant.group_by("question_id").agg(
        **_flip_kinds(), breaks=pl.col("broken").sum(), cases=pl.col("case").value_counts(sort=True)
    )
    base = frame.filter(pl.col("role") == "baseline").select(
        "question_id", "baseline_ratio", "correct_before", "related_wrong", "p_correct", "p_incorrect"
    )
    table = base.join(best, on="question_id", how="left").join(counts, on="question_id", how="left")
    walks = (
        relevant.join(best, on="question_id")
        .filter((pl.col("layer") == pl.col("best_layer")) & (pl.col("chunks") == pl.col("best_chunks")))
        .sort("strength")
        .group_by("question_id")
        .agg(walk=pl.struct("strength", "ratio"))
    )
    table = table.join(walks, on="question_id", how="left")
    rows = []
    for row in table.iter_rows(named=True):
        walk = [(w["strength"], w["ratio"]) for w in row["walk"] or []]
        improves = row["best_ratio"] is not None and row["best_ratio"] > row["baseline_ratio"]
        rows.append(
            {
                "question_id": row["question_id"],
                "baseline_ratio": row["baseline_ratio"],
                "baseline_p_correct": row["p_correct"],
                "baseline_p_incorrect": row["p_incorrect"],
                "correct_before": row["correct_before"],
                "related_wrong": row["related_wrong"],
                "best": {"layer": row["best_layer"], "strength": row["best_strength"], "chunks": row["best_chunks"], "ratio": row["best_ratio"],
                         "p_correct": row["best_p_correct"], "p_incorrect": row["best_p_incorrect"],
                         "mass_ratio": row["best_mass_ratio"], "improves_on_baseline": improves},
                **{kind: row[kind] or 0 for kind in _flip_kinds()},
                "breaks": row["breaks"] or 0,
                "cases": {c["case"]: c["count"] for c in row["cases"] or []},
                "advice": decision_advice(row["baseline_ratio"], row["related_wrong"], walk, row["best_layer"]),
            }
        )
    return rows


def _heatmap(cells: pl.DataFrame, layers: list[int], strengths: list[float], chunks: int | None = None) -> dict:
    """Per (layer, strength), at one k when the run has several: flips over baseline-wrong questions, breaks over
    baseline-correct questions."""
    if chunks is not None:
        cells = cells.filter(pl.col("chunks") == chunks)
    grouped = cells.group_by("layer", "strength").agg(
        flips=pl.col("flipped").sum(),
        wrong=(~pl.col("correct_before")).sum(),
        breaks=pl.col("broken").sum(),
        correct=pl.col("correct_before").sum(),
    )
    lookup = {(r["layer"], r["strength"]): r for r in grouped.iter_rows(named=True)}
    empty = {"flips": 0, "wrong": 0, "breaks": 0, "correct": 0}
    grid = [[lookup.get((layer, strength), empty) for strength in strengths] for layer in layers]
    return {
        "layers": layers,
        "strengths": strengths,
        "chunks": chunks,
        "flip": [[rate(c["flips"], c["wrong"]) for c in row] for row in grid],
        "break": [[rate(c["breaks"], c["correct"]) for c in row] for row in grid],
    }


def _headline(relevant: pl.DataFrame, heatmaps: list[dict]) -> dict:
    per_question = relevant.group_by("question_id").agg(
        wrong=~pl.col("correct_before").first(), correct=pl.col("correct_before").first(),
        flips=pl.col("flipped").any(), breaks=pl.col("broken").any(),
        clean_flips=(pl.col("flipped") & pl.col("p_correct_rose") & ~pl.col("collapsed")).any(),
    )
    wrong = per_question.filter(pl.col("wrong"))
    correct = per_question.filter(pl.col("correct"))
    cells = [
        (flip["rate"] or 0.0, -(brk["rate"] or 0.0), -(heatmap["chunks"] or 0), layer, strength, heatmap["chunks"], flip, brk)
        for heatmap in heatmaps
        for layer, flip_row, break_row in zip(heatmap["layers"], heatmap["flip"], heatmap["break"])
        for strength, flip, brk in zip(heatmap["strengths"], flip_row, break_row)
    ]
    best = max(cells, key=lambda c: (c[0], c[1], c[2], -c[3], -c[4])) if cells else None
    return {
        "question_flip_rate": rate(int(wrong["flips"].sum()), wrong.height),
        "question_clean_flip_rate": rate(int(wrong["clean_flips"].sum()), wrong.height),
        "question_fragile_correct_rate": rate(int(correct["breaks"].sum()), correct.height),
        "best_cell": None if best is None else {"layer": best[3], "strength": best[4], "chunks": best[5],
                                                "flip_rate": best[6], "break_rate": best[7]},
    }


def _controls(frame: pl.DataFrame) -> list[dict]:
    relevant = frame.filter(pl.col("role") == "relevant").select(
        "question_id", *CELL_KEYS, rel_log=pl.col("log_improvement"), rel_flip="flipped", rel_break="broken",
        rel_ratio="ratio", wrong=~pl.col("correct_before")
    )
    controls = frame.filter(pl.col("role") == "control")
    rows = []
    for kind in sorted(controls["control_kind"].unique().drop_nulls().to_list()):
        paired = controls.filter(pl.col("control_kind") == kind).join(relevant, on=["question_id", *CELL_KEYS])
        per_question = (
            paired.group_by("question_id", maintain_order=True)
            .agg(difference=(pl.col("rel_log") - pl.col("log_improvement")).mean())
            .sort("question_id")
        )
        differences = per_question["difference"].to_list()
        mean_difference = sum(differences) / len(differences) if differences else None
        p_value = sign_flip_test(differences)
        wrong_cells = paired.filter(pl.col("wrong"))
        adjusted = (wrong_cells["rel_flip"].cast(pl.Int64) - wrong_cells["flipped"].cast(pl.Int64)).sum()
        rows.append(
            {
                "kind": kind,
                "questions": len(differences),
                "cells": paired.height,
                "mean_log_improvement_relevant": paired["rel_log"].mean(),
                "mean_log_improvement_control": paired["log_improvement"].mean(),
                "flips_relevant": int(paired["rel_flip"].sum()),
                "flips_control": int(paired["flipped"].sum()),
                "breaks_relevant": int(paired["rel_break"].sum()),
                "breaks_control": int(paired["broken"].sum()),
                "mean_difference": mean_difference,
                "p_value": p_value,
                "verdict": verdict(mean_difference, p_value, len(differences)),
                "adjusted_flip_rate": adjusted / wrong_cells.height if wrong_cells.height else None,
                "adjusted_flips": int(adjusted),
                "baseline_wrong_cells": wrong_cells.height,
            }
        )
    return rows


def _attention(frame: pl.DataFrame) -> list[dict] | None:
    """With --record-attention: per engram kind (the baseline included, for comparison), the mean share of the last
    prompt position's attention on the k engram positions (or the first k prompt positions) and on position 0."""
    recorded = frame.filter(pl.col("attn_prefix_share").is_not_null())
    if recorded.is_empty():
        return None
    kinds = recorded.with_columns(kind=pl.coalesce(pl.col("control_kind"), pl.col("role")))
    grouped = kinds.group_by("kind").agg(rows=pl.len(), prefix=pl.col("attn_prefix_share").mean(), first=pl.col("attn_first_share").mean())
    order = {"baseline": 0, "relevant": 1}
    return [{"kind": r["kind"], "rows": r["rows"], "attn_prefix_share": r["prefix"], "attn_first_share": r["first"]}
            for r in sorted(grouped.iter_rows(named=True), key=lambda r: (order.get(r["kind"], 2), r["kind"]))]


def tokens_per_chunk(n_tokens: int, chunks: int) -> tuple[int, int]:
    """(smallest, largest) tokens in one chunk under the seed rule: chunks of n // k, the remainder in the last; with
    n < k, one token each (the rest repeat the last token)."""
    if n_tokens < chunks:
        return 1, 1
    size = n_tokens // chunks
    return size, n_tokens - (chunks - 1) * size


def _chunk_count(frame: pl.DataFrame, run: dict, chunks: list[int]) -> list[dict]:
    """The seed's chunk-count table, per k: tokens per chunk actually used, the relevant engram's mean log-improvement
    (bootstrap interval over questions), the difference signal relevant vs anti, and "directional steering": the share
    of cells where the relevant engram's ratio beats the anti engram's (YES above half, inverted below)."""
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
        rows.append({
            "chunks": k,
            "tokens_per_chunk": [min(a for a, _ in sizes), max(b for _, b in sizes)] if sizes else None,
            "mean_log_improvement": sum(values) / len(values) if values else None,
            "mean_log_improvement_ci95": bootstrap_mean_ci(values),
            "anti_difference_signal": sum(signal) / len(signal) if signal else None,
            "directional": {"k": beats, "n": at_k.height, "share": share,
                            "verdict": None if share is None else "YES" if share > 0.5 else "inverted" if share < 0.5 else "tied"},
        })
    return rows


def _semantic_sink(relevant: pl.DataFrame) -> list[dict]:
    grouped = relevant.group_by("related_wrong").agg(
        questions=pl.col("question_id").n_unique(),
        flips=pl.col("flipped").sum(), wrong=(~pl.col("correct_before")).sum(),
        breaks=pl.col("broken").sum(), correct=pl.col("correct_before").sum(),
    ).sort("related_wrong", nulls_last=True)
    return [
        {
            "related_wrong": row["related_wrong"],
            "questions": row["questions"],
            "flip": rate(row["flips"], row["wrong"]),
            "break": rate(row["breaks"], row["correct"]),
        }
        for row in grouped.iter_rows(named=True)
    ]


def summarize(frame: pl.DataFrame, run: dict, engram_role: str = "relevant", generations: pl.DataFrame | None = None) -> dict:
    """Every number the report shows, computed once; all formats render this."""
    if frame.is_empty():
        raise EngramEvalError("results.parquet holds no rows")
    rag = _rag(frame)
    frame = per_condition(frame)
    settings = run.get("settings", {})
    cells = frame.filter(pl.col("role") != "baseline")
    layers = sorted(cells["layer"].unique().drop_nulls().to_list())
    strengths = sorted(cells["strength"].unique().drop_nulls().to_list())
    chunks = sorted(cells["chunks"].unique().drop_nulls().to_list())
    grid = [(None, "")] if len(chunks) == 1 else [(k, f" k={k}") for k in chunks]  # heatmaps per k in a chunk-count grid
    relevant = frame.filter(pl.col("role") == "relevant")
    relevant_maps = {f"relevant{suffix}": _heatmap(relevant, layers, strengths, k) for k, suffix in grid}
    heatmaps = dict(relevant_maps) if engram_role != "control" else {}
    if engram_role in ("control", "all"):
        controls = frame.filter(pl.col("role") == "control")
        for kind in sorted(controls["control_kind"].unique().drop_nulls().to_list()):
            for k, suffix in grid:
                heatmaps[f"{kind}{suffix}"] = _heatmap(controls.filter(pl.col("control_kind") == kind), layers, strengths, k)
    return {
        "header": {
            "run_id": frame["run_id"][0],
            "model": run.get("model_description") or frame["model"][0],
            "model_fingerprint": frame["model_fingerprint"][0][:12],
            "bank": frame["bank"][0],
            "layers": layers,
            "strengths": strengths,
            "chunks": chunks[0] if len(chunks) == 1 else chunks,
            "scoring": frame["scoring"][0],
            "injection": frame["injection"][0],
            "cells": frame.height,
            "questions": frame["question_id"].n_unique(),
            "duration_seconds": run.get("timings", {}).get("total_seconds"),
            "status": run.get("status", "unknown"),
            "partial": run.get("partial"),
            "settings_max_tokens": settings.get("max_tokens"),
            "largest_chunk_share": run.get("largest_chunk_share", {}),
        },
        "questions": _questions(frame),
        "heatmaps": heatmaps,
        "headline": _headline(relevant, list(relevant_maps.values())),
        "chunk_count": _chunk_count(frame, run, chunks) if len(chunks) > 1 else None,
        "attention": _attention(frame),
        "controls": _controls(frame),
        "semantic_sink": _semantic_sink(relevant),
        "generation": None if generations is None else _generation(generations),
        "rag": rag,
    }


def summarize_runs(runs: list[tuple[str, pl.DataFrame, dict]], allow_different_banks: bool = False) -> dict:
    """Several runs side by side (e.g. one bank on several models): per run its model, its layers as relative depth
    (layer / number of layers, so a 30-layer and a 28-layer model line up), baseline accuracy, question flip and
    fragile-correct rates, control verdicts, the relevant engram's heatmaps by depth, and its chunk-count table."""
    banks = {run.get("settings", {}).get("bank_sha256") for _, _, run in runs}
    if len(banks) > 1 and not allow_different_banks:
        described = ", ".join(f"{path} ({run.get('settings', {}).get('bank', '?')} {str(run.get('settings', {}).get('bank_sha256'))[:8]})"
                              for path, _, run in runs)
        raise EngramEvalError(f"report: the runs use different banks ({described}); pass --allow-different-banks to put them side by side")
    columns = []
    for path, frame, run in runs:
        if "num_layers" not in run:
            raise EngramEvalError(f"{path}: run.json has no num_layers (swept with an older engram-eval); sweep it again to compare it")
        summary = summarize(frame, run)
        base = per_condition(frame).filter(pl.col("role") == "baseline")
        depth = {layer: layer / run["num_layers"] for layer in summary["header"]["layers"]}
        columns.append({
            "run": str(path),
            "model": summary["header"]["model"],
            "bank": summary["header"]["bank"],
            "layers": summary["header"]["layers"],
            "depths": [round(depth[layer], 3) for layer in summary["header"]["layers"]],
            "baseline_accuracy": rate(int(base["correct_before"].sum()), base.height),
            "question_flip_rate": summary["headline"]["question_flip_rate"],
            "question_fragile_correct_rate": summary["headline"]["question_fragile_correct_rate"],
            "controls": {c["kind"]: {"verdict": c["verdict"], "p_value": c["p_value"], "mean_difference": c["mean_difference"]}
                         for c in summary["controls"]},
            "heatmaps": {name: {**heatmap, "depths": [round(depth[layer], 3) for layer in heatmap["layers"]]}
                         for name, heatmap in summary["heatmaps"].items()},
            "chunk_count": summary["chunk_count"],
        })
    return {"runs": columns}
