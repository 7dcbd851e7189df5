import pytest

from engram_eval.bank.banks import load_bank
from engram_eval.core.errors import EngramEvalError
from engram_eval.steer.prompts import prepare_question


def test_shared_first_token_is_a_bank_error(tiny, tmp_path):
    from conftest import write_tiny_bank
    path = write_tiny_bank(tmp_path, {"q1": ("The drug is", [" alpha"], [" alpha blocker"])})
    question = load_bank(path).questions[0]
    token = tiny.tokenizer.convert_ids_to_tokens(tiny.tokenizer.encode(" alpha", add_special_tokens=False)[0])
    with pytest.raises(EngramEvalError) as error:
        prepare_question(tiny, question, "first-token", path)
    token_id = tiny.tokenizer.encode(" alpha", add_special_tokens=False)[0]
    assert str(error.value) == (f"{path}: question 'q1': correct ' alpha' and incorrect ' alpha blocker' share their first token "
                                f"({token!r}, id {token_id}), so first-token scoring cannot tell them apart")
    assert prepare_question(tiny, question, "sequence", path).correct_ids  # sequence scoring separates them


def test_a_variant_without_tokens_is_refused_before_any_model_work(tiny, tmp_path):
    from dataclasses import replace

    from conftest import write_tiny_bank
    question = replace(load_bank(write_tiny_bank(tmp_path)).questions[0], correct=("",))  # past the bank's own check
    with pytest.raises(EngramEvalError) as error:
        prepare_question(tiny, question, "first-token", "bank.yaml")
    assert str(error.value) == "bank.yaml: question 'q1': variant '' has no tokens"


def test_chat_prompts_use_the_chat_template(tiny, tmp_path):
    from conftest import write_tiny_bank
    path = write_tiny_bank(tmp_path, extra="chat: true\n")
    prepared = prepare_question(tiny, load_bank(path).questions[0], "first-token", path)
    expected = tiny.tokenizer("<user> The first medication for the tumor should be\n<assistant>")["input_ids"]
    assert list(prepared.prompt_ids) == expected


def test_chat_question_for_a_tokenizer_without_a_chat_template_names_bank_and_question(tiny, tmp_path, monkeypatch):
    from conftest import write_tiny_bank
    path = write_tiny_bank(tmp_path, extra="chat: true\n")
    monkeypatch.setattr(tiny.tokenizer, "chat_template", None)
    with pytest.raises(EngramEvalError) as error:
        prepare_question(tiny, load_bank(path).questions[0], "first-token", path)
    assert str(error.value) == f"{path}: question 'q1': chat: true, but {tiny.name}'s tokenizer has no chat template"


def test_a_variant_whose_first_token_is_whitespace_is_warned_of(tiny, tmp_path):
    from conftest import write_tiny_bank
    from engram_eval.steer.prompts import variant_token_warnings

    path = write_tiny_bank(tmp_path, {"q1": ("The drug is", ["  alpha"], [" beta"])})
    prepared = prepare_question(tiny, load_bank(path).questions[0], "first-token", path)
    first = tiny.tokenizer.encode("  alpha", add_special_tokens=False)[0]
    assert tiny.tokenizer.decode([first]).strip() == ""  # this tokenizer splits off the extra space
    assert variant_token_warnings(tiny, prepared, path) == [
        f"{path}: question 'q1': variant '  alpha' starts with the whitespace token {tiny.tokenizer.decode([first])!r} "
        f"(id {first}), so first-token scoring scores that, not the answer"]
    clean = prepare_question(tiny, load_bank(write_tiny_bank(tmp_path)).questions[0], "first-token", path)
    assert variant_token_warnings(tiny, clean, path) == []


@pytest.mark.real_model
@pytest.mark.parametrize("bank_name", ["medical_traps", "rag_recall", "ci"])
def test_bundled_banks_have_distinct_first_tokens_on_the_real_tokenizer(real, bank_name):
    from pathlib import Path

    from engram_eval.steer.prompts import variant_token_warnings

    path = Path(__file__).resolve().parents[1] / f"questions/{bank_name}.yaml"
    bank = load_bank(path)
    for question in bank.questions:
        for context in (False, True) if question.context else (None,):
            prepared = prepare_question(real, question, "first-token", path, context)  # raises on a shared first token
            assert variant_token_warnings(real, prepared, path) == []


@pytest.mark.real_model
def test_multi_token_answers_under_first_token_scoring_are_named_once(real, tmp_path):
    """' endothermic' is several tokens: first-token scoring scores its first alone; one warning names it and its
    scored token and suggests --scoring sequence; a sequence scoring or one-token answers say nothing."""
    from engram_eval.bank.banks import load_bank
    from engram_eval.steer.prompts import multi_token_warning, prepare_question

    (tmp_path / "s.txt").write_text("Heat flows in.")
    (tmp_path / "b.yaml").write_text(
        "name: chem\nsources:\n  s: {file: s.txt}\nquestions:\n"
        "  - {id: q1, prompt: 'Melting ice is', correct: [' endothermic'], incorrect: [' exothermic'], engram: s}\n"
        "  - {id: q2, prompt: 'The sky is', correct: [' blue'], incorrect: [' red'], engram: s}\n")
    bank = load_bank(tmp_path / "b.yaml")
    prepared = [prepare_question(real, q, "first-token", bank.path) for q in bank.questions]
    split = [(v, ids) for p in prepared for v, ids in zip(p.question.correct + p.question.incorrect, p.correct_ids + p.incorrect_ids)
             if len(ids) > 1]
    assert [v for v, _ in split] == [" endothermic", " exothermic"]  # the tokenizer splits both, keeps ' blue', ' red' whole
    warning = multi_token_warning(real, prepared, "first-token", bank.path)
    first = real.tokenizer.decode([split[0][1][0]])
    assert warning.startswith(f"{bank.path}: 2 answer variant(s) are several tokens, and first-token scoring scores only the first: "
                              f"' endothermic' (q1: {len(split[0][1])} tokens) as {first!r}")
    assert warning.endswith("`--scoring sequence` scores whole answers")
    assert multi_token_warning(real, [prepare_question(real, q, "sequence", bank.path) for q in bank.questions], "sequence", bank.path) is None
    assert multi_token_warning(real, prepared[1:], "first-token", bank.path) is None


def test_a_prompt_longer_than_the_models_positions_is_named_by_validate_sweep_and_generate(tiny, tiny_model_dir, tmp_path):
    from click.testing import CliRunner

    from conftest import TINY_QUESTIONS, write_tiny_bank
    from engram_eval.cli import cli

    def run(*args):
        return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)

    limit = tiny.model.config.max_position_embeddings
    long_prompt = ("alpha beta " * limit).strip()
    n = len(tiny.tokenizer(long_prompt)["input_ids"])
    assert n > limit
    bank = write_tiny_bank(tmp_path, {**TINY_QUESTIONS, "long": (long_prompt, [" alpha"], [" beta"])})
    validated = run("bank", "validate", bank, "--model", tiny_model_dir)
    assert validated.exit_code == 2 and validated.stderr == (
        f"error: {bank}: question 'long': its prompt is {n} tokens; with its answer that is {n + 1} positions, more than the "
        f"model's {limit}\n")
    swept = run("sweep", bank, "--model", tiny_model_dir, "--layers", "1", "--strengths", "1", "--chunks", "4",
                "--store", tmp_path / "store", "--out", tmp_path / "run", "-q")
    assert swept.exit_code == 2 and swept.stderr == (
        f"error: {bank}: question 'long': its prompt is {n} tokens; with its answer and the engram's 4 prefix positions that "
        f"is {n + 5} positions, more than the model's {limit}\n")
    assert not (tmp_path / "run/run.json").exists()
    (tmp_path / "short").mkdir()
    short = write_tiny_bank(tmp_path / "short")
    assert run("sweep", short, "--model", tiny_model_dir, "--layers", "1", "--strengths", "1", "--chunks", "4",
               "--store", tmp_path / "store", "--out", tmp_path / "ok", "-q").exit_code == 0
    prompt = max(len(tiny.tokenizer(p)["input_ids"]) for p, _, _ in TINY_QUESTIONS.values())
    qid = max(TINY_QUESTIONS, key=lambda q: len(tiny.tokenizer(TINY_QUESTIONS[q][0])["input_ids"]))
    generated = run("generate", tmp_path / "ok", "--model", tiny_model_dir, "--max-new-tokens", limit, "-q")
    assert generated.exit_code == 2 and generated.stderr == (
        f"error: {short}: question '{qid}': its prompt is {prompt} tokens; with the engram's 4 positions and --max-new-tokens "
        f"{limit} that is {prompt + 4 + limit} positions, more than the model's {limit}\n")
