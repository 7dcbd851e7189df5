"""Statistics: interval estimates and paired tests the report draws its verdicts from."""

from __future__ import annotations

import numpy as np
from scipy.stats import binomtest, false_discovery_control, permutation_test

ALPHA = 0.05


EXACT_SIGN_FLIPS_UP_TO = 16  # questions: all 2^n sign patterns (65,536 at 16); above, 200,000 seeded random ones


def wilson_interval(successes: int, n: int) -> tuple[float, float] | None:
    """95% Wilson score interval for a binomial proportion (scipy's binomtest); None when n = 0."""
    if n == 0:
        return None
    interval = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    return clamp_unit(interval.low), clamp_unit(interval.high)


def clamp_unit(value: float) -> float:
    """A proportion's bound in [0, 1], without floating-point noise such as 5.6e-17 for 0 or 0.9999999999999999."""
    return round(min(1.0, max(0.0, float(value))), 12)


def sign_flip_test(differences: list[float], samples: int = 200_000, seed: int = 0) -> float | None:
    """Two-sided paired permutation test of mean(differences) = 0 (scipy's permutation_test, signs flipped): exact over
    all 2^n sign patterns up to 16 questions, else a seeded random sample of them (of the sorted differences, so the
    p-value does not depend on the rows' order). None without data."""
    n = len(differences)
    if n == 0:
        return None
    if n == 1:
        return 1.0  # both signs give the same |mean|
    exact = n <= EXACT_SIGN_FLIPS_UP_TO
    result = permutation_test((np.sort(np.asarray(differences, dtype=float)),), _mean, permutation_type="samples", vectorized=True,
                              n_resamples=2**n if exact else samples, alternative="two-sided", rng=np.random.default_rng(seed))
    return float(result.pvalue)


def _mean(x: np.ndarray, axis: int) -> np.ndarray:
    return np.mean(x, axis=axis)


def smallest_p_value(n: int) -> float:
    """The smallest two-sided p-value the exact sign-flip test can give with n paired questions (all signs alike)."""
    return 2.0 ** (1 - n) if n else 1.0


def benjamini_hochberg(p_values: list[float]) -> list[float]:
    """q-values: Benjamini-Hochberg adjusted p-values over the whole list (scipy's false_discovery_control)."""
    return [] if not p_values else [float(q) for q in false_discovery_control(p_values, method="bh")]


def too_few_questions(n: int) -> bool:
    """No exact sign-flip test on n paired questions can reach p < ALPHA."""
    return smallest_p_value(n) >= ALPHA


def verdict(mean_difference: float | None, p_value: float | None, n: int) -> str:
    if p_value is None or mean_difference is None:
        return "no data"
    if too_few_questions(n):
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
    discordant = a_only + b_only
    return 1.0 if discordant == 0 else float(binomtest(a_only, discordant, 0.5).pvalue)


def bootstrap_mean_ci(values: list[float], seed: int = 0, confidence: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean (scipy, 9999 resamples, seeded); None for fewer than two values or when
    every value is the same (nothing to resample). The values are sorted first: the seeded resamples pick positions, so
    the interval must not depend on the order polars happened to aggregate the rows in."""
    from scipy.stats import bootstrap

    if len(values) < 2 or len(set(values)) == 1:
        return None
    result = bootstrap((np.sort(np.asarray(values, dtype=float)),), np.mean, confidence_level=confidence, n_resamples=9999,
                       method="percentile", rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def auroc(signal: np.ndarray, positive: np.ndarray, axis: int = -1) -> np.ndarray:
    """Area under the ROC curve of `signal` for `positive` labels (higher signal = more likely positive), along axis:
    the Mann-Whitney U of the positives over the negatives / (n1 n0), ties counting half (U from average ranks, as
    scipy's mannwhitneyu). NaN where a class is empty."""
    from scipy.stats import rankdata

    signal, positive = np.asarray(signal, dtype=float), np.asarray(positive, dtype=bool)
    ranks = rankdata(signal, axis=axis)
    n1 = positive.sum(axis=axis)
    n0 = positive.shape[axis] - n1
    u = np.where(positive, ranks, 0.0).sum(axis=axis) - n1 * (n1 + 1) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return u / (n1 * n0)


def paired_bootstrap_ci(statistic, arrays: tuple[np.ndarray, ...], seed: int = 0,
                        resamples: int = 2000) -> tuple[float, float] | None:
    """Percentile 95% interval of statistic(*arrays, axis=-1), resampling the paired rows (questions) together (scipy's
    bootstrap, seeded); resamples where the statistic is undefined (one class only) are left out. None when it cannot
    vary."""
    from scipy.stats import bootstrap

    if len(arrays[0]) < 2:
        return None
    result = bootstrap(arrays, statistic, paired=True, vectorized=True, n_resamples=resamples, method="percentile",
                       confidence_level=0.95, rng=np.random.default_rng(seed))
    low, high = result.confidence_interval.low, result.confidence_interval.high
    if not (np.isfinite(low) and np.isfinite(high)):
        distribution = result.bootstrap_distribution[np.isfinite(result.bootstrap_distribution)]
        if distribution.size == 0:
            return None
        low, high = np.percentile(distribution, [2.5, 97.5])
    return float(low), float(high)


def judge(entries: list[dict]) -> None:
    """Paired comparisons (each with p_value, mean_difference, questions), in place: Benjamini-Hochberg q over those
    that have a p-value (None for the others), and each one's verdict at q."""
    tested = [e for e in entries if e["p_value"] is not None]
    for entry, q in zip(tested, benjamini_hochberg([e["p_value"] for e in tested])):
        entry["q_value"] = q
    for entry in entries:
        entry.setdefault("q_value", None)
        entry["verdict"] = verdict(entry["mean_difference"], entry["q_value"], entry["questions"])
