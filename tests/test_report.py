import pytest

from engram_eval.report.decision import decision_advice
from engram_eval.report.summary import summarize
from engram_eval.report.statistics import sign_flip_test, wilson_interval


@pytest.mark.parametrize("baseline,related,walk,advice,strength,measured", [
    (20.0, True, [(1.0, 30.0)], "confident and correct: don't use an engram", None, 20.0),
    (6.97, True, [(1.0, 2.0)], "the wrong answer is topic-related: don't use an engram (it boosts the wrong answer too)", None, 6.97),
    (0.5, True, [(1.0, 2.0)], "the wrong answer is topic-related: don't use an engram (it boosts the wrong answer too)", None, 0.5),
    (3.0, False, [(1.0, 0.7), (5.0, 4.0)], "correct, not confident: strength 1.0 (layer 8)", 1.0, 0.7),
    (3.0, None, [(5.0, 4.0)], "correct, not confident: strength 1.0 (layer 8)", 1.0, None),
    (1.0, False, [], "tie at baseline: first-token scoring cannot decide", None, 1.0),
    (0.5, False, [(1.0, 0.6), (5.0, 1.2)], "wrong: flips at layer 8, strength 5", 5.0, 1.2),
    (0.5, False, [(1.0, 0.6), (5.0, 0.4)], "wrong: stop at strength 5 (ratio falling), no flip at layer 8", 5.0, 0.4),
    (0.5, None, [(1.0, 0.6), (5.0, 0.7), (10.0, 0.8)], "wrong: no flip up to strength 10 at layer 8", 10.0, 0.8),
    (0.5, False, [(2.0, 3.0)], "wrong: search strengths 1-20 (none of them in this grid)", None, None),
])
def test_the_decision_rule_in_the_guides_order(baseline, related, walk, advice, strength, measured):
    decision = decision_advice(baseline, related, walk, 8)
    assert (decision["advice"], decision["strength"], decision["measured_ratio"]) == (advice, strength, measured)
    assert decision["measured_correct"] == (None if measured is None else measured > 1)


def test_counts_and_rates_equal_a_recount_of_the_rows(run):
    frame, meta = run
    summary = summarize(frame, meta)
    rows = frame.to_dicts()
    base = {r["question_id"]: r for r in rows if r["role"] == "baseline"}
    relevant = [r for r in rows if r["role"] == "relevant"]
    for q in summary["questions"]:
        mine = [r for r in relevant if r["question_id"] == q["question_id"]]
        assert q["flips"] == sum(r["flipped"] for r in mine) and q["breaks"] == sum(r["broken"] for r in mine)
        assert q["clean_flips"] == sum(r["flipped"] and r["p_correct_rose"] and not r["collapsed"] for r in mine)
        assert q["flips_p_correct_fell"] == sum(r["flipped"] and not r["p_correct_rose"] for r in mine)
        assert q["flips_collapsed"] == sum(r["flipped"] and r["collapsed"] for r in mine)
        b = base[q["question_id"]]
        assert (q["baseline_ratio"], q["baseline_p_correct"], q["baseline_p_incorrect"]) == (b["baseline_ratio"], b["p_correct"], b["p_incorrect"])
        best = max(mine, key=lambda r: r["ratio"])
        assert (q["best"]["layer"], q["best"]["strength"], q["best"]["p_correct"]) == (best["layer"], best["strength"], best["p_correct"])
        assert q["best"]["improves_on_baseline"] == (best["ratio"] > b["baseline_ratio"])
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
    clean = [qid for qid in wrong_questions
             if any(r["flipped"] and r["p_correct_rose"] and not r["collapsed"] for r in relevant if r["question_id"] == qid)]
    assert summary["headline"]["question_clean_flip_rate"]["k"] == len(clean)
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
        shares = {}
        for r in mine:
            if not r["correct_before"]:
                shares.setdefault(r["question_id"], []).append(rel[(r["question_id"], r["layer"], r["strength"])]["flipped"] - r["flipped"])
        adjusted = [sum(v) / len(v) for v in shares.values()]
        assert control["adjusted_flip_difference"]["difference"] == pytest.approx(sum(adjusted) / len(adjusted))
        assert control["breaks_relevant"] == sum(rel[(r["question_id"], r["layer"], r["strength"])]["broken"] for r in mine)
        assert control["breaks_control"] == sum(r["broken"] for r in mine)
        assert control["verdict"] == "too few questions to tell (n = 3)"  # 3 questions: the exact test's smallest p is 0.25


def test_semantic_sink_split(run):
    frame, meta = run
    relevant = [r for r in frame.to_dicts() if r["role"] == "relevant"]
    for group in summarize(frame, meta)["semantic_sink"]:
        mine = [r for r in relevant if r["related_wrong"] == group["related_wrong"]]
        assert group["flip"]["k"] == sum(r["flipped"] for r in mine)
        assert group["break"]["n"] == sum(r["correct_before"] for r in mine)
