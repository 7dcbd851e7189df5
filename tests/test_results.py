import math

import polars as pl
import pytest

from engram_eval.run.results import CASES, COLLAPSE_THRESHOLD, RESULT_SCHEMA, case_expr
from conftest import sweep


def test_schema_roles_and_control_kinds(tiny, tiny_bank, tmp_path):
    frame = pl.read_parquet(sweep(tiny, tiny_bank, tmp_path / "run").results_path)
    assert frame.schema == RESULT_SCHEMA
    counts = frame.group_by("role", "control_kind").len().sort("role", "control_kind").rows()
    assert counts == [("baseline", None, 3), ("control", "anti", 12), ("control", "irrelevant", 12), ("control", "random", 12), ("relevant", None, 12)]
    assert frame["run_id"].n_unique() == 1 and frame["tags"][0].to_list() == ["tiny"]
    cells = frame.filter(pl.col("role") != "baseline")
    assert ((cells["improvement"] - cells["ratio"] / cells["baseline_ratio"]).abs() < 1e-9).all()
    assert (cells["flipped"] == ((cells["baseline_ratio"] < 1) & (cells["ratio"] > 1))).all()
    assert (cells["broken"] == ((cells["baseline_ratio"] > 1) & (cells["ratio"] < 1))).all()


def test_case_labels_cover_every_case_including_tie_and_unscorable():
    pairs = [(5.0, 6.0), (5.0, 5.0), (5.0, 1.0), (5.0, 0.5), (0.5, 0.2), (0.5, 2.0), (1.0, 2.0), (0.5, 1.0), (0.5, 0.0), (0.0, 0.5), (2.0, math.inf)]
    frame = pl.DataFrame({"role": ["relevant"] * len(pairs), "baseline_ratio": [b for b, _ in pairs], "ratio": [r for _, r in pairs]})
    assert set(frame.select(case_expr()).to_series()) == set(CASES)
    assert frame.select(case_expr()).to_series().to_list() == [
        "HIGH_CONFIDENCE_CORRECT", "CORRECT_WEAKENED", "TIE", "FRAGILE_CORRECT", "HIGH_CONFIDENCE_INCORRECT",
        "RECOVERED_KNOWLEDGE", "TIE", "TIE", "UNSCORABLE", "UNSCORABLE", "UNSCORABLE"]


def test_mass_columns_recompute_from_the_probabilities(tiny, tiny_bank, tmp_path):
    frame = sweep(tiny, tiny_bank, tmp_path / "run", strengths=[0.5, 3.0, 40.0]).results_path
    rows = pl.read_parquet(frame).to_dicts()
    base = {r["question_id"]: r for r in rows if r["role"] == "baseline"}
    for r in rows:
        b = base[r["question_id"]]
        mass, base_mass = r["p_correct"] + r["p_incorrect"], b["p_correct"] + b["p_incorrect"]
        assert r["mass"] == pytest.approx(mass, rel=1e-12)
        assert r["mass_ratio"] == pytest.approx(mass / base_mass, rel=1e-12)
        assert r["collapsed"] == (mass / base_mass < COLLAPSE_THRESHOLD)
        assert r["p_correct_rose"] == (None if r["role"] == "baseline" else r["p_correct"] > b["p_correct"])
    cells = [r for r in rows if r["role"] != "baseline"]
    assert {r["collapsed"] for r in cells} == {True, False}  # strength 40 drains the answers' mass on this model
    assert {r["p_correct_rose"] for r in cells} == {True, False}
