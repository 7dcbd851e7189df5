"""How the report writes numbers, each rule's edges written out: 3 significant digits inside [1e-3, 1e4) for a ratio
(scientific outside it, 0 and non-finite as Python writes them), probabilities below 1e-3 in scientific notation,
counts as k/n, p-values with 4 decimals, and '-' for what is missing."""

import math

import pytest

from engram_eval.report.formatting import fmt_cell, fmt_float, fmt_p, fmt_prob, fmt_ratio, partial_banner


@pytest.mark.parametrize("value,expected", [
    (None, "-"), (0.0, "0.0"), (math.inf, "inf"), (-math.inf, "-inf"), (math.nan, "nan"),
    (1e-3, "0.001"), (9.99e-4, "9.99e-04"), (9999.0, "1e+04"), (1e4, "1.00e+04"), (2.3456, "2.35"), (-0.5, "-0.5"),
])
def test_fmt_ratio(value, expected):
    assert fmt_ratio(value) == expected


@pytest.mark.parametrize("value,expected", [(None, "-"), (1e-3, "0.001"), (9.99e-4, "9.99e-04"), (0.12345, "0.123"), (0.0, "0.00e+00")])
def test_fmt_prob(value, expected):
    assert fmt_prob(value) == expected


def test_counts_p_values_and_floats():
    assert fmt_cell({"k": 0, "n": 0}) == "-" and fmt_cell({"k": 2, "n": 5}) == "2/5"
    assert fmt_p(None) == "-" and fmt_p(0.01234) == "0.0123"
    assert fmt_float(None) == "-" and fmt_float(0.12345) == "0.123" and fmt_float(0.12345, 2) == "0.12"


def test_the_partial_banner_only_for_an_unfinished_run():
    assert partial_banner({"header": {"partial": None}}) is None
    assert partial_banner({"header": {"partial": {"questions_done": 2, "questions": 5}}}) == (
        "partial: 2 of 5 questions (the sweep has not finished; rerun it with the same command to complete the run)")


def test_a_finished_run_has_no_banner_and_a_question_without_context_names_no_condition():
    import polars as pl
    from decisive import decisive_frame, decisive_run

    from engram_eval.report.drilldown import question_drilldown
    from engram_eval.report.rendering import render_markdown
    from engram_eval.report.sections import drilldown_sections
    from engram_eval.report.summary import summarize

    frame = decisive_frame()
    markdown = render_markdown(summarize(frame, decisive_run()))
    assert not any(line.startswith("> ") for line in markdown.splitlines())
    (section,) = drilldown_sections(question_drilldown(frame.filter(pl.col("question_id") == "q02"), "q02"))
    assert section.title.startswith("q02: baseline p(correct) ")
