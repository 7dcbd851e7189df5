from pathlib import Path

import polars as pl
import pytest
import torch

from engram_eval.bank.banks import load_bank
from engram_eval.core.errors import EngramEvalError
from engram_eval.engram.store import EngramStore
from conftest import flat_sweep
from conftest import sweep
from reference import reference_cell, reference_distribution, reference_engram

REPO = Path(__file__).resolve().parents[1]


def test_every_cell_equals_the_straightforward_implementation(tiny, tiny_bank, tmp_path):
    result = sweep(tiny, tiny_bank, tmp_path / "run")
    frame = pl.read_parquet(result.results_path)
    bank = load_bank(tiny_bank)
    assert frame.height == 3 * (1 + 4 * 2 * 2)
    for row in frame.iter_rows(named=True):
        q = next(q for q in bank.questions if q.id == row["question_id"])
        engram = None if row["engram"] is None else reference_engram(
            tiny.model, tiny.tokenizer, bank.sources[row["engram"]].text, row["layer"], k=4)
        p_c, p_i = reference_cell(tiny.model, tiny.tokenizer, engram, row["strength"], q.prompt, list(q.correct), list(q.incorrect))
        assert row["p_correct"] == pytest.approx(p_c, rel=1e-5)
        assert row["p_incorrect"] == pytest.approx(p_i, rel=1e-5)
        assert row["ratio"] == pytest.approx(p_c / p_i, rel=1e-5)
        probs = reference_distribution(tiny.model, tiny.tokenizer, engram, row["strength"], q.prompt)
        assert row["top_token"] == tiny.tokenizer.decode([probs.argmax().item()])
        assert row["p_top"] == pytest.approx(probs.max().item(), rel=1e-5)
        first = lambda v: tiny.tokenizer.encode(v, add_special_tokens=False)[0]  # noqa: E731
        assert row["top_correct_variant"] == max(q.correct, key=lambda v: probs[first(v)].item())  # the argmax, not the first
        assert row["top_incorrect_variant"] == max(q.incorrect, key=lambda v: probs[first(v)].item())


def test_baseline_rows_equal_a_plain_forward_pass(tiny, tiny_bank, tmp_path):
    frame = pl.read_parquet(sweep(tiny, tiny_bank, tmp_path / "run").results_path).filter(pl.col("role") == "baseline")
    for row, q in zip(frame.iter_rows(named=True), load_bank(tiny_bank).questions):
        with torch.no_grad():
            probs = torch.softmax(tiny.model(torch.tensor([tiny.tokenizer(q.prompt)["input_ids"]])).logits[0, -1], -1)
        p_c = max(probs[tiny.tokenizer.encode(v, add_special_tokens=False)[0]].item() for v in q.correct)
        assert row["p_correct"] == pytest.approx(p_c, rel=1e-5)
        assert (row["engram"], row["layer"], row["strength"], row["case"], row["improvement"]) == (None, None, None, None, 1.0)


def test_before_question_runs_once_per_question_outside_the_sweep_timings(tiny, tiny_bank, tmp_path, monkeypatch):
    """A fake clock, not sleeps: each call advances it by a millisecond, and the hook by 100 s, so what the timings
    include is read off the recorded values whatever the machine's load."""
    import types

    import engram_eval.run.sweep as sweep_module

    now = [0.0]

    def perf_counter():
        now[0] += 0.001
        return now[0]

    monkeypatch.setattr(sweep_module, "time", types.SimpleNamespace(perf_counter=perf_counter))
    seen = []

    def slow(question):
        seen.append(question.id)
        now[0] += 100.0

    result = sweep(tiny, tiny_bank, tmp_path / "run", before_question=slow)
    assert seen == ["q1", "q2", "q3"]
    assert result.run["timings"]["sweep_seconds"] < 1.0 and result.run["timings"]["total_seconds"] >= 300.0


@pytest.mark.real_model
def test_real_model_sweep_matches_the_straightforward_implementation(real, tmp_path):
    bank_path = REPO / "questions/ci.yaml"
    result = flat_sweep(real, load_bank(bank_path), EngramStore(tmp_path / "store"), tmp_path / "run",
                       layers=[12, 24], strengths=[1.0, 10.0], progress=False)
    frame = pl.read_parquet(result.results_path)
    assert frame.height == 3 + 4 * 4 + 2 * 3 * 4
    bank = load_bank(bank_path)
    sample = pl.concat([frame.filter(pl.col("role") == "baseline"), frame.filter(pl.col("role") != "baseline").sample(6, seed=1)])
    for row in sample.iter_rows(named=True):
        q = next(q for q in bank.questions if q.id == row["question_id"])
        engram = None if row["engram"] is None else reference_engram(real.model, real.tokenizer, bank.sources[row["engram"]].text, row["layer"])
        p_c, p_i = reference_cell(real.model, real.tokenizer, engram, row["strength"], q.prompt, list(q.correct), list(q.incorrect))
        assert row["p_correct"] == pytest.approx(p_c, rel=1e-4)
        assert row["p_incorrect"] == pytest.approx(p_i, rel=1e-4)


def test_run_json_records_each_engrams_largest_chunk_share_per_layer(tiny, tiny_bank, tmp_path):
    result = sweep(tiny, tiny_bank, tmp_path / "run")
    bank = load_bank(tiny_bank)
    assert set(result.run["largest_chunk_share"]) == {"topic", "anti", "stars", "noise"}
    for name, shares in result.run["largest_chunk_share"].items():
        assert set(shares) == {"1", "4"}
        for layer, share in shares.items():
            norms = reference_engram(tiny.model, tiny.tokenizer, bank.sources[name].text, int(layer), k=4).norm(dim=1)
            assert share == pytest.approx((norms.max() / norms.sum()).item(), abs=1e-4)


@pytest.mark.parametrize("options,message", [
    (dict(strengths=[1.0, 0.0]), "--strengths: 0.0 is not allowed; strengths must be finite and not 0 (negative ones subtract the engram, with add and actadd injection)"),
    (dict(strengths=[-2.0]), "--strengths: -2 is negative; a negative strength subtracts the engram, which applies to add and "
                             "actadd injection, not prefix (its vectors are positions of their own)"),
    (dict(strengths=[float("nan")]), "--strengths: nan is not allowed; strengths must be finite and not 0 (negative ones subtract the engram, with add and actadd injection)"),
    (dict(strengths=[]), "--strengths: no strengths given"),
    (dict(layers=[-1]), "--layers: layer -1 is out of range; valid layers are 0..4 (0 = embedding output, 4 = last)"),
    (dict(chunks=0), "--chunks: must be at least 1 (got 0)"),
    (dict(questions=["q1", "zz"]), "--questions: no question 'zz' in {bank} (known: q1, q2, q3)"),
])
def test_the_library_validates_like_the_command_line(tiny, tiny_bank, tmp_path, options, message):
    with pytest.raises(EngramEvalError) as error:
        sweep(tiny, tiny_bank, tmp_path / "run", **options)
    assert str(error.value) == message.format(bank=tiny_bank)
    assert not (tmp_path / "run").exists() and not (tmp_path / "store").exists()


def test_questions_limits_the_run_and_the_package_exports_the_report_api(tiny, tiny_bank, tmp_path):
    import engram_eval

    result = sweep(tiny, tiny_bank, tmp_path / "run", questions=["q2"])
    frame, run = engram_eval.load_run(result.out)
    assert frame["question_id"].unique().to_list() == ["q2"] and run["settings"]["questions"] == ["q2"]
    assert engram_eval.summarize(frame, run)["header"]["questions"] == 1


def test_the_chunk_count_grid_matches_the_reference_cell_by_cell_at_each_k(tiny, tiny_bank, tmp_path):
    result = sweep(tiny, tiny_bank, tmp_path / "run", layers=[2], strengths=[1.0, 4.0], chunks=[2, 6], questions=["q1", "q3"])
    frame = pl.read_parquet(result.results_path)
    bank = load_bank(tiny_bank)
    cells = frame.filter(pl.col("role") != "baseline")
    assert cells.group_by("chunks").len().sort("chunks").rows() == [(2, 2 * 4 * 2), (6, 2 * 4 * 2)]
    assert frame.filter(pl.col("role") == "baseline")["chunks"].null_count() == 2
    for row in cells.iter_rows(named=True):
        q = next(q for q in bank.questions if q.id == row["question_id"])
        engram = reference_engram(tiny.model, tiny.tokenizer, bank.sources[row["engram"]].text, row["layer"], k=row["chunks"])
        p_c, p_i = reference_cell(tiny.model, tiny.tokenizer, engram, row["strength"], q.prompt, list(q.correct), list(q.incorrect))
        assert row["p_correct"] == pytest.approx(p_c, rel=1e-5) and row["p_incorrect"] == pytest.approx(p_i, rel=1e-5)
    assert result.run["settings"]["chunks"] == [2, 6] and set(result.run["engram_keys"]) == {
        f"{name}@k{k}" for name in ("topic", "stars", "noise", "anti") for k in (2, 6)}


@pytest.mark.parametrize("chunks,message", [([4, 0], "--chunks: must be at least 1 (got 0)"), ([4, 8, 4], "--chunks: 4 is repeated")])
def test_bad_chunk_counts_are_refused(tiny, tiny_bank, tmp_path, chunks, message):
    with pytest.raises(EngramEvalError) as error:
        sweep(tiny, tiny_bank, tmp_path / "run", chunks=chunks)
    assert str(error.value) == message
