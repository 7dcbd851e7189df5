"""Statistics: interval estimates and paired tests the report draws its verdicts from."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Sequence

import numpy as np
from scipy.stats import binomtest, false_discovery_control

ALPHA = 0.05
EXACT_SIGN_FLIPS_UP_TO = 16  # questions: all 2^n sign patterns (65,536 at 16); above, SIGN_FLIP_SAMPLES seeded random ones
SIGN_FLIP_SAMPLES = 200_000
SIGN_FLIP_BATCH = 25_000  # random sign patterns per matrix product: 25,000 x n float64 (38 MB at 192 questions)
SIGNS = np.array([1.0, -1.0])  # bit 0 keeps a difference's sign, bit 1 flips it


def wilson_interval(successes: int, n: int) -> tuple[float, float] | None:
    """95% Wilson score interval for a binomial proportion (scipy's binomtest); None when n = 0."""
    if n == 0:
        return None
    interval = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    return clamp_unit(interval.low), clamp_unit(interval.high)


def clamp_unit(value: float) -> float:
    """A proportion's bound in [0, 1], without floating-point noise such as 5.6e-17 for 0 or 0.9999999999999999."""
    return round(min(1.0, max(0.0, float(value))), 12)


class PairedTests:
    """Sign-flip tests gathered from every section of a summary and computed in one batch of sign patterns; then each
    section's finishing step (BH over its tests, its verdicts), in the order they were added. A section given none
    makes its own and runs it at once."""

    def __init__(self) -> None:
        self._entries: list[dict] = []
        self._samples: list[Sequence[float]] = []
        self._finishing: list[Callable[[], None]] = []

    def add(self, entry: dict, differences: Sequence[float]) -> None:
        """entry["p_value"] is the sign-flip test of differences once run() has run."""
        entry["p_value"] = None
        self._entries.append(entry)
        self._samples.append(differences)

    def then(self, finish: Callable[[], None]) -> None:
        self._finishing.append(finish)

    def run(self) -> None:
        for entry, p_value in zip(self._entries, sign_flip_tests(self._samples), strict=True):
            entry["p_value"] = p_value
        for finish in self._finishing:
            finish()
        self._entries, self._samples, self._finishing = [], [], []


def sign_flip_test(differences: list[float], samples: int = SIGN_FLIP_SAMPLES, seed: int = 0) -> float | None:
    """Two-sided paired permutation test of mean(differences) = 0 (sign_flip_tests on one sample)."""
    return sign_flip_tests([differences], samples, seed)[0]


def sign_flip_tests(samples_list: Sequence[Sequence[float]], samples: int = SIGN_FLIP_SAMPLES,
                    seed: int = 0) -> list[float | None]:
    """Two-sided paired permutation tests of mean(differences) = 0, one per list of differences, as scipy's
    permutation_test computes them (signs flipped; p = 2 min(P(null <= observed), P(null >= observed)), ties within
    100 eps of the observed counted, clipped to 1): exact over all 2^n sign patterns up to 16 questions, else the same
    seeded batch of random patterns for every list (its first n columns), one matrix product per batch of patterns.
    Equal to scipy's exact p-values; sampled, within their Monte-Carlo error. Each list is sorted first, so a p-value
    does not depend on the rows' order. None without data; 1.0 for one difference (both signs give the same |mean|)."""
    arrays = [np.sort(np.asarray(values, dtype=float)) for values in samples_list]
    p_values: list[float | None] = [None if x.size == 0 else 1.0 if x.size == 1 else None for x in arrays]
    exact: dict[int, list[int]] = {}
    sampled = []
    for i, x in enumerate(arrays):
        if x.size > 1:
            (exact.setdefault(x.size, []) if x.size <= EXACT_SIGN_FLIPS_UP_TO else sampled).append(i)
    for n, members in exact.items():
        patterns = SIGNS[(np.arange(2**n)[:, None] >> np.arange(n)) & 1]
        for i, p in zip(members, _two_sided([patterns], [arrays[i] for i in members], adjustment=0)):
            p_values[i] = p
    if sampled:
        width = max(arrays[i].size for i in sampled)
        patterns = (_random_signs(seed, batch, min(SIGN_FLIP_BATCH, samples - start), width)
                    for batch, start in enumerate(range(0, samples, SIGN_FLIP_BATCH)))
        for i, p in zip(sampled, _two_sided(patterns, [arrays[i] for i in sampled], adjustment=1)):
            p_values[i] = p
    return p_values


def _random_signs(seed: int, batch: int, rows: int, width: int) -> np.ndarray:
    """Batch `batch` of the seeded random sign patterns, its first `width` columns: each batch has its own stream and
    is drawn column by column, so a pattern's first n signs do not depend on how wide the batch is (a test's p-value
    does not depend on the other tests computed with it)."""
    columns = np.random.default_rng([seed, batch]).integers(0, 256, size=(-(-width // 8), rows), dtype=np.uint8)
    return SIGNS[np.unpackbits(columns.T, axis=1, count=width)]


def _two_sided(batches: Iterable[np.ndarray], arrays: list[np.ndarray], adjustment: int) -> list[float]:
    """scipy's two-sided p-value of each array's sum under the sign patterns, given in (rows, width) batches: the
    arrays are the columns of one zero-padded matrix, so each batch is one product."""
    width = max(x.size for x in arrays)
    columns = np.zeros((width, len(arrays)))
    for j, x in enumerate(arrays):
        columns[: x.size, j] = x
    observed = columns.sum(axis=0)
    gamma = np.abs(np.finfo(float).eps * 100 * observed)
    less = np.zeros(len(arrays), dtype=np.int64)
    greater = np.zeros(len(arrays), dtype=np.int64)
    total = 0
    for batch in batches:
        null = batch @ columns
        less += np.count_nonzero(null <= observed + gamma, axis=0)
        greater += np.count_nonzero(null >= observed - gamma, axis=0)
        total += batch.shape[0]
    smaller = np.minimum(less, greater) + adjustment
    return [float(p) for p in np.minimum(2 * smaller / (total + adjustment), 1.0)]


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
    """Percentile bootstrap interval of the mean, as scipy's bootstrap computes it (9999 resamples, seeded: the same
    resamples, so the same interval), with the resample indices drawn once per sample size and kept; None for fewer
    than two values or when every value is the same (nothing to resample). The values are sorted first: the seeded
    resamples pick positions, so the interval must not depend on the order polars happened to aggregate the rows in."""
    if len(values) < 2 or len(set(values)) == 1:
        return None
    means = np.sort(np.asarray(values, dtype=float))[_resample_indices(len(values), BOOTSTRAP_RESAMPLES, seed)].mean(axis=-1)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(means, [alpha, 1 - alpha])
    return float(low), float(high)


BOOTSTRAP_RESAMPLES = 9999


@functools.lru_cache(maxsize=8)
def _resample_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """scipy's bootstrap draw: row b is resample b's positions (rng.integers(0, n, (resamples, n)))."""
    indices = np.random.default_rng(seed).integers(0, n, (resamples, n))
    indices.flags.writeable = False
    return indices


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
