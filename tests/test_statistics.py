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


def _scipy_sign_flip(values, resamples):
    import numpy as np
    from scipy.stats import permutation_test

    return permutation_test((np.sort(np.asarray(values, dtype=float)),), lambda x, axis: np.mean(x, axis=axis),
                            permutation_type="samples", vectorized=True, n_resamples=resamples,
                            rng=np.random.default_rng(0)).pvalue


@pytest.mark.parametrize("n", [2, 5, 9, 16])
def test_exact_sign_flip_tests_equal_scipys_exact_permutation_test(n):
    import numpy as np

    rng = np.random.default_rng(n)
    samples = [rng.normal(0.4, 1, n), np.round(rng.normal(0.5, 1, n)), np.zeros(n), np.ones(n)]  # ties, all alike
    from engram_eval.report.statistics import sign_flip_tests

    for values, p in zip(samples, sign_flip_tests([list(v) for v in samples])):
        assert p == pytest.approx(_scipy_sign_flip(values, 2**n), abs=1e-12)


def test_sampled_sign_flip_tests_equal_scipys_within_the_monte_carlo_error():
    """Above 16 questions both sample sign patterns (different ones): the p-values agree within 4 standard errors of
    the two estimates' difference, for data of several sizes tested in one batch, ties (rounded values) included. The
    two-sided p is twice a one-sided share q = p / 2, so its standard error is 2 sqrt(q (1 - q) / samples)."""
    import numpy as np

    from engram_eval.report.statistics import SIGN_FLIP_SAMPLES, sign_flip_tests

    rng = np.random.default_rng(7)
    samples = [rng.normal(shift, 1, n) for n, shift in ((20, 0.6), (40, 0.4), (192, 0.3), (192, 0.0), (100, 0.3))]
    samples.append(np.round(rng.normal(0.15, 1, 60) * 2) / 2)
    p_values = sign_flip_tests([list(v) for v in samples])
    for values, p in zip(samples, p_values):
        expected = _scipy_sign_flip(values, SIGN_FLIP_SAMPLES)
        q = max(expected / 2, 1e-5)
        error = np.sqrt(2) * 2 * np.sqrt(q * (1 - q) / SIGN_FLIP_SAMPLES)
        assert abs(p - expected) <= 4 * error, (len(values), p, expected)
    assert 1e-4 < min(p_values) < 0.05 < max(p_values)  # small and large p-values both checked
    assert p_values == [sign_flip_tests([list(v)])[0] for v in samples]  # one batch or one at a time: the same


def test_bootstrap_interval_equals_scipys_bootstrap_with_the_same_seed():
    import numpy as np
    from scipy.stats import bootstrap

    from engram_eval.report.statistics import bootstrap_mean_ci

    rng = np.random.default_rng(3)
    for values in (rng.normal(size=2), rng.normal(size=30), np.round(rng.normal(size=192)), rng.exponential(size=50)):
        interval = bootstrap((np.sort(values),), np.mean, confidence_level=0.95, n_resamples=9999, method="percentile",
                             rng=np.random.default_rng(0)).confidence_interval
        assert bootstrap_mean_ci(list(values)) == pytest.approx((interval.low, interval.high), rel=1e-12, abs=1e-15)


def test_paired_tests_fill_every_p_value_in_one_batch_then_finish_in_order():
    from engram_eval.report.statistics import PairedTests, sign_flip_test

    tests, seen = PairedTests(), []
    samples = [[0.5, 1.0, -0.2], [0.3] * 20 + [-0.1] * 5, []]
    entries = [{"name": i} for i in range(len(samples))]
    for entry, differences in zip(entries, samples):
        tests.add(entry, differences)
    tests.then(lambda: seen.append([e["p_value"] for e in entries]))
    tests.then(lambda: seen.append("second"))
    assert all(e["p_value"] is None for e in entries) and seen == []
    tests.run()
    expected = [sign_flip_test(d) for d in samples]
    assert [e["p_value"] for e in entries] == expected and seen == [expected, "second"] and expected[2] is None
    tests.run()  # run empties the batch: nothing is computed or finished twice
    assert seen == [expected, "second"]


def test_the_exact_test_stops_at_16_questions_and_sampling_starts_at_17():
    """At the edge: 16 differences are tested over all 2^16 patterns (p a multiple of 1/65536, no +1), 17 over the
    200,000 sampled ones (p = 2 (count + 1) / 200,001)."""
    from engram_eval.report.statistics import EXACT_SIGN_FLIPS_UP_TO, SIGN_FLIP_SAMPLES, sign_flip_tests

    assert EXACT_SIGN_FLIPS_UP_TO == 16
    values = [0.9, -0.4, 0.3, 1.2, -0.7, 0.5, 0.8, -0.1, 0.6, 0.2, -0.3, 1.1, 0.4, -0.6, 0.7, 0.15, 0.35]
    exact, sampled = sign_flip_tests([values[:16], values])
    assert exact * 2**16 == pytest.approx(round(exact * 2**16), abs=1e-9)
    assert exact == pytest.approx(_scipy_sign_flip(values[:16], 2**16), abs=1e-12)
    count = sampled * (SIGN_FLIP_SAMPLES + 1) / 2 - 1
    assert count == pytest.approx(round(count), abs=1e-6) and 0 < sampled < 1
