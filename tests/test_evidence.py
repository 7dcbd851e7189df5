import numpy as np
import polars as pl
import pytest
from scipy.stats import binomtest, bootstrap, false_discovery_control

from engram_eval.core.errors import EngramEvalError
from engram_eval.report.evidence import cell_tests, effect_sizes, held_out_best_cell
from engram_eval.report.summary import summarize


def test_every_per_cell_p_and_q_value_equals_scipy_on_the_parquet(run):
    frame, meta = run
    tests = cell_tests(frame)
    rows = frame.to_dicts()
    relevant = {(r["question_id"], r["layer"], r["strength"]): r for r in rows if r["role"] == "relevant"}
    expected = []
    kinds = sorted({r["control_kind"] for r in rows if r["role"] == "control"})
    for layer in (1, 2, 4):
        for strength in (1.0, 5.0, 20.0):
            for kind in kinds:
                for outcome, column, eligible in (("flip", "flipped", False), ("break", "broken", True)):
                    pairs = [(relevant[(r["question_id"], layer, strength)][column], r[column]) for r in rows
                             if r["control_kind"] == kind and r["layer"] == layer and r["strength"] == strength
                             and r["correct_before"] == eligible]
                    if not pairs:
                        continue
                    a = sum(rel and not ctl for rel, ctl in pairs)
                    b = sum(ctl and not rel for rel, ctl in pairs)
                    p = 1.0 if a + b == 0 else binomtest(a, a + b, 0.5).pvalue
                    expected.append({"layer": layer, "strength": strength, "control": kind, "outcome": outcome,
                                     "relevant_only": a, "control_only": b, "p_value": p})
    key = lambda e: (e["layer"], e["strength"], e["control"], e["outcome"])  # noqa: E731
    assert sorted(map(key, tests)) == sorted(map(key, expected))
    got = {key(t): t for t in tests}
    q_values = false_discovery_control([got[key(e)]["p_value"] for e in expected], method="bh")
    for e, q in zip(expected, q_values):
        t = got[key(e)]
        assert (t["relevant_only"], t["control_only"]) == (e["relevant_only"], e["control_only"])
        assert t["p_value"] == pytest.approx(e["p_value"]) and t["q_value"] == pytest.approx(q)
        assert t["survives"] == (q < 0.05)


def test_effect_sizes_equal_scipy_bootstraps_of_the_per_question_means(run):
    frame, _ = run
    effects = effect_sizes(frame, [1, 4], [1.0, 20.0], None)
    rows = frame.to_dicts()
    for i, layer in enumerate((1, 4)):
        for j, strength in enumerate((1.0, 20.0)):
            cell = [r for r in rows if r["layer"] == layer and r["strength"] == strength]
            relevant = {r["question_id"]: r["log_improvement"] for r in cell if r["role"] == "relevant"}
            values = list(relevant.values())
            got = effects["maps"]["relevant"][i][j]
            assert got["mean"] == pytest.approx(sum(values) / len(values))
            ci = bootstrap((np.sort(values),), np.mean, n_resamples=9999, method="percentile", rng=np.random.default_rng(0)).confidence_interval
            assert got["ci95"] == pytest.approx((ci.low, ci.high))
            for kind in ("anti", "irrelevant", "random"):
                differences = [relevant[r["question_id"]] - r["log_improvement"] for r in cell if r["control_kind"] == kind]
                assert effects["maps"][f"relevant - {kind}"][i][j]["mean"] == pytest.approx(sum(differences) / len(differences))


def hand_made_results() -> pl.DataFrame:
    """Four baseline-wrong questions, two cells (L1 and L2 at strength 1): q1 and q2 flip at L1 only, q3 flips at L2
    only, q4 flips nowhere."""
    flips = {("q1", 1): True, ("q2", 1): True, ("q3", 2): True}
    rows = [{"question_id": q, "role": "baseline", "layer": None, "strength": None, "chunks": 16, "context": None,
             "flipped": None, "broken": None, "correct_before": False} for q in ("q1", "q2", "q3", "q4")]
    rows += [{"question_id": q, "role": "relevant", "layer": layer, "strength": 1.0, "chunks": 16, "context": None,
              "flipped": flips.get((q, layer), False), "broken": False, "correct_before": False}
             for q in ("q1", "q2", "q3", "q4") for layer in (1, 2)]
    return pl.DataFrame(rows)


def test_the_held_out_split_on_a_hand_worked_example():
    frame = hand_made_results()
    order = np.random.default_rng(7).permutation(4)  # the split the seed makes, recomputed here
    chosen = sorted(["q1", "q2", "q3", "q4"][i] for i in order[:2])
    held = sorted(set(["q1", "q2", "q3", "q4"]) - set(chosen))
    split = held_out_best_cell(frame, 7)
    assert (split["chosen_on"], split["measured_on"]) == (chosen, held)
    # By hand: on the chosen half, L1 flips the chosen ones among q1, q2; L2 flips q3 if chosen. Best = more flips, L1 on ties.
    flips_at = {1: sum(q in ("q1", "q2") for q in chosen), 2: sum(q == "q3" for q in chosen)}
    best = 1 if flips_at[1] >= flips_at[2] else 2
    assert split["cell"] == {"layer": best, "strength": 1.0, "chunks": 16}
    assert (split["flip_rate_where_chosen"]["k"], split["flip_rate_where_chosen"]["n"]) == (flips_at[best], 2)
    held_flips = sum(q in ("q1", "q2") for q in held) if best == 1 else sum(q == "q3" for q in held)
    assert (split["flip_rate_held_out"]["k"], split["flip_rate_held_out"]["n"]) == (held_flips, 2)


def test_two_questions_are_enough_to_split_and_one_is_not():
    frame = hand_made_results().filter(pl.col("question_id").is_in(["q1", "q3"]))
    split = held_out_best_cell(frame, 0)
    assert sorted(split["chosen_on"] + split["measured_on"]) == ["q1", "q3"] and len(split["chosen_on"]) == 1
    with pytest.raises(EngramEvalError, match=r"^--split: needs at least 2 questions .* \(the run has 1\)$"):
        held_out_best_cell(frame.filter(pl.col("question_id") == "q1"), 0)


def test_a_single_baseline_correct_question_on_the_chosen_half_still_ranks_by_breaks():
    """q_right breaks at L1 only; nothing flips. When q_right alone is the chosen half, L2 (no break) is the pick."""
    rows = [{"question_id": q, "role": "relevant", "layer": layer, "strength": 1.0, "chunks": 16, "context": None,
             "flipped": False, "broken": q == "q_right" and layer == 1, "correct_before": True}
            for q in ("q_right", "q_steady") for layer in (1, 2)]

    def chooses_q_right(seed: int) -> bool:
        rng = np.random.default_rng(seed)
        rng.permutation(0)  # the (empty) baseline-wrong stratum first
        return rng.permutation(2)[0] == 0

    seed = next(s for s in range(50) if chooses_q_right(s))
    split = held_out_best_cell(pl.DataFrame(rows), seed)
    assert split["chosen_on"] == ["q_right"] and split["cell"]["layer"] == 2
    assert (split["break_rate_where_chosen"]["k"], split["break_rate_where_chosen"]["n"]) == (0, 1)


def test_summaries_carry_the_tests_effects_and_split(run):
    frame, meta = run
    summary = summarize(frame, meta, split=3)
    assert summary["tests"] == cell_tests(frame) and summary["split"] == held_out_best_cell(frame, 3)
    assert set(summary["effects"]["all"]["maps"]) == {"relevant", "relevant - anti", "relevant - irrelevant", "relevant - random"}


def test_every_interval_and_control_p_value_equals_scipy_on_the_parquet(run):
    from scipy.stats import permutation_test

    frame, meta = run
    summary = summarize(frame, meta)
    rows = frame.to_dicts()
    relevant = [r for r in rows if r["role"] == "relevant"]
    heat = summary["heatmaps"]["relevant"]
    for i, layer in enumerate(heat["layers"]):
        for j, strength in enumerate(heat["strengths"]):
            wrong = [r for r in relevant if r["layer"] == layer and r["strength"] == strength and not r["correct_before"]]
            if wrong:
                ci = binomtest(sum(r["flipped"] for r in wrong), len(wrong)).proportion_ci(method="wilson")
                assert heat["flip"][i][j]["ci95"] == pytest.approx([max(0.0, ci.low), min(1.0, ci.high)], abs=1e-11)
    by_cell = {(r["question_id"], r["layer"], r["strength"]): r["log_improvement"] for r in relevant}
    for control in summary["controls"]:
        per_question = {}
        for r in rows:
            if r["control_kind"] == control["kind"]:
                per_question.setdefault(r["question_id"], []).append(by_cell[(r["question_id"], r["layer"], r["strength"])] - r["log_improvement"])
        differences = np.array([np.mean(v) for _, v in sorted(per_question.items())])
        expected = permutation_test((differences,), lambda x, axis: np.mean(x, axis=axis), permutation_type="samples",
                                    vectorized=True, n_resamples=2 ** len(differences)).pvalue
        assert control["p_value"] == pytest.approx(expected)


@pytest.mark.parametrize("seed", range(40))
def test_the_held_out_pick_and_its_ties_against_the_rule_written_out(seed):
    """Small random grids (6 questions, so halves of 3: ties, and halves with no baseline-wrong or no baseline-correct
    question, are common): the cell picked on the chosen half is the highest flip rate, then the lowest break rate, then
    the lowest k, layer and strength (a rate with no eligible question counts as 0), and its counts on both halves."""
    rng = np.random.default_rng(seed)
    questions = [f"q{i}" for i in range(6)]
    correct = {q: bool(rng.random() < 0.5) for q in questions}
    rows = [{"question_id": q, "role": role, "layer": layer, "strength": strength, "chunks": k, "correct_before": correct[q],
             "flipped": role == "relevant" and not correct[q] and bool(rng.random() < 0.4),
             "broken": role == "relevant" and correct[q] and bool(rng.random() < 0.4)}
            for q in questions for role in ("relevant", "control") for layer in (1, 2) for strength in (1.0, 5.0) for k in (8, 16)]
    split = held_out_best_cell(pl.DataFrame(rows), seed)
    split_rng, chosen = np.random.default_rng(seed), []
    for stratum in ([q for q in questions if not correct[q]], [q for q in questions if correct[q]]):
        order = [stratum[i] for i in split_rng.permutation(len(stratum))]
        chosen += order[: (len(stratum) // 2) if correct[stratum[0]] else (len(stratum) + 1) // 2] if stratum else []
    assert (split["chosen_on"], split["measured_on"]) == (sorted(chosen), sorted(set(questions) - set(chosen)))

    def counts(ids, cell):
        mine = [r for r in rows if r["role"] == "relevant" and r["question_id"] in ids and (r["layer"], r["strength"], r["chunks"]) == cell]
        return (sum(r["flipped"] for r in mine), sum(not r["correct_before"] for r in mine),
                sum(r["broken"] for r in mine), sum(r["correct_before"] for r in mine))

    def key(cell):
        flips, wrong, breaks, right = counts(split["chosen_on"], cell)
        return (-(flips / wrong if wrong else 0.0), breaks / right if right else 0.0, cell[2], cell[0], cell[1])

    best = min([(layer, strength, k) for layer in (1, 2) for strength in (1.0, 5.0) for k in (8, 16)], key=key)
    assert (split["cell"]["layer"], split["cell"]["strength"], split["cell"]["chunks"]) == best
    for half, flip, brk in (("chosen_on", "flip_rate_where_chosen", "break_rate_where_chosen"),
                            ("measured_on", "flip_rate_held_out", "break_rate_held_out")):
        flips, wrong, breaks, right = counts(split[half], best)
        assert (split[flip]["k"], split[flip]["n"], split[brk]["k"], split[brk]["n"]) == (flips, wrong, breaks, right)


@pytest.mark.parametrize("seed", range(12))
def test_the_split_is_stratified_by_baseline_correctness(seed):
    """Five baseline-wrong and four baseline-correct questions: whatever the seed, the half that chooses gets three
    wrong and two correct ones, the other half two and two (recomputed from each stratum's own permutation)."""
    wrong, right = [f"w{i}" for i in range(5)], [f"r{i}" for i in range(4)]
    rows = [{"question_id": q, "role": "relevant", "layer": layer, "strength": 1.0, "chunks": 16, "context": None,
             "flipped": q in wrong and layer == 1, "broken": False, "correct_before": q in right}
            for q in wrong + right for layer in (1, 2)]
    split = held_out_best_cell(pl.DataFrame(rows), seed)
    rng = np.random.default_rng(seed)
    expected = sorted([wrong[i] for i in rng.permutation(5)[:3]] + [right[i] for i in rng.permutation(4)[:2]])
    assert split["chosen_on"] == expected
    assert sum(q in wrong for q in split["chosen_on"]) == 3 and sum(q in wrong for q in split["measured_on"]) == 2
    assert sum(q in right for q in split["chosen_on"]) == 2 and sum(q in right for q in split["measured_on"]) == 2
