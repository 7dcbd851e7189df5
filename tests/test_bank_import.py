import json
from pathlib import Path

import polars as pl
import pytest
import yaml
from click.testing import CliRunner

from engram_eval.bank.banks import load_bank
from engram_eval.cli import cli

REPO = Path(__file__).resolve().parents[1]
RECORDS = [
    {"qid": "a1", "q": "Which planet is red?", "options": ["Venus", "Mars", "Jupiter"], "gold": 1, "why": "Mars is red with rust.",
     "subject": "space", "passage": "Mars is the Red Planet."},
    {"qid": "a2", "q": "What do bees make?", "options": ["Honey", "Milk", "Silk"], "gold": 0, "why": "Bees make honey from nectar.",
     "subject": "life", "passage": "Bees turn nectar into honey."},
    {"qid": "a3", "q": "Which is a gas?", "options": ["Iron", "Oxygen", "Salt"], "gold": 1, "why": "Oxygen is a gas in the air.",
     "subject": "space", "passage": "Air holds oxygen."},
]


def expected_question(record: dict, answer: int) -> dict:
    """A hand-written question of the default mc template."""
    letters = "ABC"
    return {"id": record["qid"],
            "prompt": record["q"] + "\n" + "\n".join(f"{l}) {o}" for l, o in zip(letters, record["options"])) + "\nAnswer:",
            "correct": [f" {letters[answer]}"], "incorrect": [f" {l}" for i, l in enumerate(letters) if i != answer],
            "engram": f"q-{record['qid']}"}


def write(tmp_path: Path, suffix: str, records: list[dict], encode=None) -> Path:
    path = tmp_path / f"data{suffix}"
    frame = pl.DataFrame(records)
    if suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    elif suffix == ".json":
        path.write_text(json.dumps(records))
    elif suffix == ".parquet":
        frame.write_parquet(path)
    else:  # csv: one column per option
        flat = [{k: v for k, v in r.items() if k != "options"} | {f"o{i}": o for i, o in enumerate(r["options"])} for r in records]
        pl.DataFrame(flat).write_csv(path)
    return path


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_each_file_format_gives_the_hand_written_bank(tmp_path, suffix):
    path = write(tmp_path, suffix, RECORDS)
    choices = "o0+o1+o2" if suffix == ".csv" else "options"
    out = tmp_path / "bank.yaml"
    result = run("bank", "import", path, "--map", f"id=qid,question=q,choices={choices},answer=gold,source=why", "--out", out,
                 "--controls", "~gaussian,irrelevant")
    assert result.exit_code == 0, result.output
    data = yaml.safe_load(out.read_text())
    assert data["questions"] == [expected_question(r, r["gold"]) for r in RECORDS]
    assert data["defaults"] == {"controls": ["~gaussian", "irrelevant"]}
    bank = load_bank(out)
    assert bank.sources["q-a1"].text == "Mars is red with rust.\n" and bank.sources["irrelevant"].kind == "irrelevant"


@pytest.mark.parametrize("answers,extra", [
    ([1, 0, 1], []),                        # an index from 0
    ([2, 1, 2], ["--answer-base", "1"]),    # an index from 1
    (["B", "a", "B"], []),                  # a letter, either case
    (["Mars", "Honey", "Oxygen"], []),      # the choice's text
])
def test_each_answer_encoding(tmp_path, answers, extra):
    records = [{**r, "gold": a} for r, a in zip(RECORDS, answers)]
    path = write(tmp_path, ".jsonl", records)
    out = tmp_path / "bank.yaml"
    result = run("bank", "import", path, "--map", "id=qid,question=q,choices=options,answer=gold,source=why", "--out", out, *extra)
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(out.read_text())["questions"] == [expected_question(r, r0["gold"]) for r, r0 in zip(records, RECORDS)]


def test_completion_format_optional_fields_and_sources_per_topic(tmp_path):
    records = [{"id": "c1", "p": "The capital of France is", "good": "Paris", "bad": ["Lyon", " Nice"], "src": "Paris is the capital.",
                "t": "geo", "ctx": "France's capital is Paris.", "rel": "yes", "tag": "geo"},
               {"id": "c2", "p": "The capital of Italy is", "good": "Rome", "bad": ["Milan"], "src": "Rome is the capital.",
                "t": "geo", "ctx": None, "rel": "no", "tag": "geo"}]
    path = tmp_path / "c.jsonl"  # `good` is text, `bad` a list: both forms of an answer field
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    out = tmp_path / "caps.yaml"
    result = run("bank", "import", path, "--format", "completion", "--map",
                 "id=id,prompt=p,correct=good,incorrect=bad,source=src,topic=t,context=ctx,related_wrong=rel,tags=tag",
                 "--source-per-topic", "--out", out, "--controls", "random")
    assert result.exit_code == 0, result.output
    bank = load_bank(out)
    c1, c2 = bank.questions
    assert (c1.correct, c1.incorrect, c2.correct, c2.incorrect) == ((" Paris",), (" Lyon", " Nice"), (" Rome",), (" Milan",))
    assert c1.engram == c2.engram == "topic-geo" and bank.sources["topic-geo"].text == "Paris is the capital.\n\nRome is the capital.\n"
    assert (c1.context, c2.context, c1.related_wrong, c2.related_wrong, c1.tags) == ("France's capital is Paris.", None, True, False, ("geo",))
    assert bank.sources["random"].kind == "random" and c1.controls == ("random",)


def test_limit_and_seed_pick_a_reproducible_subset_in_file_order(tmp_path):
    records = [{**RECORDS[i % 3], "qid": f"r{i}"} for i in range(30)]
    path = write(tmp_path, ".jsonl", records)
    ids = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.yaml"
        assert run("bank", "import", path, "--map", "id=qid,question=q,choices=options,answer=gold,source=why", "--out", out,
                   "--limit", "7", "--seed", "3").exit_code == 0
        ids.append([q["id"] for q in yaml.safe_load(out.read_text())["questions"]])
    expected = pl.DataFrame(records).with_row_index().sample(7, seed=3).sort("index")["qid"].to_list()
    assert ids[0] == ids[1] == expected and len(set(ids[0])) == 7


@pytest.mark.parametrize("change,message", [
    ({"map": "id=qid,question=q,choices=opts,answer=gold,source=why"}, "{path}: --map choices=opts: no column 'opts' (columns: qid, q, options, gold, why, subject, passage)"),
    ({"record": {"gold": 5}}, "{path}: line 2: answer index 5 is out of range for 3 choices (counting from 0)"),
    ({"record": {"gold": 1.7}}, "{path}: line 2: answer index 1.7 is not a whole number"),
    ({"record": {"gold": "D"}}, "{path}: line 2: answer letter D has no such choice (choices A-C)"),
    ({"record": {"gold": "Pluto"}}, "{path}: line 2: answer 'Pluto' is neither an index, a letter nor one of the choices"),
    ({"record": {"qid": "a1"}}, "{path}: duplicate id 'a1' (records 1 and 2 of the import)"),
    ({"empty": True}, "{path}: cannot read as jsonl"),
    ({"unreadable": True}, "{path}: cannot read as jsonl"),
    ({"map": "question=q,choices=options,answer=gold"}, "--map: give source=COLUMN: the text each question's relevant engram is built from (an explanation or a retrieved passage)"),
])
def test_bad_records_are_one_line_naming_the_record_and_nothing_is_written(tmp_path, change, message):
    records = [dict(r) for r in RECORDS]
    records[1].update(change.get("record", {}))
    path = write(tmp_path, ".jsonl", records)
    if change.get("empty"):
        path.write_text("")
    if change.get("unreadable"):
        path.write_bytes(b"{not json\xff")
    mapping = change.get("map", "id=qid,question=q,choices=options,answer=gold,source=why")
    result = run("bank", "import", path, "--map", mapping, "--out", tmp_path / "bank.yaml")
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {message.format(path=path)}"), result.stderr
    assert result.stderr.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]


def test_a_saved_hugging_face_dataset_imports_like_a_file(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "saved"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(RECORDS)}).save_to_disk(str(folder))
    out = tmp_path / "hf.yaml"
    result = run("bank", "import", "--hf", f"{folder}:test", "--map", "id=qid,question=q,choices=options,answer=gold,source=why", "--out", out)
    assert result.exit_code == 0, result.output
    assert yaml.safe_load(out.read_text())["questions"] == [expected_question(r, r["gold"]) for r in RECORDS]
    missing = run("bank", "import", "--hf", f"{folder}:dev", "--map", "question=q,choices=options,answer=gold,source=why", "--out", tmp_path / "x.yaml")
    assert missing.stderr == f"error: --hf: {folder} has no split 'dev' (splits: test)\n"


def test_the_bundled_bank_is_what_its_documented_import_command_makes(tmp_path):
    command = next(line for line in (REPO / "docs/bank.md").read_text().splitlines() if line.startswith("engram-eval bank import"))
    args = command.split()[1:]
    args[args.index("--out") + 1] = str(tmp_path / "science_mc.yaml")
    args[args.index("questions/data/science_mc.csv")] = str(REPO / "questions/data/science_mc.csv")
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    committed = (REPO / "questions/science_mc.yaml").read_text()
    assert (tmp_path / "science_mc.yaml").read_text() == committed.replace("questions/data/science_mc.csv", str(REPO / "questions/data/science_mc.csv"))
    for source in (REPO / "questions/science_mc-sources").iterdir():
        assert (tmp_path / "science_mc-sources" / source.name).read_text() == source.read_text()


def test_bank_validate_and_stats(tiny_model_dir, tmp_path):
    from conftest import write_tiny_bank

    bank = write_tiny_bank(tmp_path, {"q1": ("The drug is", ["  alpha"], [" beta"]), "q2": ("Before glucose you must give", [" thiamine"], [" insulin"])})
    checked = run("bank", "validate", bank, "--model", tiny_model_dir)
    assert checked.exit_code == 0 and checked.stdout.startswith(f"{bank}: 2 questions, 4 sources and its first tokens on {tiny_model_dir}: valid, 2 warning(s)")
    whitespace, multi_token = checked.stderr.splitlines()
    assert "variant '  alpha' starts with the whitespace token" in whitespace
    assert "answer variant(s) are several tokens" in multi_token and multi_token.endswith("`--scoring sequence` scores whole answers")
    assert run("bank", "validate", bank, "--model", tiny_model_dir, "--strict").exit_code == 2
    stats = run("bank", "stats", bank, "--model", tiny_model_dir).stdout
    from engram_eval.backend.model import load_tokenizer
    lengths = sorted(len(load_tokenizer(str(tiny_model_dir)).tokenizer(p)["input_ids"]) for p in ("The drug is", "Before glucose you must give"))
    assert f"{lengths[0]} / {(lengths[0] + lengths[1]) / 2:g} / {lengths[1]}" in stats  # an even count: the mean of the middle two and "anti 2, irrelevant 2, random 2" in stats


@pytest.mark.real_model
def test_an_imported_bank_has_distinct_letters_on_the_real_tokenizer_and_sweeps(real, tmp_path):
    from engram_eval.steer.prompts import prepare_question, variant_token_warnings
    from engram_eval.engram.store import EngramStore
    from conftest import flat_sweep

    bank_path = REPO / "questions/science_mc.yaml"
    bank = load_bank(bank_path)
    for question in bank.questions:
        prepared = prepare_question(real, question, "first-token", bank_path)  # raises on a shared first token
        assert len({ids[0] for ids in prepared.correct_ids + prepared.incorrect_ids}) == 4
        assert variant_token_warnings(real, prepared, bank_path) == []
    result = flat_sweep(real, bank, EngramStore(tmp_path / "s"), tmp_path / "run", layers=[16], strengths=[1.0],
                       questions=["sci-01", "sci-05"], progress=False, warn=lambda m: None)
    frame = pl.read_parquet(result.results_path)
    assert frame.height == 2 * (1 + 5) and set(frame["control_kind"].drop_nulls()) == {"irrelevant", "random", "null-prefix"}


@pytest.mark.real_model
def test_chat_import_letters_the_reply_starts_with_and_the_template_applied(real, tmp_path):
    """--chat: the bank says `chat: true`, the letters have no leading space (the reply after the chat template's
    generation prompt starts with "A"), and the scored prompt is the tokenizer's own chat template of the question;
    --no-chat (the default) keeps the hand-written bank."""
    from engram_eval.steer.prompts import prepare_question

    path = write(tmp_path, ".jsonl", RECORDS)
    mapping = "id=qid,question=q,choices=options,answer=gold,source=why"
    assert run("bank", "import", path, "--map", mapping, "--out", tmp_path / "chat.yaml", "--chat").exit_code == 0
    assert run("bank", "import", path, "--map", mapping, "--out", tmp_path / "plain.yaml", "--no-chat").exit_code == 0
    chat, plain = (yaml.safe_load((tmp_path / f"{n}.yaml").read_text()) for n in ("chat", "plain"))
    assert chat["chat"] is True and "chat" not in plain
    assert plain["questions"] == [expected_question(r, r["gold"]) for r in RECORDS]
    for record, question in zip(RECORDS, chat["questions"]):
        written = expected_question(record, record["gold"])
        assert (question["prompt"], question["correct"]) == (written["prompt"], [written["correct"][0].strip()])
        assert question["incorrect"] == [v.strip() for v in written["incorrect"]]
    bank = load_bank(tmp_path / "chat.yaml")
    for question in bank.questions:
        prepared = prepare_question(real, question, "first-token", bank.path)
        template = real.tokenizer.apply_chat_template([{"role": "user", "content": question.prompt}], tokenize=False,
                                                      add_generation_prompt=True)
        assert list(prepared.prompt_ids) == real.tokenizer(template)["input_ids"]
        assert all(len(ids) == 1 for ids in prepared.correct_ids + prepared.incorrect_ids)  # each letter one token
