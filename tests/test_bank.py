from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engram_eval.bank.banks import load_bank
from engram_eval.core.errors import EngramEvalError

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
name: t
sources:
  pheo: {text: "alpha first"}
  stars: {text: "O B A F G K M", kind: irrelevant}
defaults:
  controls: [stars]
questions:
  - id: q1
    prompt: "The first drug is"
    correct: [" alpha"]
    incorrect: [" beta"]
    engram: pheo
"""


def write(tmp_path: Path, text: str, name: str = "bank.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(path: Path, **kwargs) -> str:
    with pytest.raises(EngramEvalError) as error:
        load_bank(path, **kwargs)
    return str(error.value)


def test_good_bank_loads_with_defaults(tmp_path):
    bank = load_bank(write(tmp_path, GOOD))
    (q,) = bank.questions
    assert (bank.name, q.controls, q.chat, q.related_wrong, q.tags, bank.sources["stars"].kind) == ("t", ("stars",), False, None, (), "irrelevant")


def test_bundled_banks_validate():
    medical = load_bank(REPO / "questions/medical_traps.yaml")
    ids = {q.id for q in medical.questions}
    assert {"pheo1", "pheo_mc", "tension1", "glaucoma1", "wernicke1", "mh1", "tca1", "methanol1", "thyroid1", "anaphylaxis1", "dka1"} == ids
    assert {s.kind for s in medical.sources.values()} == {"relevant", "anti", "irrelevant", "random"}
    assert load_bank(REPO / "questions/ci.yaml").questions
    rag = load_bank(REPO / "questions/rag_recall.yaml")
    assert len(rag.questions) >= 20 and all(q.context and q.controls and q.engram in rag.sources for q in rag.questions)
    assert {"~gaussian", "~mean-token"} <= set(rag.questions[0].controls) and rag.lint() == []


def test_random_words_source_is_reproducible_from_its_seed():
    import subprocess
    import sys

    script = subprocess.run([sys.executable, str(REPO / "questions/sources/make_random_words.py")], capture_output=True,
                            text=True, check=True)
    assert script.stdout == (REPO / "questions/sources/random_words.txt").read_text()


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    path = write(tmp_path, GOOD.replace('correct: [" alpha"]', 'correct: [" alpha"'))
    assert error_of(path) == f"{path}:11:5: YAML error: expected ',' or ']', but got '<scalar>'"


@pytest.mark.parametrize("change,message", [
    (('    engram: pheo\n', ''), "question 'q1': field 'engram': missing required field"),
    (('correct: [" alpha"]', 'correct: " alpha"'), "question 'q1': field 'correct': must be list, got a string"),
    (('correct: [" alpha"]', 'correct: []'), "question 'q1': field 'correct': must list at least one item"),
    (('correct: [" alpha"]', 'correct: [1]'), "question 'q1': field 'correct': every item must be a string, got int 1"),
    (('    engram: pheo\n', '    engram: pheo\n    colour: red\n'),
     "question 'q1': field 'colour': unknown field (allowed: answer_patterns, chat, context, context_file, controls, correct, engram, id, "
     "incorrect, incorrect_unrelated, prompt, related_wrong, relatedness, tags)"),
    (('    engram: pheo\n', '    engram: pheo\n    related_wrong: maybe\n'), "question 'q1': field 'related_wrong': must be bool, got a string"),
    (('kind: irrelevant', 'kind: cosmic'), "source 'stars': field 'kind': unknown kind 'cosmic' (one of: relevant, irrelevant, random, anti, other)"),
    (('engram: pheo', 'engram: pheox'), "question 'q1': field 'engram': unknown source 'pheox' (known: pheo, stars)"),
    (('controls: [stars]', 'controls: [stars, moon]'), "question 'q1': field 'controls': unknown source 'moon' (known: pheo, stars)"),
    (('{text: "alpha first"}', '{}'), "source 'pheo': give exactly one of 'file', 'files' or 'text'"),
    (('name: t', 'name: ../../escaped'), "top level: field 'name': may use only letters, digits, '_', '.', '-', and may not start with '.' (it names the default --out folder)"),
    (('name: t', 'name: /tmp/absolute'), "top level: field 'name': may use only letters, digits, '_', '.', '-', and may not start with '.' (it names the default --out folder)"),
    (('  pheo: {text', '  "..": {text: "x"}\n  pheo: {text'), "source '..': name may use only letters, digits, '_', '.', '-', and may not start with '.'"),
    (('  pheo: {text', '  ".": {text: "x"}\n  pheo: {text'), "source '.': name may use only letters, digits, '_', '.', '-', and may not start with '.'"),
    (('  pheo: {text', '  .hidden: {text: "x"}\n  pheo: {text'), "source '.hidden': name may use only letters, digits, '_', '.', '-', and may not start with '.'"),
])
def test_schema_errors_name_file_question_and_field(tmp_path, change, message):
    path = write(tmp_path, GOOD.replace(*change))
    assert error_of(path) == f"{path}: {message}"


def test_a_bank_without_a_name_takes_its_file_name_made_safe(tmp_path):
    path = write(tmp_path, GOOD.replace("name: t\n", ""), name="my bank (v2).yaml")
    assert load_bank(path).name == "my_bank__v2_"


def test_deeply_nested_yaml_is_one_line(tmp_path):
    path = write(tmp_path, "[" * 100_000 + "\n")
    assert error_of(path) == (f"{path}: YAML error: nested too deeply to read (lists or mappings inside each other thousands "
                              "of levels down)")


def test_duplicate_question_ids_name_both_places(tmp_path):
    path = write(tmp_path, GOOD + GOOD[GOOD.index("  - id: q1"):])
    assert error_of(path) == f"{path}: question 'q1': field 'id': duplicate id (questions #1 and #2)"


def test_duplicate_source_names_name_both_lines(tmp_path):
    path = write(tmp_path, GOOD.replace('  stars:', '  pheo: {text: "again"}\n  stars:'))
    assert error_of(path) == f"{path}:4:3: YAML error: duplicate key 'pheo' (lines 3 and 4)"


@pytest.mark.parametrize("content,message", [(None, "not found"), ("", "is empty"), (b"\xff\xfe\x00bad", "is not UTF-8 text")])
def test_source_file_problems_name_the_path(tmp_path, content, message):
    source = tmp_path / "src.txt"
    if isinstance(content, bytes):
        source.write_bytes(content)
    elif content is not None:
        source.write_text(content)
    path = write(tmp_path, GOOD.replace('{text: "alpha first"}', "{file: src.txt}"))
    assert error_of(path) == f"{path}: source 'pheo': field 'file': {source} {message}"


@pytest.mark.parametrize("target", ["../../etc/passwd", "/etc/passwd"])
def test_source_outside_the_bank_folder_is_refused(tmp_path, target):
    folder = tmp_path / "bank"
    folder.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("outside text")
    target = target if target.startswith("/") else "../outside.txt"
    path = write(folder, GOOD.replace('{text: "alpha first"}', f"{{file: {target}}}"))
    assert error_of(path) == (f"{path}: source 'pheo': field 'file': {target} lies outside the bank's folder "
                              f"{folder.resolve()} (pass --allow-outside-paths to allow it)")
    if target == "../outside.txt":
        assert load_bank(path, allow_outside_paths=True).sources["pheo"].text == "outside text"


def test_missing_bank_file(tmp_path):
    assert error_of(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: bank file not found"


yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8), st.lists(st.text(max_size=5), max_size=3))
question = st.fixed_dictionaries(
    {"id": st.one_of(st.text(max_size=6), st.integers()), "prompt": yaml_scalars, "correct": yaml_scalars,
     "incorrect": yaml_scalars, "engram": st.sampled_from(["pheo", "stars", "nope", ""])},
    optional={"controls": yaml_scalars, "related_wrong": yaml_scalars, "chat": yaml_scalars, "tags": yaml_scalars, "extra": yaml_scalars},
)
bank = st.fixed_dictionaries(
    {"sources": st.one_of(st.just({"pheo": {"text": "alpha"}, "stars": {"text": "stars", "kind": "irrelevant"}}),
                          st.dictionaries(st.text(max_size=5), st.dictionaries(st.sampled_from(["text", "kind", "file"]), yaml_scalars), max_size=3)),
     "questions": st.one_of(st.lists(question, max_size=3), yaml_scalars)},
    optional={"name": yaml_scalars, "chat": yaml_scalars, "defaults": st.one_of(st.fixed_dictionaries({"controls": yaml_scalars}), yaml_scalars)},
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(bank, yaml_scalars), raw=st.one_of(st.none(), st.text(max_size=40)))
def test_generated_banks_load_or_raise_the_tools_error(tmp_path, data, raw):
    import yaml
    path = tmp_path / "generated.yaml"
    path.write_text(raw if raw is not None else yaml.safe_dump(data))
    try:
        load_bank(path)
    except EngramEvalError as error:
        assert "\n" not in str(error) and str(error).startswith(str(path))


@pytest.mark.parametrize("variant", ["", "  ", "\\n"])
def test_an_empty_or_whitespace_variant_is_a_bank_error(tmp_path, variant):
    path = write(tmp_path, GOOD.replace('incorrect: [" beta"]', f'incorrect: [" beta", "{variant}"]'))
    shown = variant.replace("\\n", "\n")
    assert error_of(path) == f"{path}: question 'q1': field 'incorrect': variant {shown!r} is only whitespace"


@pytest.mark.parametrize("prompt,variant,message", [
    ("The first drug is ", " alpha", "the prompt ends in whitespace and variant ' alpha' starts with a space, so the scored text has both; drop one"),
    ("The first drug is", "alpha", "variant 'alpha' has no leading space after a prompt that ends in a word, so it is scored glued to that word"),
    ("Answer:", "alpha", None),
    ("The first drug is", " alpha", None),
])
def test_lint_warns_of_spacing_mistakes_naming_file_and_question(tmp_path, prompt, variant, message):
    path = write(tmp_path, GOOD.replace('"The first drug is"', f'"{prompt}"').replace('correct: [" alpha"]', f'correct: ["{variant}"]'))
    assert load_bank(path).lint() == ([f"{path}: question 'q1': {message}"] if message else [])


def test_lint_skips_chat_questions_and_warns_of_a_bank_without_controls(tmp_path):
    chat = write(tmp_path, GOOD.replace('"The first drug is"', '"The first drug is "') + "    chat: true\n", "chat.yaml")
    assert load_bank(chat).lint() == []
    bare = write(tmp_path, GOOD.replace("  controls: [stars]", "  controls: []"), "bare.yaml")
    assert load_bank(bare).lint() == [f"{bare}: no question has a control engram, so no number can tell a relevant engram "
                                      "from any engram at all (add `defaults: controls: [...]`)"]


@pytest.mark.parametrize("content,message", [(None, "not found"), ("  \n", "is empty"), (b"\xff\xfe", "is not UTF-8 text")])
def test_context_file_problems_name_the_path(tmp_path, content, message):
    context = tmp_path / "passage.txt"
    if isinstance(content, bytes):
        context.write_bytes(content)
    elif content is not None:
        context.write_text(content)
    path = write(tmp_path, GOOD + "    context_file: passage.txt\n")
    assert error_of(path) == f"{path}: question 'q1': field 'context_file': {context} {message}"


def test_context_file_outside_the_bank_folder_is_refused_and_inline_context_loads(tmp_path):
    (tmp_path / "bank").mkdir()
    (tmp_path / "passage.txt").write_text("Alpha first.")
    path = write(tmp_path / "bank", GOOD + "    context_file: ../passage.txt\n")
    assert error_of(path) == (f"{path}: question 'q1': field 'context_file': ../passage.txt lies outside the bank's folder "
                              f"{(tmp_path / 'bank').resolve()} (pass --allow-outside-paths to allow it)")
    assert load_bank(path, allow_outside_paths=True).questions[0].context == "Alpha first."
    inline = write(tmp_path, GOOD + '    context: "Alpha first."\n', "inline.yaml")
    assert load_bank(inline).questions[0].context == "Alpha first."
    both = write(tmp_path, GOOD + '    context: "x"\n    context_file: passage.txt\n', "both.yaml")
    assert error_of(both) == f"{both}: question 'q1': give at most one of 'context' or 'context_file'"


def test_an_invalid_answer_pattern_is_a_bank_error_naming_the_pattern(tmp_path):
    path = write(tmp_path, GOOD + '    answer_patterns: {correct: ["alpha(", "ok"]}\n')
    message = error_of(path)
    assert message.startswith(f"{path}: question 'q1': answer_patterns: field 'correct': invalid regular expression 'alpha(' (")
    good = write(tmp_path, GOOD + '    answer_patterns: {correct: ["alpha[- ]?blocker"]}\n', "good.yaml")
    assert load_bank(good).questions[0].answer_patterns == {"correct": ("alpha[- ]?blocker",), "incorrect": ()}


def test_incorrect_unrelated_and_relatedness(tmp_path):
    from engram_eval.bank.banks import load_bank
    from engram_eval.core.errors import EngramEvalError

    def bank_with(extra: str):
        path = tmp_path / "b.yaml"
        path.write_text("name: b\nsources:\n  s: {text: 'alpha beta'}\nquestions:\n"
                        "  - {id: q1, prompt: 'The answer is', correct: [' yes'], incorrect: [' no'], engram: s, "
                        f"related_wrong: true{extra}}}\n")
        return path

    plain = load_bank(bank_with(""))
    q = load_bank(bank_with(", incorrect_unrelated: [' maybe'], relatedness: {' no': 0.5, ' maybe': 0.1}")).questions[0]
    assert q.incorrect_unrelated == (" maybe",) and q.relatedness == {" no": 0.5, " maybe": 0.1}
    assert plain.questions[0].incorrect_unrelated == () and "incorrect_unrelated" not in str(plain.sha256)
    with pytest.raises(EngramEvalError, match="also among the question's correct or incorrect answers"):
        load_bank(bank_with(", incorrect_unrelated: [' no']"))
    with pytest.raises(EngramEvalError, match="not one of the question's answers"):
        load_bank(bank_with(", relatedness: {' other': 1}"))
    with pytest.raises(EngramEvalError, match="not a finite number"):
        load_bank(bank_with(", relatedness: {' no': .nan}"))
