"""Rendering: one report summary -> a rich table, markdown, json or a self-contained html page."""

from __future__ import annotations

import html
import json
import math

from .experiments import cell_label


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return "-"
    if value == 0 or not math.isfinite(value):
        return str(value)
    return f"{value:.3g}" if 1e-3 <= abs(value) < 1e4 else f"{value:.2e}"


def fmt_share(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%" + ("!" if value > 0.5 else "")


def fmt_prob(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}" if value >= 1e-3 else f"{value:.2e}"


def fmt_probs(p_correct: float | None, p_incorrect: float | None) -> str:
    return f"{fmt_prob(p_correct)} / {fmt_prob(p_incorrect)}"


def fmt_cell_name(cell: dict, show_k: bool = False) -> str:
    return f"L{cell['layer']}, {cell['strength']:g}" + (f", k={cell['chunks']}" if show_k else "")


def fmt_best(best: dict, show_k: bool = False) -> str:
    """The relevant engram's best cell; when no cell beats the baseline ratio, say so rather than call it best."""
    if best["layer"] is None:
        return "-"
    cell = f"{fmt_cell_name(best, show_k)}: {fmt_ratio(best['ratio'])} ({fmt_probs(best['p_correct'], best['p_incorrect'])})"
    return cell if best["improves_on_baseline"] else f"no cell improves on the baseline (highest {cell})"


def fmt_flips(q: dict) -> str:
    if not q["flips"]:
        return "0"
    return f"{q['flips']} ({q['clean_flips']} / {q['flips_p_correct_fell']} / {q['flips_collapsed']})"


def fmt_effect(cell: dict) -> str:
    if cell["mean"] is None:
        return "-"
    interval = "" if cell["ci95"] is None else f" ({cell['ci95'][0]:.2f} to {cell['ci95'][1]:.2f})"
    return f"{cell['mean']:.2f}{interval}"


def fmt_measured(decision: dict) -> str:
    ratio = decision["measured_ratio"]
    if ratio is None:
        return "-"
    where = "baseline" if decision["strength"] is None else f"strength {decision['strength']:g}"
    return f"{where}: ratio {fmt_ratio(ratio)} ({'correct' if decision['measured_correct'] else 'wrong'})"


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


def partial_banner(summary: dict) -> str | None:
    partial = summary["header"]["partial"]
    if not partial:
        return None
    of = f" of {partial['questions']}" if partial["questions"] else ""
    return (f"partial: {partial['questions_done']}{of} questions (the sweep has not finished; "
            "rerun it with the same command to complete the run)")


def _sections(summary: dict, short: bool = False) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, columns, rows) for every table, in report order; table, markdown and html render these. short (markdown,
    for CI step summaries) leaves out the effect-size tables."""
    h = summary["header"]
    show_k = isinstance(h["chunks"], list)
    sections = [(
        "Run", ["field", "value"],
        [["model", f"{h['model']} ({h['model_fingerprint']})"], ["bank", h["bank"]],
         ["grid", f"layers {', '.join(map(str, h['layers']))} x strengths {', '.join(f'{s:g}' for s in h['strengths'])}, k = {', '.join(map(str, h['chunks'])) if show_k else h['chunks']}"],
         ["scoring", f"{h['scoring']}, {h['injection']} injection"],
         ["cells", f"{h['cells']} rows, {h['questions']} questions (run {h['run_id']}, {partial_banner(summary) or h['status']})"],
         ["duration", "-" if h["duration_seconds"] is None else f"{h['duration_seconds']:.1f} s"]],
    )]
    if h["largest_chunk_share"]:
        sections.append((
            "Largest chunk's share of each engram's summed row norms, per layer (above 50%, one chunk dominates)",
            ["engram", *[f"L{layer}" for layer in h["layers"]]],
            [[name, *[fmt_share(shares.get(str(layer))) for layer in h["layers"]]] for name, shares in sorted(h["largest_chunk_share"].items())],
        ))
    sections.append((
        "Questions (probabilities: p(correct) / p(incorrect))",
        ["question", "baseline ratio", "baseline p", "correct?", "related wrong", "best cell of the relevant engram",
         "flips (clean / p(correct) fell / mass collapsed)", "breaks"],
        [[q["question_id"], fmt_ratio(q["baseline_ratio"]), fmt_probs(q["baseline_p_correct"], q["baseline_p_incorrect"]),
          "yes" if q["correct_before"] else "no", {True: "yes", False: "no", None: "-"}[q["related_wrong"]],
          fmt_best(q["best"], show_k), fmt_flips(q), str(q["breaks"])]
         for q in summary["questions"]],
    ))
    sections.append((
        "Calibration cases, and the practical guide's decision rule (in its order) with what the grid measured at its advice",
        ["question", "cases (relevant cells)", "advice", "measured at the advice"],
        [[q["question_id"], ", ".join(f"{c} {n}" for c, n in q["cases"].items()), q["decision"]["advice"], fmt_measured(q["decision"])]
         for q in summary["questions"]],
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
         ["... with a clean flip (p(correct) rose, mass kept)", fmt_rate(hl["question_clean_flip_rate"])],
         ["baseline-correct questions that break somewhere in the grid", fmt_rate(hl["question_fragile_correct_rate"])],
         *([] if best is None else [
             [f"flip rate at the best cell ({fmt_cell_name(best, show_k)}; chosen after looking at these questions, see --split)",
              fmt_rate(best["flip_rate"])],
             [f"fragile-correct rate at that cell ({fmt_cell_name(best, show_k)})", fmt_rate(best["break_rate"])]])],
    ))
    if (split := summary.get("split")) is not None:
        sections.append((
            f"Held-out best cell (--split {split['seed']}): chosen on {len(split['chosen_on'])} questions, measured on the other "
            f"{len(split['measured_on'])}", ["measure", "where chosen", "held out"],
            [["cell", fmt_cell_name(split["cell"], show_k), ""],
             ["flip rate", fmt_rate(split["flip_rate_where_chosen"]), fmt_rate(split["flip_rate_held_out"])],
             ["fragile-correct rate", fmt_rate(split["break_rate_where_chosen"]), fmt_rate(split["break_rate_held_out"])],
             ["questions", ", ".join(split["chosen_on"]), ", ".join(split["measured_on"])]],
        ))
    tests = summary.get("tests") or []
    surviving = [t for t in tests if t["survives"]]
    keys = [k for k in ("layer", "strength", "chunks", "context") if tests and k in tests[0]]
    sections.append((
        f"Per-cell exact tests (McNemar, relevant vs control on the same questions): {len(surviving)} of {len(tests)} survive "
        "Benjamini-Hochberg at q < 0.05 over the whole grid",
        [*keys, "control", "outcome", "relevant only / control only", "p", "q"],
        [[*(str(t[k]) for k in keys), t["control"], t["outcome"], f"{t['relevant_only']} / {t['control_only']}",
          fmt_p(t["p_value"]), fmt_p(t["q_value"])] for t in surviving] or [["none", *[""] * (len(keys) + 4)]],
    ))
    if not short:
        for name, effects in (summary.get("effects") or {}).items():
            for label, grid in effects["maps"].items():
                suffix = "" if effects["chunks"] is None else f", k={effects['chunks']}"
                sections.append((
                    f"Effect size {label}{suffix}: mean log-improvement (95% bootstrap CI over questions)",
                    ["layer \\ strength", *[f"{s:g}" for s in effects["strengths"]]],
                    [[f"L{layer}", *[fmt_effect(cell) for cell in row]] for layer, row in zip(effects["layers"], grid)],
                ))
    sections.append((
        "Negative controls (same cells; paired sign-flip test across questions)",
        ["control", "questions", "cells", "mean log impr. relevant", "mean log impr. control", "difference", "p", "verdict",
         "flips rel/ctrl", "breaks rel/ctrl", "controls-adjusted flip rate"],
        [[c["kind"], str(c["questions"]), str(c["cells"]), fmt_float(c["mean_log_improvement_relevant"]),
          fmt_float(c["mean_log_improvement_control"]), fmt_float(c["mean_difference"]), fmt_p(c["p_value"]), c["verdict"],
          f"{c['flips_relevant']}/{c['flips_control']}", f"{c['breaks_relevant']}/{c['breaks_control']}",
          "-" if c["adjusted_flip_rate"] is None else f"{c['adjusted_flips']}/{c['baseline_wrong_cells']} ({100 * c['adjusted_flip_rate']:.1f}%)"]
         for c in summary["controls"]],
    ))
    sections.append((
        "Semantic sink (relevant engram): is the wrong answer related to the topic?",
        ["related wrong", "questions", "flip rate (cells)", "break rate (cells)"],
        [[{True: "yes", False: "no", None: "unlabelled"}[s["related_wrong"]], str(s["questions"]), fmt_rate(s["flip"]), fmt_rate(s["break"])]
         for s in summary["semantic_sink"]],
    ))
    if summary.get("chunk_count"):
        sections.append((
            "Chunk count (the seed's table): per k", ["k", "tokens per chunk (min-max)", "mean log-improvement, relevant (95% bootstrap CI)",
                                                      "difference signal relevant vs anti (%)", "directional steering: relevant beats anti"],
            [[str(c["chunks"]), "-" if c["tokens_per_chunk"] is None else f"{c['tokens_per_chunk'][0]}-{c['tokens_per_chunk'][1]}",
              fmt_float(c["mean_log_improvement"]) + ("" if c["mean_log_improvement_ci95"] is None else
                                                       f" ({c['mean_log_improvement_ci95'][0]:.3f} to {c['mean_log_improvement_ci95'][1]:.3f})"),
              "-" if c["anti_difference_signal"] is None else f"{c['anti_difference_signal']:.3f}",
              "-" if not c["directional"]["n"] else
              f"{c['directional']['verdict']}: {c['directional']['k']}/{c['directional']['n']} cells ({100 * c['directional']['share']:.0f}%)"]
             for c in summary["chunk_count"]],
        ))
    if summary.get("attention"):
        sections.append((
            "Where the model looks: the last prompt position's attention (mean over heads, layers and cells)",
            ["engram kind", "rows", "share on the k engram positions (first k positions for baseline, add, actadd)", "share on position 0"],
            [[a["kind"], str(a["rows"]), f"{a['attn_prefix_share']:.3f}", f"{a['attn_first_share']:.3f}"] for a in summary["attention"]],
        ))
    if (g := summary.get("generation")) is not None:
        verdicts = ("correct", "incorrect", "both", "neither")
        sections.append((
            f"Probability vs generated text ({g['cells']} generated cells): probability verdict (ratio) against what the text says",
            ["probability says \\ text says", *verdicts],
            [[p, *[str(g["confusion"][p][v]) for v in verdicts]] for p in ("correct", "incorrect", "tie") if any(g["confusion"][p].values())],
        ))
        sections.append((
            "Generation flips: does the text say the correct answer first?", ["rows", "text says the correct answer first"],
            [["flipped cells (ratio crossed 1)", fmt_rate(g["flipped_says_correct_first"])],
             ["baseline rows", fmt_rate(g["baseline_says_correct_first"])],
             ["baseline rows the probability calls correct", fmt_rate(g["baseline_probability_correct"])]],
        ))
        sections.append((
            "Generated text, examples (first 120 characters)", ["question", "cell", "text verdict", "text"],
            [[e["question_id"], e["cell"], e["verdict"], e["text"].replace("\n", " ")] for e in g["examples"]],
        ))
    if (rag := summary.get("rag")) is not None:
        conditions = ("no engram", "engram only", "context only", "engram + context")
        sections.append((
            f"RAG priming: share of the {rag['questions']} questions with a context that are correct (ratio > 1)",
            ["cell", *conditions, "engram + context vs context only (exact McNemar)"],
            [[f"{c['cell']}: L{c['layer']}, {c['strength']:g}", *[fmt_rate(c[name]) for name in conditions],
              f"{c['engram_context_only']} vs {c['context_only']} discordant, p = {fmt_p(c['p_value'])}"] for c in rag["conditions"]],
        ))
    return sections


# ---------------------------------------------------------------- renderers


def render_table(summary: dict, console) -> None:
    if banner := partial_banner(summary):
        console.print(f"[bold yellow]{banner}[/]")
    print_sections(_sections(summary), console, summary["heatmaps"])


def print_sections(sections: list[tuple[str, list[str], list[list[str]]]], console, heatmaps: dict | None = None) -> None:
    """Rich tables; a single run's heatmap tables get coloured cells. No column gets a min_width: rich keeps words
    whole where the console has room and folds them where it has not, whereas a min_width made it crop the last
    columns off tables that were too wide."""
    from rich.table import Table

    for title, columns, rows in sections:
        heat = title.startswith("Heatmap")
        table = Table(title=title, title_justify="left", show_header=True)
        for column in columns:
            table.add_column(column, justify="right" if heat else "left", overflow="fold")
        grid = None
        if heat and heatmaps is not None:
            name, measure = title.removeprefix("Heatmap ").split(":")[0], "flip" if "flip rate" in title else "break"
            grid = heatmaps[name][measure]
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
    banner = partial_banner(summary)
    return markdown_page(f"engram-eval report: {summary['header']['bank']} on {summary['header']['model']}",
                         _sections(summary, short=True), [f"> **{banner}**"] if banner else [])


def markdown_page(heading: str, sections: list[tuple[str, list[str], list[list[str]]]], preface: list[str] = ()) -> str:
    lines = [f"# {heading}", ""] + ([*preface, ""] if preface else [])
    for title, columns, rows in sections:
        lines += [f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        lines.append("")
    return "\n".join(lines)


def render_json(summary: dict) -> str:
    return json.dumps(summary, indent=2, default=str)


PAGE_STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}"
              "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;vertical-align:top}th{background:#eee}"
              "details{margin:.4em 0}summary{cursor:pointer;font-weight:bold}.questions{font-size:13px;color:#333;min-height:1.2em}")


def html_table(columns: list[str], rows: list[list[str]]) -> str:
    return ("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in columns) + "</tr>"
            + "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows) + "</table>")


def html_page(title: str, body: str, head: str = "") -> str:
    """A self-contained page: the title as heading, the body, and anything the head needs (a script)."""
    return ("<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(title)}</title><style>{PAGE_STYLE}</style>{head}</head><body>\n"
            f"<h1>{html.escape(title)}</h1>\n{body}\n</body></html>")


def side_by_side_sections(comparison: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, columns, rows) of several runs side by side: one column per run; heatmap rows by relative depth."""
    runs = comparison["runs"]
    names = [f"{i + 1}: {r['model']}" for i, r in enumerate(runs)]
    kinds = sorted({kind for r in runs for kind in r["controls"]})
    rows = [["run", *[r["run"] for r in runs]], ["bank", *[r["bank"] for r in runs]],
            ["layers (relative depth)", *[", ".join(f"L{l} ({d:.2f})" for l, d in zip(r["layers"], r["depths"])) for r in runs]],
            ["baseline accuracy", *[fmt_rate(r["baseline_accuracy"]) for r in runs]],
            ["baseline-wrong questions that flip", *[fmt_rate(r["question_flip_rate"]) for r in runs]],
            ["baseline-correct questions that break", *[fmt_rate(r["question_fragile_correct_rate"]) for r in runs]]]
    rows += [[f"relevant vs {kind}", *["-" if kind not in r["controls"] else
                                       f"{r['controls'][kind]['verdict']} (p {fmt_p(r['controls'][kind]['p_value'])})" for r in runs]]
             for kind in kinds]
    sections = [("Runs side by side", ["measure", *names], rows)]
    for name, run in zip(names, runs):
        for heat, heatmap in run["heatmaps"].items():
            sections.append((
                f"Heatmap {heat} of run {name}: flip rate by relative depth", ["depth (layer) \\ strength", *[f"{s:g}" for s in heatmap["strengths"]]],
                [[f"{d:.2f} (L{layer})", *[fmt_cell(c) for c in row]] for d, layer, row in zip(heatmap["depths"], heatmap["layers"], heatmap["flip"])],
            ))
        if run["chunk_count"]:
            sections.append((
                f"Chunk count of run {name}", ["k", "mean log-improvement", "difference signal vs anti (%)", "directional steering"],
                [[str(c["chunks"]), fmt_float(c["mean_log_improvement"]),
                  "-" if c["anti_difference_signal"] is None else f"{c['anti_difference_signal']:.3f}",
                  "-" if not c["directional"]["n"] else f"{c['directional']['verdict']} ({c['directional']['k']}/{c['directional']['n']})"]
                 for c in run["chunk_count"]],
            ))
    return sections


def render_side_by_side(comparison: dict, output_format: str, console=None) -> str | None:
    return _render_sections(comparison, side_by_side_sections(comparison), "engram-eval report: runs side by side", output_format, console)


def render_drilldown(drill: dict, output_format: str, console=None) -> str | None:
    return _render_sections(drill, drilldown_sections(drill), f"engram-eval report: question {drill['question_id']}", output_format, console)


def _render_sections(data: dict, sections: list, heading: str, output_format: str, console=None) -> str | None:
    if output_format == "json":
        return json.dumps(data, indent=2, default=str)
    if output_format == "table":
        return print_sections(sections, console)
    if output_format == "html":
        return html_page(heading, "\n".join(f"<h2>{html.escape(title)}</h2>" + html_table(columns, rows) for title, columns, rows in sections))
    return markdown_page(heading, sections)


def drilldown_sections(drill: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """One question cell by cell: each side's probability and its boost against the baseline, the sink score, the
    top variants and the top token; then the generated texts."""
    sections = []
    for condition in drill["conditions"]:
        base = condition["baseline"]
        where = "" if condition["context"] is None else " with its context" if condition["context"] else " without its context"
        title = (f"{drill['question_id']}{where}: baseline p(correct) {fmt_prob(base['p_correct'])} ({base['top_correct_variant']!r}), "
                 f"p(incorrect) {fmt_prob(base['p_incorrect'])} ({base['top_incorrect_variant']!r}), ratio {fmt_ratio(base['ratio'])}; "
                 "sink score = log boost(incorrect) - log boost(correct)")
        show_k = len({c["chunks"] for c in condition["cells"]}) > 1
        rows = [[c["engram"], f"L{c['layer']}" + (f" k={c['chunks']}" if show_k else ""), f"{c['strength']:g}",
                 f"{fmt_prob(c['p_correct'])} (x{fmt_ratio(c['boost_correct'])})", f"{fmt_prob(c['p_incorrect'])} (x{fmt_ratio(c['boost_incorrect'])})",
                 fmt_ratio(c["ratio"]), fmt_float(c["sink_score"], 2), f"{c['top_correct_variant']!r} / {c['top_incorrect_variant']!r}",
                 f"{c['top_token']!r} {fmt_prob(c['p_top'])}"] for c in condition["cells"]]
        sections.append((title, ["engram", "layer", "strength", "p(correct) (boost)", "p(incorrect) (boost)", "ratio", "sink",
                                 "top variants", "top token"], rows))
    if drill["texts"]:
        sections.append((f"{drill['question_id']}: generated texts", ["cell", "first answer", "verdict", "text"],
                         [[cell_label(t),
                           t["first_answer"], t["verdict"], t["text"].replace("\n", " ")] for t in drill["texts"]]))
    return sections
