import math
from pathlib import Path

import polars as pl
import pytest
import torch

import engram_eval.sweep as sweep_module
from engram_eval.bank import load_bank
from engram_eval.errors import EngramEvalError
from engram_eval.store import EngramStore
from engram_eval.sweep import CASES, RESULT_SCHEMA, case_expr, prepare_question, run_sweep
from reference import reference_cell, reference_engram

REPO = Path(__file__).resolve().parents[1]
GRID = dict(layers=[1, 4], strengths=[0.5, 3.0], chunks=4)


def sweep(lm, bank_path, out, **kwargs):
    options = {**GRID, "progress": False, **kwargs}
    return run_sweep(lm, load_bank(bank_path), EngramStore(out.parent / "store"), out, **options)


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


def test_baseline_rows_equal_a_plain_forward_pass(tiny, tiny_bank, tmp_path):
    frame = pl.read_parquet(sweep(tiny, tiny_bank, tmp_path / "run").results_path).filter(pl.col("role") == "baseline")
    for row, q in zip(frame.iter_rows(named=True), load_bank(tiny_bank).questions):
        with torch.no_grad():
            probs = torch.softmax(tiny.model(torch.tensor([tiny.tokenizer(q.prompt)["input_ids"]])).logits[0, -1], -1)
        p_c = max(probs[tiny.tokenizer.encode(v, add_special_tokens=False)[0]].item() for v in q.correct)
        assert row["p_correct"] == pytest.approx(p_c, rel=1e-5)
        assert (row["engram"], row["layer"], row["strength"], row["case"], row["improvement"]) == (None, None, None, None, 1.0)


def test_batched_equals_unbatched(tiny, tiny_bank, tmp_path):
    one = pl.read_parquet(sweep(tiny, tiny_bank, tmp_path / "one", batch_size=1).results_path)
    auto = pl.read_parquet(sweep(tiny, tiny_bank, tmp_path / "auto").results_path)
    three = pl.read_parquet(sweep(tiny, tiny_bank, tmp_path / "three", batch_size=3).results_path)
    for other in (auto, three):
        assert other.drop("p_correct", "p_incorrect", "log_ratio", "ratio", "improvement", "log_improvement", "baseline_ratio").equals(
            one.drop("p_correct", "p_incorrect", "log_ratio", "ratio", "improvement", "log_improvement", "baseline_ratio"))
        for column in ("p_correct", "p_incorrect", "ratio"):
            assert (other[column] / one[column] - 1).abs().max() < 1e-5


def test_batches_are_split_evenly_so_no_small_remainder_batch_runs(tiny, tiny_bank, tmp_path, monkeypatch):
    real = sweep_module.variant_logprobs
    sizes = []

    def recording(lm, prefixes, *args):
        sizes.append(0 if prefixes is None else prefixes.shape[0])
        return real(lm, prefixes, *args)

    monkeypatch.setattr(sweep_module, "variant_logprobs", recording)
    result = sweep(tiny, tiny_bank, tmp_path / "run", batch_size=5)
    questions = result.run["cells"]["questions"]
    assert sizes == [0, 4, 4, 4, 4] * questions  # 16 cells per question at most 5 at a time: 4 x 4, not 5 + 5 + 5 + 1


def test_before_question_runs_once_per_question_outside_the_sweep_timings(tiny, tiny_bank, tmp_path):
    import time

    seen = []

    def slow(question):
        seen.append(question.id)
        time.sleep(1.0)

    result = sweep(tiny, tiny_bank, tmp_path / "run", before_question=slow)
    assert seen == ["q1", "q2", "q3"]
    assert result.run["timings"]["sweep_seconds"] < 3.0 <= result.run["timings"]["total_seconds"]


def test_resume_after_interruption_equals_an_uninterrupted_run(tiny, tiny_bank, tmp_path, monkeypatch):
    whole = pl.read_parquet(sweep(tiny, tiny_bank, tmp_path / "whole").results_path)
    real_score = sweep_module.score_cells
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_score(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "score_cells", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sweep(tiny, tiny_bank, tmp_path / "cut")
    assert sorted(p.name for p in (tmp_path / "cut/parts").iterdir()) == ["00000-q1.parquet"]
    assert not (tmp_path / "cut/results.parquet").exists()
    monkeypatch.setattr(sweep_module, "score_cells", real_score)
    resumed = sweep(tiny, tiny_bank, tmp_path / "cut")
    assert resumed.run["cells"] == {"total": 51, "resumed": 17, "computed": 34, "questions": 3}
    assert pl.read_parquet(resumed.results_path).equals(whole)


def test_other_settings_on_an_existing_run_are_refused_unless_forced(tiny, tiny_bank, tmp_path):
    sweep(tiny, tiny_bank, tmp_path / "run")
    with pytest.raises(EngramEvalError) as error:
        sweep(tiny, tiny_bank, tmp_path / "run", strengths=[1.0])
    assert str(error.value) == (f"--out {tmp_path / 'run'} holds a run with different settings (strengths); "
                                "use another --out, or --force to replace it")
    forced = pl.read_parquet(sweep(tiny, tiny_bank, tmp_path / "run", strengths=[1.0], force=True).results_path)
    assert forced["strength"].drop_nulls().unique().to_list() == [1.0]


def test_schema_roles_and_control_kinds(tiny, tiny_bank, tmp_path):
    frame = pl.read_parquet(sweep(tiny, tiny_bank, tmp_path / "run").results_path)
    assert frame.schema == RESULT_SCHEMA
    counts = frame.group_by("role", "control_kind").len().sort("role", "control_kind").rows()
    assert counts == [("baseline", None, 3), ("control", "anti", 12), ("control", "irrelevant", 12), ("control", "random", 12), ("relevant", None, 12)]
    assert frame["run_id"].n_unique() == 1 and frame["tags"][0].to_list() == ["tiny"]
    cells = frame.filter(pl.col("role") != "baseline")
    assert ((cells["improvement"] - cells["ratio"] / cells["baseline_ratio"]).abs() < 1e-9).all()
    assert (cells["flipped"] == ((cells["baseline_ratio"] < 1) & (cells["ratio"] > 1))).all()
    assert (cells["broken"] == ((cells["baseline_ratio"] > 1) & (cells["ratio"] < 1))).all()


def test_case_labels_cover_every_case_including_tie_and_unscorable():
    pairs = [(5.0, 6.0), (5.0, 5.0), (5.0, 1.0), (5.0, 0.5), (0.5, 0.2), (0.5, 2.0), (1.0, 2.0), (0.5, 1.0), (0.5, 0.0), (0.0, 0.5), (2.0, math.inf)]
    frame = pl.DataFrame({"role": ["relevant"] * len(pairs), "baseline_ratio": [b for b, _ in pairs], "ratio": [r for _, r in pairs]})
    assert set(frame.select(case_expr()).to_series()) == set(CASES)
    assert frame.select(case_expr()).to_series().to_list() == [
        "HIGH_CONFIDENCE_CORRECT", "CORRECT_WEAKENED", "TIE", "FRAGILE_CORRECT", "HIGH_CONFIDENCE_INCORRECT",
        "RECOVERED_KNOWLEDGE", "TIE", "TIE", "UNSCORABLE", "UNSCORABLE", "UNSCORABLE"]


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


def test_variant_without_tokens_is_a_bank_error(tiny, tmp_path):
    from conftest import write_tiny_bank
    path = write_tiny_bank(tmp_path, {"q1": ("The drug is", [""], [" beta"])})
    with pytest.raises(EngramEvalError) as error:
        run_sweep(tiny, load_bank(path), EngramStore(tmp_path / "s"), tmp_path / "run", layers=[1], strengths=[1.0], progress=False)
    assert str(error.value) == f"{path}: question 'q1': variant '' has no tokens"
    assert not (tmp_path / "run").exists() and not (tmp_path / "s").exists()  # checked before any model work


def test_sequence_scoring_sums_variant_log_probs(tiny, tiny_bank, tmp_path):
    frame = pl.read_parquet(sweep(tiny, tiny_bank, tmp_path / "run", scoring="sequence-max", layers=[2], strengths=[2.0]).results_path)
    bank = load_bank(tiny_bank)
    row = frame.filter((pl.col("question_id") == "q1") & (pl.col("engram") == "topic")).row(0, named=True)
    q = bank.questions[0]
    engram = reference_engram(tiny.model, tiny.tokenizer, bank.sources["topic"].text, 2, k=4)
    table = tiny.model.get_input_embeddings().weight
    prefix = engram * (table.norm(dim=1).mean() / engram.norm(dim=1).mean()) * 2.0

    def logprob(variant):
        ids = tiny.tokenizer(q.prompt)["input_ids"]
        tail = tiny.tokenizer.encode(variant, add_special_tokens=False)
        with torch.no_grad():
            logits = tiny.model(inputs_embeds=torch.cat([prefix, table[ids + tail]]).unsqueeze(0)).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        start = prefix.shape[0] + len(ids) - 1
        return sum(logp[start + j, t].item() for j, t in enumerate(tail))

    assert math.log(row["p_correct"]) == pytest.approx(max(logprob(v) for v in q.correct), abs=1e-4)
    assert math.log(row["p_incorrect"]) == pytest.approx(max(logprob(v) for v in q.incorrect), abs=1e-4)


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


@pytest.mark.real_model
def test_real_model_sweep_matches_the_straightforward_implementation(real, tmp_path):
    bank_path = REPO / "questions/ci.yaml"
    result = run_sweep(real, load_bank(bank_path), EngramStore(tmp_path / "store"), tmp_path / "run",
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


def test_out_of_memory_backs_off_and_gives_identical_results(tiny, tiny_bank, tmp_path, monkeypatch):
    reference = pl.read_parquet(sweep(tiny, tiny_bank, tmp_path / "ref", batch_size=1).results_path)
    real = sweep_module.variant_logprobs
    sizes = []

    def small_memory(lm, prefixes, *args):
        if prefixes is not None:
            sizes.append(prefixes.shape[0])
            if prefixes.shape[0] > 3:
                raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(lm, prefixes, *args)

    monkeypatch.setattr(sweep_module, "variant_logprobs", small_memory)
    frame = pl.read_parquet(sweep(tiny, tiny_bank, tmp_path / "oom", batch_size=16).results_path)
    assert sizes[:4] == [16, 8, 4, 2] and max(sizes[3:]) == 2  # halves until it fits, then keeps that size
    assert frame.drop("p_correct", "p_incorrect", "log_ratio", "ratio", "improvement", "log_improvement", "baseline_ratio").equals(
        reference.drop("p_correct", "p_incorrect", "log_ratio", "ratio", "improvement", "log_improvement", "baseline_ratio"))
    assert (frame["ratio"] / reference["ratio"] - 1).abs().max() < 1e-5
