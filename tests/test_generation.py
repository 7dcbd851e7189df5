from pathlib import Path

import polars as pl
import pytest

import engram_eval.run.generation as generation_module
from engram_eval.bank.banks import load_bank
from engram_eval.core.errors import EngramEvalError
from engram_eval.run.generation import run_generate, select_cells
from conftest import sweep, write_tiny_bank
from reference import reference_engram, reference_generation

REPO = Path(__file__).resolve().parents[1]


def reference_tokens(lm, bank_path, row, max_new_tokens, k, injection, scaling="global"):
    bank = load_bank(bank_path)
    question = next(q for q in bank.questions if q.id == row["question_id"])
    engram = None if row["engram"] is None else reference_engram(lm.model, lm.tokenizer, bank.sources[row["engram"]].text,
                                                                 row["layer"], k=k, final_norm=injection != "actadd")
    prompt = f"{question.context}\n\n{question.prompt}" if row["context"] else question.prompt
    return reference_generation(lm.model, lm.tokenizer, engram, row["strength"], prompt, max_new_tokens,
                                mode=injection, layer=row["layer"], scaling=scaling)


def ours(row) -> list[int]:
    """Our tokens as transformers returns them: the EOS that ended the text included."""
    return list(row["token_ids"]) + ([row["eos"]] if row["stop"] == "eos" else [])


@pytest.mark.parametrize("injection", ["prefix", "add", "actadd"])
def test_batched_generation_equals_transformers_generate_token_for_token(tiny, tiny_bank, tmp_path, monkeypatch, injection):
    result = sweep(tiny, tiny_bank, tmp_path / "run", injection=injection, layers=[0, 2, 4], strengths=[0.5, 3.0], questions=["q1", "q2"])
    # An EOS the tiny model actually produces early in some rows, so that some rows stop at EOS and others at the limit.
    first = reference_tokens(tiny, tiny_bank, {"question_id": "q1", "engram": None, "layer": None, "strength": None, "context": None},
                             12, 4, injection)
    eos = first[4]
    monkeypatch.setattr(tiny.model.generation_config, "eos_token_id", eos)
    frame = pl.read_parquet(run_generate(tiny, result.out, cells="all", max_new_tokens=12, progress=False).generations_path)
    assert frame.height == pl.read_parquet(result.results_path).height
    assert {"eos", "length"} <= set(frame["stop"])
    for row in frame.with_columns(eos=pl.lit(eos)).iter_rows(named=True):
        assert ours(row) == reference_tokens(tiny, tiny_bank, row, 12, 4, injection), (row["engram"], row["layer"], row["strength"])
        assert row["n_tokens"] == len(row["token_ids"]) and row["text"] == tiny.tokenizer.decode(row["token_ids"], skip_special_tokens=True)


@pytest.mark.parametrize("text,expected", [
    ("Use needle decompression now.", (True, False, "correct", "correct")),
    ("A CT scan is contraindicated.", (False, True, "incorrect", "incorrect")),
    ("It is contraindicated here.", (False, False, "none", "neither")),
    ("Give the chest tube, not a needle.", (True, True, "incorrect", "both")),
    ("NEEDLE first; chest tube later", (True, True, "correct", "both")),
    ("The alphabet starts with a.", (False, False, "none", "neither")),
])
def test_answers_match_on_word_boundaries_case_insensitively(text, expected):
    from engram_eval.bank.answers import AnswerMatcher
    from engram_eval.bank.banks import Question

    question = Question("q", "p", (" needle", " decompression"), (" chest", " tube", " CT", " alpha"), "e", (), None, (), False)
    judged = AnswerMatcher.for_question(question).judge(text)
    assert (judged["says_correct"], judged["says_incorrect"], judged["first_answer"], judged["verdict"]) == expected


def test_b1_matches_before_a_full_stop_and_answer_patterns_override_the_variants():
    from dataclasses import replace

    from engram_eval.bank.answers import AnswerMatcher
    from engram_eval.bank.banks import Question

    question = Question("q", "p", (" B1", " thiamine"), (" glucose",), "e", (), None, (), False)
    assert AnswerMatcher.for_question(question).judge("Give vitamin B1.")["verdict"] == "correct"
    custom = replace(question, answer_patterns={"correct": (r"vitamin\s+b\d",), "incorrect": ()})
    judged = AnswerMatcher.for_question(custom).judge("Vitamin  B1 or glucose?")
    assert (judged["first_answer"], judged["verdict"]) == ("correct", "both")


def test_the_default_selection_is_baseline_moved_relevant_cells_and_best_and_worst_per_kind(run):
    frame, _ = run
    chosen = select_cells(frame, "default").drop("row")
    rows = frame.with_row_index("row").to_dicts()
    expected = set()
    for qid in {r["question_id"] for r in rows}:
        mine = [r for r in rows if r["question_id"] == qid]
        expected |= {r["row"] for r in mine if r["role"] == "baseline"}
        expected |= {r["row"] for r in mine if r["role"] == "relevant" and (r["flipped"] or r["broken"])}
        for kind in {r["control_kind"] or r["role"] for r in mine if r["role"] != "baseline"}:
            group = [r for r in mine if r["role"] != "baseline" and (r["control_kind"] or r["role"]) == kind]
            expected |= {max(group, key=lambda r: r["ratio"])["row"], min(group, key=lambda r: r["ratio"])["row"]}
    assert chosen.equals(frame.with_row_index("row").filter(pl.col("row").is_in(sorted(expected))).drop("row"))


def test_generation_resumes_after_an_interruption_and_equals_an_uninterrupted_run(tiny, tiny_bank, tmp_path, monkeypatch):
    result = sweep(tiny, tiny_bank, tmp_path / "run", layers=[1], strengths=[1.0])
    whole = pl.read_parquet(run_generate(tiny, result.out, max_new_tokens=6, progress=False).generations_path)
    cut = sweep(tiny, tiny_bank, tmp_path / "cut", layers=[1], strengths=[1.0])
    real, calls = generation_module.generate_in_batches, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(generation_module, "generate_in_batches", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_generate(tiny, cut.out, max_new_tokens=6, batch_size=4, progress=False)  # batches of 4 rows: one question each
    assert [p.name for p in (cut.out / "generation-parts").iterdir()] == ["00000-q1.parquet"]
    monkeypatch.setattr(generation_module, "generate_in_batches", real)
    resumed = pl.read_parquet(run_generate(tiny, cut.out, max_new_tokens=6, progress=False).generations_path)
    assert resumed.drop("run_id").equals(whole.drop("run_id"))


def test_a_resume_with_nothing_left_keeps_the_timings_and_files_follow_the_umask(tiny, tiny_bank, tmp_path):
    import json
    import os
    import stat

    result = sweep(tiny, tiny_bank, tmp_path / "run", layers=[1], strengths=[1.0])
    first = run_generate(tiny, result.out, max_new_tokens=4, progress=False).info["timings"]
    again = run_generate(tiny, result.out, max_new_tokens=4, progress=False).info["timings"]
    assert first["tokens"] > 0 and again == first == json.loads((result.out / "generation.json").read_text())["timings"]
    mask = os.umask(0)
    os.umask(mask)
    for path in [result.out / "generations.parquet", result.out / "results.parquet", result.out / "run.json",
                 *(result.out / "parts").iterdir(), *Path(result.run["store"]).glob("*.safetensors")]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path


def test_other_generation_settings_are_refused_unless_forced(tiny, tiny_bank, tmp_path):
    result = sweep(tiny, tiny_bank, tmp_path / "run", layers=[1], strengths=[1.0])
    run_generate(tiny, result.out, max_new_tokens=4, progress=False)
    with pytest.raises(EngramEvalError) as error:
        run_generate(tiny, result.out, max_new_tokens=5, progress=False)
    assert str(error.value) == f"{result.out} holds generations with other settings (max_new_tokens); use --force to replace them"
    frame = pl.read_parquet(run_generate(tiny, result.out, max_new_tokens=5, force=True, progress=False).generations_path)
    assert frame["n_tokens"].max() == 5


@pytest.mark.parametrize("case,message", [
    ("no results", "{out}: no results.parquet (finish the sweep with `engram-eval sweep ... --out {out}` first)"),
    ("zero tokens", "--max-new-tokens: must be at least 1 (got 0)"),
    ("unknown cells", "--cells: unknown 'some' (one of: default, all, baseline, flips)"),
    ("other model", "{out} was swept with model {name} ({short}), not random-init x.json (*): pass the run's --model"),
])
def test_bad_generation_input_is_one_clear_error(tiny, tiny_bank, tmp_path, case, message):
    import dataclasses

    out = tmp_path / "run"
    if case != "no results":
        sweep(tiny, tiny_bank, out, layers=[1], strengths=[1.0])
    lm = dataclasses.replace(tiny, fingerprint="f" * 64, name="random-init x.json") if case == "other model" else tiny
    options = {"max_new_tokens": 0} if case == "zero tokens" else {"cells": "some"} if case == "unknown cells" else {}
    with pytest.raises(EngramEvalError) as error:
        run_generate(lm, out, progress=False, **options)
    expected = message.format(out=out, name=tiny.name, short=tiny.short_fingerprint).replace("(*)", "(ffffffffffff)")
    assert str(error.value) == expected
    assert not (out / "generations.parquet").exists()


def test_a_context_question_is_scored_and_generated_after_its_passage(tiny, tmp_path):
    from engram_eval.steer.prompts import prepare_question

    bank_path = write_tiny_bank(tmp_path)
    text = bank_path.read_text().replace('  engram: topic\n', '  engram: topic\n  context: "Alpha blockers come first."\n', 1)
    bank_path.write_text(text)
    question = load_bank(bank_path).questions[0]
    with_context = prepare_question(tiny, question, "first-token", bank_path, context=True)
    assert list(with_context.prompt_ids) == tiny.tokenizer("Alpha blockers come first.\n\n" + question.prompt)["input_ids"]
    assert list(prepare_question(tiny, question, "first-token", bank_path, context=False).prompt_ids) == tiny.tokenizer(question.prompt)["input_ids"]
    result = sweep(tiny, bank_path, tmp_path / "run", layers=[2], strengths=[2.0], context="both")
    frame = pl.read_parquet(result.results_path)
    assert frame.filter(pl.col("question_id") == "q1")["context"].unique().sort().to_list() == [False, True]
    assert frame.filter(pl.col("question_id") == "q2")["context"].null_count() == frame.filter(pl.col("question_id") == "q2").height
    assert frame.filter(pl.col("role") == "baseline").height == 4  # q1 twice, q2 and q3 once
    generated = pl.read_parquet(run_generate(tiny, result.out, cells="all", max_new_tokens=5, progress=False).generations_path)
    for row in generated.filter(pl.col("question_id") == "q1").with_columns(eos=pl.lit(-1)).iter_rows(named=True):
        assert ours(row) == reference_tokens(tiny, bank_path, row, 5, 4, "prefix")


@pytest.mark.real_model
def test_real_model_generation_equals_transformers_generate(real, tmp_path):
    from engram_eval.engram.store import EngramStore
    from conftest import flat_sweep

    bank_path = REPO / "questions/ci.yaml"
    result = flat_sweep(real, load_bank(bank_path), EngramStore(tmp_path / "store"), tmp_path / "run", layers=[16],
                       strengths=[1.0, 10.0], questions=["mh1"], progress=False)
    frame = pl.read_parquet(run_generate(real, result.out, cells="all", max_new_tokens=20, progress=False).generations_path)
    eos = real.tokenizer.eos_token_id
    for row in frame.with_columns(eos=pl.lit(eos)).iter_rows(named=True):
        assert ours(row) == reference_tokens(real, bank_path, row, 20, 16, "prefix"), (row["engram"], row["strength"])


def test_context_both_on_a_bank_without_any_context_is_a_warning(tiny, tiny_bank, tmp_path):
    warnings = []
    result = sweep(tiny, tiny_bank, tmp_path / "run", layers=[1], strengths=[1.0], context="both", warn=warnings.append)
    assert f"{tiny_bank}: --context both, but no question has a context: every question runs once" in warnings
    assert pl.read_parquet(result.results_path)["context"].null_count() == 3 * 5


def test_generate_from_another_folder_finds_the_runs_bank_and_store(tiny_model_dir, tiny_bank, tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from engram_eval.cli import cli

    def run(*args):
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)

    monkeypatch.chdir(tiny_bank.parent)
    assert run("sweep", tiny_bank.name, "--model", tiny_model_dir, "--layers", "1", "--strengths", "1", "--chunks", "4",
               "--store", "store", "--out", "run", "-q").exit_code == 0
    recorded = json.loads((tiny_bank.parent / "run/run.json").read_text())
    assert recorded["bank_path"] == str(tiny_bank.resolve()) and recorded["store"] == str((tiny_bank.parent / "store").resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    store_files = sorted((tiny_bank.parent / "store").iterdir())
    result = run("generate", tiny_bank.parent / "run", "--model", tiny_model_dir, "--max-new-tokens", "3", "-q")
    assert result.exit_code == 0, result.output
    assert list(elsewhere.iterdir()) == [] and sorted((tiny_bank.parent / "store").iterdir()) == store_files


def test_generate_quiet_prints_no_library_warnings(tiny_model_dir, tiny_bank, tmp_path):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo), "PYTHONWARNINGS": "default"}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "engram_eval.cli", *map(str, args)], capture_output=True, text=True,
                              env=env, cwd=tmp_path)

    assert cli("sweep", tiny_bank, "--model", tiny_model_dir, "--layers", "1", "--strengths", "1", "--chunks", "4",
               "--store", tmp_path / "store", "--out", tmp_path / "run", "-q").returncode == 0
    result = cli("generate", tmp_path / "run", "--model", tiny_model_dir, "--max-new-tokens", "3", "-q")
    assert result.returncode == 0 and "Warning" not in result.stderr, result.stderr


def test_generate_loads_the_model_the_run_was_swept_with_and_refuses_another(tiny_model_dir, shallow_model_dir, tiny_bank, tmp_path):
    """No --model: the run's (run.json's model_spec), not the default SmolLM2; a --model with another fingerprint is one
    line naming both models."""
    import json

    from click.testing import CliRunner

    from engram_eval.cli import cli

    out = tmp_path / "run"
    swept = CliRunner().invoke(cli, ["sweep", str(tiny_bank), "--model", str(tiny_model_dir), "--layers", "1", "--strengths", "2",
                                     "--chunks", "4", "--store", str(tmp_path / "store"), "--out", str(out), "-q"])
    assert swept.exit_code == 0, swept.output
    run = json.loads((out / "run.json").read_text())
    assert run["model_spec"] == str(tiny_model_dir)
    generated = CliRunner().invoke(cli, ["generate", str(out), "--max-new-tokens", "2", "-q"])
    assert generated.exit_code == 0, generated.output
    assert pl.read_parquet(out / "generations.parquet")["run_id"].unique().to_list() == [run["run_id"]]
    other = CliRunner().invoke(cli, ["generate", str(out), "--model", str(shallow_model_dir), "--max-new-tokens", "2", "-q"])
    fingerprint = run["settings"]["model_fingerprint"][:12]
    assert other.exit_code == 2 and other.stderr.count("\n") == 1
    assert other.stderr.startswith(f"error: {out} was swept with model {run['settings']['model']} ({fingerprint}), not "
                                   f"{Path(shallow_model_dir).name} ("), other.stderr
