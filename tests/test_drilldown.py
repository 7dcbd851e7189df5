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
