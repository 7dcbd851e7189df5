"""Engram arithmetic (`a - b`, `0.5 * a + 0.5 * b`, `-a`) and signed strengths: parsed without eval, combined chunk by
chunk before scaling, against vectors combined by hand in the test."""

import math
from pathlib import Path

import polars as pl
import pytest
import torch

from engram_eval.bank.banks import load_bank
from engram_eval.bank.expressions import MalformedExpression, parse_expression
from engram_eval.core.errors import EngramEvalError
from conftest import sweep, write_tiny_bank
from reference import reference_cell, reference_engram


@pytest.mark.parametrize("text,canonical,terms", [
    ("topic - anti", "topic - anti", ((1.0, "topic"), (-1.0, "anti"))),
    ("0.5*topic+0.5 * stars", "0.5 * topic + 0.5 * stars", ((0.5, "topic"), (0.5, "stars"))),
    ("-topic", "-topic", ((-1.0, "topic"),)),
    ("- 2 * topic - -anti", "-2 * topic + anti", ((-2.0, "topic"), (1.0, "anti"))),
    ("topic + topic", "2 * topic", ((2.0, "topic"),)),
    ("anti-pheo", "anti-pheo", ((1.0, "anti-pheo"),)),  # a '-' inside a name is part of it
])
def test_expressions_parse_into_weighted_names_with_one_spelling(text, canonical, terms):
    expression = parse_expression(text)
    assert expression.terms == terms and str(expression) == canonical and parse_expression(canonical) == expression


@pytest.mark.parametrize("text,why", [
    ("topic anti", "expects + or - before 'anti'"),
    ("topic -", "ends without a source name"),
    ("* topic", "expects a source name before '*'"),
    ("x * topic", "multiplies by 'x', not a number"),
    ("topic - topic", "gives 'topic' a weight of 0"),
    ("__import__('os') * topic", "multiplies by \"__import__('os')\", not a number"),
])
def test_malformed_expressions_say_what_is_wrong(text, why):
    with pytest.raises(MalformedExpression, match=f"^{__import__('re').escape(why)}$"):
        parse_expression(text)


def arithmetic_bank(folder: Path, engram: str = "topic - anti", controls: str = "[stars, 0.5 * stars + 0.5 * noise, -topic]") -> Path:
    path = write_tiny_bank(folder)
    text = path.read_text().replace("controls: [stars, noise, anti]", f"controls: {controls}")
    path.write_text(text.replace("engram: topic", f"engram: {engram}", 1))
    return path


def combined(lm, bank, name: str, layer: int, k: int, final_norm: bool = True) -> torch.Tensor:
    """The expression's raw vectors, combined by hand from each source's chunk means (a hook, tests/reference.py)."""
    return sum(weight * reference_engram(lm.model, lm.tokenizer, bank.sources[source].text, layer, k=k, final_norm=final_norm)
               for weight, source in parse_expression(name).terms)


@pytest.mark.parametrize("injection", ["prefix", "add", "actadd"])
def test_expression_cells_equal_the_vectors_combined_by_hand_before_scaling(tiny, tmp_path, injection):
    bank_path = arithmetic_bank(tmp_path)
    result = sweep(tiny, bank_path, tmp_path / "run", injection=injection, layers=[2, tiny.num_layers], strengths=[1.0, 4.0],
                   questions=["q1"])
    frame = pl.read_parquet(result.results_path)
    bank = load_bank(bank_path)
    keys = result.run["engram_keys"]
    assert set(keys) == {"topic", "anti", "stars", "noise"}  # the store holds the sources, never a combination
    assert len(list((tmp_path / "store").glob("*.safetensors"))) == 4
    rows = frame.filter(pl.col("role") != "baseline")
    assert set(rows["engram"]) == {"topic - anti", "stars", "0.5 * stars + 0.5 * noise", "-topic"}
    assert set(rows.filter(pl.col("engram") == "topic - anti")["engram_key"]) == {f"{keys['topic']} - {keys['anti']}"}
    assert set(rows.filter(pl.col("engram") == "-topic")["control_kind"]) == {"expression"}
    assert set(rows.filter(pl.col("engram") == "stars")["control_kind"]) == {"irrelevant"}
    question = bank.questions[0]
    for row in rows.iter_rows(named=True):
        engram = combined(tiny, bank, row["engram"], row["layer"], 4, final_norm=injection != "actadd")
        p_c, p_i = reference_cell(tiny.model, tiny.tokenizer, engram, row["strength"], question.prompt, list(question.correct),
                                  list(question.incorrect), mode=injection, layer=row["layer"])
        assert row["p_correct"] == pytest.approx(p_c, rel=1e-5), (row["engram"], row["layer"], row["strength"])
        assert row["p_incorrect"] == pytest.approx(p_i, rel=1e-5), (row["engram"], row["layer"], row["strength"])


@pytest.mark.parametrize("injection", ["add", "actadd"])
def test_a_negative_strength_subtracts_the_engram_as_a_negative_multiplier_does(tiny, tmp_path, injection):
    """steering-vectors' convention: a negative multiplier adds multiplier x the vector, i.e. subtracts it. The reference
    adds strength x vector with the strength as given; and strength -s with `topic` is strength s with `-topic`."""
    bank_path = arithmetic_bank(tmp_path, engram="topic", controls="[stars, -topic]")
    frame = pl.read_parquet(sweep(tiny, bank_path, tmp_path / "run", injection=injection, layers=[0, 2], strengths=[-3.0, 3.0],
                                  questions=["q1"]).results_path)
    assert sorted(set(frame["strength"].drop_nulls())) == [-3.0, 3.0]
    bank = load_bank(bank_path)
    question = bank.questions[0]
    for row in frame.filter(pl.col("engram") == "topic").iter_rows(named=True):
        engram = combined(tiny, bank, "topic", row["layer"], 4, final_norm=injection != "actadd")
        p_c, _ = reference_cell(tiny.model, tiny.tokenizer, engram, row["strength"], question.prompt, list(question.correct),
                                list(question.incorrect), mode=injection, layer=row["layer"])
        assert row["p_correct"] == pytest.approx(p_c, rel=1e-5)
        mirrored = frame.filter((pl.col("engram") == "-topic") & (pl.col("layer") == row["layer"]) & (pl.col("strength") == -row["strength"]))
        assert mirrored["p_correct"][0] == pytest.approx(row["p_correct"], rel=1e-5)
    below, above = (frame.filter((pl.col("engram") == "topic") & (pl.col("strength") == s))["log_improvement"] for s in (-3.0, 3.0))
    assert not below.equals(above)


@pytest.mark.parametrize("engram,controls,message", [
    ("topic - antii", "[stars]", "field 'engram': unknown source 'antii' in 'topic - antii' (known: anti, noise, stars, topic)"),
    ("topic", "[stars, topic anti]", "field 'controls': 'topic anti' is not a source name nor an expression over them: it "
                                     "expects + or - before 'anti'"),
    ("topic-anti", "[stars]", "field 'engram': unknown source 'topic-anti' (known: anti, noise, stars, topic) (put spaces "
                              "around an operator: 'a - b')"),
    ("topic", "[stars, 1 * topic]", "field 'controls': 'topic' is the question's own engram"),
])
def test_a_bad_expression_is_one_line_naming_the_bank_and_question(tmp_path, engram, controls, message):
    bank_path = arithmetic_bank(tmp_path, engram=engram, controls=controls)
    with pytest.raises(EngramEvalError) as error:
        load_bank(bank_path)
    assert str(error.value) == f"{bank_path}: question 'q1': {message}"


def test_compare_accepts_expressions_and_combines_them_like_the_sweep(tiny, tmp_path):
    from engram_eval.core.spec import Extraction
    from engram_eval.engram.geometry import bank_pairs, compare_engrams
    from engram_eval.engram.store import EngramStore

    bank = load_bank(arithmetic_bank(tmp_path))
    texts, pairs = bank_pairs(bank, ["topic - anti", "0.5*stars + 0.5*noise", "topic"])
    assert pairs == [("topic - anti", "0.5 * stars + 0.5 * noise"), ("topic - anti", "topic"), ("0.5 * stars + 0.5 * noise", "topic")]
    frame = compare_engrams(tiny, texts, pairs, [2], [4], Extraction(), EngramStore(tmp_path / "store"))
    for row in frame.iter_rows(named=True):
        a, b = (combined(tiny, bank, name, 2, 4).flatten().double() for name in (row["a"], row["b"]))
        assert row["cosine"] == pytest.approx((a @ b / (a.norm() * b.norm())).item(), rel=1e-5)
        assert row["tokens_a"] is None and row["centered_cosine"] is None  # a combination has no tokens of its own
    with pytest.raises(EngramEvalError, match="no source named 'topic - nope'"):
        bank_pairs(bank, ["topic - nope", "topic"])


def test_the_directional_signal_of_the_run_uses_the_expression(tiny, tmp_path):
    """run.json's anti_difference_signal (the report's chunk-count / directional section) compares the relevant
    engram, an expression here, with each anti control, from the vectors combined by hand."""
    bank_path = arithmetic_bank(tmp_path, engram="topic - stars", controls="[anti, noise]")
    result = sweep(tiny, bank_path, tmp_path / "run", layers=[2], strengths=[1.0], questions=["q1"])
    bank = load_bank(bank_path)
    [signal] = result.run["anti_difference_signal"]
    a, b = (combined(tiny, bank, name, 2, 4).flatten().double() for name in ("topic - stars", "anti"))
    assert signal["difference_signal"] == pytest.approx(100 * (1 - (a @ b / (a.norm() * b.norm())).item()), rel=1e-4, abs=1e-6)
    assert not math.isnan(signal["difference_signal"])


def test_the_report_gives_a_negative_strength_its_own_grid_column_and_doses_along_the_positive_ones(tiny, tmp_path):
    from engram_eval.report.summary import load_run, summarize

    bank_path = arithmetic_bank(tmp_path, engram="topic", controls="[stars, -topic]")
    result = sweep(tiny, bank_path, tmp_path / "run", injection="actadd", layers=[2], strengths=[-5.0, 2.0, 8.0])
    frame, run = load_run(result.out)
    summary = summarize(frame, run)
    [heatmap] = summary["heatmaps"].values()
    assert heatmap["strengths"] == [-5.0, 2.0, 8.0]
    relevant = frame.filter(pl.col("role") == "relevant")
    for column, strength in enumerate(heatmap["strengths"]):
        cells = relevant.filter(pl.col("strength") == strength)
        wrong = cells.filter(~pl.col("correct_before"))
        assert heatmap["flip"][0][column]["questions"] == sorted(wrong.filter(pl.col("flipped"))["question_id"].to_list())
    grid = summary["dose_matched"]["curves"]
    assert all(point["strength"] > 0 for points in grid.values() for point in points)
    assert {point["strength"] for point in grid["relevant"]} == {2.0, 8.0}
