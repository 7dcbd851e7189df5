import html
import json

import pytest

from engram_eval.report.html_report import render_html
from engram_eval.report.formatting import fmt_best, fmt_flips, fmt_percent, fmt_share
from engram_eval.report.rendering import render_json, render_markdown
from engram_eval.report.summary import summarize


def test_markdown_json_and_html_carry_the_same_numbers(run):
    frame, meta = run
    summary = summarize(frame, meta, engram_role="all")
    markdown, data, page = render_markdown(summary), json.loads(render_json(summary)), render_html(summary)
    assert data["headline"] == json.loads(json.dumps(summary["headline"]))
    assert set(summary["heatmaps"]) == {"relevant", "anti", "irrelevant", "random"}
    for q in summary["questions"]:
        tables = markdown.split("\n## Questions")[1]  # the off-distribution list, above, names questions too
        outcome, cases = [l for l in tables.splitlines() if l.startswith(f"| {q['question_id']} |")]
        assert outcome.endswith(f"| {fmt_flips(q)} | {q['breaks']} | {fmt_percent(q['anti_steerable'])} |") and f"| {q['decision']['advice']} |" in cases
        assert html.escape(q["decision"]["advice"]) in page
    assert page.count("class='questions'") == 2 * len(summary["heatmaps"])  # one clickable figure per count heatmap
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")


def test_a_best_cell_below_the_baseline_is_not_called_best():
    cell = {"layer": 8, "strength": 1.0, "ratio": 0.3, "p_correct": 0.01, "p_incorrect": 0.0333, "mass_ratio": 0.5}
    assert fmt_best({**cell, "improves_on_baseline": True}) == "L8, 1: 0.3 (0.01 / 0.0333)"
    assert fmt_best({**cell, "improves_on_baseline": False}) == "no cell improves on the baseline (highest L8, 1: 0.3 (0.01 / 0.0333))"
    assert fmt_flips({"flips": 7, "clean_flips": 1, "flips_p_correct_fell": 4, "flips_collapsed": 2}) == "7 (1 / 4 / 2)"


def test_the_report_shows_each_engrams_largest_chunk_share(run):
    frame, meta = run
    summary = summarize(frame, meta)
    assert summary["header"]["largest_chunk_share"] == meta["largest_chunk_share"]
    markdown = render_markdown(summary).split("## Largest chunk's share")[1]
    for name, shares in meta["largest_chunk_share"].items():
        row = next(line for line in markdown.splitlines() if line.startswith(f"| {name} |"))
        assert row == "| " + " | ".join([name, *[fmt_share(shares[str(layer)]) for layer in (1, 2, 4)]]) + " |"


def test_words_in_table_cells_wrap_whole_at_a_narrow_width(run):
    import io

    from rich.console import Console

    from engram_eval.report.rendering import render_table

    frame, meta = run
    summary = summarize(frame, meta)
    buffer = io.StringIO()
    render_table(summary, Console(file=buffer, width=100, color_system=None))
    text = buffer.getvalue()
    for control in summary["controls"]:
        for word in control["verdict"].split():
            assert word in text


def test_the_header_names_the_model_as_it_is(run):
    frame, meta = run
    summary = summarize(frame, {**meta, "model_description": "SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32"})
    assert render_markdown(summary).startswith("# engram-eval report: tiny on SmolLM2-135M-Instruct, Q4_1 GGUF dequantized to float32")


def test_the_attention_section_averages_per_engram_kind(tiny, tiny_bank, tmp_path):
    import polars as pl

    from conftest import sweep

    result = sweep(tiny, tiny_bank, tmp_path / "run", record_attention=True, layers=[2], strengths=[1.0, 5.0])
    frame = pl.read_parquet(result.results_path)
    attention = {a["kind"]: a for a in summarize(frame, result.run)["attention"]}
    assert list(attention)[:2] == ["baseline", "relevant"]
    for kind, a in attention.items():
        rows = [r for r in frame.to_dicts() if (r["control_kind"] or r["role"]) == kind]
        assert a["rows"] == len(rows)
        assert a["attn_prefix_share"] == pytest.approx(sum(r["attn_prefix_share"] for r in rows) / len(rows))
        assert a["attn_first_share"] == pytest.approx(sum(r["attn_first_share"] for r in rows) / len(rows))
    assert "## Where the model looks" in render_markdown(summarize(frame, result.run))


def test_a_questions_generated_texts_name_their_context_condition():
    from engram_eval.report.sections import drilldown_sections

    texts = [{"role": "baseline", "engram": None, "layer": None, "strength": None, "chunks": None, "context": True,
              "first_answer": "none", "verdict": "neither", "text": "a"},
             {"role": "relevant", "engram": "pheo", "layer": 8, "strength": 2.0, "chunks": 16, "context": False,
              "first_answer": "correct", "verdict": "correct", "text": "b\nc"}]
    (section,) = drilldown_sections({"question_id": "q1", "conditions": [], "texts": texts})
    rows = section.rows
    assert [row[0] for row in rows] == ["baseline with context", "pheo L8 x2, without context"]
    assert rows[1][3] == "b c"


@pytest.mark.parametrize("width", [80, 120, 160])
def test_the_terminal_report_fits_any_width_without_cutting_a_column(width):
    """Every line within the width, every word of every title, column header and cell whole somewhere in the text
    (a table too wide for its columns is stacked, not cropped to 'controls-adju' or 'bre'), and the headline per
    engram kind, with its conclusion, within the first 30 lines at 120 columns and wider."""
    import io
    import re

    from decisive import every_section_frame, every_section_generations, every_section_run
    from rich.console import Console

    from engram_eval.report.rendering import render_table
    from engram_eval.report.sections import summary_sections

    summary = summarize(every_section_frame(), every_section_run(), generations=every_section_generations(), split=1)
    buffer = io.StringIO()
    render_table(summary, Console(file=buffer, width=width, color_system=None))
    lines = buffer.getvalue().splitlines()
    assert max(len(line) for line in lines) <= width
    words = set(re.split(r"[\s│┃┏┓┗┛┡┩└┘┌┐━─╇╋┳┻┼├┤]+", buffer.getvalue()))
    for section in summary_sections(summary):
        for text in [section.title, *section.columns, *(cell for row in section.rows for cell in row)]:
            missing = [w for w in text.split() if w not in words]
            assert not missing, (section.key, text, missing)
    if width >= 120:
        first_screen = " ".join(line.strip(" │┃") for line in lines[:30])
        assert summary["headline"]["conclusion"].split()[-1] in first_screen
        for entry in summary["headline"]["by_kind"]:
            assert any(line.startswith(f"│ {entry['kind']} ") for line in lines[:30])


def test_off_distribution_questions_are_found_from_the_baseline_rows_and_marked():
    """A baseline whose answers hold under 10% of the probability, or whose top token ends the turn, is named (per
    condition), recorded by the sweep in run.json, and named once, in its own section after the headline."""
    import polars as pl
    from decisive import decisive_frame, decisive_run

    from engram_eval.run.results import off_distribution

    frame = decisive_frame().with_columns(
        mass=pl.when(pl.col("question_id") == "q03").then(0.05).otherwise(pl.col("mass")),
        top_token=pl.when(pl.col("question_id") == "q07").then(pl.lit("<|im_end|>")).otherwise(pl.col("top_token")))
    base = frame.filter(pl.col("role") == "baseline")
    expected = {r["question_id"] for r in base.iter_rows(named=True) if r["mass"] < 0.1 or r["top_token"] == "<|im_end|>"}
    off = off_distribution(frame, {"<|im_end|>", "<|endoftext|>"})
    assert set(off) == expected == {"q03", "q07"}
    assert off["q03"] == "its answers hold 5.0% of the probability"
    assert off["q07"] == "the top token is '<|im_end|>' (end of turn or text) at p 0.50"
    summary = summarize(frame, {**decisive_run(), "off_distribution": off})
    markdown = render_markdown(summary)
    for q in summary["questions"]:
        assert q["off_distribution"] == off.get(q["question_id"])
    flagged = markdown.split("## Off-distribution: 2 of 20 questions have answers the model does not expect")[1].split("\n## ")[0]
    assert [line for line in flagged.splitlines() if line.startswith("| q0")] == \
        [f"| {q} | {off[q]} |".replace("|>", "\\|>").replace("<|", "<\\|") for q in sorted(off)]
    assert "off-distribution" not in markdown.split("## Questions")[1].split("\n## ")[0]  # named once, not on every row


def test_a_table_of_more_than_long_rows_starts_folded_and_one_of_exactly_long_rows_does_not(monkeypatch):
    """The HTML page's threshold at its edge: a table of n rows is open when LONG = n and folded when LONG = n - 1."""
    import re

    from decisive import every_section_frame, every_section_run

    from engram_eval.report import html_report
    from engram_eval.report.sections import summary_sections

    summary = summarize(every_section_frame(), every_section_run())
    section = next(s for s in summary_sections(summary) if s.key == "calibration")
    n = len(section.rows)
    for long, tag in ((n, "h3"), (n - 1, "details")):
        monkeypatch.setattr(html_report, "LONG", long)
        page = html_report.render_html(summary)
        assert re.search(rf"<{tag} id='section-calibration'", page), (long, tag)
