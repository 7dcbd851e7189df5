"""Prompt-conditioned engrams (--reextract) and temporal ensembling (generate --ensemble M --ensemble-decay m), against
straightforward computations written in tests/reference.py: an extraction with hooks, and a decoding loop that runs
every step's whole context under each engram of the window, without caches."""

from pathlib import Path

import polars as pl
import pytest
import torch
from click.testing import CliRunner
from conftest import sweep
from reference import reference_conditioned_engram, reference_engram, reference_ensembled

from engram_eval.bank.banks import load_bank
from engram_eval.cli import cli
from engram_eval.engram.store import EngramStore
from engram_eval.run.generation import run_generate
from engram_eval.core.spec import Ensembling

REPO = Path(__file__).resolve().parents[1]


def prompt_of(bank, row) -> str:
    question = next(q for q in bank.questions if q.id == row["question_id"])
    return f"{question.context}\n\n{question.prompt}" if row["context"] else question.prompt


def reference_row(lm, bank, row, ensembling: Ensembling, max_new_tokens: int, k: int, mode: str, eos: int) -> list[int]:
    """The reference's tokens for one generated row (the baseline: no engram at all)."""
    prompt = prompt_of(bank, row)
    text = None if row["engram"] is None else bank.sources[row["engram"]].text
    fixed = None if text is None else reference_engram(lm.model, lm.tokenizer, text, row["layer"], k, final_norm=mode != "actadd")
    return reference_ensembled(lm.model, lm.tokenizer, text if ensembling.reextract else None, fixed, row["strength"] or 0.0,
                               prompt, max_new_tokens, ensembling.size, ensembling.decay, ensembling.reextract,
                               row["layer"] or 0, k, mode, eos)


def ours(row, eos: int) -> list[int]:
    return list(row["token_ids"]) + ([eos] if row["stop"] == "eos" else [])


def test_reextracted_engrams_equal_a_straightforward_extraction_after_the_prompt(tiny, tiny_bank, tmp_path):
    result = sweep(tiny, tiny_bank, tmp_path / "run", layers=[1, 4], strengths=[3.0], reextract=True, questions=["q1", "q2"])
    bank = load_bank(tiny_bank)
    store = EngramStore(tmp_path / "store")
    frame = pl.read_parquet(result.results_path).filter(pl.col("role") != "baseline")
    keys = {}
    for row in frame.iter_rows(named=True):
        question = next(q for q in bank.questions if q.id == row["question_id"])
        stored = store.load(store.path_for(row["engram"], row["engram_key"]))
        state = tiny.tokenizer(question.prompt)["input_ids"]
        expected = reference_conditioned_engram(tiny.model, tiny.tokenizer, state, bank.sources[row["engram"]].text, row["layer"], 4)
        torch.testing.assert_close(stored.engram.layers[row["layer"]], expected, rtol=1e-4, atol=1e-5)
        assert stored.metadata["state_tokens"] == str(len(state))
        keys.setdefault(row["engram"], set()).add(row["engram_key"])
    assert all(len(per_question) == 2 for per_question in keys.values())  # every engram, controls too: one per question
    plain = sweep(tiny, tiny_bank, tmp_path / "plain", layers=[1, 4], strengths=[3.0], questions=["q1", "q2"])
    assert result.run["run_id"] != plain.run["run_id"] and "reextract" not in plain.run["settings"]
    assert not set(pl.read_parquet(plain.results_path)["engram_key"].drop_nulls()) & {k for ks in keys.values() for k in ks}


def test_a_reextracted_cell_scores_what_its_own_engram_scores(tiny, tiny_bank, tmp_path):
    from reference import reference_cell

    result = sweep(tiny, tiny_bank, tmp_path / "run", layers=[2], strengths=[3.0], reextract=True, questions=["q3"])
    bank = load_bank(tiny_bank)
    question = bank.questions[[q.id for q in bank.questions].index("q3")]
    for row in pl.read_parquet(result.results_path).filter(pl.col("role") != "baseline").iter_rows(named=True):
        engram = reference_conditioned_engram(tiny.model, tiny.tokenizer, tiny.tokenizer(question.prompt)["input_ids"],
                                              bank.sources[row["engram"]].text, 2, 4)
        p_correct, p_incorrect = reference_cell(tiny.model, tiny.tokenizer, engram, 3.0, question.prompt,
                                                list(question.correct), list(question.incorrect), layer=2)
        assert row["p_correct"] == pytest.approx(p_correct, rel=1e-4) and row["p_incorrect"] == pytest.approx(p_incorrect, rel=1e-4)


@pytest.mark.parametrize("injection,ensembling", [
    ("prefix", Ensembling(3, 0.5, True)),
    ("add", Ensembling(2, 0.0, True)),
    ("actadd", Ensembling(3, 1.0, True)),
    ("prefix", Ensembling(1, 0.01, True)),  # continuous re-injection
    ("prefix", Ensembling(3, 0.3, False)),  # one engram: the ensemble is plain greedy decoding
])
def test_ensembled_generation_equals_a_plain_loop_token_for_token(tiny, tiny_bank, tmp_path, monkeypatch, injection, ensembling):
    result = sweep(tiny, tiny_bank, tmp_path / "run", injection=injection, layers=[1, 4], strengths=[0.5, 3.0],
                   questions=["q1", "q2"])
    eos = tiny.tokenizer.encode(" the", add_special_tokens=False)[0]  # a token the tiny model does produce: some rows end early
    monkeypatch.setattr(tiny.model.generation_config, "eos_token_id", eos)
    generated = run_generate(tiny, result.out, cells="all", max_new_tokens=6, progress=False, ensembling=ensembling)
    assert generated.generations_path.name == "generations-ensemble.parquet"
    frame = pl.read_parquet(generated.generations_path)
    assert frame.height == pl.read_parquet(result.results_path).height
    assert set(frame["ensemble"]) == {ensembling.size} and set(frame["ensemble_decay"]) == {ensembling.decay}
    assert set(frame["reextract"]) == {ensembling.reextract}
    bank = load_bank(tiny_bank)
    for row in frame.iter_rows(named=True):
        assert ours(row, eos) == reference_row(tiny, bank, row, ensembling, 6, 4, injection, eos), (row["engram"], row["layer"])


def test_one_engram_ensembles_equal_todays_generation_and_both_files_stay(tiny, tiny_bank, tmp_path):
    result = sweep(tiny, tiny_bank, tmp_path / "run", layers=[1, 4], strengths=[0.5, 3.0], questions=["q1", "q2"])
    plain = pl.read_parquet(run_generate(tiny, result.out, cells="all", max_new_tokens=8, progress=False).generations_path)
    for size in (1, 4):  # without --reextract every engram of the window is the cell's own
        ensembled = run_generate(tiny, result.out, cells="all", max_new_tokens=8, progress=False, force=True,
                                 ensembling=Ensembling(size, 0.2, False))
        if size == 1:
            assert ensembled.generations_path.name == "generations.parquet"  # M = 1 without re-extraction: today's path
        assert pl.read_parquet(ensembled.generations_path)["token_ids"].to_list() == plain["token_ids"].to_list()
    assert (result.out / "generations.parquet").is_file() and (result.out / "generations-ensemble.parquet").is_file()


def test_the_report_compares_plain_and_ensembled_texts_on_the_same_cells(tiny, tiny_bank, tmp_path):
    from engram_eval.report.summary import load_generations, load_run, summarize

    result = sweep(tiny, tiny_bank, tmp_path / "run", layers=[1, 4], strengths=[0.5, 3.0])
    run_generate(tiny, result.out, cells="all", max_new_tokens=6, progress=False)
    run_generate(tiny, result.out, cells="default", max_new_tokens=6, progress=False, ensembling=Ensembling(2, 0.1, True))
    plain, ensembled = load_generations(result.out), load_generations(result.out, ensembled=True)
    summary = summarize(*load_run(result.out), generations=plain, ensembled=ensembled)
    comparison = summary["ensemble_comparison"]
    assert (comparison["ensemble"], comparison["ensemble_decay"], comparison["reextract"]) == (2, 0.1, True)
    cell = ["question_id", "role", "engram", "layer", "strength", "chunks"]
    both = plain.join(ensembled, on=cell, suffix="_e", nulls_equal=True)
    assert comparison["cells"] == both.height == ensembled.height
    counted = {}
    for row in both.iter_rows(named=True):
        kind = row["control_kind"] or row["role"]
        c = counted.setdefault(kind, [0, 0, 0, 0])
        c[0] += 1
        c[1] += row["text"] != row["text_e"]
        c[2] += row["first_answer"] == "correct"
        c[3] += row["first_answer_e"] == "correct"
    assert {k["kind"]: [k["cells"], k["texts_differ"], k["plain_says_correct_first"]["k"], k["ensembled_says_correct_first"]["k"]]
            for k in comparison["by_kind"]} == counted
    alone = summarize(*load_run(result.out), ensembled=ensembled)  # only ensembled texts: they are the generation section's
    assert alone["generation"]["cells"] == ensembled.height and alone["ensemble_comparison"] is None
    markdown = CliRunner().invoke(cli, ["report", str(result.out), "--format", "markdown"]).output
    assert f"Plain vs ensembled generation (--ensemble 2, --ensemble-decay 0.1, --reextract) on the {both.height} cells" in markdown


@pytest.mark.parametrize("args,message", [
    (["--ensemble", "0"], "error: --ensemble: must be at least 1 (got 0)"),
    (["--ensemble-decay", "-0.5"], "error: --ensemble-decay: must be finite and at least 0 (got -0.5)"),
    (["--ensemble-decay", "nan"], "error: --ensemble-decay: must be finite and at least 0 (got nan)"),
])
def test_bad_ensemble_options_are_one_line_and_write_nothing(tiny_model_dir, tiny, tiny_bank, tmp_path, args, message):
    result = sweep(tiny, tiny_bank, tmp_path / "run", layers=[1], strengths=[1.0], questions=["q1"])
    before = sorted(p.name for p in result.out.iterdir())
    out = CliRunner().invoke(cli, ["generate", str(result.out), "--model", str(tiny_model_dir), *args])
    assert out.exit_code != 0 and out.output.strip() == message
    assert sorted(p.name for p in result.out.iterdir()) == before


@pytest.mark.parametrize("keywords,message", [
    (dict(reextract=True, pooling="learned", learn_steps=1), "--reextract: reads the source after each prompt in one pass; it "
                                                             "does not combine with --pooling learned"),
    (dict(reextract=True, window=8), "--reextract: reads the source after each prompt in one pass; it does not combine with --window"),
])
def test_reextract_refuses_what_it_cannot_condition(tiny, tiny_bank, tmp_path, keywords, message):
    from engram_eval.core.errors import EngramEvalError
    from engram_eval.core.spec import Extraction

    extraction = Extraction(**{k: v for k, v in keywords.items() if k != "reextract"})
    with pytest.raises(EngramEvalError, match="^" + message.replace("(", r"\(").replace(")", r"\)") + "$"):
        sweep(tiny, tiny_bank, tmp_path / "run", reextract=True, extraction=extraction)
    assert not (tmp_path / "run").exists()


@pytest.mark.real_model
def test_real_model_reextracted_ensemble_equals_the_plain_loop(real, tmp_path):
    from conftest import flat_sweep

    bank_path = REPO / "questions/ci.yaml"
    bank = load_bank(bank_path)
    result = flat_sweep(real, bank, EngramStore(tmp_path / "store"), tmp_path / "run", layers=[16], strengths=[10.0],
                        questions=["mh1"], reextract=True, progress=False)
    ensembling = Ensembling(2, 0.5, True)
    frame = pl.read_parquet(run_generate(real, result.out, cells="default", max_new_tokens=4, progress=False,
                                         ensembling=ensembling).generations_path)
    question = bank.questions[[q.id for q in bank.questions].index("mh1")]
    stored = EngramStore(tmp_path / "store")
    relevant = pl.read_parquet(result.results_path).filter(pl.col("role") == "relevant").row(0, named=True)
    torch.testing.assert_close(
        stored.load(stored.path_for(relevant["engram"], relevant["engram_key"])).engram.layers[16],
        reference_conditioned_engram(real.model, real.tokenizer, real.tokenizer(question.prompt)["input_ids"],
                                     bank.sources[relevant["engram"]].text, 16, 16), rtol=1e-3, atol=1e-4)
    eos = real.tokenizer.eos_token_id
    for row in frame.filter(pl.col("control_kind").is_null() | (pl.col("control_kind") != "null-prefix")).iter_rows(named=True):
        assert ours(row, eos) == reference_row(real, bank, row, ensembling, 4, 16, "prefix", eos), (row["engram"], row["strength"])


def test_ensemble_options_on_the_command_line_equal_the_library(tiny_model_dir, tiny, tiny_bank, tmp_path):
    import shutil

    result = sweep(tiny, tiny_bank, tmp_path / "run", layers=[1, 4], strengths=[0.5, 3.0], questions=["q1"])
    shutil.copytree(result.out, tmp_path / "library")  # the library's own copy: nothing of the command's to resume
    out = CliRunner().invoke(cli, ["generate", str(result.out), "--model", str(tiny_model_dir), "--cells", "all",
                                   "--max-new-tokens", "5", "--ensemble", "2", "--ensemble-decay", "0.5", "--reextract", "-q"])
    assert out.exit_code == 0, out.output
    assert "generations-ensemble.parquet" in out.output
    got = pl.read_parquet(result.out / "generations-ensemble.parquet")
    library = run_generate(tiny, tmp_path / "library", cells="all", max_new_tokens=5, progress=False,
                           ensembling=Ensembling(2, 0.5, True))
    expected = pl.read_parquet(library.generations_path)
    assert got.drop("run_id").equals(expected.drop("run_id"))
    assert (set(got["ensemble"]), set(got["ensemble_decay"]), set(got["reextract"])) == ({2}, {0.5}, {True})
    plain = run_generate(tiny, result.out, cells="all", max_new_tokens=5, progress=False)
    assert pl.read_parquet(plain.generations_path)["token_ids"].to_list() != got["token_ids"].to_list()
