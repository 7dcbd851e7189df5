"""The dose-matched comparison (engram_eval.report.dose): the interpolation against hand-computed cases, the section's
p- and q-values against scipy on the constructed run, the side effects at the best cell, and --doses."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from decisive import (QUESTIONS, decisive_frame, decisive_run, every_section_frame, every_section_run_with_probe,
                      every_section_side_effects)
from scipy.stats import false_discovery_control, permutation_test

from engram_eval.cli import cli
from engram_eval.core.errors import EngramEvalError
from engram_eval.report.dose import at_dose, dose_series, is_monotone, parse_doses
from engram_eval.report.summary import summarize


def test_interpolation_is_linear_in_log_strength_between_the_bracketing_strengths():
    strengths, doses, values = [1.0, 4.0, 16.0], [0.1, 0.3, 0.9], [0.0, 1.0, 3.0]
    # 0.2 is halfway from 0.1 to 0.3: halfway in log strength from 1 to 4 (strength 2), halfway in value
    value, strength = at_dose(strengths, doses, values, 0.2)
    assert value == pytest.approx(0.5) and strength == pytest.approx(2.0)
    # 0.75 is 3/4 of the way from 0.3 to 0.9: log s = log 4 + 0.75 (log 16 - log 4)
    value, strength = at_dose(strengths, doses, values, 0.75)
    assert value == pytest.approx(1.0 + 0.75 * 2.0) and strength == pytest.approx(math.exp(math.log(4) + 0.75 * math.log(4)))
    assert at_dose(strengths, doses, values, 0.3) == (pytest.approx(1.0), pytest.approx(4.0))  # on a grid point
    # no extrapolation below the smallest dose or above the largest
    assert at_dose(strengths, doses, values, 0.05) == (None, None)
    assert at_dose(strengths, doses, values, 1.5) == (None, None)
    # a dose that falls again: the first crossing, and the series is flagged
    falling = [0.1, 0.5, 0.2]
    assert not is_monotone(falling) and is_monotone(doses) and is_monotone([0.1, 0.1, 0.2])
    value, strength = at_dose(strengths, falling, values, 0.3)
    assert value == pytest.approx(0.5) and strength == pytest.approx(2.0)


def test_dose_series_flags_a_non_monotone_series_and_leaves_unreached_doses_empty():
    rows = []
    for engram, doses in (("a", [0.1, 0.3, 0.9]), ("b", [0.1, 0.5, 0.2])):
        for strength, dose, value in zip([1.0, 4.0, 16.0], doses, [0.0, 1.0, 3.0]):
            rows.append({"question_id": "q", "kind": "relevant", "engram": engram, "layer": 1, "chunks": 16,
                         "strength": strength, "dose": dose, "log_improvement": value})
    series = dose_series(pl.DataFrame(rows).sample(fraction=1.0, shuffle=True, seed=3), (0.2, 2.0))
    a = series.filter(pl.col("engram") == "a").sort("target")
    assert a["log_improvement"].to_list() == [pytest.approx(0.5), None] and a["monotone"].all()
    b = series.filter(pl.col("engram") == "b").sort("target")
    assert b["log_improvement"][0] == pytest.approx(0.25) and not b["monotone"].any()  # the first crossing: 1/4 of 0.1 -> 0.5


def hand_interpolated(frame: pl.DataFrame, target: float) -> dict[tuple, float]:
    """(question, kind, engram, layer, chunks) -> log-improvement at target: a plain loop over the two strengths."""
    out = {}
    cells = frame.filter(pl.col("role") != "baseline").with_columns(kind=pl.coalesce("control_kind", "role"))
    for key, group in cells.group_by("question_id", "kind", "engram", "layer", "chunks"):
        group = group.sort("strength")
        (s0, s1), (d0, d1), (v0, v1) = group["strength"], group["kl_next"].cast(pl.Float64), group["log_improvement"]
        if min(d0, d1) <= target <= max(d0, d1):
            t = (target - d0) / (d1 - d0)
            out[key] = v0 + t * (v1 - v0)
    return out


def test_the_sections_tests_equal_scipy_on_hand_interpolated_values():
    frame = decisive_frame()
    dose = summarize(frame, decisive_run())["dose_matched"]
    assert dose["dose"] == "kl_next" and dose["non_monotone"] == 0 and dose["series"] == 20 * 4 * 2
    p_values = []
    for entry in dose["entries"]:
        values = hand_interpolated(frame, entry["dose"])
        differences = []
        for q in QUESTIONS:
            pairs = [values[(q, "relevant", f"relevant-{q}", layer, 16)] - v for (qq, kind, _, layer, _), v in values.items()
                     if qq == q and kind == entry["control"] and (q, "relevant", f"relevant-{q}", layer, 16) in values]
            if pairs:
                differences.append(np.mean(pairs))
        assert entry["questions"] == len(differences)
        if not differences:
            assert entry["p_value"] is None and entry["verdict"] == "no data"
            continue
        assert entry["mean_difference"] == pytest.approx(np.mean(differences))
        exact = permutation_test((np.array(differences),), np.mean, permutation_type="samples", n_resamples=200_000,
                                 alternative="two-sided", rng=np.random.default_rng(0))
        assert entry["p_value"] == pytest.approx(exact.pvalue, abs=6e-3)  # two samples of 200,000 sign patterns (SE < 1.2e-3)
        p_values.append(entry["p_value"])
    tested = [e for e in dose["entries"] if e["p_value"] is not None]
    assert [e["q_value"] for e in tested] == pytest.approx(list(false_discovery_control(p_values, method="bh")))
    # what the constructed doses reach: relevant and anti 0.05 and 0.2, irrelevant 0.05 only, random 0.2 only
    reached = {(e["dose"], e["control"]) for e in dose["entries"] if e["questions"]}
    assert reached == {(0.05, "anti"), (0.05, "irrelevant"), (0.2, "anti"), (0.2, "random")}
    verdicts = {(e["dose"], e["control"]): e["verdict"] for e in dose["entries"]}
    assert verdicts[(0.2, "anti")] == "relevant beats controls" and verdicts[(0.2, "random")] == "controls beat relevant"
    needed = {(n["kind"], n["dose"]): n for n in dose["strength_needed"]}
    # irrelevant: 0.02 nats per unit of strength, so 0.05 at strength 2.5 = exp(log 1 + t log 5), t = (0.05-0.02)/0.08
    assert needed[("irrelevant", 0.05)]["median_strength"] == pytest.approx(math.exp(0.375 * math.log(5)), rel=1e-6)
    assert needed[("irrelevant", 0.2)] == {"kind": "irrelevant", "dose": 0.2, "median_strength": None, "series_reaching": 0,
                                           "series": 40}


def test_the_neutral_probe_is_the_dose_when_present_and_the_headline_states_it_at_the_best_cell():
    frame = every_section_frame()
    effects = every_section_side_effects(frame)
    summary = summarize(frame, every_section_run_with_probe(), side_effects=effects)
    dose = summary["dose_matched"]
    assert dose["dose"] == "neutral_kl" and "200 positions of the neutral passage default" in dose["dose_source"]
    best = summary["headline"]["best_cell"]
    by_kind = {k["kind"]: k["at_best_cell"] for k in summary["headline"]["by_kind"]}
    # neutral_kl is 0.1 x strength (random 0.3 x), the perplexity ratio 1 + neutral_kl, at every cell of the kind
    assert by_kind["relevant"] == {"dose": pytest.approx(0.1 * best["strength"]), "ppl_ratio": pytest.approx(1 + 0.1 * best["strength"])}
    assert by_kind["random"]["dose"] == pytest.approx(0.3 * best["strength"])
    assert summary["headline"]["side_effect_measure"] == "neutral_kl"
    table = {(r["kind"], r["layer"], r["strength"]): r for r in dose["side_effects"]}
    # distinct cells: relevant-q01..q20 at k 8 and 16 (one engram per question)
    assert table[("relevant", 1, 5.0)]["cells"] == 40 and table[("random", 2, 1.0)]["neutral_kl"] == pytest.approx(0.3)


def test_doses_option_sets_the_targets_and_bad_doses_are_one_line(tmp_path):
    from engram_eval.run.results import RESULT_SCHEMA
    from engram_eval.run.rundir import RESULTS_FORMAT
    from engram_eval.core.files import file_sha256

    run = tmp_path / "run"
    run.mkdir()
    decisive_frame().select(list(RESULT_SCHEMA)).write_parquet(run / "results.parquet")
    (run / "run.json").write_text(json.dumps({**decisive_run(), "results_format": RESULTS_FORMAT,
                                              "results_sha256": file_sha256(run / "results.parquet")}))
    result = CliRunner().invoke(cli, ["report", str(run), "--format", "json", "--doses", "0.1,0.02"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    dose = json.loads(result.stdout)["dose_matched"]
    assert dose["targets"] == [0.02, 0.1] and {e["dose"] for e in dose["entries"]} == {0.02, 0.1}
    for bad in ("0,1", "-1", "a", "", "inf"):
        result = CliRunner().invoke(cli, ["report", str(run), "--doses", bad], catch_exceptions=False)
        assert result.exit_code == 2 and result.stderr.startswith(f"error: --doses {bad}: give positive numbers")
        assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    with pytest.raises(EngramEvalError):
        parse_doses("1,nan")
    assert parse_doses("1,0.5,1") == (0.5, 1.0)
