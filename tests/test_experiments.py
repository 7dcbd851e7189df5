import json

import polars as pl
import pytest

from engram_eval.report.summary import summarize


def test_the_generation_section_recounts_from_the_generations(tiny, tiny_bank, tmp_path):
    from engram_eval.run.generation import run_generate
    from engram_eval.report.summary import load_generations, load_run
    from conftest import sweep

    result = sweep(tiny, tiny_bank, tmp_path / "run", layers=[1, 3], strengths=[1.0, 20.0])
    run_generate(tiny, result.out, cells="all", max_new_tokens=8, progress=False)
    generations = load_generations(result.out)
    g = summarize(*load_run(result.out), generations=generations)["generation"]
    rows = generations.to_dicts()
    for row in rows:
        row["probability"] = "correct" if row["ratio"] > 1 else "incorrect" if row["ratio"] < 1 else "tie"
    for p, verdicts in g["confusion"].items():
        for v, n in verdicts.items():
            assert n == sum(r["probability"] == p and r["verdict"] == v for r in rows)
    for entry in g["by_kind"]:
        mine = [r for r in rows if (r["control_kind"] or r["role"]) == entry["kind"]]
        flipped = [r for r in mine if r["flipped"]]
        assert entry["rows"] == len(mine) > 0
        if entry["kind"] != "baseline":
            assert (entry["flipped_says_correct_first"]["k"], entry["flipped_says_correct_first"]["n"]) == (
                sum(r["first_answer"] == "correct" for r in flipped), len(flipped))
    assert sum(entry["rows"] for entry in g["by_kind"]) == len(rows)
    assert g["cells"] == len(rows) == len(g["texts"])


def test_rag_priming_compares_the_four_conditions_on_the_same_questions(tiny, tmp_path):
    from engram_eval.report.summary import load_run
    from engram_eval.report.statistics import mcnemar_exact
    from conftest import sweep, write_tiny_bank

    bank_path = write_tiny_bank(tmp_path)
    bank_path.write_text(bank_path.read_text().replace("  engram: topic\n", "  engram: topic\n  context: \"Alpha blockers come first.\"\n"))
    result = sweep(tiny, bank_path, tmp_path / "run", layers=[1, 3], strengths=[1.0, 20.0], context="both")
    frame, run = load_run(result.out)
    rag = summarize(frame, run)["rag"]
    rows = frame.to_dicts()
    assert rag["questions"] == 3 and [c["strength"] for c in rag["conditions"]][1] == 1.0
    base = {(r["question_id"], r["context"]): r["correct_before"] for r in rows if r["role"] == "baseline"}
    for c in rag["conditions"]:
        at = {(r["question_id"], r["context"]): r["correct_after"] for r in rows
              if r["role"] == "relevant" and (r["layer"], r["strength"]) == (c["layer"], c["strength"])}
        qs = ["q1", "q2", "q3"]
        assert c["no engram"]["k"] == sum(base[(q, False)] for q in qs)
        assert c["engram only"]["k"] == sum(at[(q, False)] for q in qs)
        assert c["context only"]["k"] == sum(base[(q, True)] for q in qs)
        assert c["engram + context"]["k"] == sum(at[(q, True)] for q in qs)
        b = sum(at[(q, True)] and not base[(q, True)] for q in qs)
        d = sum(base[(q, True)] and not at[(q, True)] for q in qs)
        assert (c["engram_context_only"], c["context_only"], c["p_value"]) == (b, d, mcnemar_exact(b, d))
    best = max(((r["layer"], r["strength"]) for r in rows if r["role"] == "relevant"),
               key=lambda cell: (sum(r["correct_after"] for r in rows if r["role"] == "relevant" and r["context"]
                                     and (r["layer"], r["strength"]) == cell), -cell[0], -cell[1]))
    assert (rag["conditions"][0]["layer"], rag["conditions"][0]["strength"]) == best
    assert sorted(q["question_id"] for q in summarize(frame, run)["questions"]) == [
        f"{q} {c}context" for q in ("q1", "q2", "q3") for c in "+-"]  # each condition is its own, labelled unit


def test_the_rag_ladder_recounts_each_rung_on_the_same_questions_across_runs(tiny, tmp_path):
    """null prefix / mean engram / learned engram (another run, --ladder) / the context itself, without the context for
    the engram rungs, each at its best cell: recounted from the rows."""
    from engram_eval.core.spec import Extraction
    from engram_eval.report.rendering import render_markdown
    from engram_eval.report.summary import load_run
    from conftest import sweep, write_tiny_bank

    bank_path = write_tiny_bank(tmp_path)
    text = bank_path.read_text().replace("  engram: topic\n", "  engram: topic\n  context: \"Alpha blockers come first.\"\n")
    bank_path.write_text(text.replace("controls: [stars, noise, anti]", "controls: [stars, ~gaussian]"))
    grid = dict(layers=[1, 3], strengths=[1.0, 20.0], context="both")
    mean = sweep(tiny, bank_path, tmp_path / "mean", **grid)
    learned = sweep(tiny, bank_path, tmp_path / "learned", extraction=Extraction(pooling="learned", learn_steps=3), **grid)
    frame, run = load_run(mean.out)
    other = load_run(learned.out)
    summary = summarize(frame, run, ladder=[("learned run", *other)])
    ladder = summary["rag"]["ladder"]
    assert [r["rung"] for r in ladder] == ["no engram", "null prefix", "mean engram (this run)", "learned engram (learned run)",
                                           "context in the prompt, no engram"]

    def best(rows, keep) -> int:
        cells = {}
        for r in rows:
            if keep(r) and r["context"] is False:
                key = (r["engram"], r["layer"], r["strength"])
                cells[key] = cells.get(key, 0) + r["correct_after"]
        return max(cells.values())

    rows, other_rows = frame.to_dicts(), other[0].to_dicts()
    assert ladder[0]["k"] == sum(r["correct_before"] for r in rows if r["role"] == "baseline" and r["context"] is False)
    assert ladder[1]["k"] == best(rows, lambda r: r["engram"] == "~gaussian")
    assert ladder[2]["k"] == best(rows, lambda r: r["role"] == "relevant")
    assert ladder[3]["k"] == best(other_rows, lambda r: r["role"] == "relevant")
    assert ladder[4]["k"] == sum(r["correct_before"] for r in rows if r["role"] == "baseline" and r["context"] is True)
    assert {r["n"] for r in ladder} == {3}
    assert "RAG ladder: the same 3 questions" in render_markdown(summary)
    from click.testing import CliRunner

    from engram_eval.cli import cli

    shown = CliRunner().invoke(cli, ["report", str(mean.out), "--ladder", str(learned.out), "--format", "json"])
    assert shown.exit_code == 0, shown.output
    got = json.loads(shown.output)["rag"]["ladder"]
    assert [r["k"] for r in got] == [r["k"] for r in ladder] and got[3]["rung"] == f"learned engram ({learned.out})"
    from engram_eval.core.errors import EngramEvalError

    with pytest.raises(EngramEvalError, match=r"^--ladder partial: lacks questions q3 of this run's with a context$"):
        summarize(frame, run, ladder=[("partial", other[0].filter(pl.col("question_id") != "q3"), other[1])])


def test_the_chunk_count_section_recounts_the_seed_table(tiny, tiny_bank, tmp_path):
    from engram_eval.bank.banks import load_bank
    from engram_eval.report.rendering import render_markdown
    from engram_eval.report.summary import load_run
    import numpy as np
    from scipy.stats import bootstrap
    from conftest import sweep
    from reference import reference_engram

    result = sweep(tiny, tiny_bank, tmp_path / "run", layers=[1, 3], strengths=[1.0, 9.0], chunks=[2, 4, 8])
    frame, run = load_run(result.out)
    summary = summarize(frame, run)
    rows, bank = frame.to_dicts(), load_bank(tiny_bank)
    assert set(summary["heatmaps"]) == {"relevant k=2", "relevant k=4", "relevant k=8"}
    for c in summary["chunk_count"]:
        k = c["chunks"]
        sizes = []
        for name, source in bank.sources.items():
            n = len(tiny.tokenizer(source.text)["input_ids"])
            sizes += [n // k, n - (k - 1) * (n // k)]
        assert c["tokens_per_chunk"] == [min(sizes), max(sizes)]
        per_question = {}
        for r in rows:
            if r["role"] == "relevant" and r["chunks"] == k:
                per_question.setdefault(r["question_id"], []).append(r["log_improvement"])
        means = [sum(v) / len(v) for v in per_question.values()]
        assert c["mean_log_improvement"] == pytest.approx(sum(means) / len(means))
        # scipy's percentile bootstrap written out: 9999 resamples of the sorted per-question means, seed 0
        interval = bootstrap((np.sort(means),), np.mean, confidence_level=0.95, n_resamples=9999, method="percentile",
                             rng=np.random.default_rng(0)).confidence_interval
        assert c["mean_log_improvement_ci95"] == pytest.approx((interval.low, interval.high))
        rel = {(r["question_id"], r["layer"], r["strength"]): r["ratio"] for r in rows if r["role"] == "relevant" and r["chunks"] == k}
        anti = [r for r in rows if r["control_kind"] == "anti" and r["chunks"] == k]
        beats = sum(rel[(r["question_id"], r["layer"], r["strength"])] > r["ratio"] for r in anti)
        assert (c["directional"]["k"], c["directional"]["n"]) == (beats, len(anti))
        signals = []
        for layer in (1, 3):
            a = reference_engram(tiny.model, tiny.tokenizer, bank.sources["topic"].text, layer, k=k).flatten().double()
            b = reference_engram(tiny.model, tiny.tokenizer, bank.sources["anti"].text, layer, k=k).flatten().double()
            signals += [100 * (1 - (a @ b / (a.norm() * b.norm())).item())] * 3  # three questions share topic and anti
        assert c["anti_difference_signal"] == pytest.approx(sum(signals) / len(signals), abs=1e-4)
    assert "## Chunk count (the seed's table): per k" in render_markdown(summary)
