import itertools
import math

import pytest

from engram_eval.report.statistics import sign_flip_test, smallest_p_value, verdict, wilson_interval


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


def test_interval_bounds_are_clamped_without_floating_point_noise():
    for n in range(1, 60):
        low, high = wilson_interval(0, n)
        assert low == 0.0 and 0 < high < 1
        low, high = wilson_interval(n, n)
        assert high == 1.0 and 0 < low < 1


@pytest.mark.parametrize("n,p,expected", [
    (2, 0.5, "too few questions to tell (n = 2)"),
    (5, 0.0625, "too few questions to tell (n = 5)"),  # 2 / 2^5: every sign alike is still p > 0.05
    (6, 0.03125, "relevant beats controls"),
    (6, 0.5, "indistinguishable from controls"),
    (0, None, "no data"),
])
def test_a_control_test_that_cannot_reach_significance_says_so(n, p, expected):
    assert verdict(1.0 if p is not None else None, p, n) == expected
    if n >= 6:
        assert smallest_p_value(n) == sign_flip_test([1.0] * n) < 0.05


def test_the_verdicts_boundaries_as_the_rule_is_written():
    """p < 0.05 (not <=) is significant; either number missing is no data; with no question no p-value can fall below 1."""
    assert verdict(0.4, 0.05, 20) == "indistinguishable from controls"
    assert verdict(0.4, 0.049, 20) == "relevant beats controls" and verdict(-0.4, 0.049, 20) == "controls beat relevant"
    assert verdict(0.4, None, 20) == verdict(None, 0.01, 20) == "no data"
    assert smallest_p_value(0) == 1.0 and smallest_p_value(1) == 1.0 and smallest_p_value(3) == 0.25


def test_exact_mcnemar_on_a_hand_worked_example():
    from engram_eval.report.statistics import mcnemar_exact

    # 8 discordant pairs one way, 2 the other: two-sided binomial, 2 * P(X <= 2 | n = 10, 1/2) = 2 * (1 + 10 + 45) / 1024
    assert mcnemar_exact(8, 2) == pytest.approx(112 / 1024)
    assert mcnemar_exact(2, 8) == pytest.approx(112 / 1024)
    assert mcnemar_exact(5, 5) == pytest.approx(1.0) and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(6, 0) == pytest.approx(2 / 64)


def test_seeded_resampling_does_not_depend_on_the_order_of_the_values():
    import random

    from engram_eval.report.statistics import bootstrap_mean_ci

    rng = random.Random(1)
    values = [rng.gauss(0.3, 1) for _ in range(24)]  # above the exact sign-flip limit: sampled signs
    shuffled = random.Random(2).sample(values, len(values))
    assert bootstrap_mean_ci(shuffled) == bootstrap_mean_ci(values)
    assert sign_flip_test(shuffled) == sign_flip_test(values)
