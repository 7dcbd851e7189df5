"""The report's sections: each table as a typed value (key, title, columns, rows, an optional figure), built from a
run's summary, a comparison of runs or one question's drill-down. The renderers (engram_eval.report.rendering, the HTML page)
iterate them; none reads a title to know what a section is. docs/report.md lists them."""

from __future__ import annotations

from .experiments import cell_label
from .run_summary import RunSummary
from .figures import CountHeatmap, DoseCurves, EffectHeatmap, KindRates, RocCurves, Section, SinkBars
from .sink import sink_line
from .formatting import (
    fmt_best,
    fmt_cell,
    fmt_cell_name,
    fmt_difference,
    fmt_effect,
    fmt_flips,
    fmt_float,
    fmt_interval,
    fmt_measured,
    fmt_needed,
    fmt_p,
    fmt_percent,
    fmt_prob,
    fmt_probs,
    fmt_rate,
    fmt_ratio,
    fmt_share,
    fmt_side_effect,
    partial_banner,
)


def summary_sections(summary: RunSummary, short: bool = False) -> list[Section]:
    """Every table of a run's report, in report order; the renderers iterate these. short (markdown, for CI step
    summaries) leaves out the effect-size tables."""
    h = summary["header"]
    show_k = isinstance(h["chunks"], list)
    sections = [_headline_section(summary["headline"], h["subject"]), *_off_distribution_sections(h),
                *_sink_sections(summary.get("sink"), h["subject"]), Section("run",
        "Run", ["field", "value"],
        [["model", f"{h['model']} ({h['model_fingerprint']})"], ["bank", h["bank"]],
         ["grid", f"layers {', '.join(map(str, h['layers']))} x strengths {', '.join(f'{s:g}' for s in h['strengths'])}, k = {', '.join(map(str, h['chunks'])) if show_k else h['chunks']}"],
         ["scoring", f"{h['scoring']}, {h['injection']} injection"],
         ["cells", f"{h['cells']} rows, {h['questions']} questions"
          + (f" in {h['conditions']} conditions (with and without context)" if h["conditions"] != h["questions"] else "")
          + f" (run {h['run_id']}, {partial_banner(summary) or h['status']})"],
         ["duration", "-" if h["duration_seconds"] is None else f"{h['duration_seconds']:.1f} s"]],
    )]
    if h["largest_chunk_share"]:
        sections.append(Section("chunk-share",
            "Largest chunk's share of each engram's summed row norms, per layer (above 50%, one chunk dominates)",
            ["engram", *[f"L{layer}" for layer in h["layers"]]],
            [[name, *[fmt_share(shares.get(str(layer))) for layer in h["layers"]]] for name, shares in sorted(h["largest_chunk_share"].items())],
        ))
    sections.append(Section("questions",
        "Questions (probabilities: p(correct) / p(incorrect))",
        ["question", "baseline ratio", "baseline p", "correct?", "related wrong", f"best cell of {h['subject']}",
         "flips (clean / p(correct) fell / mass collapsed)", "breaks", "anti-steerable (cells the wrong way)"],
        [[q["question_id"], fmt_ratio(q["baseline_ratio"]), fmt_probs(q["baseline_p_correct"], q["baseline_p_incorrect"]),
          "yes" if q["correct_before"] else "no", {True: "yes", False: "no", None: "-"}[q["related_wrong"]],
          fmt_best(q["best"], show_k), fmt_flips(q), str(q["breaks"]), fmt_percent(q["anti_steerable"])]
         for q in summary["questions"]],
    ))
    sections.append(Section("calibration",
        "Calibration cases, and the practical guide's decision rule (in its order) with what the grid measured at its advice",
        ["question", "cases (relevant cells)", "advice", "measured at the advice"],
        [[q["question_id"], ", ".join(f"{c} {n}" for c, n in q["cases"].items()), q["decision"]["advice"], fmt_measured(q["decision"])]
         for q in summary["questions"]],
    ))
    for name, heatmap in summary["heatmaps"].items():
        for measure, label in (("flip", "flip rate (flips / baseline-wrong questions)"), ("break", "fragile-correct rate (breaks / baseline-correct questions)")):
            sections.append(Section(f"heatmap:{name}:{measure}",
                f"Heatmap {name}: {label}", ["layer \\ strength", *[f"{s:g}" for s in heatmap["strengths"]]],
                [[f"L{layer}", *[fmt_cell(c) for c in row]] for layer, row in zip(heatmap["layers"], heatmap[measure])],
                CountHeatmap(heatmap, measure), right_aligned=True,
            ))
    sections.append(_best_cell_section(summary["headline"], show_k, h["subject"]))
    if (split := summary.get("split")) is not None:
        sections.append(Section("held-out",
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
    sections.append(Section("exact-tests",
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
                sections.append(Section(f"effect:{name}:{label}",
                    f"Effect size {label}{suffix}: mean log-improvement (95% bootstrap CI over questions)",
                    ["layer \\ strength", *[f"{s:g}" for s in effects["strengths"]]],
                    [[f"L{layer}", *[fmt_effect(cell) for cell in row]] for layer, row in zip(effects["layers"], grid)],
                    EffectHeatmap(effects, label),
                ))
    sections.append(Section("controls",
        "Negative controls (same cells; paired sign-flip test across questions)",
        ["control", "questions", "cells rel/ctrl", "mean log impr. relevant", "mean log impr. control", "difference", "p",
         "verdict", "flips rel/ctrl", "breaks rel/ctrl", "controls-adjusted flip rate (relevant - control flip share)"],
        [[c["kind"], str(c["questions"]), f"{c['cells_relevant']}/{c['cells_control']}", fmt_float(c["mean_log_improvement_relevant"]),
          fmt_float(c["mean_log_improvement_control"]), fmt_float(c["mean_difference"]), fmt_p(c["p_value"]), c["verdict"],
          f"{c['flips_relevant']}/{c['flips_control']}", f"{c['breaks_relevant']}/{c['breaks_control']}",
          fmt_difference(c["adjusted_flip_difference"])]
         for c in summary["controls"]],
    ))
    if (dose := summary.get("dose_matched")) is not None:
        sections.extend(_dose_sections(dose))
    if (cal := summary.get("calibration")) is not None:
        sections.append(_confidence_section(cal))
    sections.append(Section("semantic-sink",
        "Semantic sink (relevant engram): is the wrong answer related to the topic?",
        ["related wrong", "questions", "flip rate (cells)", "break rate (cells)"],
        [[{True: "yes", False: "no", None: "unlabelled"}[s["related_wrong"]], str(s["questions"]), fmt_rate(s["flip"]), fmt_rate(s["break"])]
         for s in summary["semantic_sink"]],
    ))
    if summary.get("chunk_count"):
        sections.append(Section("chunk-count",
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
        sections.append(Section("attention",
            "Where the model looks: the last prompt position's attention (mean over heads, layers and cells)",
            ["engram kind", "rows", "share on the k engram positions (first k positions for baseline, add, actadd)", "share on position 0"],
            [[a["kind"], str(a["rows"]), f"{a['attn_prefix_share']:.3f}", f"{a['attn_first_share']:.3f}"] for a in summary["attention"]],
        ))
    if (g := summary.get("generation")) is not None:
        verdicts = ("correct", "incorrect", "both", "neither")
        sections.append(Section("generation-confusion",
            f"Probability vs generated text ({g['cells']} generated cells): probability verdict (ratio) against what the text says",
            ["probability says \\ text says", *verdicts],
            [[p, *[str(g["confusion"][p][v]) for v in verdicts]] for p in ("correct", "incorrect", "tie") if any(g["confusion"][p].values())],
        ))
        sections.append(Section("generation-flips",
            "Generation flips: does the text say the correct answer first? (per engram kind)",
            ["engram kind", "generated rows", "flipped cells (ratio crossed 1) whose text says the correct answer first",
             "rows whose text says the correct answer first", "rows the probability calls correct"],
            [[k["kind"], str(k["rows"]), "-" if k["flipped_says_correct_first"] is None else fmt_rate(k["flipped_says_correct_first"]),
              fmt_rate(k["says_correct_first"]), fmt_rate(k["probability_correct"])] for k in g["by_kind"]],
        ))
        sections.append(Section("generation-examples",
            "Generated text, examples (first 120 characters)", ["question", "cell", "text verdict", "text"],
            [[e["question_id"], e["cell"], e["verdict"], e["text"].replace("\n", " ")] for e in g["examples"]],
        ))
    if (e := summary.get("ensemble_comparison")) is not None:
        sections.append(Section("generation-ensemble",
            f"Plain vs ensembled generation (--ensemble {e['ensemble']}, --ensemble-decay {e['ensemble_decay']:g}"
            f"{', --reextract' if e['reextract'] else ''}) on the {e['cells']} cells both generated",
            ["engram kind", "cells", "texts that differ", "plain: says the correct answer first",
             "ensembled: says the correct answer first"],
            [[k["kind"], str(k["cells"]), str(k["texts_differ"]), fmt_rate(k["plain_says_correct_first"]),
              fmt_rate(k["ensembled_says_correct_first"])] for k in e["by_kind"]],
        ))
    if (rag := summary.get("rag")) is not None:
        conditions = ("no engram", "engram only", "context only", "engram + context")
        sections.append(Section("rag",
            f"RAG priming: share of the {rag['questions']} questions with a context that are correct (ratio > 1)",
            ["cell", *conditions, "engram + context vs context only (exact McNemar)"],
            [[f"{c['cell']}: L{c['layer']}, {c['strength']:g}", *[fmt_rate(c[name]) for name in conditions],
              f"{c['engram_context_only']} vs {c['context_only']} discordant, p = {fmt_p(c['p_value'])}"] for c in rag["conditions"]],
        ))
        sections.append(Section("rag-ladder",
            f"RAG ladder: the same {rag['questions']} questions, from no engram to the context itself (engram rungs without "
            "the context, at their best cell, chosen after looking)",
            ["rung", "best cell", "correct"],
            [[r["rung"], r["cell"] or "-", fmt_rate(r)] for r in rag["ladder"]],
        ))
    if (variability := summary.get("variability")) is not None:
        sections.extend(_variability_sections(variability))
    return sections


def _variability_sections(variability: dict) -> list[Section]:
    """Per kind whose source has paraphrases: the effect's spread over the paraphrases (and over the samples drawn
    from them) per question, at the question's best cell of the relevant engram, and the bank's "survives rewording"
    rate."""
    sections = []
    for variant, plural in (("paraphrase", "paraphrases"), ("sample", "samples")):
        for spread in variability[plural]:
            quantiles = spread["log_improvement_quantiles"] or {}
            sections.append(Section(f"variability:{variant}:{spread['kind']}",
                f"Variability over {plural} ({spread['kind']}): survives {'rewording' if variant == 'paraphrase' else 'sampling'} "
                f"{fmt_rate(spread['survives'])} (baseline-wrong questions flipped by every {variant} / by any); "
                f"log-improvement at the best cells, 5% / 50% / 95%: "
                + " / ".join(fmt_float(quantiles.get(q)) for q in ("0.05", "0.5", "0.95")),
                ["question", "engram", plural, "log-improvement at the best cell: min / median / max", f"{plural} that flip"],
                [[q["question_id"], q["engram"], str(q["variants"]),
                  " / ".join(fmt_float(q[f"log_improvement_{m}"]) for m in ("min", "median", "max")),
                  "-" if q["flipped"] is None else f"{q['flipped']} of {q['variants']}"] for q in spread["questions"]],
            ))
    return sections


def _dose_sections(dose: dict) -> list[Section]:
    """Controls at equal disturbance: the paired tests at each target dose, the strength each kind needs, and (with the
    neutral probe) the side-effect table."""
    measure = dose["dose"]
    sections = [Section("dose-matched",
        f"Dose-matched controls: relevant vs each control at equal {measure} (interpolated in log strength; "
        f"{dose['non_monotone']} of {dose['series']} series not monotone in strength)",
        ["dose (nats)", "control", "questions", "mean log impr. difference (relevant - control)", "p", "q (BH over the section)",
         "verdict"],
        [[f"{e['dose']:g}", e["control"], str(e["questions"]), fmt_float(e["mean_difference"]), fmt_p(e["p_value"]),
          fmt_p(e["q_value"]), e["verdict"]] for e in dose["entries"]] or [["none", *[""] * 6]],
        DoseCurves(dose["curves"], dose["targets"], measure),
    )]
    needed = {(n["kind"], n["dose"]): n for n in dose["strength_needed"]}
    kinds = list(dict.fromkeys(n["kind"] for n in dose["strength_needed"]))
    sections.append(Section("dose-strength",
        f"Strength needed to reach each dose of {measure} (median over the series that reach it; series reaching / all)",
        ["engram kind", *[f"{target:g} nats" for target in dose["targets"]]],
        [[kind, *[fmt_needed(needed[(kind, target)]) for target in dose["targets"]]] for kind in kinds],
    ))
    if dose["side_effects"] is not None:
        sections.append(Section("side-effects",
            f"Side effects on the neutral passage ({dose['dose_source'].partition(': ')[2]}): median over each kind's cells",
            ["engram kind", "layer", "strength", "cells", "neutral KL (nats)", "perplexity ratio (steered / unsteered)"],
            [[r["kind"], f"L{r['layer']}", f"{r['strength']:g}", str(r["cells"]), fmt_float(r["neutral_kl"]),
              fmt_float(r["neutral_ppl_ratio"])] for r in dose["side_effects"]],
        ))
    return sections


def _confidence_section(cal: dict) -> Section:
    """Does a label-free signal predict that the baseline's answer is correct? (the seeds' Use Case 2)"""
    title = (f"Confidence calibration: do label-free signals predict a correct baseline? ({cal['questions']} questions, "
             f"{cal['positives']} correct at baseline; AUROC 0.5 = chance, 95% bootstrap CI over questions)")
    sel = cal["selective"]
    selective_rows = [
        [f"accuracy kept, abstaining on the {sel['abstained']} fragile questions", fmt_percent(sel["accuracy_kept_fragile"]), ""],
        [f"accuracy kept, abstaining on the {sel['abstained']} lowest-margin questions", fmt_percent(sel["accuracy_kept_margin"]), ""],
        ["accuracy of all questions", fmt_percent(sel["accuracy_all"]), ""],
    ]
    if cal["too_few"]:
        rows = [["AUROC", "too few questions to tell (fewer than 10 correct or 10 wrong baselines)", ""], *selective_rows]
    else:
        rows = [*[[f"AUROC {s['name']}", "-" if s["auroc"] is None else f"{s['auroc']:.3f}", fmt_interval(s["ci95"])]
                  for s in cal["signals"]],
                *[[f"{d['a']} - {d['b']} (AUROC difference)", f"{d['delta']:+.3f}", fmt_interval(d["ci95"])] for d in cal["differences"]],
                *selective_rows]
    return Section("confidence-calibration", title, ["measure", "value", "95% CI"], rows,
                   None if cal["too_few"] else RocCurves(cal["roc"]))


def _headline_section(headline: dict, steered: str) -> Section:
    """The research question first: each engram kind's flips and breaks, and each control's verdict against the
    relevant engram (or vector), under the one-line conclusion."""
    best = headline["best_cell"]
    at = "-" if best is None else f"L{best['layer']} x{best['strength']:g}" + ("" if best["chunks"] is None else f" k={best['chunks']}")
    return Section("headline",
        f"Headline: {headline['conclusion']}",
        ["engram kind", "baseline-wrong questions that flip somewhere", "baseline-correct questions that break somewhere",
         f"paired test against {steered}",
         f"side effects at {steered}'s best cell ({at}): median {headline['side_effect_measure']}",
         "anti-steerable: mean share of a question's cells that move its log-odds the wrong way"],
        [[k["kind"], fmt_rate(k["question_flip_rate"]), fmt_rate(k["question_fragile_correct_rate"]),
          "-" if k["verdict"] is None else f"{k['verdict']} (p {fmt_p(k['p_value'])})", fmt_side_effect(k["at_best_cell"]),
          fmt_percent(k["anti_steerable"]["mean"])]
         for k in headline["by_kind"]],
        KindRates(headline["by_kind"]),
    )


def _off_distribution_sections(header: dict) -> list[Section]:
    """The questions whose baseline answers are off-distribution, named once (not on every row of every table)."""
    off = header["off_distribution"]
    if not off:
        return []
    return [Section("off-distribution",
        f"Off-distribution: {len(off)} of {header['conditions']} questions have answers the model does not expect "
        "(a flip there measures noise more than knowledge)", ["question", "why"], [[q, off[q]] for q in sorted(off)])]


def _sink_sections(sink: dict | None, steered: str) -> list[Section]:
    """The semantic sink measured per answer (engram_eval.report.sink), when the bank lets it be: its one line over
    the per-kind Δs, then the paired tests per cell."""
    if sink is None:
        return []

    def measured(entry: dict) -> str:
        ci = entry["ci95"]
        return f"{entry['mean']:+.3f}" + ("" if ci is None else f" ({ci[0]:+.3f} to {ci[1]:+.3f})")

    return [
        Section("sink", sink_line(sink, steered),
                ["engram kind", "questions", "Δ log p(correct)", "Δ log p(related wrong)", "Δ log p(unrelated wrong)",
                 "sink: related - unrelated (95% CI)"],
                [[k["kind"], str(k["questions"]), measured(k["correct"]), measured(k["related"]), measured(k["unrelated"]),
                  measured(k["sink"])] for k in sink["by_kind"]], SinkBars(sink["by_kind"])),
        *([] if not sink.get("dose_matched") else [Section(
            "sink-dose", f"Semantic sink at equal dose: {steered} minus each control, paired over questions (q: BH over this table)",
            ["dose (nats)", "control", "questions", "mean difference (95% CI)", "p", "q", "verdict"],
            [[f"{e['dose']:g}", e["control"], str(e["questions"]),
              "-" if e["mean_difference"] is None else measured({"mean": e["mean_difference"], "ci95": e["ci95"]}),
              fmt_p(e["p_value"]), fmt_p(e["q_value"]), e["verdict"]] for e in sink["dose_matched"]])]),
        Section("sink-tests", f"Semantic sink per cell: {steered} minus each control, paired over questions (q: BH over this table)",
                ["control", "cell", "measure", "questions", "mean difference (95% CI)", "p", "q", "verdict"],
                [[t["control"], f"L{t['layer']} x{t['strength']:g}" + ("" if t["chunks"] is None else f" k={t['chunks']}"),
                  {"sink": "sink", "correct": "Δ log p(correct)"}[t["measure"]], str(t["questions"]),
                  measured({"mean": t["mean_difference"], "ci95": t["ci95"]}), fmt_p(t["p_value"]), fmt_p(t["q_value"]),
                  t["verdict"]] for t in sink["tests"]]),
    ]


def _best_cell_section(hl: dict, show_k: bool, steered: str) -> Section:
    best = hl["best_cell"]
    return Section("best-cell",
        f"{steered[0].upper()}{steered[1:]} across the grid, and its best cell", ["measure", "value"],
        [["baseline-wrong questions that flip somewhere in the grid", fmt_rate(hl["question_flip_rate"])],
         ["... with a clean flip (p(correct) rose, mass kept)", fmt_rate(hl["question_clean_flip_rate"])],
         ["baseline-correct questions that break somewhere in the grid", fmt_rate(hl["question_fragile_correct_rate"])],
         *([] if best is None else [
             [f"flip rate at the best cell ({fmt_cell_name(best, show_k)}; chosen after looking at these questions, see --split)",
              fmt_rate(best["flip_rate"])],
             [f"fragile-correct rate at that cell ({fmt_cell_name(best, show_k)})", fmt_rate(best["break_rate"])]])],
    )


def side_by_side_sections(comparison: dict) -> list[Section]:
    """Several runs side by side: one column per run; heatmap rows by relative depth."""
    runs = comparison["runs"]
    names = [f"{i + 1}: {r['model']}" + (f" ({', '.join(f'{k} {v}' for k, v in r['differs'].items())})" if r["differs"] else "")
             for i, r in enumerate(runs)]
    kinds = sorted({kind for r in runs for kind in r["controls"]})
    rows = [["run", *[r["run"] for r in runs]], ["bank", *[r["bank"] for r in runs]],
            ["settings that differ", *[", ".join(f"{k} {v}" for k, v in r["differs"].items()) or "none" for r in runs]],
            ["layers (relative depth)", *[", ".join(f"L{l} ({d:.2f})" for l, d in zip(r["layers"], r["depths"])) for r in runs]],
            ["baseline accuracy", *[fmt_rate(r["baseline_accuracy"]) for r in runs]],
            ["baseline-wrong questions that flip", *[fmt_rate(r["question_flip_rate"]) for r in runs]],
            ["baseline-correct questions that break", *[fmt_rate(r["question_fragile_correct_rate"]) for r in runs]]]
    rows += [[f"relevant vs {kind}", *["-" if kind not in r["controls"] else
                                       f"{r['controls'][kind]['verdict']} (p {fmt_p(r['controls'][kind]['p_value'])})" for r in runs]]
             for kind in kinds]
    if any(r["sink"] for r in runs):
        rows.append(["semantic sink, Δ related - Δ unrelated (relevant; controls)",
                     *["-" if not r["sink"] else "; ".join(f"{kind} {v['mean']:+.3f}" for kind, v in r["sink"].items()) for r in runs]])
    sections = [Section("runs", "Runs side by side", ["measure", *names], rows)]
    for name, run in zip(names, runs):
        for heat, heatmap in run["heatmaps"].items():
            sections.append(Section(f"heatmap:{name}:{heat}",
                f"Heatmap {heat} of run {name}: flip rate by relative depth", ["depth (layer) \\ strength", *[f"{s:g}" for s in heatmap["strengths"]]],
                [[f"{d:.2f} (L{layer})", *[fmt_cell(c) for c in row]] for d, layer, row in zip(heatmap["depths"], heatmap["layers"], heatmap["flip"])],
                right_aligned=True,
            ))
        if run["chunk_count"]:
            sections.append(Section(f"chunk-count:{name}",
                f"Chunk count of run {name}", ["k", "mean log-improvement", "difference signal vs anti (%)", "directional steering"],
                [[str(c["chunks"]), fmt_float(c["mean_log_improvement"]),
                  "-" if c["anti_difference_signal"] is None else f"{c['anti_difference_signal']:.3f}",
                  "-" if not c["directional"]["n"] else f"{c['directional']['verdict']} ({c['directional']['k']}/{c['directional']['n']})"]
                 for c in run["chunk_count"]],
            ))
    return sections


def drilldown_sections(drill: dict) -> list[Section]:
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
        rows = [[c["engram"], ("every layer" if c["every_layer"] else f"L{c['layer']}") + (f" k={c['chunks']}" if show_k else ""),
                 f"{c['strength']:g}",
                 f"{fmt_prob(c['p_correct'])} (x{fmt_ratio(c['boost_correct'])})", f"{fmt_prob(c['p_incorrect'])} (x{fmt_ratio(c['boost_incorrect'])})",
                 fmt_ratio(c["ratio"]), fmt_float(c["sink_score"], 2), f"{c['top_correct_variant']!r} / {c['top_incorrect_variant']!r}",
                 f"{c['top_token']!r} {fmt_prob(c['p_top'])}"] for c in condition["cells"]]
        sections.append(Section(f"condition:{condition['context']}", title,
                                ["engram", "layer", "strength", "p(correct) (boost)", "p(incorrect) (boost)", "ratio", "sink",
                                 "top variants", "top token"], rows))
    if drill["texts"]:
        sections.append(Section("texts", f"{drill['question_id']}: generated texts", ["cell", "first answer", "verdict", "text"],
                         [[cell_label(t),
                           t["first_answer"], t["verdict"], t["text"].replace("\n", " ")] for t in drill["texts"]]))
    return sections
