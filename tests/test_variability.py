"""Paraphrased sources (`files: [...]`) and engrams sampled from them (`sweep --sample N --sample-seed S`): the rows
against the store and the reference, the report's spread and "survives rewording" rate recounted from the Parquet, and
the samples against the formula written here."""

import hashlib
import math
import statistics
from pathlib import Path

import polars as pl
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_SOURCES, assert_same_results, sweep, write_tiny_bank
from reference import reference_cell, reference_engram

from engram_eval.bank.banks import load_bank
from engram_eval.cli import cli
from engram_eval.core.errors import EngramEvalError
from engram_eval.engram.store import EngramStore
from engram_eval.report.summary import load_run, summarize

REPO = Path(__file__).resolve().parents[1]
REWORDED = [
    TINY_SOURCES["topic"],
    "First the alpha blockers, then the beta blockers. Adrenaline comes from the tumor; alpha blockade first. " * 3,
    "The tumor releases adrenaline, so alpha blockers come before beta blockers: alpha blockade first. " * 3,
]


def paraphrase_bank(folder: Path) -> Path:
    """The tiny bank whose relevant source lists three paraphrases."""
    for i, text in enumerate(REWORDED):
        (folder / f"topic{i}.txt").write_text(text)
    path = write_tiny_bank(folder)
    text = path.read_text()
    line = next(line for line in text.splitlines() if line.startswith("  topic:"))
    path.write_text(text.replace(line, "  topic: {files: [topic0.txt, topic1.txt, topic2.txt], kind: relevant}"))
    return path


def test_paraphrase_rows_are_each_texts_own_engram(tiny, tmp_path):
    bank_path = paraphrase_bank(tmp_path)
    result = sweep(tiny, bank_path, tmp_path / "run", layers=[1, 4], strengths=[0.5, 3.0])
    frame = pl.read_parquet(result.results_path)
    relevant = frame.filter(pl.col("role") == "relevant")
    assert sorted(relevant["paraphrase"].unique().to_list()) == [0, 1, 2]
    assert relevant.group_by("question_id", "paraphrase").len()["len"].to_list() == [4] * 9  # 2 layers x 2 strengths each
    assert frame.filter(pl.col("role") == "control")["paraphrase"].null_count() == frame.filter(pl.col("role") == "control").height
    store, bank = EngramStore(tmp_path / "store"), load_bank(bank_path)
    for i, text in enumerate(REWORDED):
        key = relevant.filter(pl.col("paraphrase") == i)["engram_key"].unique()
        assert key.len() == 1
        name = "topic" if i == 0 else f"topic#p{i}"
        stored = store.load(store.path_for(name, key[0]))
        assert stored.metadata["source_sha256"] == hashlib.sha256(text.encode()).hexdigest()
    question = bank.questions[0]
    for row in relevant.filter((pl.col("question_id") == question.id) & (pl.col("layer") == 4)).iter_rows(named=True):
        engram = reference_engram(tiny.model, tiny.tokenizer, REWORDED[row["paraphrase"]], 4, k=4)
        p_correct, p_incorrect = reference_cell(tiny.model, tiny.tokenizer, engram, row["strength"], question.prompt,
                                                list(question.correct), list(question.incorrect), layer=4)
        assert row["p_correct"] == pytest.approx(p_correct, rel=1e-4) and row["p_incorrect"] == pytest.approx(p_incorrect, rel=1e-4)
    # Paraphrase 0 is the source as it always was: the same numbers as a bank without paraphrases.
    (tmp_path / "plain").mkdir()
    plain = pl.read_parquet(sweep(tiny, write_tiny_bank(tmp_path / "plain"), tmp_path / "plain" / "run", layers=[1, 4],
                                  strengths=[0.5, 3.0]).results_path)
    primary = frame.filter(pl.col("sample").is_null() & (pl.col("paraphrase").fill_null(0) == 0))
    numbers = ["question_id", "engram", "layer", "strength", "p_correct", "p_incorrect", "flipped", "engram_key"]
    assert_same_results(primary.select(numbers), plain.select(numbers))  # batches differ: float32 rounding


def recount(frame: pl.DataFrame, kind_rows: pl.Expr, variant: str) -> dict:
    """The variability section's numbers, recounted with loops: per question, the variants' log-improvement at the
    question's best cell of the relevant engram's own text, and how many flip at any cell."""
    rows = frame.to_dicts()
    own = [r for r in rows if r["role"] == "relevant" and r["sample"] is None and (r["paraphrase"] or 0) == 0]
    questions = {}
    for qid in sorted({r["question_id"] for r in own}):
        mine = [r for r in own if r["question_id"] == qid]
        best = sorted(mine, key=lambda r: (-r["ratio"], r["chunks"], r["layer"], r["strength"]))[0]
        variants = [r for r in frame.filter(kind_rows & (pl.col("question_id") == qid) & pl.col(variant).is_not_null()).to_dicts()]
        ids = sorted({r[variant] for r in variants})
        at_best = [r["log_improvement"] for r in variants if (r["layer"], r["strength"], r["chunks"]) ==
                   (best["layer"], best["strength"], best["chunks"])]
        flips = sum(any(r["flipped"] for r in variants if r[variant] == i) for i in ids)
        questions[qid] = (len(ids), min(at_best), statistics.median(at_best), max(at_best),
                          None if best["correct_before"] else flips, at_best)
    return questions


def check_spread(spread: dict, expected: dict) -> None:
    got = {q["question_id"]: q for q in spread["questions"]}
    assert set(got) == set(expected)
    for qid, (n, low, median, high, flipped, _) in expected.items():
        q = got[qid]
        assert (q["variants"], q["flipped"]) == (n, flipped)
        assert q["log_improvement_min"] == pytest.approx(low) and q["log_improvement_max"] == pytest.approx(high)
        assert q["log_improvement_median"] == pytest.approx(median)
    wrong = [v for v in expected.values() if v[4] is not None]
    any_flip = [v for v in wrong if v[4] > 0]
    assert (spread["flip_with_any"], spread["flip_with_every"]) == (len(any_flip), sum(v[4] == v[0] for v in any_flip))
    everything = sorted(x for v in expected.values() for x in v[5])
    assert spread["log_improvement_quantiles"]["0.5"] == pytest.approx(statistics.median(everything))


def test_the_spread_and_survives_rewording_recounted_from_the_parquet(tiny, tmp_path):
    result = sweep(tiny, paraphrase_bank(tmp_path), tmp_path / "run", layers=[1, 2, 4], strengths=[0.5, 3.0, 20.0],
                   samples=3, sample_seed=11)
    frame, run = load_run(result.out)
    summary = summarize(frame, run)
    relevant = pl.col("role") == "relevant"
    check_spread(summary["variability"]["paraphrases"][0], recount(frame, relevant, "paraphrase"))
    check_spread(summary["variability"]["samples"][0], recount(frame, relevant, "sample"))
    assert [s["kind"] for s in summary["variability"]["paraphrases"]] == ["relevant"]
    # The rest of the report reads the source's own text only: the same summary as without the variants' rows.
    own = frame.filter(pl.col("sample").is_null() & (pl.col("paraphrase").fill_null(0) == 0))
    assert {k: v for k, v in summarize(own, run).record.items() if k != "variability"} == \
        {k: v for k, v in summary.record.items() if k != "variability"}
    assert summarize(own, run)["variability"] is None
    markdown = CliRunner().invoke(cli, ["report", str(result.out), "--format", "markdown"]).output
    assert "## Variability over paraphrases (relevant): survives rewording" in markdown
    assert "## Variability over samples (relevant): survives sampling" in markdown


def formula_sample(paraphrases: list[torch.Tensor], seed: int, source: str, samples: int) -> list[torch.Tensor]:
    """mean + sum_j z_j (v_j - mean) / sqrt(P - 1), z ~ N(0, 1) from a generator seeded by sha256('seed|source')."""
    derived = int(hashlib.sha256(f"{seed}|{source}".encode()).hexdigest()[:15], 16)
    z = torch.randn((samples, len(paraphrases)), generator=torch.Generator().manual_seed(derived))
    mean = sum(paraphrases) / len(paraphrases)
    out = []
    for row in z:
        total = mean.clone()
        for j, v in enumerate(paraphrases):
            total = total + row[j] * (v - mean) / math.sqrt(len(paraphrases) - 1)
        out.append(total)
    return out


def test_samples_equal_the_formula_and_reproduce_with_their_seed(tiny, tmp_path):
    bank_path = paraphrase_bank(tmp_path)
    result = sweep(tiny, bank_path, tmp_path / "run", layers=[2], strengths=[3.0], samples=4, sample_seed=5)
    frame = pl.read_parquet(result.results_path)
    sampled = frame.filter(pl.col("sample").is_not_null())
    assert sampled["engram"].unique().to_list() == ["topic"] and sampled["paraphrase"].null_count() == sampled.height
    assert sampled.group_by("question_id").len()["len"].to_list() == [4] * 3
    bank = load_bank(bank_path)
    paraphrases = [reference_engram(tiny.model, tiny.tokenizer, text, 2, k=4) for text in REWORDED]
    expected = formula_sample(paraphrases, 5, "topic", 4)
    question = bank.questions[0]
    for row in sampled.filter(pl.col("question_id") == question.id).iter_rows(named=True):
        p_correct, _ = reference_cell(tiny.model, tiny.tokenizer, expected[row["sample"]], 3.0, question.prompt,
                                      list(question.correct), list(question.incorrect), layer=2)
        assert row["p_correct"] == pytest.approx(p_correct, rel=1e-4)
    again = pl.read_parquet(sweep(tiny, bank_path, tmp_path / "again", layers=[2], strengths=[3.0], samples=4,
                                  sample_seed=5).results_path)
    assert again.filter(pl.col("sample").is_not_null())["p_correct"].to_list() == sampled["p_correct"].to_list()
    other = pl.read_parquet(sweep(tiny, bank_path, tmp_path / "other", layers=[2], strengths=[3.0], samples=4,
                                  sample_seed=6).results_path)
    assert other.filter(pl.col("sample").is_not_null())["p_correct"].to_list() != sampled["p_correct"].to_list()
    assert result.run["settings"]["samples"] == 4 and result.run["settings"]["sample_seed"] == 5


def test_sample_draws_are_standard_normal_and_span_the_paraphrases():
    from engram_eval.engram.variability import sample_draws, sampled_engram

    z = sample_draws(0, "topic", 20000, 3)
    assert abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02
    vectors = [torch.randn(4, 8) for _ in range(3)]
    draws = torch.stack([sampled_engram(vectors, row) for row in z[:2000]])
    mean = sum(vectors) / 3
    torch.testing.assert_close(draws.mean(dim=0), mean, atol=0.1, rtol=0)
    centred = torch.stack([v - mean for v in vectors]).flatten(1)
    covariance = centred.T @ centred / 2  # the paraphrases' sample covariance, which the draws reproduce
    spread = (draws - mean).flatten(1)
    torch.testing.assert_close(spread.T @ spread / len(spread), covariance, atol=0.25, rtol=0.1)


def test_sample_without_paraphrases_and_a_missing_paraphrase_are_one_line(tiny_model_dir, tiny, tmp_path):
    plain = write_tiny_bank(tmp_path)
    out = CliRunner().invoke(cli, ["sweep", str(plain), "--model", str(tiny_model_dir), "--layers", "1", "--strengths", "1",
                                   "--chunks", "4", "--sample", "2", "--store", str(tmp_path / "store"), "--out", str(tmp_path / "run")])
    assert out.exit_code != 0
    assert out.output.strip() == (f"error: --sample: no engram the questions of {plain} use has paraphrases to fit a Gaussian "
                                  "to (a source needs `files: [a.txt, b.txt, ...]`, at least 2)")
    assert not (tmp_path / "run").exists() and not (tmp_path / "store").exists()
    folder = tmp_path / "missing"
    folder.mkdir()
    bank = paraphrase_bank(folder)
    (folder / "topic2.txt").unlink()
    with pytest.raises(EngramEvalError) as error:
        load_bank(bank)
    assert str(error.value) == f"{bank}: source 'topic': field 'files': {(folder / 'topic2.txt').resolve()} not found"
    for args, message in ((["--sample", "-1"], "error: --sample: must be at least 1 (got -1)"),
                          (["--sample-seed", "3"], "error: --sample-seed: applies to --sample N")):
        out = CliRunner().invoke(cli, ["sweep", str(plain), "--model", str(tiny_model_dir), *args, "--out", str(tmp_path / "run")])
        assert out.exit_code != 0 and out.output.strip() == message


@pytest.mark.real_model
def test_real_model_paraphrase_rows_are_the_paraphrases_engrams(real, tmp_path):
    bank_path = REPO / "questions/medical_traps.yaml"
    result = sweep(real, bank_path, tmp_path / "run", layers=[8], strengths=[5.0], chunks=16, questions=["pheo1"])
    bank = load_bank(bank_path)
    question = bank.questions[0]
    relevant = pl.read_parquet(result.results_path).filter(pl.col("role") == "relevant").sort("paraphrase")
    assert relevant["paraphrase"].to_list() == [0, 1, 2]
    for row, text in zip(relevant.iter_rows(named=True), bank.sources["pheo"].texts):
        engram = reference_engram(real.model, real.tokenizer, text, 8, k=16)
        p_correct, p_incorrect = reference_cell(real.model, real.tokenizer, engram, 5.0, question.prompt,
                                                list(question.correct), list(question.incorrect), layer=8)
        assert row["p_correct"] == pytest.approx(p_correct, rel=2e-3) and row["p_incorrect"] == pytest.approx(p_incorrect, rel=2e-3)


def test_sample_options_on_the_command_line_equal_the_library(tiny_model_dir, tiny, tmp_path):
    bank_path = paraphrase_bank(tmp_path)
    out = CliRunner().invoke(cli, ["sweep", str(bank_path), "--model", str(tiny_model_dir), "--layers", "1,4", "--strengths",
                                   "0.5,3", "--chunks", "4", "--sample", "2", "--sample-seed", "4", "--store",
                                   str(tmp_path / "store"), "--out", str(tmp_path / "cli"), "-q"])
    assert out.exit_code == 0, out.output
    assert "variant cells" in out.output
    got = pl.read_parquet(tmp_path / "cli" / "results.parquet")
    expected = pl.read_parquet(sweep(tiny, bank_path, tmp_path / "lib", layers=[1, 4], strengths=[0.5, 3.0], samples=2,
                                     sample_seed=4).results_path)
    assert_same_results(got, expected)
    assert sorted(got["sample"].drop_nulls().unique().to_list()) == [0, 1]


def test_check_keeps_every_paraphrase_and_sample_cell_apart(tiny, tmp_path):
    from engram_eval.report.check import summarize_run

    result = sweep(tiny, paraphrase_bank(tmp_path), tmp_path / "run", layers=[1], strengths=[3.0], samples=2)
    frame, run = load_run(result.out)
    baseline_file = summarize_run(frame, run)
    cells = frame.filter(pl.col("role") != "baseline")
    assert len(baseline_file["cells"]) == baseline_file["totals"]["cells"] == cells.height
    assert {"q1|topic|L1|s3.0", "q1|topic|L1|s3.0|p1", "q1|topic|L1|s3.0|p2", "q1|topic|L1|s3.0|sample1"} <= set(baseline_file["cells"])
    row = cells.filter((pl.col("question_id") == "q1") & (pl.col("paraphrase") == 2)).row(0, named=True)
    assert baseline_file["cells"]["q1|topic|L1|s3.0|p2"]["log_ratio"] == row["log_ratio"]
