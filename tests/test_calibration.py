"""The confidence-calibration section recounted: signals per question from the rows, AUROC from scipy's mannwhitneyu,
bootstrap intervals from scipy's bootstrap (a plain loop statistic), differences, the selective view, the too-few rule."""

import numpy as np
import polars as pl
import pytest
from scipy.stats import bootstrap, mannwhitneyu

from decisive import decisive_frame
from engram_eval.report.calibration import calibration_summary
from engram_eval.report.summary import per_condition


def signals_by_hand(frame: pl.DataFrame) -> dict[str, dict]:
    """question -> {correct, margin, stability, stability:KIND..., fragile}, from the rows with plain loops."""
    base = {r["question_id"]: r["log_ratio"] for r in frame.filter(pl.col("role") == "baseline").iter_rows(named=True)}
    keeps: dict[tuple[str, str], list[bool]] = {}
    for r in frame.filter((pl.col("role") != "baseline") & ~pl.col("repeated")).iter_rows(named=True):
        kind = "stability" if r["role"] == "relevant" else f"control_stability:{r['control_kind']}"
        keeps.setdefault((r["question_id"], kind), []).append(np.sign(r["log_ratio"]) == np.sign(base[r["question_id"]]))
    out = {}
    for q, b in base.items():
        entry = {"correct": b > 0, "margin": abs(b)}
        for (qid, kind), values in keeps.items():
            if qid == q:
                entry[kind] = sum(values) / len(values)
        entry["fragile"] = entry["stability"] < 1
        out[q] = entry
    return out


def auc_by_scipy(x, y) -> float:
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=bool)
    return mannwhitneyu(x[y], x[~y]).statistic / (y.sum() * (~y).sum())


def interval_by_scipy(statistic, arrays) -> list[float]:
    def looped(*samples):
        return statistic(*samples)

    result = bootstrap(arrays, looped, paired=True, vectorized=False, n_resamples=2000, method="percentile",
                       confidence_level=0.95, rng=np.random.default_rng(0))
    return [result.confidence_interval.low, result.confidence_interval.high]


@pytest.fixture(scope="module")
def frame() -> pl.DataFrame:
    return per_condition(decisive_frame())


def test_every_signal_auroc_interval_and_difference_recounts(frame):
    summary = calibration_summary(frame)
    by_hand = signals_by_hand(frame)
    questions = sorted(by_hand)
    y = np.array([by_hand[q]["correct"] for q in questions])
    assert summary["questions"] == 20 and summary["positives"] == int(y.sum()) == 10 and not summary["too_few"]
    columns = {"margin": [by_hand[q]["margin"] for q in questions],
               "stability": [by_hand[q]["stability"] for q in questions],
               **{k: [by_hand[q][k] for q in questions] for k in sorted(by_hand[questions[0]]) if k.startswith("control_stability:")},
               "fragile": [0.0 if by_hand[q]["fragile"] else 1.0 for q in questions]}
    assert [s["name"] for s in summary["signals"]] == ["margin", "stability", "control_stability:anti", "control_stability:irrelevant",
                                                      "control_stability:random", "fragile"]
    for signal in summary["signals"]:
        x = columns[signal["name"]]
        assert signal["auroc"] == pytest.approx(auc_by_scipy(x, y), abs=1e-12), signal["name"]
        expected = interval_by_scipy(auc_by_scipy, (np.array(x), y))
        assert signal["ci95"] == pytest.approx(expected, abs=1e-9), signal["name"]
    for difference in summary["differences"]:
        a, b = np.array(columns[difference["a"]]), np.array(columns[difference["b"]])
        assert difference["delta"] == pytest.approx(auc_by_scipy(a, y) - auc_by_scipy(b, y), abs=1e-12)
        expected = interval_by_scipy(lambda s, t, u: auc_by_scipy(s, u) - auc_by_scipy(t, u), (a, b, y))
        assert difference["ci95"] == pytest.approx(expected, abs=1e-9), difference["b"]
    assert [d["b"] for d in summary["differences"]] == ["margin", "control_stability:anti", "control_stability:irrelevant", "control_stability:random"]


def test_the_selective_view_recounts(frame):
    selective = calibration_summary(frame)["selective"]
    by_hand = signals_by_hand(frame)
    fragile = [q for q in by_hand if by_hand[q]["fragile"]]
    kept = [q for q in by_hand if not by_hand[q]["fragile"]]
    lowest_margin = sorted(by_hand, key=lambda q: (by_hand[q]["margin"], q))[len(fragile):]
    assert selective["abstained"] == len(fragile) and selective["kept"] == len(kept)
    assert selective["accuracy_kept_fragile"] == pytest.approx(np.mean([by_hand[q]["correct"] for q in kept]))
    assert selective["accuracy_kept_margin"] == pytest.approx(np.mean([by_hand[q]["correct"] for q in lowest_margin]))


def test_fewer_than_ten_of_a_class_is_too_few_to_tell(frame):
    wrong_at_baseline = frame.filter((pl.col("role") == "baseline") & (pl.col("log_ratio") < 0))["question_id"].to_list()
    fewer = frame.filter(pl.col("question_id") != wrong_at_baseline[0])
    summary = calibration_summary(fewer)
    assert summary["too_few"] and summary["signals"] == [] and summary["questions"] == 19 and summary["positives"] == 10


def test_the_report_shows_it_in_every_format_and_html_draws_the_roc_curves(frame):
    from engram_eval.report.html_report import render_html
    from engram_eval.report.rendering import render_markdown
    from engram_eval.report.summary import summarize

    from decisive import decisive_run

    summary = summarize(decisive_frame(), decisive_run())
    cal = summary["calibration"]
    assert cal["roc"]["stability"][0] == [0.0, 0.0] and cal["roc"]["stability"][-1] == [1.0, 1.0]
    markdown = render_markdown(summary)
    assert "Confidence calibration" in markdown and f"{cal['signals'][1]['auroc']:.3f}" in markdown
    page = render_html(summary)
    assert "id=\"roc-curves\"" in page or "id='roc-curves'" in page
