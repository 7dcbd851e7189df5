import math

import pytest
from click.testing import CliRunner

from engram_eval.cli import cli
from engram_eval.report.drilldown import question_drilldown
from engram_eval.core.errors import EngramEvalError


def test_boosts_and_sink_scores_recompute_from_the_rows(run):
    frame, _ = run
    drill = question_drilldown(frame, "q2")
    (condition,) = drill["conditions"]
    rows = [r for r in frame.to_dicts() if r["question_id"] == "q2"]
    base = next(r for r in rows if r["role"] == "baseline")
    assert condition["baseline"]["p_correct"] == base["p_correct"] and condition["baseline"]["ratio"] == base["ratio"]
    cells = [r for r in rows if r["role"] != "baseline"]
    assert len(condition["cells"]) == len(cells) and condition["cells"][0]["role"] == "relevant"
    for cell in condition["cells"]:
        row = next(r for r in cells if (r["engram"], r["layer"], r["strength"]) == (cell["engram"], cell["layer"], cell["strength"]))
        assert cell["boost_correct"] == pytest.approx(row["p_correct"] / base["p_correct"])
        assert cell["boost_incorrect"] == pytest.approx(row["p_incorrect"] / base["p_incorrect"])
        assert cell["sink_score"] == pytest.approx(math.log(cell["boost_incorrect"]) - math.log(cell["boost_correct"]))
        assert cell["sink_score"] == pytest.approx(-row["log_improvement"], abs=1e-9)  # the same quantity, seen from the other side
    with pytest.raises(EngramEvalError) as error:
        question_drilldown(frame, "zz")
    assert str(error.value) == "--question: no question 'zz' in this run (known: q1, q2, q3)"


def test_report_question_from_the_command_line(tiny_model_dir, tiny_bank, tmp_path):
    out = tmp_path / "run"
    CliRunner().invoke(cli, ["sweep", str(tiny_bank), "--model", str(tiny_model_dir), "--layers", "1", "--strengths", "1,4",
                             "--chunks", "4", "--out", str(out), "--store", str(tmp_path / "s"), "--quiet"])
    markdown = CliRunner().invoke(cli, ["report", str(out), "--question", "q1", "--format", "markdown"]).stdout
    assert markdown.startswith("# engram-eval report: question q1") and "sink score" in markdown and "| topic | L1 | 4 |" in markdown
    result = CliRunner().invoke(cli, ["report", str(out), str(out), "--question", "q1"])
    assert result.exit_code == 2 and result.stderr == "error: --question: give one RUN\n"


def test_a_null_prefix_computed_once_is_shown_once_for_every_layer():
    """The decisive run with two null prefixes repeated across its two layers (as the sweep writes them under prefix
    injection): the drill-down shows each computed cell once, the null prefix's marked `every layer`."""
    import polars as pl
    from decisive import decisive_frame
    from test_report_recount import with_null_prefixes

    from engram_eval.report.rendering import render_drilldown

    frame = with_null_prefixes(decisive_frame())
    (condition,) = question_drilldown(frame, "q01")["conditions"]
    mine = frame.filter((pl.col("question_id") == "q01") & (pl.col("role") != "baseline"))
    assert len(condition["cells"]) == mine.filter(~pl.col("repeated")).height == mine.height - 4  # 2 nulls x 2 strengths once
    nulls = [c for c in condition["cells"] if c["control_kind"] == "null-prefix"]
    assert len(nulls) == 4 and all(c["every_layer"] and c["layer"] == 1 for c in nulls)
    assert not any(c["every_layer"] for c in condition["cells"] if c["control_kind"] != "null-prefix")
    assert render_drilldown(question_drilldown(frame, "q01"), "markdown").count("| ~gaussian | every layer |") == 2
