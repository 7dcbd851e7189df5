import itertools
import json
import math

import polars as pl
import pytest

from engram_eval.report import (decision_advice, render_html, render_json, render_markdown, sign_flip_test, summarize,
                                wilson_interval)
from engram_eval.store import EngramStore
from engram_eval.sweep import run_sweep
from engram_eval.bank import load_bank


@pytest.fixture(scope="module")
def run(tiny, tmp_path_factory):
    from conftest import write_tiny_bank
    folder = tmp_path_factory.mktemp("report")
    result = run_sweep(tiny, load_bank(write_tiny_bank(folder)), EngramStore(folder / "store"), folder / "run",
                       layers=[1, 2, 4], strengths=[1.0, 5.0, 20.0], chunks=4, progress=False)
    return pl.read_parquet(result.results_path), result.run


def test_wilson_interval_matches_the_textbook_formula():
    k, n, z = 3, 10, 1.959963984540054
    p = k / n
    center = (p + z**2 / (2 * n)) / (1 + z**2 / n)
    half = z / (1 + z**2 / n) * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    assert wilson_interval(k, n) == pytest.approx((center - half, center + half))
    assert wilson_interval(0, 0) is None
    assert wilson_interval(0, 5)[0] == 0.0


def test_sign_flip_p_value_on_a_hand_made_table():
    # differences 1, 2, 3: of the 8 sign patterns, only +++ and --- reach |sum| = 6
    assert sign_flip_test([1.0, 2.0, 3.0]) == pytest.approx(2 / 8)
    # 1, -1, 2, 4: |sum| = 6 reached by (+-++), (-+++)... count by brute force, independently
    d = [1.0, -1.0, 2.0, 4.0]
    hits = sum(abs(sum(s * x for s, x in zip(signs, d))) >= 6 for signs in itertools.product((1, -1), repeat=4))
    assert sign_flip_test(d) == pytest.approx(hits / 16)
    assert sign_flip_test([]) is None


@pytest.mark.parametrize("baseline,related,walk,expected", [
    (20.0, False, [], "confident and correct: don't use an engram"),
    (3.0, None, [], "correct, not confident: strength 1.0"),
    (0.5, False, [(1.0, 0.6), (5.0, 1.2)], "wrong: flips at layer 8, strength 5"),
    (0.5, False, [(1.0, 0.6), (5.0, 0.4)], "wrong: stop at strength 5 (ratio falling), no flip at layer 8"),
    (0.5, True, [(1.0, 0.6), (5.0, 0.7), (10.0, 0.8)], "wrong: no flip up to strength 10 at layer 8; wrong answer is topic-related, engram likely hurts"),
    (0.5, False, [(2.0, 3.0)], "wrong: search strengths 1-20 (none of them in this grid)"),
])
def test_decision_rule(baseline, related, walk, expected):
    assert decision_advice(baseline, related, walk, 8) == expected


def test_counts_and_rates_equal_a_recount_of_the_rows(run):
    frame, meta = run
    summary = summarize(frame, meta)
    rows = frame.to_dicts()
    base = {r["question_id"]: r for r in rows if r["role"] == "baseline"}
    relevant = [r for r in rows if r["role"] == "relevant"]
    for q in summary["questions"]:
        mine = [r for r in relevant if r["question_id"] == q["question_id"]]
        assert q["flips"] == sum(r["flipped"] for r in mine) and q["breaks"] == sum(r["broken"] for r in mine)
        assert q["baseline_ratio"] == base[q["question_id"]]["baseline_ratio"]
        best = max(mine, key=lambda r: r["ratio"])
        assert (q["best"]["layer"], q["best"]["strength"]) == (best["layer"], best["strength"])
        assert sum(q["cases"].values()) == len(mine)
    heat = summary["heatmaps"]["relevant"]
    for i, layer in enumerate(heat["layers"]):
        for j, strength in enumerate(heat["strengths"]):
            cell = [r for r in relevant if r["layer"] == layer and r["strength"] == strength]
            wrong = [r for r in cell if not r["correct_before"]]
            assert (heat["flip"][i][j]["k"], heat["flip"][i][j]["n"]) == (sum(r["flipped"] for r in wrong), len(wrong))
            correct = [r for r in cell if r["correct_before"]]
            assert (heat["break"][i][j]["k"], heat["break"][i][j]["n"]) == (sum(r["broken"] for r in correct), len(correct))
    wrong_questions = [qid for qid, r in base.items() if not r["correct_before"]]
    flipping = [qid for qid in wrong_questions if any(r["flipped"] for r in relevant if r["question_id"] == qid)]
    headline = summary["headline"]["question_flip_rate"]
    assert (headline["k"], headline["n"]) == (len(flipping), len(wrong_questions))
    assert headline["ci95"] == (list(wilson_interval(len(flipping), len(wrong_questions))) if wrong_questions else None)


def test_controls_are_compared_on_the_same_cells(run):
    frame, meta = run
    rows = frame.to_dicts()
    rel = {(r["question_id"], r["layer"], r["strength"]): r for r in rows if r["role"] == "relevant"}
    for control in summarize(frame, meta)["controls"]:
        mine = [r for r in rows if r["role"] == "control" and r["control_kind"] == control["kind"]]
        per_question = {}
        for r in mine:
            per_question.setdefault(r["question_id"], []).append(rel[(r["question_id"], r["layer"], r["strength"])]["log_improvement"] - r["log_improvement"])
        differences = [sum(v) / len(v) for _, v in sorted(per_question.items())]
        assert control["mean_difference"] == pytest.approx(sum(differences) / len(differences))
        assert control["p_value"] == pytest.approx(sign_flip_test(differences))
        assert control["mean_log_improvement_control"] == pytest.approx(sum(r["log_improvement"] for r in mine) / len(mine))
        wrong = [r for r in mine if not r["correct_before"]]
        adjusted = sum(rel[(r["question_id"], r["layer"], r["strength"])]["flipped"] - r["flipped"] for r in wrong)
        assert control["adjusted_flips"] == adjusted
        assert control["verdict"] in ("relevant beats controls", "indistinguishable from controls", "controls beat relevant")


def test_semantic_sink_split(run):
    frame, meta = run
    relevant = [r for r in frame.to_dicts() if r["role"] == "relevant"]
    for group in summarize(frame, meta)["semantic_sink"]:
        mine = [r for r in relevant if r["related_wrong"] == group["related_wrong"]]
        assert group["flip"]["k"] == sum(r["flipped"] for r in mine)
        assert group["break"]["n"] == sum(r["correct_before"] for r in mine)


def test_markdown_json_and_html_carry_the_same_numbers(run):
    frame, meta = run
    summary = summarize(frame, meta, engram_role="all")
    markdown, data, page = render_markdown(summary), json.loads(render_json(summary)), render_html(summary)
    assert data["headline"] == json.loads(json.dumps(summary["headline"]))
    assert set(summary["heatmaps"]) == {"relevant", "anti", "irrelevant", "random"}
    for q in summary["questions"]:
        outcome, cases = [l for l in markdown.splitlines() if l.startswith(f"| {q['question_id']} |")]
        assert outcome.endswith(f"| {q['flips']} | {q['breaks']} |") and cases.endswith(f"| {q['advice']} |")
        assert q["advice"] in page
    assert page.count("<img alt='Heatmap") == 2 * len(summary["heatmaps"])
    assert page.count("data:image/png;base64,iVBOR") == 2 * len(summary["heatmaps"])  # real PNGs
    assert page.startswith("<!doctype html>") and page.rstrip().endswith("</html>")
