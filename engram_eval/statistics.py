"""Statistics: interval estimates and paired tests the report draws its verdicts from."""

from __future__ import annotations

import itertools
import math
import random

ALPHA = 0.05


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float] | None:
    """95% Wilson score interval for a binomial proportion; None when n = 0."""
    if n == 0:
        return None
    p = successes / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return clamp_unit(center - half), clamp_unit(center + half)


def clamp_unit(value: float) -> float:
    """A proportion's bound in [0, 1], without floating-point noise such as 5.6e-17 for 0 or 0.9999999999999999."""
    return round(min(1.0, max(0.0, value)), 12)


def sign_flip_test(differences: list[float], samples: int = 200_000) -> float | None:
    """Two-sided paired permutation test of mean(differences) = 0: exact over all 2^n sign flips for n <= 16,
    else a fixed-seed Monte Carlo estimate."""
    n = len(differences)
    if n == 0:
        return None
    observed = abs(sum(differences)) - 1e-12
    if n <= 16:
        signs = itertools.product((1, -1), repeat=n)
        hits = sum(abs(sum(s * d for s, d in zip(sign, differences))) >= observed for sign in signs)
        return hits / 2**n
    rng = random.Random(0)
    hits = sum(abs(sum(d if rng.random() < 0.5 else -d for d in differences)) >= observed for _ in range(samples))
    return (hits + 1) / (samples + 1)


def smallest_p_value(n: int) -> float:
    """The smallest two-sided p-value the exact sign-flip test can give with n paired questions (all signs alike)."""
    return 2.0 ** (1 - n) if n else 1.0


def verdict(mean_difference: float | None, p_value: float | None, n: int) -> str:
    if p_value is None or mean_difference is None:
        return "no data"
    if smallest_p_value(n) >= ALPHA:
        return f"too few questions to tell (n = {n})"
    if p_value < ALPHA:
        return "relevant beats controls" if mean_difference > 0 else "controls beat relevant"
    return "indistinguishable from controls"


def rate(successes: int, n: int) -> dict:
    interval = wilson_interval(successes, n)
    return {"k": successes, "n": n, "rate": successes / n if n else None, "ci95": list(interval) if interval else None}


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Exact two-sided McNemar test of paired outcomes: the binomial test of the discordant pairs (a_only of
    a_only + b_only, at 1/2); 1.0 when there are none."""
    from scipy.stats import binomtest

    discordant = a_only + b_only
    return 1.0 if discordant == 0 else float(binomtest(a_only, discordant, 0.5).pvalue)


def bootstrap_mean_ci(values: list[float], seed: int = 0, confidence: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean (scipy, 9999 resamples, seeded); None for fewer than two values or when
    every value is the same (nothing to resample)."""
    import numpy as np
    from scipy.stats import bootstrap

    if len(values) < 2 or len(set(values)) == 1:
        return None
    result = bootstrap((np.asarray(values, dtype=float),), np.mean, confidence_level=confidence, n_resamples=9999,
                       method="percentile", rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)
