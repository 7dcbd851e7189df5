"""Write docs/findings.md from finished runs: their negative-control tables side by side, Benjamini-Hochberg q beside
every p, and for a large bank the confidence-calibration table.

`make findings` runs the sweeps and then this script; every number and sentence below comes from the runs.
Usage: python docs/findings.py LABEL=RUN [LABEL=RUN ...] [--paraphrases LABEL=RUN] [--large LABEL=RUN]
       [--model MODEL=RUN,RUN --model MODEL=RUN,RUN] > docs/findings.md
       python docs/findings.py --update docs/findings.md --model MODEL=RUN,RUN --model MODEL=RUN,RUN
(the LABEL=RUN runs share one bank; --paraphrases adds, for one of them, a column per paraphrase of the relevant
sources: the same controls with each reworded source as the relevant engram; --large names one run of a large bank,
reported on its own; each --model names one model's runs of the same banks, in the same order: the two-model section,
which --update writes into an existing page in place of its previous one, leaving the rest as generated.)
"""

from __future__ import annotations

import sys

import polars as pl

from engram_eval import load_run, summarize
from engram_eval.report.formatting import fmt_float, fmt_interval, fmt_p, fmt_percent
from engram_eval.report.statistics import ALPHA, benjamini_hochberg


def controls_by_kind(run_dir: str, paraphrase: int | None = None) -> tuple[dict, dict[str, dict]]:
    """A run's summary and its controls by kind; with a paraphrase, the run as if that paraphrase of each relevant source
    were the source (its rows in place of paraphrase 0's)."""
    frame, run = load_run(run_dir)
    if paraphrase is not None:  # that paraphrase's rows alone (the source's column says how the others spread)
        frame = (frame.filter(pl.col("sample").is_null() & (pl.col("paraphrase").is_null() | (pl.col("paraphrase") == paraphrase)))
                 .with_columns(paraphrase=pl.when(pl.col("paraphrase").is_not_null()).then(pl.lit(0, pl.Int32))))
    summary = summarize(frame, run)
    return summary, {c["kind"]: c for c in summary["controls"]}


def paraphrase_count(run_dir: str) -> int:
    """How many paraphrases the run's relevant sources have (1: none beside the text)."""
    frame, _ = load_run(run_dir)
    return int(frame["paraphrase"].max() or 0) + 1


def corrected_verdict(control: dict, q: float | None) -> str:
    """The report's verdict with q in place of p: 'relevant beats controls' only at q < 0.05."""
    if q is None or control["verdict"].startswith(("too few", "no data")):
        return control["verdict"]
    if q < ALPHA:
        return "relevant beats controls" if control["mean_difference"] > 0 else "controls beat relevant"
    return "indistinguishable from controls"


def q_values(tables: list[dict[str, dict]]) -> dict[tuple[int, str], float]:
    """BH over every p-value the page shows in one table: (column, control kind) -> q."""
    shown = [(i, kind, c["p_value"]) for i, controls in enumerate(tables) for kind, c in sorted(controls.items())
             if c["p_value"] is not None]
    return {(i, kind): q for (i, kind, _), q in zip(shown, benjamini_hochberg([p for *_, p in shown]))}


def controls_table(loaded: list[tuple[str, dict, dict]]) -> list[str]:
    tables = [controls for _, _, controls in loaded]
    qs = q_values(tables)
    kinds = sorted({kind for controls in tables for kind in controls})
    lines = ["| control kind | " + " | ".join(label for label, _, _ in loaded) + " |", "|---|" + "---|" * len(loaded)]
    for kind in kinds:
        cells = []
        for i, controls in enumerate(tables):
            c, q = controls.get(kind), qs.get((i, kind))
            cells.append("-" if c is None else f"{fmt_float(c['mean_difference'])} (n {c['questions']}, p {fmt_p(c['p_value'])}, "
                                              f"q {fmt_p(q)}): {corrected_verdict(c, q)}")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines += ["", "| per run | " + " | ".join(label for label, _, _ in loaded) + " |", "|---|" + "---|" * len(loaded)]
    for measure, key in (("baseline-wrong questions that flip somewhere", "question_flip_rate"),
                         ("... with a clean flip (p(correct) rose, mass kept)", "question_clean_flip_rate"),
                         ("baseline-correct questions that break somewhere", "question_fragile_correct_rate")):
        lines.append(f"| {measure} | " + " | ".join(
            f"{s['headline'][key]['k']}/{s['headline'][key]['n']}" for _, s, _ in loaded) + " |")
    lines.append("| survives rewording: flipped by every paraphrase / by any (relevant) | " + " | ".join(
        survives(s) for _, s, _ in loaded) + " |")
    lines.append("| flips: relevant / each control kind (cells) | " + " | ".join(
        ", ".join(f"{kind} {c['flips_relevant']}/{c['flips_control']}" for kind, c in sorted(controls.items()))
        for controls in tables) + " |")
    lines += ["", "## What the runs say", ""]
    for i, (label, _, controls) in enumerate(loaded):
        verdicts = {kind: corrected_verdict(c, qs.get((i, kind))) for kind, c in sorted(controls.items())}
        better = [kind for kind, v in verdicts.items() if v == "relevant beats controls"]
        worse = [kind for kind, v in verdicts.items() if v == "controls beat relevant"]
        lines.append(f"- **{label}**: at q < 0.05 the relevant engram beats {len(better)} of {len(controls)} control kinds"
                     + (f" ({', '.join(better)})" if better else "")
                     + (f"; {', '.join(worse)} beat{'s' if len(worse) == 1 else ''} it" if worse else "") + ".")
    return lines


def survives(summary: dict) -> str:
    spreads = [v for v in (summary.get("variability") or {}).get("paraphrases", []) if v["kind"] == "relevant"]
    return "-" if not spreads else f"{spreads[0]['flip_with_every']}/{spreads[0]['flip_with_any']}"


def grid_text(header: dict) -> str:
    return (f"the bundled bank `{header['bank']}` on {header['model']}, layers {', '.join(map(str, header['layers']))} x "
            f"strengths {', '.join(f'{s:g}' for s in header['strengths'])}, k = {header['chunks']}")


def calibration_table(summary: dict) -> list[str]:
    cal = summary["calibration"]
    if cal is None:
        return ["No relevant-engram cells: no calibration."]
    lines = [f"{cal['questions']} questions, {cal['positives']} correct at baseline. AUROC 0.5 is chance; intervals are 95% "
             "bootstrap intervals over questions.", ""]
    if cal["too_few"]:
        return lines + ["Too few questions to tell (fewer than 10 correct or 10 wrong baselines)."]
    lines += ["| signal | AUROC | 95% CI |", "|---|---|---|"]
    lines += [f"| {s['name']} | {fmt_float(s['auroc'])} | {fmt_interval(s['ci95'])} |" for s in cal["signals"]]
    lines += ["", "| AUROC difference | delta | 95% CI |", "|---|---|---|"]
    lines += [f"| {d['a']} - {d['b']} | {d['delta']:+.3f} | {fmt_interval(d['ci95'])} |" for d in cal["differences"]]
    sel = cal["selective"]
    lines += ["", f"Abstaining on the {sel['abstained']} fragile questions keeps {sel['kept']} at accuracy "
                  f"{fmt_percent(sel['accuracy_kept_fragile'])}; abstaining on as many lowest-margin questions keeps accuracy "
                  f"{fmt_percent(sel['accuracy_kept_margin'])} (all questions: {fmt_percent(sel['accuracy_all'])})."]
    return lines


def model_rows(label: str, run_dir: str) -> dict:
    """One model's run of one bank: its summary, controls by kind and the median next-token KL of the relevant engram's
    cells at the run's best cell (the cell with the highest flip rate)."""
    frame, run = load_run(run_dir)
    summary = summarize(frame, run)
    best = summary["headline"]["best_cell"]
    kl = None
    if best is not None:
        at = frame.filter((pl.col("role") == "relevant") & (pl.col("layer") == best["layer"]) & (pl.col("strength") == best["strength"])
                          & pl.col("sample").is_null() & (pl.col("paraphrase").is_null() | (pl.col("paraphrase") == 0)))
        kl = at["kl_next"].median()
    return {"model": label, "summary": summary, "controls": {c["kind"]: c for c in summary["controls"]}, "kl": kl}


def auroc_text(summary: dict, name: str) -> str:
    cal = summary["calibration"]
    if cal is None or cal["too_few"]:
        return "too few"
    signal = next((s for s in cal["signals"] if s["name"] == name), None)
    return "-" if signal is None else f"{fmt_float(signal['auroc'])} {fmt_interval(signal['ci95'])}"


def rate_text(rate: dict) -> str:
    return f"{rate['k']}/{rate['n']} {fmt_interval(rate['ci95'])}"


def models_section(models: list[tuple[str, list[str]]]) -> list[str]:
    """The seeds asked whether model size helps (Qwen2.5 0.5B, 3B, 7B). Here: the same banks on each model, side by
    side, with q over every p the table shows, and what replicates in words."""
    rows = [model_rows(label, run) for label, runs in models for run in runs]
    qs = q_values([r["controls"] for r in rows])
    kinds = sorted({kind for r in rows for kind in r["controls"]})
    lines = ["## Does model size help? The same banks on both embedded models", "",
             "The seeds compared Qwen2.5 0.5B, 3B and 7B. Here each embedded model runs the same banks with the seed default "
             "(its scale measured at the first block's input, the engram after a BOS the tokenizer puts first: "
             "docs/method.md). Each control cell: the relevant engram's mean log-improvement minus the control's, p of the "
             "paired sign-flip test over questions, q (Benjamini-Hochberg over every p in this table) and the verdict at "
             "q < 0.05. Flips and breaks: questions with a clean flip (p(correct) rose, mass kept) among baseline-wrong "
             "ones, and questions that break somewhere among baseline-correct ones, with 95% Wilson intervals. KL: the "
             "median next-token KL of the relevant engram's cells at the best cell. AUROC: does the margin, or the "
             "engram's stability, predict a correct baseline (95% bootstrap interval; 'too few' under 10 of either). "
             "Off-distribution: questions whose answers hold under 10% of the baseline's next-token probability (or "
             "whose top token ends the text); the report names each, and a flip there measures noise more than "
             "knowledge.", "",
             "| model | bank | grid | off-distribution | " + " | ".join(f"vs {kind}" for kind in kinds)
             + " | clean flips | breaks | median KL at best cell | AUROC margin | AUROC stability |",
             "|---|---|---|---|" + "---|" * len(kinds) + "---|---|---|---|---|"]
    for i, r in enumerate(rows):
        header, headline = r["summary"]["header"], r["summary"]["headline"]
        cells = []
        for kind in kinds:
            c, q = r["controls"].get(kind), qs.get((i, kind))
            cells.append("-" if c is None else f"{fmt_float(c['mean_difference'])} (p {fmt_p(c['p_value'])}, q {fmt_p(q)}): "
                                              f"{corrected_verdict(c, q)}")
        grid = f"L {','.join(map(str, header['layers']))} x s {','.join(f'{s:g}' for s in header['strengths'])}"
        off = f"{len(header['off_distribution'] or {})}/{header['questions']}"
        lines.append(f"| {r['model']} | {header['bank']} | {grid} | {off} | " + " | ".join(cells)
                     + f" | {rate_text(headline['question_clean_flip_rate'])} | {rate_text(headline['question_fragile_correct_rate'])}"
                     + f" | {fmt_float(r['kl'])} | {auroc_text(r['summary'], 'margin')} | {auroc_text(r['summary'], 'stability')} |")
    lines += ["", "### What replicates across the two models", ""]
    banks = list(dict.fromkeys(r["summary"]["header"]["bank"] for r in rows))
    for bank in banks:
        here = [(i, r) for i, r in enumerate(rows) if r["summary"]["header"]["bank"] == bank]
        verdicts = {kind: {r["model"]: corrected_verdict(r["controls"][kind], qs.get((i, kind))) for i, r in here
                           if kind in r["controls"]} for kind in kinds}
        same = [kind for kind, by in verdicts.items() if len(by) == len(here) and len(set(by.values())) == 1]
        differ = [kind for kind, by in verdicts.items() if len(set(by.values())) > 1]
        text = [f"- **{bank}**:"]
        if same:
            text.append("the same verdict on both models against " + "; ".join(
                f"{kind} ({next(iter(verdicts[kind].values()))})" for kind in same) + ".")
        if differ:
            text.append("A different verdict against " + "; ".join(
                f"{kind} (" + ", ".join(f"{m}: {v}" for m, v in verdicts[kind].items()) + ")" for kind in differ) + ".")
        flips = ", ".join(f"{r['model']} {rate_text(r['summary']['headline']['question_clean_flip_rate'])}" for _, r in here)
        breaks = ", ".join(f"{r['model']} {rate_text(r['summary']['headline']['question_fragile_correct_rate'])}" for _, r in here)
        text.append(f"Clean flips: {flips}; breaks: {breaks}.")
        lines.append(" ".join(text))
    verdicts = [corrected_verdict(c, qs.get((i, kind))) for i, r in enumerate(rows) for kind, c in r["controls"].items()]
    wins, losses = verdicts.count("relevant beats controls"), verdicts.count("controls beat relevant")
    lines.append(f"- Over both models and banks the relevant engram beats its control at q < 0.05 in {wins} of "
                 f"{len(verdicts)} comparisons, and loses in {losses}.")
    return lines


def main(arguments: list[str]) -> str:
    large = reworded = None
    models: list[tuple[str, list[str]]] = []
    while "--model" in arguments:
        at = arguments.index("--model")
        label, runs = arguments[at + 1].split("=", 1)
        models.append((label, runs.split(",")))
        arguments = arguments[:at] + arguments[at + 2:]
    if "--large" in arguments:
        at = arguments.index("--large")
        large, arguments = arguments[at + 1].split("=", 1), arguments[:at] + arguments[at + 2:]
    if "--paraphrases" in arguments:
        at = arguments.index("--paraphrases")
        reworded, arguments = arguments[at + 1].split("=", 1), arguments[:at] + arguments[at + 2:]
    loaded = [(label, *controls_by_kind(path)) for label, path in (argument.split("=", 1) for argument in arguments)]
    if reworded is not None:
        label, path = reworded
        loaded += [(f"{label}, paraphrase {i}", *controls_by_kind(path, i)) for i in range(1, paraphrase_count(path))]
    lines = [
        "# Findings: does removing the massive activation make relevant engrams distinguishable?",
        "",
        f"Generated by `make findings` (do not edit by hand): {grid_text(loaded[0][1]['header'])}, one run per column. Each "
        "cell: mean log-improvement of the relevant engram minus the control's over the same cells (positive: relevant "
        "better), the number of paired questions n, the paired sign-flip test's p across questions, its Benjamini-Hochberg "
        "q over every p in the table, and the verdict at q < 0.05. A `paraphrase i` column is the same run with the i-th "
        "paraphrase of each relevant source (the same facts in other words) as the relevant engram, against the same controls.",
        "",
        *controls_table(loaded),
    ]
    if large is not None:
        label, summary, controls = large[0], *controls_by_kind(large[1])
        lines += ["", f"## A bank large enough to decide: {label}", "",
                  f"On {grid_text(summary['header'])}; q is Benjamini-Hochberg over this table's p-values.", "",
                  *controls_table([(label, summary, controls)]), "",
                  "## Does engram stability predict when the model is right? (the seeds' Use Case 2)", "",
                  *calibration_table(summary)]
    if models:
        lines += ["", models_block(models)]
    lines.append("")
    return "\n".join(lines)


MODELS_START, MODELS_END = "<!-- two models: make findings-models -->", "<!-- /two models -->"


def models_block(models: list[tuple[str, list[str]]]) -> str:
    return "\n".join([MODELS_START, *models_section(models), MODELS_END])


def update(page: str, models: list[tuple[str, list[str]]]) -> str:
    """The page with its two-model section replaced (appended when it has none); every other line as it was."""
    return replace_block(page, MODELS_START, MODELS_END, models_block(models))


def replace_block(page: str, start: str, end: str, block: str) -> str:
    """The page with the block between its start and end markers (markers included) replaced by `block`, or `block`
    appended when the page has none."""
    if start in page and end in page:
        before, rest = page.split(start, 1)
        return before + block + rest.split(end, 1)[1]
    return page.rstrip("\n") + "\n\n" + block + "\n"


if __name__ == "__main__":
    arguments = sys.argv[1:]
    if arguments[:1] == ["--update"]:
        target, rest = arguments[1], arguments[2:]
        parsed = [(label, runs.split(",")) for flag, value in zip(rest[::2], rest[1::2]) if flag == "--model"
                  for label, runs in [value.split("=", 1)]]
        with open(target, encoding="utf-8") as f:
            page = update(f.read(), parsed)  # computed before the page is opened to write
        with open(target, "w", encoding="utf-8") as f:
            f.write(page)
    else:
        print(main(arguments), end="")
