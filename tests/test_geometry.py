import json
import math
from pathlib import Path

import polars as pl
import pytest
import torch
from click.testing import CliRunner

from engram_eval.bank.banks import load_bank
from engram_eval.cli import cli
from engram_eval.engram.extraction import Extraction
from engram_eval.core.errors import EngramEvalError
from engram_eval.engram.geometry import bank_pairs, compare_engrams, pair_geometry, shared_prefix_tokens
from engram_eval.engram.store import EngramStore
from reference import reference_engram

REPO = Path(__file__).resolve().parents[1]


def straightforward_geometry(a: torch.Tensor, b: torch.Tensor, reference: torch.Tensor) -> dict:
    """The same numbers written out with Python loops over float64 values."""
    def cos(x, y):
        x, y = [float(v) for v in x.flatten()], [float(v) for v in y.flatten()]
        dot = sum(p * q for p, q in zip(x, y))
        return dot / (math.sqrt(sum(p * p for p in x)) * math.sqrt(sum(q * q for q in y)))

    rows = sorted(cos(a[i], b[i]) for i in range(a.shape[0]))
    middle = len(rows) // 2
    value = cos(a, b)
    return {"cosine": value, "angle_deg": math.degrees(math.acos(value)), "difference_signal": 100 * (1 - value),
            "chunk_cosine_min": rows[0], "chunk_cosine_median": rows[middle] if len(rows) % 2 else (rows[middle - 1] + rows[middle]) / 2,
            "norm_ratio": math.sqrt(sum(float(v) ** 2 for v in a.flatten())) / math.sqrt(sum(float(v) ** 2 for v in b.flatten())),
            "centered_cosine": cos(a - reference, b - reference), "cosine_without_first_chunk": cos(a[1:], b[1:]),
            "centered_cosine_without_first_chunk": cos((a - reference)[1:], (b - reference)[1:])}


def test_pair_geometry_equals_a_straightforward_computation():
    torch.manual_seed(3)
    a, b, reference = torch.randn(4, 8) + 2, torch.randn(4, 8) + 2, torch.randn(4, 8)
    got, expected = pair_geometry(a, b, reference), straightforward_geometry(a, b, reference)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    with pytest.raises(EngramEvalError, match="cannot be compared"):
        pair_geometry(a, torch.randn(4, 6))


def test_shared_prefix_tokens_of_two_texts_that_share_a_sentence(tiny):
    shared = "Alpha blockers first, then beta blockers. "
    a, b = tiny.tokenizer(shared + "The tumor releases adrenaline.")["input_ids"], tiny.tokenizer(shared + "Stars are hot.")["input_ids"]
    expected = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert shared_prefix_tokens(a, b) == expected >= len(tiny.tokenizer(shared.strip())["input_ids"]) - 1
    assert shared_prefix_tokens([1, 2, 3], [1, 2, 3, 4]) == 3 and shared_prefix_tokens([5], [6]) == 0


def test_compare_on_a_bank_pairs_each_relevant_engram_with_its_controls(tiny, tiny_bank, tmp_path):
    bank = load_bank(tiny_bank)
    texts, pairs = bank_pairs(bank, [])
    assert pairs == [("topic", "stars"), ("topic", "noise"), ("topic", "anti")]
    frame = compare_engrams(tiny, texts, pairs, [1, 3], [4], Extraction(), EngramStore(tmp_path))
    assert frame.height == 6 and frame.columns[:5] == ["model", "a", "b", "layer", "chunks"]
    for row in frame.iter_rows(named=True):
        engram = {name: reference_engram(tiny.model, tiny.tokenizer, text, row["layer"], k=4) for name, text in texts.items()}
        reference = torch.stack(list(engram.values())).mean(dim=0)
        expected = straightforward_geometry(engram[row["a"]], engram[row["b"]], reference)
        for key, value in expected.items():
            assert row[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
        ids = {name: tiny.tokenizer(texts[name])["input_ids"] for name in (row["a"], row["b"])}
        assert row["shared_prefix_tokens"] == shared_prefix_tokens(ids[row["a"]], ids[row["b"]])
        n_a, n_b = len(ids[row["a"]]), len(ids[row["b"]])
        assert (row["tokens_a"], row["tokens_b"]) == (n_a, n_b)
        assert row["token_counts_differ"] == (abs(n_a - n_b) / max(n_a, n_b) > 0.2)
    anti = frame.filter(pl.col("b") == "anti").row(0, named=True)  # "Alpha blockers first" vs "Beta blockers first": 0 shared
    assert anti["shared_prefix_covers_a_chunk"] is False


def test_token_counts_that_differ_by_more_than_a_fifth_are_flagged():
    from engram_eval.engram.geometry import token_counts_differ

    assert (token_counts_differ(100, 80), token_counts_differ(100, 79), token_counts_differ(79, 100)) == (False, True, True)
    assert token_counts_differ(None, 10) is None


def test_named_sources_with_a_null_prefix_and_bad_names(tiny, tiny_bank, tmp_path):
    bank = load_bank(tiny_bank)
    texts, pairs = bank_pairs(bank, ["topic", "anti", "~gaussian"])
    assert pairs == [("topic", "anti"), ("topic", "~gaussian"), ("anti", "~gaussian")]
    frame = compare_engrams(tiny, texts, pairs, [2], [4], Extraction(), EngramStore(tmp_path))
    gaussian = frame.filter(pl.col("b") == "~gaussian")
    assert gaussian["shared_prefix_tokens"].null_count() == 2 and gaussian["centered_cosine"].null_count() == 2
    raw = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    topic = reference_engram(tiny.model, tiny.tokenizer, texts["topic"], 2, k=4)
    assert gaussian.row(0, named=True)["cosine"] == pytest.approx(straightforward_geometry(topic, raw, torch.zeros(4, 32) + 1)["cosine"], rel=1e-4)
    with pytest.raises(EngramEvalError) as error:
        bank_pairs(bank, ["topic", "moon"])
    assert str(error.value) == (f"{tiny_bank}: no source named 'moon' (known: anti, noise, stars, topic, ~gaussian, "
                                "~mean-token; or an expression over the sources such as 'a - b')")
    with pytest.raises(EngramEvalError, match="nothing to compare"):
        bank_pairs(bank, ["topic"])


def test_compare_command_on_two_models_writes_parquet_per_model(tiny_model_dir, shallow_model_dir, tiny_bank, tmp_path):
    shallow = shallow_model_dir
    out = tmp_path / "geometry.parquet"
    result = CliRunner().invoke(cli, ["compare", "--bank", str(tiny_bank), "topic", "anti", "--model", str(tiny_model_dir),
                                      "--model", str(shallow), "--depths", "0.5,1", "--chunks", "4", "--store", str(tmp_path / "s"),
                                      "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    frame = pl.read_parquet(out)
    assert frame.select("model", "layer", "depth").rows() == [(tiny_model_dir.name, 2, 0.5), (tiny_model_dir.name, 4, 1.0),
                                                             (shallow.name, 1, 0.5), (shallow.name, 2, 1.0)]
    assert {"difference_signal", "centered_cosine", "cosine_without_first_chunk", "shared_prefix_tokens"} <= set(frame.columns)


@pytest.mark.parametrize("args,message", [
    (["compare", "one.txt"], "compare: give at least two source files, or --bank BANK.yaml (nothing to compare)"),
    (["compare", "one.txt", "two.txt", "--chunks", "0"], "--chunks: must be at least 1 (got 0)"),
    (["compare", "one.txt", "two.txt", "--chunks", "4,4"], "--chunks: 4 is repeated"),
    (["compare", "one.txt", "two.txt", "--depths", "1.5"], "--depths: 1.5 is not a relative depth between 0 and 1"),
])
def test_bad_compare_input_is_one_line(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("one.txt").write_text("alpha")
    Path("two.txt").write_text("beta")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and result.stderr == f"error: {message}\n"


@pytest.mark.real_model
def test_real_model_geometry_equals_the_straightforward_computation(real, tmp_path):
    bank = load_bank(REPO / "questions/medical_traps.yaml")
    texts = {name: bank.sources[name].text for name in ("pheo", "anti_pheo", "astronomy")}
    frame = compare_engrams(real, texts, [("pheo", "anti_pheo"), ("pheo", "astronomy")], [20], [16], Extraction(), EngramStore(tmp_path))
    engram = {name: reference_engram(real.model, real.tokenizer, text, 20) for name, text in texts.items()}
    reference = torch.stack(list(engram.values())).mean(dim=0)
    for row in frame.iter_rows(named=True):
        expected = straightforward_geometry(engram[row["a"]], engram[row["b"]], reference)
        for key in ("cosine", "difference_signal", "centered_cosine", "cosine_without_first_chunk", "chunk_cosine_min"):
            assert row[key] == pytest.approx(expected[key], rel=1e-3, abs=1e-4), key
    pheo_anti = frame.row(0, named=True)
    a, b = (real.tokenizer(texts[name])["input_ids"] for name in ("pheo", "anti_pheo"))
    shared = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))  # counted here, token by token
    assert pheo_anti["shared_prefix_tokens"] == shared > 0
    assert pheo_anti["shared_prefix_covers_a_chunk"] == (shared >= min(len(a), len(b)) // 16)  # the seed's first chunk: n // k


@pytest.mark.real_model
def test_the_embedded_model_and_a_second_local_model_side_by_side(real, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "random-llama"  # a small random-init model with the embedded model's tokenizer, saved to disk
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(real.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    real.tokenizer.save_pretrained(other)
    runner = CliRunner()
    geometry = tmp_path / "geometry.parquet"
    result = runner.invoke(cli, ["compare", "--bank", str(REPO / "questions/ci.yaml"), "pheo", "anti_pheo", "--model", "smollm2-135m",
                                 "--model", str(other), "--depths", "0.5,1", "--store", str(tmp_path / "s"), "--out", str(geometry)])
    assert result.exit_code == 0, result.output
    assert pl.read_parquet(geometry).select("model", "layer").rows() == [("smollm2-135m", 15), ("smollm2-135m", 30),
                                                                        ("random-llama", 2), ("random-llama", 3)]
    for model, layers, out in (("smollm2-135m", "15,30", "a"), (str(other), "2,3", "b")):
        assert runner.invoke(cli, ["sweep", str(REPO / "questions/ci.yaml"), "--model", model, "--layers", layers, "--strengths", "1",
                                   "--questions", "pheo1", "--out", str(tmp_path / out), "--store", str(tmp_path / "s"), "--quiet"]).exit_code == 0
    report = runner.invoke(cli, ["report", str(tmp_path / "a"), str(tmp_path / "b"), "--format", "json"])
    assert report.exit_code == 0, report.output
    runs = json.loads(report.stdout)["runs"]
    assert [r["depths"] for r in runs] == [[0.5, 1.0], [0.667, 1.0]]
