"""The practical guide's decision rule at its edges, and the headline's best cell and its tie-breaks, each written
out here (the rule in docs/method.md): strict inequalities, in the guide's order."""

import itertools

import pytest

from engram_eval.report.decision import decision_advice
from engram_eval.report.summary import _headline
from engram_eval.report.statistics import rate

WALK = [(1.0, 0.5), (5.0, 0.6), (10.0, 0.7), (15.0, 0.75), (20.0, 0.74)]


@pytest.mark.parametrize("baseline,related,walk,advice,strength", [
    (10.0, None, WALK, "correct, not confident: strength 1.0 (layer 8)", 1.0),  # > 10, not >= 10
    (10.5, None, WALK, "confident and correct: don't use an engram", None),
    (1.5, None, WALK, "correct, not confident: strength 1.0 (layer 8)", 1.0),  # > 1, not > 2
    (1.0, None, WALK, "tie at baseline: first-token scoring cannot decide", None),
    (0.5, True, WALK, "the wrong answer is topic-related: don't use an engram (it boosts the wrong answer too)", None),
    (0.5, None, [(1.0, 0.5), (5.0, 1.0), (10.0, 1.2)], "wrong: flips at layer 8, strength 10", 10.0),  # ratio 1 is no flip
    (0.5, None, [(1.0, 0.5), (5.0, 0.39)], "wrong: stop at strength 5 (ratio falling), no flip at layer 8", 5.0),  # < 0.8 x 0.5
    (0.5, None, [(1.0, 0.5), (5.0, 0.4)], "wrong: no flip up to strength 5 at layer 8", 5.0),  # 0.8 x best itself: no stop
    (0.5, None, [(2.0, 3.0)], "wrong: search strengths 1-20 (none of them in this grid)", None),
])
def test_the_decision_rule_at_its_edges(baseline, related, walk, advice, strength):
    decision = decision_advice(baseline, related, walk, 8)
    assert (decision["advice"], decision["strength"]) == (advice, strength)
    measured = dict(walk).get(strength) if strength is not None else (None if "search" in advice else baseline)
    assert decision["measured_ratio"] == measured
    assert decision["measured_correct"] == (None if measured is None else measured > 1)


def heatmap(chunks, flips, breaks):
    """A 2 x 2 heatmap (layers 1, 2 x strengths 1, 5) of k/n counts."""
    return {"chunks": chunks, "layers": [1, 2], "strengths": [1.0, 5.0],
            "flip": [[rate(k, 4) for k in row] for row in flips], "break": [[rate(k, 4) for k in row] for row in breaks]}


@pytest.mark.parametrize("seed", range(30))
def test_the_best_cell_is_the_highest_flip_rate_then_fewest_breaks_then_lowest_k_layer_strength(seed):
    import numpy as np
    import polars as pl

    rng = np.random.default_rng(seed)
    maps = [heatmap(k, rng.integers(0, 3, (2, 2)).tolist(), rng.integers(0, 3, (2, 2)).tolist()) for k in (8, 16)]
    relevant = pl.DataFrame({"question_id": ["q"], "correct_before": [False], "flipped": [False], "broken": [False],
                             "p_correct_rose": [False], "collapsed": [False]})
    best = _headline(relevant, maps)["best_cell"]
    cells = [(m["flip"][i][j]["k"], m["break"][i][j]["k"], m["chunks"], layer, strength)
             for m in maps for (i, layer), (j, strength) in itertools.product(enumerate(m["layers"]), enumerate(m["strengths"]))]
    flips, breaks, k, layer, strength = min(cells, key=lambda c: (-c[0], c[1], c[2], c[3], c[4]))
    assert (best["chunks"], best["layer"], best["strength"]) == (k, layer, strength)
    assert (best["flip_rate"]["k"], best["break_rate"]["k"]) == (flips, breaks)
    assert _headline(relevant, [])["best_cell"] is None


def test_a_tie_between_a_lower_layer_and_a_lower_strength_goes_to_the_lower_layer():
    import polars as pl

    flips = [[0, 3], [3, 0]]  # L1 x5 and L2 x1 tie at the top
    maps = [heatmap(None, flips, [[0, 0], [0, 0]])]
    relevant = pl.DataFrame({"question_id": ["q"], "correct_before": [False], "flipped": [False], "broken": [False],
                             "p_correct_rose": [False], "collapsed": [False]})
    best = _headline(relevant, maps)["best_cell"]
    assert (best["layer"], best["strength"]) == (1, 5.0)


def test_a_questions_best_cell_on_equal_ratios_is_the_lowest_k_layer_and_strength():
    import polars as pl
    from decisive import decisive_frame, decisive_run

    from engram_eval.report.summary import summarize

    frame = decisive_frame().with_columns(
        ratio=pl.when((pl.col("question_id") == "q01") & (pl.col("role") == "relevant")).then(2.0).otherwise(pl.col("ratio")))
    q01 = next(q for q in summarize(frame, decisive_run())["questions"] if q["question_id"] == "q01")
    assert (q01["best"]["layer"], q01["best"]["strength"], q01["best"]["ratio"]) == (1, 1.0, 2.0)


@pytest.mark.parametrize("baseline,walk,contradicted", [
    (3.0, [(1.0, 0.206)], True),  # the case: "strength 1.0" advised, the grid measured it wrong
    (3.0, [(1.0, 2.0)], True),  # still right, but weaker than the baseline
    (3.0, [(1.0, 3.5)], False),
    (0.5, [(1.0, 0.6), (5.0, 0.39)], True),  # the walk stops at a ratio below the baseline's
    (0.5, [(1.0, 0.6), (5.0, 1.2)], False),
    (0.5, [(1.0, 0.55), (5.0, 0.5)], False),  # no worse than the baseline
    (20.0, [(1.0, 0.1)], False),  # "don't use an engram": no setting to contradict
])
def test_advice_the_grid_contradicts_is_marked(baseline, walk, contradicted):
    from engram_eval.report.formatting import fmt_measured

    decision = decision_advice(baseline, None, walk, 8)
    expected = decision["strength"] is not None and dict(walk)[decision["strength"]] < baseline
    assert decision["contradicted"] is contradicted is expected
    assert ("the grid measured this as harmful" in fmt_measured(decision)) is contradicted
