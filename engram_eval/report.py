"""Report: results.parquet -> one summary (polars aggregations) -> table, markdown, json or html."""

from __future__ import annotations

import base64
import html
import io
import itertools
import json
import math
import random
from pathlib import Path

import polars as pl

from .errors import EngramEvalError

DECISION_STRENGTHS = (1.0, 5.0, 10.0, 15.0, 20.0)
ALPHA = 0.05


# ---------------------------------------------------------------- statistics


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float] | None:
    """95% Wilson score interval for a binomial proportion; None when n = 0."""
    if n == 0:
        return None
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


def sign_flip_test(differences: list[float], samples: int = 200_000) -> float | None:
    """Two-sided paired permutation test of mean(differences) = 0: exact over all 2^n sign flips for n <= 16,
    else a fixed-seed Monte Carlo estimate."""
    n = len(differences)
    if n == 0:
        return None
    observed = abs(sum(differences)) - 1e-12
    if n <= 16:
        signs = itertools.product((1, -1), repeat=n)
        hits = sum(abs(sum(s * d for s, d in zip(sign, differences))) >= observed for sign in signs)
        return hits / 2**n
    rng = random.Random(0)
    hits = sum(abs(sum(d if rng.random() < 0.5 else -d for d in differences)) >= observed for _ in range(samples))
    return (hits + 1) / (samples + 1)


def verdict(mean_difference: float | None, p_value: float | None) -> str:
    if p_value is None or mean_difference is None:
        return "no data"
    if p_value < ALPHA:
        return "relevant beats controls" if mean_difference > 0 else "controls beat relevant"
    return "indistinguishable from controls"


def rate(successes: int, n: int) -> dict:
    interval = wilson_interval(successes, n)
    return {"k": successes, "n": n, "rate": successes / n if n else None, "ci95": list(interval) if interval else None}


# ---------------------------------------------------------------- aggregation


def load_run(run_dir: str | Path) -> tuple[pl.DataFrame, dict]:
    run_dir = Path(run_dir)
    results = run_dir / "results.parquet"
    if not results.is_file():
        raise EngramEvalError(f"{run_dir}: no results.parquet (run `engram-eval sweep` with --out {run_dir} first)")
    try:
        frame = pl.read_parquet(results)
        run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    except (OSError, ValueError, pl.exceptions.PolarsError) as exc:
        raise EngramEvalError(f"{results}: cannot read ({exc})") from None
    return frame, run


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


def _questions(frame: pl.DataFrame) -> list[dict]:
    relevant = frame.filter(pl.col("role") == "relevant")
    best = (
        relevant.sort(["question_id", "ratio", "layer", "strength"], descending=[False, True, False, False])
        .group_by("question_id", maintain_order=True)
        .first()
        .select("question_id", best_layer="layer", best_strength="strength", best_ratio="ratio")
    )
    counts = relevant.group_by("question_id").agg(
        flips=pl.col("flipped").sum(), breaks=pl.col("broken").sum(), cases=pl.col("case").value_counts(sort=True)
    )
    base = frame.filter(pl.col("role") == "baseline").select("question_id", "baseline_ratio", "correct_before", "related_wrong")
    table = base.join(best, on="question_id", how="left").join(counts, on="question_id", how="left")
    walks = (
        relevant.join(best, on="question_id")
        .filter(pl.col("layer") == pl.col("best_layer"))
        .sort("strength")
        .group_by("question_id")
        .agg(walk=pl.struct("strength", "ratio"))
    )
    table = table.join(walks, on="question_id", how="left")
    rows = []
    for row in table.iter_rows(named=True):
        walk = [(w["strength"], w["ratio"]) for w in row["walk"] or []]
        rows.append(
            {
                "question_id": row["question_id"],
                "baseline_ratio": row["baseline_ratio"],
                "correct_before": row["correct_before"],
                "related_wrong": row["related_wrong"],
                "best": {"layer": row["best_layer"], "strength": row["best_strength"], "ratio": row["best_ratio"]},
                "flips": row["flips"] or 0,
                "breaks": row["breaks"] or 0,
                "cases": {c["case"]: c["count"] for c in row["cases"] or []},
                "advice": decision_advice(row["baseline_ratio"], row["related_wrong"], walk, row["best_layer"]),
            }
        )
    return rows


def _heatmap(cells: pl.DataFrame, layers: list[int], strengths: list[float]) -> dict:
    """Per (layer, strength): flips over baseline-wrong questions, breaks over baseline-correct questions."""
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
        "flip": [[rate(c["flips"], c["wrong"]) for c in row] for row in grid],
        "break": [[rate(c["breaks"], c["correct"]) for c in row] for row in grid],
    }


def _headline(relevant: pl.DataFrame, heatmap: dict) -> dict:
    per_question = relevant.group_by("question_id").agg(
        wrong=~pl.col("correct_before").first(), correct=pl.col("correct_before").first(),
        flips=pl.col("flipped").any(), breaks=pl.col("broken").any(),
    )
    wrong = per_question.filter(pl.col("wrong"))
    correct = per_question.filter(pl.col("correct"))
    cells = [
        (flip["rate"] or 0.0, -(brk["rate"] or 0.0), layer, strength, flip, brk)
        for layer, flip_row, break_row in zip(heatmap["layers"], heatmap["flip"], heatmap["break"])
        for strength, flip, brk in zip(heatmap["strengths"], flip_row, break_row)
    ]
    best = max(cells, key=lambda c: (c[0], c[1], -c[2], -c[3])) if cells else None
    return {
        "question_flip_rate": rate(int(wrong["flips"].sum()), wrong.height),
        "question_fragile_correct_rate": rate(int(correct["breaks"].sum()), correct.height),
        "best_cell": None if best is None else {"layer": best[2], "strength": best[3], "flip_rate": best[4], "break_rate": best[5]},
    }


def _controls(frame: pl.DataFrame) -> list[dict]:
    relevant = frame.filter(pl.col("role") == "relevant").select(
        "question_id", "layer", "strength", rel_log=pl.col("log_improvement"), rel_flip="flipped", wrong=~pl.col("correct_before")
    )
    controls = frame.filter(pl.col("role") == "control")
    rows = []
    for kind in sorted(controls["control_kind"].unique().drop_nulls().to_list()):
        paired = controls.filter(pl.col("control_kind") == kind).join(relevant, on=["question_id", "layer", "strength"])
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
                "breaks_control": int(paired["broken"].sum()),
                "mean_difference": mean_difference,
                "p_value": p_value,
                "verdict": verdict(mean_difference, p_value),
                "adjusted_flip_rate": adjusted / wrong_cells.height if wrong_cells.height else None,
                "adjusted_flips": int(adjusted),
                "baseline_wrong_cells": wrong_cells.height,
            }
        )
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


def summarize(frame: pl.DataFrame, run: dict, engram_role: str = "relevant") -> dict:
    """Every number the report shows, computed once; all formats render this."""
    if frame.is_empty():
        raise EngramEvalError("results.parquet holds no rows")
    settings = run.get("settings", {})
    cells = frame.filter(pl.col("role") != "baseline")
    layers = sorted(cells["layer"].unique().drop_nulls().to_list())
    strengths = sorted(cells["strength"].unique().drop_nulls().to_list())
    relevant = frame.filter(pl.col("role") == "relevant")
    heatmaps = {"relevant": _heatmap(relevant, layers, strengths)}
    if engram_role in ("control", "all"):
        controls = frame.filter(pl.col("role") == "control")
        for kind in sorted(controls["control_kind"].unique().drop_nulls().to_list()):
            heatmaps[kind] = _heatmap(controls.filter(pl.col("control_kind") == kind), layers, strengths)
        if engram_role == "control":
            heatmaps.pop("relevant")
    return {
        "header": {
            "run_id": frame["run_id"][0],
            "model": frame["model"][0],
            "model_fingerprint": frame["model_fingerprint"][0][:12],
            "bank": frame["bank"][0],
            "layers": layers,
            "strengths": strengths,
            "chunks": int(frame["chunks"][0]),
            "scoring": frame["scoring"][0],
            "injection": frame["injection"][0],
            "cells": frame.height,
            "questions": frame["question_id"].n_unique(),
            "duration_seconds": run.get("timings", {}).get("total_seconds"),
            "status": run.get("status", "unknown"),
            "settings_max_tokens": settings.get("max_tokens"),
        },
        "questions": _questions(frame),
        "heatmaps": heatmaps,
        "headline": _headline(relevant, heatmaps.get("relevant") or _heatmap(relevant, layers, strengths)),
        "controls": _controls(frame),
        "semantic_sink": _semantic_sink(relevant),
    }


# ---------------------------------------------------------------- formatting shared by every output


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0 or not math.isfinite(value):
        return str(value)
    return f"{value:.3g}" if 1e-3 <= abs(value) < 1e4 else f"{value:.2e}"


def fmt_rate(r: dict) -> str:
    if not r["n"]:
        return f"{r['k']}/0"
    low, high = r["ci95"]
    return f"{r['k']}/{r['n']} ({100 * r['rate']:.0f}%, 95% CI {100 * low:.0f}-{100 * high:.0f}%)"


def fmt_cell(r: dict) -> str:
    return "-" if not r["n"] else f"{r['k']}/{r['n']}"


def fmt_float(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def fmt_p(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _sections(summary: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, columns, rows) for every table, in report order; table, markdown and html render these."""
    h = summary["header"]
    sections = [(
        "Run", ["field", "value"],
        [["model", f"{h['model']} ({h['model_fingerprint']})"], ["bank", h["bank"]],
         ["grid", f"layers {', '.join(map(str, h['layers']))} x strengths {', '.join(f'{s:g}' for s in h['strengths'])}, k = {h['chunks']}"],
         ["scoring", f"{h['scoring']}, {h['injection']} injection"],
         ["cells", f"{h['cells']} rows, {h['questions']} questions (run {h['run_id']}, {h['status']})"],
         ["duration", "-" if h["duration_seconds"] is None else f"{h['duration_seconds']:.1f} s"]],
    )]
    sections.append((
        "Questions", ["question", "baseline ratio", "correct?", "related wrong", "best cell (layer, strength: ratio)", "flips", "breaks"],
        [[q["question_id"], fmt_ratio(q["baseline_ratio"]), "yes" if q["correct_before"] else "no",
          {True: "yes", False: "no", None: "-"}[q["related_wrong"]],
          "-" if q["best"]["layer"] is None else f"L{q['best']['layer']}, {q['best']['strength']:g}: {fmt_ratio(q['best']['ratio'])}",
          str(q["flips"]), str(q["breaks"])]
         for q in summary["questions"]],
    ))
    sections.append((
        "Calibration cases and decision-rule advice", ["question", "cases (relevant cells)", "advice"],
        [[q["question_id"], ", ".join(f"{c} {n}" for c, n in q["cases"].items()), q["advice"]] for q in summary["questions"]],
    ))
    for name, heatmap in summary["heatmaps"].items():
        for measure, label in (("flip", "flip rate (flips / baseline-wrong questions)"), ("break", "fragile-correct rate (breaks / baseline-correct questions)")):
            sections.append((
                f"Heatmap {name}: {label}", ["layer \\ strength", *[f"{s:g}" for s in heatmap["strengths"]]],
                [[f"L{layer}", *[fmt_cell(c) for c in row]] for layer, row in zip(heatmap["layers"], heatmap[measure])],
            ))
    hl = summary["headline"]
    best = hl["best_cell"]
    sections.append((
        "Headline", ["measure", "value"],
        [["baseline-wrong questions that flip somewhere in the grid", fmt_rate(hl["question_flip_rate"])],
         ["baseline-correct questions that break somewhere in the grid", fmt_rate(hl["question_fragile_correct_rate"])],
         *([] if best is None else [
             [f"flip rate at best cell (L{best['layer']}, strength {best['strength']:g})", fmt_rate(best["flip_rate"])],
             [f"fragile-correct rate at best cell (L{best['layer']}, strength {best['strength']:g})", fmt_rate(best["break_rate"])]])],
    ))
    sections.append((
        "Negative controls (same cells; paired sign-flip test across questions)",
        ["control", "questions", "cells", "mean log impr. relevant", "mean log impr. control", "difference", "p", "verdict",
         "flips rel/ctrl", "control breaks", "controls-adjusted flip rate"],
        [[c["kind"], str(c["questions"]), str(c["cells"]), fmt_float(c["mean_log_improvement_relevant"]),
          fmt_float(c["mean_log_improvement_control"]), fmt_float(c["mean_difference"]), fmt_p(c["p_value"]), c["verdict"],
          f"{c['flips_relevant']}/{c['flips_control']}", str(c["breaks_control"]),
          "-" if c["adjusted_flip_rate"] is None else f"{c['adjusted_flips']}/{c['baseline_wrong_cells']} ({100 * c['adjusted_flip_rate']:.1f}%)"]
         for c in summary["controls"]],
    ))
    sections.append((
        "Semantic sink (relevant engram): is the wrong answer related to the topic?",
        ["related wrong", "questions", "flip rate (cells)", "break rate (cells)"],
        [[{True: "yes", False: "no", None: "unlabelled"}[s["related_wrong"]], str(s["questions"]), fmt_rate(s["flip"]), fmt_rate(s["break"])]
         for s in summary["semantic_sink"]],
    ))
    return sections


# ---------------------------------------------------------------- renderers


def render_table(summary: dict, console) -> None:
    from rich.table import Table

    for title, columns, rows in _sections(summary):
        heat = title.startswith("Heatmap")
        table = Table(title=title, title_justify="left", show_header=True)
        for column in columns:
            table.add_column(column, justify="right" if heat else "left", overflow="fold")
        grid = None
        if heat:
            name, measure = title.removeprefix("Heatmap ").split(":")[0], "flip" if "flip rate" in title else "break"
            grid = summary["heatmaps"][name][measure]
        for i, row in enumerate(rows):
            if grid is None:
                table.add_row(*row)
            else:
                table.add_row(row[0], *[_heat_cell(text, cell, measure) for text, cell in zip(row[1:], grid[i])])
        console.print(table)


def _heat_cell(text: str, cell: dict, measure: str) -> str:
    if cell["rate"] is None:
        return text
    colours = ("grey23", "dark_green", "green4", "green3") if measure == "flip" else ("grey23", "dark_red", "red3", "red1")
    colour = colours[min(3, math.ceil(cell["rate"] * 3))]
    return f"[white on {colour}] {text} [/]"


def render_markdown(summary: dict) -> str:
    lines = [f"# engram-eval report: {summary['header']['bank']} on {summary['header']['model']}", ""]
    for title, columns, rows in _sections(summary):
        lines += [f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def render_json(summary: dict) -> str:
    return json.dumps(summary, indent=2, default=str)


def heatmap_png(heatmap: dict, measure: str, title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [[c["rate"] if c["rate"] is not None else float("nan") for c in row] for row in heatmap[measure]]
    fig, ax = plt.subplots(figsize=(1.1 + 0.8 * len(heatmap["strengths"]), 1.0 + 0.5 * len(heatmap["layers"])))
    image = ax.imshow(values, cmap="Greens" if measure == "flip" else "Reds", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(len(heatmap["strengths"])), [f"{s:g}" for s in heatmap["strengths"]])
    ax.set_yticks(range(len(heatmap["layers"])), [f"L{layer}" for layer in heatmap["layers"]])
    ax.set_xlabel("strength")
    ax.set_title(title, fontsize=9)
    for i, row in enumerate(heatmap[measure]):
        for j, cell in enumerate(row):
            ax.text(j, i, fmt_cell(cell), ha="center", va="center", fontsize=8)
    fig.colorbar(image, ax=ax, fraction=0.05)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def render_html(summary: dict) -> str:
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>engram-eval report: {html.escape(summary['header']['bank'])}</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}th{background:#eee}</style></head><body>",
        f"<h1>engram-eval report: {html.escape(summary['header']['bank'])} on {html.escape(summary['header']['model'])}</h1>",
    ]
    for title, columns, rows in _sections(summary):
        parts.append(f"<h2>{html.escape(title)}</h2>")
        if title.startswith("Heatmap"):
            name = title.removeprefix("Heatmap ").split(":")[0]
            measure = "flip" if "flip rate" in title else "break"
            png = base64.b64encode(heatmap_png(summary["heatmaps"][name], measure, title)).decode()
            parts.append(f"<img alt='{html.escape(title)}' src='data:image/png;base64,{png}'>")
        parts.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows]
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)
