"""`report` and `check` from the command line on the constructed run (tests/decisive.py) written as a run directory:
no model, so these run fast enough for the mutation run (`make mutation`) too."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
from click.testing import CliRunner
from decisive import decisive_frame, decisive_run

from engram_eval.report.check import compare, summarize_run
from engram_eval.cli import cli
from engram_eval.report.rendering import render_json, render_markdown
from engram_eval.report.summary import summarize
from engram_eval.run.rundir import RESULTS_FORMAT


SUBSET = [f"q{i:02d}" for i in (*range(1, 7), *range(11, 17))]  # 6 wrong, 6 right: exact sign-flip tests, quick to summarize


def small_frame():
    import polars as pl

    return decisive_frame().filter(pl.col("question_id").is_in(SUBSET))


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def run_dir(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    small_frame().write_parquet(out / "results.parquet")
    (out / "run.json").write_text(json.dumps({**decisive_run(), "results_format": RESULTS_FORMAT, "num_layers": 4}))
    return out


def test_report_formats_engram_role_split_and_output(run_dir, tmp_path):
    frame, run_json = small_frame(), {**decisive_run(), "results_format": RESULTS_FORMAT, "num_layers": 4}
    def rounded(text):  # polars may sum the read-back rows in another order: the last bit of a mean moves
        return json.loads(text, parse_float=lambda v: round(float(v), 9))

    as_json = rounded(run("report", run_dir, "--format", "json", "--split", "2", "--engram-role", "all").stdout)
    expected = rounded(render_json(summarize(frame, run_json, engram_role="all", split=2)))
    # a mean's last bit can move a rendered digit (0.975 -> 0.97 or 0.98): the sections' text is compared elsewhere
    shown, wanted = as_json.pop("sections"), expected.pop("sections")
    assert [(s["key"], s["title"], s["columns"]) for s in shown] == [(s["key"], s["title"], s["columns"]) for s in wanted]
    assert as_json == expected and as_json["split"]["seed"] == 2
    assert sorted(as_json["heatmaps"]) == ["anti", "irrelevant", "random", "relevant"]
    assert run("report", run_dir, "--format", "markdown").stdout == render_markdown(summarize(frame, run_json)) + "\n"
    out = tmp_path / "r.md"
    assert run("report", run_dir, "--format", "markdown", "--output", out).stdout == f"{out}\n"
    assert out.read_text() == render_markdown(summarize(frame, run_json)) + "\n"
    table = run("report", run_dir, "--output", tmp_path / "r.txt").stdout
    assert table == f"{tmp_path / 'r.txt'}\n" and "Headline" in (tmp_path / "r.txt").read_text()
    assert "Headline" in run("report", run_dir).stdout
    missing = run("report", run_dir, "--output", tmp_path / "nowhere" / "r.md")
    assert missing.exit_code == 2 and missing.stderr == f"error: --output: folder {tmp_path / 'nowhere'} does not exist\n"
    page = run("report", run_dir, "--format", "html")
    assert page.stdout == f"{run_dir / 'report.html'}\n" and (run_dir / "report.html").read_text().startswith("<!doctype html>")
    two = run("report", run_dir, run_dir, "--question", "q01")
    assert two.exit_code == 2 and two.stderr == "error: --question: give one RUN\n"
    drill = json.loads(run("report", run_dir, "--question", "q01", "--format", "json").stdout)
    assert drill["question_id"] == "q01" and len(drill["conditions"][0]["cells"]) == 16
    side = json.loads(run("report", run_dir, run_dir, "--format", "json").stdout)
    assert [r["run"] for r in side["runs"]] == [str(run_dir)] * 2
    assert side["runs"][0]["baseline_accuracy"]["k"] == 6


def test_check_update_pass_drift_and_tolerances(run_dir, tmp_path):
    baseline = tmp_path / "b.json"
    assert run("check", run_dir, "--baseline", baseline, "--update").stdout == f"baseline {baseline} updated (192 cells)\n"
    assert json.loads(baseline.read_text()) == json.loads(json.dumps(summarize_run(small_frame(), decisive_run())))
    passed = run("check", run_dir, "--baseline", baseline)
    assert passed.exit_code == 0 and passed.stdout == (f"check passed: 192 cells and 12 questions within rtol=0.0001, atol=0.0001 "
                                                       f"of {baseline}\n")
    data = json.loads(baseline.read_text())
    data["cells"]["q05|relevant-q05|L2|s5.0"]["log_ratio"] += 0.01
    data["totals"]["flips"] += 1
    baseline.write_text(json.dumps(data))
    failed = run("check", run_dir, "--baseline", baseline)
    assert failed.exit_code == 1 and "check failed: 2 values moved" in failed.stdout
    assert "q05|relevant-q05|L2|s5.0 log_ratio" in failed.stdout and "-0.01" in failed.stdout and "totals flips" in failed.stdout
    data["settings"] = {"max_tokens": 1}
    baseline.write_text(json.dumps(data))
    refused = run("check", run_dir, "--baseline", baseline)
    assert refused.exit_code == 2 and "max_tokens (baseline 1, run 2048)" in refused.stderr


@pytest.mark.parametrize("old,new,moved", [
    (math.inf, math.inf, False), (-math.inf, -math.inf, False), (math.nan, math.nan, False),
    (math.inf, 3.0, True), (3.0, math.inf, True), (-math.inf, math.inf, True), (math.nan, 3.0, True), (3.0, math.nan, True),
    (math.inf, math.nan, True), (1.0, 1.0 + 5e-5, False), (1.0, 1.0 + 5e-4, True),
])
def test_check_compares_infinite_and_nan_log_ratios_both_ways(old, new, moved):
    def summary(value):
        return {"questions": {"q": {"baseline_log_ratio": 0.0}}, "cells": {"c": {"log_ratio": value, "flipped": False}},
                "totals": {"cells": 1}}

    drifts = compare(summary(new), summary(old))
    assert bool(drifts) == moved and all(d.what == "c log_ratio" for d in drifts)


def test_compare_names_each_drift_exactly():
    from engram_eval.report.check import Drift

    def summary(cells, questions=None, totals=None):
        return {"questions": questions or {}, "cells": cells, "totals": totals or {}}

    base = summary({"a": {"log_ratio": 1.0, "flipped": False}, "b": {"log_ratio": 2.0, "flipped": True}},
                   {"q": {"baseline_log_ratio": 0.5}}, {"cells": 2, "flips": 1})
    now = summary({"b": {"log_ratio": 2.25, "flipped": False}, "c": {"log_ratio": 0.0, "flipped": False}},
                  {"q": {"baseline_log_ratio": 0.5}}, {"cells": 2, "flips": 0})
    assert compare(now, base) == [
        Drift("cell a", "present", "missing"),
        Drift("b log_ratio", 2.0, 2.25, 0.25),
        Drift("b flipped", True, False),
        Drift("cell c", "missing", "present"),
        Drift("totals flips", 1, 0),
    ]
    gone = summary({"a": {"log_ratio": 1.0, "flipped": False}})
    assert compare(gone, summary({"a": {"log_ratio": 1.0, "flipped": False, "extra": None}})) == []  # None == missing field
    assert compare(summary({"a": {"flipped": False}}), summary({"a": {"log_ratio": 1.0, "flipped": False}})) == [
        Drift("a log_ratio", 1.0, None, None)]
    assert compare({"totals": {}}, {"cells": {"a": {"log_ratio": 1.0}}}) == [Drift("cell a", "present", "missing")]
    assert compare({"cells": {"a": {"log_ratio": 1.0}}, "totals": {}}, {}) == [Drift("cell a", "missing", "present")]
    at_the_bound = compare(summary({"a": {"log_ratio": 1.5}}), summary({"a": {"log_ratio": 1.0}}), rtol=0.0, atol=0.5)
    assert at_the_bound == []  # |difference| <= atol + rtol |baseline|: the bound itself passes
    assert compare(summary({"a": {"log_ratio": 3.0}}), summary({"a": {"log_ratio": 2.0}}), rtol=0.5, atol=0.0) == []
    assert compare(summary({"a": {"log_ratio": 3.0}}), summary({"a": {"log_ratio": 2.0}}), rtol=0.25, atol=0.5) == []
    assert compare(summary({"a": {"log_ratio": 3.0}}), summary({"a": {"log_ratio": 2.0}}), rtol=0.25, atol=0.4) != []
    assert compare(summary({"a": {"log_ratio": -3.0}}), summary({"a": {"log_ratio": -2.0}}), rtol=0.5, atol=0.0) == []


def test_differing_settings_name_each_setting_and_shorten_long_values():
    from engram_eval.report.check import differing_settings

    long_value = list(range(30))
    assert differing_settings({"settings": {"layers": long_value, "bank": "a"}}, {"settings": {"layers": [1], "bank": "a"}}) == [
        f"layers (baseline [1], run {json.dumps(long_value)[:37]}...)"]
    assert differing_settings({"settings": {"layers": [1]}}, {"settings": {"layers": [1]}}) == []
    assert differing_settings({"settings": {"pooling": "last"}}, {"settings": {"bank": "x"}}) == [
        'bank (baseline "x", run "(absent)")', 'pooling (baseline "mean", run "last")']
    assert differing_settings({"settings": {}}, {})[0].startswith("none recorded in the baseline")


def test_the_baseline_file_is_the_runs_cells_written_out():
    """summarize_run against the rows, key by key: question|engram|Llayer|sstrength, and |kK in a chunk-count grid."""
    import polars as pl

    frame = small_frame()
    settings = {"layers": [1, 2], "bank": "decisive"}
    summary = summarize_run(frame, {"settings": settings})
    cells = frame.filter(pl.col("role") != "baseline")
    assert summary["settings"] == settings and summary["model_fingerprint"] == "f" * 64
    assert summary["questions"] == {r["question_id"]: {"baseline_log_ratio": r["log_ratio"]}
                                    for r in frame.filter(pl.col("role") == "baseline").iter_rows(named=True)}
    assert summary["cells"] == {f"{r['question_id']}|{r['engram']}|L{r['layer']}|s{r['strength']}":
                                {"log_ratio": r["log_ratio"], "flipped": r["flipped"], "broken": r["broken"]}
                                for r in cells.iter_rows(named=True)}
    assert summary["totals"] == {"questions": 12, "cells": cells.height, "flips": int(cells["flipped"].sum()),
                                 "breaks": int(cells["broken"].sum())}
    assert summarize_run(frame, {})["settings"] == {}
    grid = pl.concat([frame, cells.with_columns(chunks=pl.lit(8, pl.Int32), log_ratio=pl.col("log_ratio") + 1)])
    keyed = summarize_run(grid, {})["cells"]
    assert len(keyed) == 2 * cells.height
    r = cells.row(0, named=True)
    key = f"{r['question_id']}|{r['engram']}|L{r['layer']}|s{r['strength']}"
    assert keyed[key + "|k16"]["log_ratio"] == r["log_ratio"] and keyed[key + "|k8"]["log_ratio"] == r["log_ratio"] + 1
    both = pl.concat([frame.with_columns(context=pl.lit(True)), frame.with_columns(context=pl.lit(False))])
    conditions = summarize_run(both, {})
    assert set(conditions["questions"]) == {f"{q} {c}" for q in SUBSET for c in ("+context", "-context")}


def test_split_on_a_one_question_run_is_one_line(tmp_path):
    import polars as pl

    out = tmp_path / "one"
    out.mkdir()
    decisive_frame().filter(pl.col("question_id") == "q01").write_parquet(out / "results.parquet")
    (out / "run.json").write_text(json.dumps({**decisive_run(), "results_format": RESULTS_FORMAT}))
    result = CliRunner().invoke(cli, ["report", str(out), "--split", "1"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == ("error: --split: needs at least 2 questions to choose on one half and measure "
                                                      "on the other (the run has 1)")


def test_compare_names_question_drifts_and_every_cell_either_side_lacks():
    from engram_eval.report.check import Drift

    base = {"questions": {"q": {"baseline_log_ratio": 0.5}, "r": {"baseline_log_ratio": 1.0}},
            "cells": {"a": {"log_ratio": 1.0}}, "totals": {}}
    now = {"questions": {"q": {"baseline_log_ratio": 0.75}}, "cells": {"a": {"log_ratio": 1.0}, "b": {"log_ratio": 0.0},
                                                                      "c": {"log_ratio": 0.0}}, "totals": {}}
    assert compare(now, base) == [Drift("q baseline_log_ratio", 0.5, 0.75, 0.25), Drift("question r", "present", "missing"),
                                  Drift("cell b", "missing", "present"), Drift("cell c", "missing", "present")]
    assert compare(base, now) == [Drift("q baseline_log_ratio", 0.75, 0.5, -0.25), Drift("question r", "missing", "present"),
                                  Drift("cell b", "present", "missing"), Drift("cell c", "present", "missing")]


def test_differing_settings_fill_in_defaults_and_absences_on_either_side():
    from engram_eval.report.check import differing_settings

    assert differing_settings({"settings": {"bank": "x"}}, {"settings": {"pooling": "last"}}) == [
        'bank (baseline "(absent)", run "x")', 'pooling (baseline "last", run "mean")']
    assert differing_settings({}, {"settings": {"pooling": "mean", "bank": "x"}}) == ['bank (baseline "x", run "(absent)")']
    forty = "a" * 38  # json.dumps adds the quotes: 40 characters are shown whole, 41 are cut to 37 and "..."
    assert differing_settings({"settings": {"bank": forty}}, {"settings": {"bank": "b"}}) == [f'bank (baseline "b", run "{forty}")']
    assert differing_settings({"settings": {"bank": forty + "a"}}, {"settings": {"bank": "b"}}) == [
        f'bank (baseline "b", run "{forty[:36]}...)']


def test_the_baseline_file_is_written_where_asked_and_diffs_line_by_line(tmp_path):
    """One key per line, keys sorted: a baseline's change reads as a small diff in review."""
    from engram_eval.report.check import read_baseline, write_baseline

    summary = {"settings": {}, "questions": {"a": {"baseline_log_ratio": 0.25}},
               "totals": {"questions": 1, "cells": 2, "flips": 1, "breaks": 0},
               "cells": {"b|x|L1|s1.0": {"log_ratio": 0.5, "flipped": True, "broken": False},
                         "a|x|L1|s1.0": {"log_ratio": 1.5, "flipped": False, "broken": False}}}
    path = tmp_path / "new" / "folder" / "baseline.json"
    write_baseline(path, summary)
    text = path.read_text()
    assert read_baseline(path) == summary and text.endswith("}\n")
    lines = text.splitlines()
    assert lines[:4] == ['{', ' "cells": {', '  "a|x|L1|s1.0": {', '   "broken": false,']
    assert lines.index('  "b|x|L1|s1.0": {') > lines.index('  "a|x|L1|s1.0": {') and lines[-3:] == ['  "questions": 1', ' }', '}']


def test_load_run_reads_an_unfinished_runs_parts_and_refuses_other_formats(tmp_path):
    import polars as pl

    from engram_eval.core.errors import EngramEvalError
    from engram_eval.report.summary import load_run

    out = tmp_path / "partial"
    (out / "parts").mkdir(parents=True)
    frame = small_frame()
    done = SUBSET[:3]
    for i, q in enumerate(done):
        frame.filter(pl.col("question_id") == q).write_parquet(out / "parts" / f"{i:05d}-{q}.parquet")
    (out / "parts" / "notes.txt").write_text("not a part")
    run_json = {**decisive_run(), "results_format": RESULTS_FORMAT, "settings": {"questions": SUBSET}}
    (out / "run.json").write_text(json.dumps(run_json))
    rows, run = load_run(out)
    assert sorted(set(rows["question_id"])) == done and rows.height == frame.filter(pl.col("question_id").is_in(done)).height
    assert run["partial"] == {"questions_done": 3, "questions": len(SUBSET)}
    frame.write_parquet(out / "results.parquet")  # finished: the merged file, not the parts
    rows, run = load_run(out)
    assert rows.height == frame.height and "partial" not in run
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "run.json").write_text(json.dumps(run_json))
    with pytest.raises(EngramEvalError, match=f"^{re.escape(str(empty))}: no results.parquet"):
        load_run(empty)
    (empty / "run.json").write_text(json.dumps({**run_json, "results_format": "0ld"}))
    with pytest.raises(EngramEvalError, match=f"^{re.escape(str(empty))} was written by another engram-eval version"):
        load_run(empty)


def test_bench_report_times_each_format_against_reading_the_parquet(run_dir, tmp_path):
    """Fresh one-thread interpreters: reading the Parquet, report in three formats, two runs side by side; each
    ratio is that measure's wall time over reading the Parquet it reads; the table names the run and its size."""
    from engram_eval.bench.report_bench import ONE_THREAD, bench_report

    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    r = bench_report([run_dir, other], trials=1)
    assert r["threads"] == 1 and set(ONE_THREAD.values()) == {"1"} and r["read"]["peak_mib"] > 0
    assert list(r["reports"]) == ["report --format table", "report --format json", "report --format html",
                                  "report of 2 runs side by side (json)"]
    for name, row in r["reports"].items():
        assert row["seconds"] > 0 and row["peak_mib"] > 0
        if "side by side" not in name:
            assert row["ratio_to_read"] == pytest.approx(row["seconds"] / r["read"]["seconds"])
    result = run("bench", "--report", run_dir, "--trials", "1")
    assert result.exit_code == 0 and f"{run_dir} ({len(SUBSET)} questions" in " ".join(result.output.split())
    broken = tmp_path / "broken"
    broken.mkdir()
    result = CliRunner().invoke(cli, ["bench", "--report", str(broken)])
    assert result.exit_code != 0 and "no results.parquet" in result.output and "Traceback" not in result.output


def test_bench_report_runs_each_measure_trials_times(run_dir, monkeypatch):
    import subprocess

    from engram_eval.bench import report_bench

    calls = []
    real = subprocess.run
    monkeypatch.setattr(report_bench.subprocess, "run", lambda command, **kw: calls.append(command[4]) or real(command, **kw))
    report_bench.bench_report([run_dir], trials=2)
    assert calls == ["read"] * 2 + ["report"] * 2 * len(report_bench.REPORT_FORMATS)
