"""Every decision boundary, at and around its edge, through the code that applies it, against the definition written
here (METHOD.md's): moving a boundary (`ratio < 0.9` for a break, `q <= 0.05`, a chunk or scope one position off) fails
a test. The flags themselves are written by the results writer, so they are checked where they are written, not
recounted from themselves."""

from __future__ import annotations

import math

import polars as pl
import pytest
import torch

from engram_eval.bank.banks import load_bank
from engram_eval.core.chunks import chunk_bounds
from engram_eval.report import evidence
from engram_eval.report.dose import at_dose
from engram_eval.report.statistics import ALPHA
from engram_eval.run.results import COLLAPSE_THRESHOLD, question_frame
from engram_eval.run.settings import SweepSettings
from engram_eval.steer.grid import Cell
from engram_eval.steer.injection import Steering
from engram_eval.steer.prompts import PreparedQuestion
from conftest import write_tiny_bank
from decisive import case as expected_case, decisive_frame

EDGE_RATIOS = [0.5, 0.9, 0.95, 0.99, 1.0, 1.01, 1.05, 1.1, 2.0]


def frame_of(tmp_path, baseline: tuple[float, float], cells: list[tuple[float, float]]) -> pl.DataFrame:
    """The results writer's frame for one question whose baseline and cells have these (p_correct, ratio)."""
    bank = load_bank(write_tiny_bank(tmp_path))
    question = bank.questions[0]
    settings = SweepSettings.from_record(dict(model="m", model_fingerprint="f", bank=bank.name, bank_sha256="s", layers=[1],
                                              strengths=[float(i + 1) for i in range(len(cells))], chunks=4,
                                              scoring="first-token", injection="prefix", questions=[question.id]))
    grid = [Cell("topic", "key", "relevant", None, 1, float(i + 1), 4) for i in range(len(cells))]
    rows = [baseline, *cells]
    # ratio 1 exactly: both log-probabilities the same number, so exp(0) is 1.0 and not 1 +- an ulp
    logp_correct = [math.log(p) for p, _ in rows]
    logp_incorrect = [lc if r == 1.0 else lc - math.log(r) for lc, (_, r) in zip(logp_correct, rows)]
    n = len(rows)
    scores = {"repeated": [False] * n, "logp_correct": logp_correct, "logp_incorrect": logp_incorrect,
              "top_correct": [" alpha"] * n, "top_incorrect": [" beta"] * n, "top_token": [" x"] * n,
              "logp_top": [-0.1] * n, "kl_next": [0.0] * n, "entropy_next": [1.0] * n,
              "attn_prefix_share": [None] * n, "attn_first_share": [None] * n,
              "answer_logps": [[c, i] for c, i in zip(logp_correct, logp_incorrect)]}
    prepared = PreparedQuestion(question, (1, 2), ((3,),), ((4,),))
    return question_frame(settings, bank, prepared, grid, scores)


@pytest.mark.parametrize("baseline_ratio", EDGE_RATIOS)
def test_flips_breaks_and_cases_at_ratios_around_1_follow_the_definition(tmp_path, baseline_ratio):
    frame = frame_of(tmp_path, (0.2, baseline_ratio), [(0.2, r) for r in EDGE_RATIOS])
    cells = frame.filter(pl.col("role") != "baseline")
    assert cells["ratio"].to_list() == pytest.approx(EDGE_RATIOS, rel=1e-12)
    for r, row in zip(EDGE_RATIOS, cells.iter_rows(named=True)):
        b = baseline_ratio
        assert row["flipped"] == (b < 1 and r > 1), (b, r)  # METHOD.md: flip = baseline < 1 and ratio > 1
        assert row["broken"] == (b > 1 and r < 1), (b, r)  # break = baseline > 1 and ratio < 1
        assert row["correct_before"] == (b > 1) and row["correct_after"] == (r > 1), (b, r)
        assert row["case"] == expected_case(b, r), (b, r)  # METHOD.md's calibration cases, as tests/decisive.py writes them


def test_collapse_is_a_mass_ratio_strictly_below_the_threshold(tmp_path):
    factors = [0.05, COLLAPSE_THRESHOLD * 0.999, COLLAPSE_THRESHOLD * 1.001, 0.5, 1.0]
    frame = frame_of(tmp_path, (0.2, 2.0), [(0.2 * f, 2.0) for f in factors])
    cells = frame.filter(pl.col("role") != "baseline")
    assert cells["mass_ratio"].to_list() == pytest.approx(factors, rel=1e-9)
    assert cells["collapsed"].to_list() == [f < COLLAPSE_THRESHOLD for f in factors]


def bh_by_hand(p_values: list[float]) -> list[float]:
    """Benjamini-Hochberg written out: q_(i) = min over j >= i of p_(j) m / j, capped at 1."""
    m = len(p_values)
    order = sorted(range(m), key=lambda i: p_values[i])
    q = [0.0] * m
    running = 1.0
    for rank in range(m, 0, -1):
        index = order[rank - 1]
        running = min(running, p_values[index] * m / rank)
        q[index] = running
    return q


@pytest.mark.parametrize("p_value", [0.0499, ALPHA, 0.0501])
def test_a_cell_survives_correction_only_with_q_strictly_below_alpha(monkeypatch, p_value):
    """Every cell's McNemar p-value set to one number: BH gives q = p for each, at, below and above 0.05."""
    monkeypatch.setattr(evidence, "mcnemar_exact", lambda a, b: p_value)
    entries = evidence.cell_tests(decisive_frame())
    qs = bh_by_hand([e["p_value"] for e in entries])
    assert [e["q_value"] for e in entries] == pytest.approx(qs, abs=1e-15)
    assert [e["survives"] for e in entries] == [q < ALPHA for q in qs]
    assert {e["survives"] for e in entries} == {p_value < ALPHA}


def test_a_staircase_of_p_values_survives_up_to_the_bh_step_and_no_further(monkeypatch):
    """p_(i) = 0.05 i / m exactly at the step for the first half, just above it after: those pass, these do not."""
    m = len(evidence.cell_tests(decisive_frame()))
    staircase = iter([ALPHA * i / m * (0.999 if i <= m // 2 else 1.2) for i in range(1, m + 1)])
    monkeypatch.setattr(evidence, "mcnemar_exact", lambda a, b: next(staircase))
    entries = evidence.cell_tests(decisive_frame())
    qs = bh_by_hand([e["p_value"] for e in entries])
    assert [e["survives"] for e in entries] == [q < ALPHA for q in qs]
    assert sum(e["survives"] for e in entries) == m // 2


def test_the_dose_bracket_includes_its_ends_and_nothing_beyond():
    strengths, doses, values = [1.0, 2.0, 4.0], [0.1, 0.2, 0.4], [10.0, 20.0, 40.0]
    for target, value, strength in [(0.1, 10.0, 1.0), (0.2, 20.0, 2.0), (0.4, 40.0, 4.0)]:  # on each end of a bracket
        got_value, got_strength = at_dose(strengths, doses, values, target)
        assert got_value == pytest.approx(value) and got_strength == pytest.approx(strength), target
    for outside in (0.1 * (1 - 1e-9), 0.4 * (1 + 1e-9)):
        assert at_dose(strengths, doses, values, outside) == (None, None)
    t = (0.3 - 0.2) / (0.4 - 0.2)  # inside the second bracket: linear in log strength
    got_value, got_strength = at_dose(strengths, doses, values, 0.3)
    assert got_value == pytest.approx(20.0 + t * 20.0) and got_strength == pytest.approx(math.exp(math.log(2) + t * math.log(2)))


def chunks_by_definition(n: int, k: int) -> list[tuple[int, int]]:
    """METHOD.md: size = max(1, n // k); chunk i covers [i size, i size + size), the last runs to n; a chunk that would
    start at or past n is the last token alone."""
    size = max(1, n // k)
    out = []
    for i in range(k):
        start = i * size
        if start >= n:
            out.append((n - 1, n))
        elif i == k - 1:
            out.append((start, n))
        else:
            out.append((start, start + size))
    return out


@pytest.mark.parametrize("k", [1, 3, 4, 16])
def test_chunk_remainders_around_every_multiple_of_k(k):
    from engram_eval.engram.pooling import chunk_mean

    for n in sorted({1, k - 1, k, k + 1, 2 * k - 1, 2 * k, 2 * k + 1, 3 * k + k // 2} - {0}):
        bounds = chunks_by_definition(n, k)
        assert chunk_bounds(n, k) == bounds, (n, k)
        states = torch.arange(n, dtype=torch.float64).unsqueeze(1) ** 2
        means = torch.stack([states[a:b].mean(0) for a, b in bounds])
        assert torch.equal(chunk_mean(states, k), means), (n, k)


@pytest.mark.parametrize("prompt_end", [1, 2, 5, 6])
@pytest.mark.parametrize("positions", ["all", "prompt", "answer", "last"])
def test_position_scopes_switch_exactly_at_the_prompts_end(positions, prompt_end):
    n = 6
    steering = Steering("actadd", torch.ones(1, 4), layers=[1], positions=positions, prompt_end=prompt_end)
    mask = steering.position_mask(n, torch.device("cpu"), torch.float32)
    by_definition = {
        "all": [True] * n,
        "prompt": [i < prompt_end for i in range(n)],  # the prompt's positions: 0 .. prompt_end - 1
        "answer": [i >= prompt_end for i in range(n)],  # the answer's (and generated) ones
        "last": [i >= prompt_end - 1 for i in range(n)],  # the last prompt position and every one after it
    }[positions]
    got = [True] * n if mask is None else [bool(v) for v in mask.tolist()]
    assert got == by_definition
