import itertools
import math

import pytest

from engram_eval.statistics import sign_flip_test, wilson_interval


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
