"""Report: results.parquet -> one summary of every number the report shows (polars aggregations)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from ..core.errors import EngramEvalError
from ..run.results import condition_label, primary_rows
from ..run.rundir import PART_CHECKSUMS, GenerationFiles, check_results_format, read_run_json, verify_file, verify_results
from .calibration import calibration_summary
from .controls import by_kind, conclusion, controls_summary, question_rates, subject, wrong_way
from .decision import decision_advice
from .dose import DEFAULT_DOSES, at_best_cell, dose_matched_summary, load_side_effects
from .evidence import cell_tests, effect_sizes, held_out_best_cell
from .experiments import attention_summary, chunk_count_summary, ensemble_comparison, generation_summary, rag_summary
from .run_summary import RunSummary
from .sink import load_answers, sink_summary
from .statistics import PairedTests, rate
from .variability import variability_summary


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
    if parts:
        for part in parts:
            verify_file(part, run.get(PART_CHECKSUMS, {}).get(part.name), run_dir / "run.json",
                        "rerun the sweep's command to compute it again")
    else:
        verify_results(run_dir, run)
    try:
        frame = pl.read_parquet(results if not parts else parts)
    except (OSError, ValueError, pl.exceptions.PolarsError) as exc:
        raise EngramEvalError(f"{results if not parts else run_dir / 'parts'}: cannot read ({exc})") from None
    if parts:
        run = {**run, "partial": {"questions_done": len(parts), "questions": len(run.get("settings", {}).get("questions", [])) or None}}
    return frame, run


def per_condition(frame: pl.DataFrame) -> pl.DataFrame:
    """The rows with each question labelled per context condition (results.condition_label)."""
    return frame.with_columns(condition_label())


def load_generations(run_dir: str | Path, ensembled: bool = False) -> pl.DataFrame | None:
    """RUN/generations.parquet when `engram-eval generate` has run (ensembled: RUN/generations-ensemble.parquet, from
    `generate --ensemble/--reextract`), else None."""
    files = GenerationFiles(Path(run_dir), plain=not ensembled)
    path, record = files.parquet, files.info
    if not path.is_file():
        return None
    try:
        info = json.loads(record.read_text())
    except (OSError, ValueError):
        info = {}
    verify_file(path, info.get("generations_sha256") if isinstance(info, dict) else None, record,
                "rerun `engram-eval generate` with the same options to merge it again")
    try:
        return pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise EngramEvalError(f"{path}: cannot read ({exc})") from None


def _flip_kinds() -> dict[str, pl.Expr]:
    """Flips, partitioned: collapsed when both answers' probability drained away, else p(correct) fell when the ratio
    only moved because p_incorrect fell faster, else clean (p_correct rose and the answers kept their mass)."""
    flipped, collapsed, rose = pl.col("flipped"), pl.col("collapsed"), pl.col("p_correct_rose")
    return {
        "flips": flipped.sum(),
        "clean_flips": (flipped & ~collapsed & rose).sum(),
        "flips_p_correct_fell": (flipped & ~collapsed & ~rose).sum(),
        "flips_collapsed": (flipped & collapsed).sum(),
    }


def _questions(frame: pl.DataFrame, off: dict[str, str]) -> list[dict]:
    relevant = frame.filter(pl.col("role") == "relevant")
    best = (
        relevant.sort(["question_id", "ratio", "chunks", "layer", "strength"], descending=[False, True, False, False, False])
        .group_by("question_id", maintain_order=True)
        .first()
        .select("question_id", best_layer="layer", best_strength="strength", best_chunks="chunks", best_ratio="ratio",
                best_p_correct="p_correct", best_p_incorrect="p_incorrect", best_mass_ratio="mass_ratio")
    )
    counts = relevant.group_by("question_id").agg(
        **_flip_kinds(), breaks=pl.col("broken").sum(), cases=pl.col("case").value_counts(sort=True),
        anti_steerable=wrong_way().mean(),
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
                "off_distribution": off.get(row["question_id"]),
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
                "anti_steerable": row["anti_steerable"],
                "cases": {c["case"]: c["count"] for c in row["cases"] or []},
                "decision": decision_advice(row["baseline_ratio"], row["related_wrong"], walk, row["best_layer"]),
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
        flipping=pl.col("question_id").filter(pl.col("flipped")).unique().sort(),
        breaking=pl.col("question_id").filter(pl.col("broken")).unique().sort(),
    )
    lookup = {(r["layer"], r["strength"]): r for r in grouped.iter_rows(named=True)}
    grid = [[lookup[(layer, strength)] for strength in strengths] for layer in layers]  # every question has every cell
    return {
        "layers": layers,
        "strengths": strengths,
        "chunks": chunks,
        "flip": [[{**rate(c["flips"], c["wrong"]), "questions": c["flipping"]} for c in row] for row in grid],
        "break": [[{**rate(c["breaks"], c["correct"]), "questions": c["breaking"]} for c in row] for row in grid],
    }


def _headline(relevant: pl.DataFrame, heatmaps: list[dict]) -> dict:
    cells = [
        (flip["rate"] or 0.0, -(brk["rate"] or 0.0), -(heatmap["chunks"] or 0), layer, strength, heatmap["chunks"], flip, brk)
        for heatmap in heatmaps
        for layer, flip_row, break_row in zip(heatmap["layers"], heatmap["flip"], heatmap["break"])
        for strength, flip, brk in zip(heatmap["strengths"], flip_row, break_row)
    ]
    best = max(cells, key=lambda c: (c[0], c[1], c[2], -c[3], -c[4])) if cells else None
    return {
        **question_rates(relevant),
        "best_cell": None if best is None else {"layer": best[3], "strength": best[4], "chunks": best[5],
                                                "flip_rate": best[6], "break_rate": best[7]},
    }


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


def summarize(run: str | Path | pl.DataFrame, run_json: dict | None = None, engram_role: str = "relevant",
              generations: pl.DataFrame | None = None, split: int | None = None, side_effects: pl.DataFrame | None = None,
              doses: tuple[float, ...] = DEFAULT_DOSES, ladder: list[tuple[str, pl.DataFrame, dict]] = (),
              ensembled: pl.DataFrame | None = None, answers: pl.DataFrame | None = None) -> RunSummary:
    """Every number the report shows, computed once, as a typed RunSummary; all formats render it.

    run: a run directory (its results, run.json, generations, neutral probe and answers are read from it, as
    `engram-eval report RUN` does), or a results frame with its run.json as run_json and the other tables passed
    in. split: pick the best cell on a random half of the questions (this seed) and report its rates on the other half.
    side_effects: the neutral probe's rows (RUN/side_effects.parquet), the dose of the dose-matched comparison at these
    target doses (else each row's kl_next). ladder: other runs of the bank (label, frame, run.json) whose engrams join
    the RAG section's ladder. ensembled: `generate --ensemble/--reextract`'s texts, compared with the plain ones on the
    cells both generated (and the generation section's own when there are no plain ones). answers: RUN/answers.parquet
    (sink.load_answers), for the semantic sink measured per answer."""
    if not isinstance(run, pl.DataFrame):
        frame, run_json = load_run(run)
        return summarize(frame, run_json, engram_role, load_generations(run), split, load_side_effects(run, run_json), doses,
                         ladder, load_generations(run, ensembled=True), load_answers(run, run_json))
    frame, run = run, run_json or {}
    if frame.is_empty():
        raise EngramEvalError("results.parquet holds no rows")
    variability = variability_summary(per_condition(frame))
    frame = frame.filter(primary_rows())  # other paraphrases and samples: the variability section's alone
    rag = rag_summary(frame, run, [(label, other.filter(primary_rows()), info) for label, other, info in ladder])
    question_count = frame["question_id"].n_unique()
    frame = per_condition(frame)
    tests = PairedTests()  # every sign-flip test of the summary, one batch of sign patterns
    tested = controls_summary(frame, tests)
    dose_matched = dose_matched_summary(frame, run, side_effects, doses, tests)
    sink = sink_summary(answers, frame, side_effects, doses, tests)
    tests.run()
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
    headline = _headline(relevant, list(relevant_maps.values()))
    texts = generations if generations is not None else ensembled  # the generation section's: plain ones when there are
    return RunSummary.build({
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
            "questions": question_count,
            "conditions": frame["question_id"].n_unique(),  # a question with and without its context is two
            "duration_seconds": run.get("timings", {}).get("total_seconds"),
            "status": run.get("status", "unknown"),
            "partial": run.get("partial"),
            "settings_max_tokens": settings.get("max_tokens"),
            "largest_chunk_share": run.get("largest_chunk_share", {}),
            "off_distribution": run.get("off_distribution", {}),
            "subject": subject(run),
        },
        "questions": _questions(frame, run.get("off_distribution", {})),
        "heatmaps": heatmaps,
        "headline": {**headline, "by_kind": by_kind(frame, tested, at_best_cell(frame, side_effects, headline["best_cell"])),
                     "conclusion": conclusion(tested, subject(run)), "side_effect_measure": "kl_next" if side_effects is None else "neutral_kl"},
        "chunk_count": chunk_count_summary(frame, run, chunks) if len(chunks) > 1 else None,
        "tests": cell_tests(frame),
        "effects": {f"k={k}" if k is not None else "all": effect_sizes(frame, layers, strengths, k) for k, _ in grid},
        "split": None if split is None else held_out_best_cell(frame, split),
        "attention": attention_summary(frame),
        "controls": tested,
        "dose_matched": dose_matched,
        "semantic_sink": _semantic_sink(relevant),
        "sink": sink,
        "calibration": calibration_summary(frame),
        "generation": None if texts is None else generation_summary(texts),
        "ensemble_comparison": None if generations is None or ensembled is None else ensemble_comparison(generations, ensembled),
        "rag": rag,
        "variability": variability,
    }, frame)
