import json
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner

import engram_eval.steer.injection as injection_module
from engram_eval.bank.banks import load_bank
from engram_eval.report.check import compare, summarize_run
from engram_eval.cli import cli
from engram_eval.engram.store import EngramStore
from conftest import flat_sweep

REPO = Path(__file__).resolve().parents[1]
CI_GRID = dict(layers=[8, 16, 24], strengths=[1.0, 5.0, 10.0])  # the grid `make test` sweeps for the committed baseline


@pytest.fixture(scope="module")
def tiny_run(tiny, tmp_path_factory):
    from conftest import write_tiny_bank
    folder = tmp_path_factory.mktemp("check")
    flat_sweep(tiny, load_bank(write_tiny_bank(folder)), EngramStore(folder / "store"), folder / "run",
              layers=[1, 3], strengths=[1.0, 9.0], chunks=4, progress=False)
    return folder / "run"


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_identical_runs_pass(tiny_run, tmp_path):
    baseline = tmp_path / "baseline.json"
    assert invoke("check", tiny_run, "--baseline", baseline, "--update").exit_code == 0
    result = invoke("check", tiny_run, "--baseline", baseline)
    assert result.exit_code == 0 and result.output.startswith("check passed: 48 cells and 3 questions within rtol=0.0001, atol=0.0001")


def test_drift_fails_with_a_table_of_what_moved(tiny_run, tmp_path):
    baseline = tmp_path / "baseline.json"
    invoke("check", tiny_run, "--baseline", baseline, "--update")
    data = json.loads(baseline.read_text())
    key = sorted(data["cells"])[0]
    data["cells"][key]["log_ratio"] += 0.01
    data["totals"]["flips"] += 1
    baseline.write_text(json.dumps(data))
    result = invoke("check", tiny_run, "--baseline", baseline)
    assert result.exit_code == 1 and result.stderr == ""
    assert "check failed: 2 values moved" in result.stdout and key in result.stdout and "-0.01" in result.stdout
    assert invoke("check", tiny_run, "--baseline", baseline, "--atol", "0.02").exit_code == 1  # totals still differ


def test_compare_reports_missing_and_changed_cells():
    base = {"questions": {"q": {"baseline_log_ratio": 1.0}}, "cells": {"a": {"log_ratio": 0.5, "flipped": False, "broken": False}},
            "totals": {"flips": 0}}
    now = {"questions": {"q": {"baseline_log_ratio": 1.00005}}, "cells": {"b": {"log_ratio": 0.5, "flipped": True, "broken": False}},
           "totals": {"flips": 1}}
    assert [d.what for d in compare(now, base)] == ["cell a", "cell b", "totals flips"]
    assert compare(now, base, atol=0, rtol=1e-6)[0].what == "q baseline_log_ratio"


@pytest.mark.real_model
def test_committed_baseline_passes_and_a_changed_convention_fails(real, tmp_path, monkeypatch):
    bank = load_bank(REPO / "questions/ci.yaml")
    baseline = json.loads((REPO / "tests/baselines/ci.json").read_text())
    run = flat_sweep(real, bank, EngramStore(tmp_path / "store"), tmp_path / "seed", **CI_GRID, progress=False)
    assert compare(summarize_run(pl.read_parquet(run.results_path), run.run), baseline) == []
    # Break one convention: scale by the engram's max row norm instead of its mean row norm.
    monkeypatch.setattr(injection_module, "mean_row_norm", lambda x: x.float().norm(dim=1).max())
    drifted = flat_sweep(real, bank, EngramStore(tmp_path / "store"), tmp_path / "drift", **CI_GRID, progress=False)
    drifts = compare(summarize_run(pl.read_parquet(drifted.results_path), drifted.run), baseline)
    assert len(drifts) > 10 and all(d.what.split()[0] in baseline["cells"] or d.what.startswith("totals") for d in drifts)
    assert not any("baseline_log_ratio" in d.what for d in drifts)  # baselines carry no engram: unchanged


def test_a_run_with_other_settings_is_refused_naming_each_setting(tiny, tiny_run, tmp_path):
    from conftest import sweep, write_tiny_bank

    baseline = tmp_path / "baseline.json"
    invoke("check", tiny_run, "--baseline", baseline, "--update")
    other = sweep(tiny, write_tiny_bank(tmp_path), tmp_path / "other", layers=[1, 3], strengths=[1.0, 8.0], chunks=8).out
    result = invoke("check", other, "--baseline", baseline)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == (f"error: {other} was run with other settings than {baseline}: chunks (baseline 4, run 8); "
                             "strengths (baseline [1.0, 9.0], run [1.0, 8.0])\n")


def test_a_setting_the_baseline_predates_must_keep_its_default(tiny_run, tmp_path):
    from engram_eval.report.check import differing_settings

    current = {"settings": {"scoring": "first-token", "max_tokens": 2048}}
    assert differing_settings(current, {"settings": {"scoring": "first-token"}}) == []
    assert differing_settings({"settings": {"scoring": "first-token", "max_tokens": 99}}, {"settings": {"scoring": "first-token"}}) == [
        "max_tokens (baseline 2048, run 99)"]
    scoped = {"settings": {"scoring": "first-token", "positions": "last"}}  # run.json records positions once it is set
    assert differing_settings(scoped, {"settings": {"scoring": "first-token"}}) == ['positions (baseline "all", run "last")']
    assert differing_settings(current, {"cells": {}}) == [
        "none recorded in the baseline (written by an older engram-eval; regenerate it with --update from a run you trust)"]


def test_the_committed_baseline_records_the_ci_runs_settings():
    settings = json.loads((REPO / "tests/baselines/ci.json").read_text())["settings"]
    assert (settings["layers"], settings["strengths"], settings["scoring"], settings["injection"], settings["chunks"]) == (
        CI_GRID["layers"], CI_GRID["strengths"], "first-token", "prefix", 16)
    assert settings["bank_sha256"] == load_bank(REPO / "questions/ci.yaml").sha256


def _malformed(data: dict) -> list[tuple[object, str]]:
    cell = sorted(data["cells"])[0]
    question = sorted(data["questions"])[0]
    string_ratio = json.loads(json.dumps(data))
    string_ratio["cells"][cell]["log_ratio"] = "0.5"
    int_cell = json.loads(json.dumps(data))
    int_cell["cells"][cell] = 3
    empty_cell = json.loads(json.dumps(data))
    empty_cell["cells"][cell] = {}
    no_totals = {k: v for k, v in data.items() if k != "totals"}
    partial = json.loads(json.dumps(data))
    partial["cells"] = dict(sorted(partial["cells"].items())[: len(partial["cells"]) // 2])
    bad_question = json.loads(json.dumps(data))
    bad_question["questions"][question] = {"baseline_log_ratio": None}
    return [
        ([1, 2, 3], "a JSON list, not an object"),
        ({}, "no 'settings' object"),
        (string_ratio, f"cell '{cell}' has no numeric log_ratio"),
        (int_cell, f"cell '{cell}' has no numeric log_ratio"),
        (empty_cell, f"cell '{cell}' has no numeric log_ratio"),
        (no_totals, "no 'totals' object"),
        (partial, f"totals say {len(data['cells'])} cells, the file holds {len(data['cells']) // 2}: a partial baseline"),
        (bad_question, f"question '{question}' has no numeric baseline_log_ratio"),
        ({**data, "questions": {}}, "no questions"),
    ]


def test_a_malformed_empty_or_partial_baseline_is_one_line(tiny_run, tmp_path):
    baseline = tmp_path / "baseline.json"
    assert invoke("check", tiny_run, "--baseline", baseline, "--update").exit_code == 0
    for content, problem in _malformed(json.loads(baseline.read_text())):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps(content))
        result = invoke("check", tiny_run, "--baseline", bad)
        assert result.exit_code == 2 and result.stderr == (
            f"error: --baseline {bad}: not a baseline summary ({problem}); write one with --update from a run you trust\n"), problem


def test_the_prefix_placement_is_a_setting_check_compares():
    """A baseline written before --prefix-at existed holds after-bos (the default); a run at start differs from it."""
    from engram_eval.report.check import differing_settings

    baseline = {"settings": {"model": "m", "injection": "prefix"}}
    assert differing_settings({"settings": {"model": "m", "injection": "prefix"}}, baseline) == []
    assert differing_settings({"settings": {"model": "m", "injection": "prefix", "prefix_at": "start"}}, baseline) == [
        'prefix_at (baseline "after-bos", run "start")']
