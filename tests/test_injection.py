import math
from pathlib import Path

import polars as pl
import pytest
import torch

import engram_eval.steer.scoring as scoring_module
from engram_eval.bank.banks import load_bank
from engram_eval.core.errors import EngramEvalError
from engram_eval.steer.injection import scale_engram
from conftest import sweep, write_tiny_bank
from reference import reference_cell, reference_engram

REPO = Path(__file__).resolve().parents[1]


def raw_vectors(lm, bank, name: str, layer: int, k: int, mode: str = "prefix") -> torch.Tensor | None:
    """An engram's raw rows, written out independently: a source's chunk means (from a hook; actadd's from the block's
    output at every layer, the last included), or a null prefix."""
    if name is None:
        return None
    if name == "~gaussian":
        return torch.randn(k, lm.hidden_size, generator=torch.Generator().manual_seed(0))
    if name == "~mean-token":
        return lm.model.get_input_embeddings().weight.detach().float().mean(dim=0).repeat(k, 1)
    return reference_engram(lm.model, lm.tokenizer, bank.sources[name].text, layer, k=k, final_norm=mode != "actadd")


def assert_rows_match_reference(lm, bank_path, frame, k, rel, **method):
    bank = load_bank(bank_path)
    for row in frame.iter_rows(named=True):
        q = next(q for q in bank.questions if q.id == row["question_id"])
        engram = raw_vectors(lm, bank, row["engram"], row["layer"], k, method.get("mode", "prefix"))
        p_c, p_i = reference_cell(lm.model, lm.tokenizer, engram, row["strength"], q.prompt, list(q.correct), list(q.incorrect),
                                  layer=row["layer"], **method)
        assert row["p_correct"] == pytest.approx(p_c, rel=rel), (row["engram"], row["layer"], row["strength"])
        assert row["p_incorrect"] == pytest.approx(p_i, rel=rel), (row["engram"], row["layer"], row["strength"])


MODES = [("add", "global"), ("actadd", "global"), ("prefix", "per-chunk"), ("add", "per-chunk")]  # prefix, global: test_sweep


@pytest.mark.parametrize("mode,scaling", MODES)
def test_every_cell_of_each_mode_equals_the_straightforward_implementation(tiny, tiny_bank, tmp_path, mode, scaling):
    result = sweep(tiny, tiny_bank, tmp_path / "run", injection=mode, scaling=scaling, layers=[0, 2, 4], strengths=[0.5, 3.0],
                   questions=["q1", "q2"])
    frame = pl.read_parquet(result.results_path)
    assert set(frame["injection"]) == {mode} and set(frame["scaling"]) == {scaling}
    assert_rows_match_reference(tiny, tiny_bank, frame, 4, rel=1e-5, mode=mode, scaling=scaling)


def test_null_prefixes_are_the_documented_vectors_scaled_like_any_engram(tiny, tmp_path):
    bank = write_tiny_bank(tmp_path, extra="").read_text().replace("controls: [stars, noise, anti]", "controls: [stars, ~gaussian, ~mean-token]")
    (tmp_path / "nulls.yaml").write_text(bank)
    frame = pl.read_parquet(sweep(tiny, tmp_path / "nulls.yaml", tmp_path / "run", layers=[1, 3]).results_path)
    nulls = frame.filter(pl.col("control_kind") == "null-prefix")
    assert sorted(set(nulls["engram"])) == ["~gaussian", "~mean-token"] and nulls["engram_key"].null_count() == nulls.height
    assert_rows_match_reference(tiny, tmp_path / "nulls.yaml", nulls, 4, rel=1e-5, mode="prefix")
    by_layer = [nulls.filter(pl.col("layer") == layer).drop("layer", "repeated") for layer in (1, 3)]
    assert by_layer[0].equals(by_layer[1])  # a null prefix is the same at every layer: one computation, repeated rows
    assert nulls.filter(pl.col("layer") == 1)["repeated"].not_().all() and nulls.filter(pl.col("layer") == 3)["repeated"].all()
    assert not frame.filter(pl.col("control_kind") != "null-prefix")["repeated"].any()
    again = pl.read_parquet(sweep(tiny, tmp_path / "nulls.yaml", tmp_path / "again", layers=[1, 3]).results_path)
    assert again.filter(pl.col("control_kind") == "null-prefix").equals(nulls)


def test_null_prefixes_are_computed_once_per_strength_for_prefix_and_per_layer_for_actadd(tiny, tmp_path, monkeypatch):
    bank = write_tiny_bank(tmp_path).read_text().replace("controls: [stars, noise, anti]", "controls: [stars, ~gaussian]")
    (tmp_path / "nulls.yaml").write_text(bank)
    real, rows = scoring_module.variant_logprobs, []

    def counting(lm, steering, *args):
        rows.append(0 if steering is None else steering.vectors.shape[0])
        return real(lm, steering, *args)

    monkeypatch.setattr(scoring_module, "variant_logprobs", counting)
    frame = pl.read_parquet(sweep(tiny, tmp_path / "nulls.yaml", tmp_path / "prefix", layers=[1, 2, 3], questions=["q1"]).results_path)
    assert frame.height == 1 + 3 * 3 * 2 and sum(rows) == 2 * 3 * 2 + 2  # topic and stars per cell, ~gaussian per strength
    rows.clear()
    actadd = pl.read_parquet(sweep(tiny, tmp_path / "nulls.yaml", tmp_path / "actadd", layers=[1, 2, 3], questions=["q1"],
                                   injection="actadd").results_path)
    assert sum(rows) == 3 * 3 * 2  # actadd injects at the cell's layer: every cell is its own
    gaussian = actadd.filter(pl.col("engram") == "~gaussian")
    assert gaussian["p_correct"].n_unique() == gaussian.height
    assert_rows_match_reference(tiny, tmp_path / "nulls.yaml", gaussian, 4, rel=1e-5, mode="actadd")


def test_per_chunk_scaling_gives_every_vector_the_embedding_norm_and_global_is_the_seeds():
    vectors = torch.tensor([[3.0, 4.0], [30.0, 40.0], [0.0, 2.0]])
    per_chunk = scale_engram(vectors, embedding_norm=10.0, strength=2.0, scaling="per-chunk")
    assert torch.allclose(per_chunk.norm(dim=1), torch.full((3,), 20.0))
    assert torch.allclose(per_chunk[1] / per_chunk[1].norm(), vectors[1] / vectors[1].norm())
    global_ = scale_engram(vectors, embedding_norm=10.0, strength=2.0)
    assert torch.allclose(global_, vectors * (10.0 / vectors.norm(dim=1).mean()) * 2.0)


@pytest.mark.parametrize("options,message", [
    (dict(injection="add", chunks=12), "{bank}: question 'q1': --injection add needs a prompt of at least k = 12 tokens; this one has {n}"),
    (dict(injection="actadd", scaling="per-chunk"), "--scaling: applies to prefix and add injection; actadd scales its direction by "
                                                     "the residual stream's own norm"),
    (dict(injection="sideways"), "--injection: unknown 'sideways' (one of: prefix, add, actadd, vector-add, vector-clamp)"),
    (dict(scaling="loud"), "--scaling: unknown 'loud' (one of: global, per-chunk)"),
])
def test_bad_injection_settings_are_refused_before_any_model_work(tiny, tiny_bank, tmp_path, options, message):
    with pytest.raises(EngramEvalError) as error:
        sweep(tiny, tiny_bank, tmp_path / "run", **options)
    n = len(tiny.tokenizer("The first medication for the tumor should be")["input_ids"])
    assert str(error.value) == message.format(bank=tiny_bank, n=n)
    assert not (tmp_path / "run").exists() and not (tmp_path / "store").exists()


@pytest.mark.real_model
@pytest.mark.parametrize("mode,scaling", [("add", "global"), ("actadd", "global"), ("prefix", "per-chunk")])
def test_real_model_modes_match_the_straightforward_implementation_on_a_sample(real, tmp_path, mode, scaling):
    from engram_eval.engram.store import EngramStore
    from conftest import flat_sweep

    bank_path = REPO / "questions/ci.yaml"
    result = flat_sweep(real, load_bank(bank_path), EngramStore(tmp_path / "store"), tmp_path / "run", layers=[12, 30],
                       strengths=[1.0, 5.0], injection=mode, scaling=scaling, questions=["pheo1"], progress=False)
    frame = pl.read_parquet(result.results_path)
    sample = pl.concat([frame.filter(pl.col("role") == "baseline"), frame.filter(pl.col("role") != "baseline").sample(4, seed=2)])
    assert_rows_match_reference(real, bank_path, sample, 16, rel=1e-4, mode=mode, scaling=scaling)


def test_the_mode_table_is_the_cli_choices_the_help_and_the_reference_tests():
    from engram_eval.cli import cli
    from engram_eval.steer.injection import INJECTIONS

    names = INJECTIONS.names()
    vector_modes = {"vector-add", "vector-clamp"}  # their reference tests: test_vector_steering (hooks, lm-eval's clamp)
    assert set(names) == {mode for mode, _ in MODES} | {"prefix"} | vector_modes  # a new mode needs its reference test
    for command in ("sweep", "bench"):
        option = next(p for p in cli.commands[command].params if p.name == "injection")
        assert tuple(option.type.choices) == names and option.default == "prefix"
    help_text = next(p for p in cli.commands["sweep"].params if p.name == "injection").help
    assert all(f"{name}: {INJECTIONS[name].summary}" in help_text for name in names)
    with pytest.raises(EngramEvalError, match=r"^--injection: unknown 'steer' \(one of: prefix, add, actadd, vector-add, vector-clamp\)$"):
        INJECTIONS["steer"]


@pytest.mark.parametrize("name", ["prefix", "add", "actadd"])
def test_each_modes_attributes_say_what_it_does(tiny, name):
    """prefix_positions: the inputs grow by k; hooks_blocks: hooks on the blocks while active; an add-like mode
    changes the first k positions only; site_depends_on_layer: the same vectors at another layer steer differently."""
    from engram_eval.steer.injection import INJECTIONS, Steering

    mode = INJECTIONS[name]
    k, body = 3, torch.randn(1, 6, tiny.hidden_size)
    vectors = torch.randn(1, k, tiny.hidden_size) if not mode.hooks_blocks else torch.randn(1, tiny.hidden_size)
    steering = Steering(name, vectors, [0])
    inputs = steering.inputs(body)
    assert inputs.shape[1] == 6 + (k if mode.prefix_positions else 0) and steering.prefix_length == (k if mode.prefix_positions else 0)
    if name == "add":
        assert torch.equal(inputs[:, k:], body[:, k:]) and not torch.equal(inputs[:, :k], body[:, :k])
    blocks = tiny.backend.blocks()

    def hooks() -> int:
        return sum(len(block._forward_hooks) for block in blocks)

    before = hooks()
    with Steering(name, vectors, [2]).active(tiny.backend):
        during = hooks()
    assert (during > before) == mode.hooks_blocks and hooks() == before
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    embeds = tiny.model.get_input_embeddings()(ids)

    def logits(layer):
        steer = Steering(name, vectors, [layer])
        with torch.no_grad(), steer.active(tiny.backend):
            return tiny.model(inputs_embeds=steer.inputs(embeds)).logits[0, -1]

    assert (not torch.allclose(logits(1), logits(2))) == mode.site_depends_on_layer


def test_actadd_takes_its_last_layer_direction_from_the_last_blocks_output_where_it_adds(tiny, tiny_bank, tmp_path):
    """hidden_states[num_layers] is the final norm's output; actadd adds to (and measures s on) the last block's. Its
    engrams at the last layer are that block's output (a hook on it, written here); every other layer, and every other
    run's engrams, are as before; the run's results format says so."""
    import json

    from engram_eval.engram.store import EngramStore
    from engram_eval.run.rundir import RESULTS_FORMAT
    from reference import reference_chunks

    last = tiny.num_layers
    actadd = sweep(tiny, tiny_bank, tmp_path / "actadd", injection="actadd", layers=[2, last], strengths=[1.0], questions=["q1"])
    prefix = sweep(tiny, tiny_bank, tmp_path / "prefix", layers=[2, last], strengths=[1.0], questions=["q1"])
    below = sweep(tiny, tiny_bank, tmp_path / "below", injection="actadd", layers=[2], strengths=[1.0], questions=["q1"])
    store = EngramStore(tmp_path / "store")
    captured = {}
    handle = tiny.model.model.layers[-1].register_forward_hook(lambda m, i, o: captured.update(h=o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        tiny.model(input_ids=torch.tensor([tiny.tokenizer(load_bank(tiny_bank).sources["topic"].text)["input_ids"]]))
    handle.remove()
    block_output = reference_chunks(captured["h"][0].float(), 4)
    steered = store.load(Path(actadd.run["engram_files"]["topic"]))
    plain = store.load(Path(prefix.run["engram_files"]["topic"]))
    assert torch.allclose(steered.engram.layers[last], block_output, atol=1e-5)
    assert not torch.allclose(plain.engram.layers[last], block_output, atol=1e-3)  # the final norm's output, as before
    assert torch.equal(steered.engram.layers[2], plain.engram.layers[2])
    assert steered.metadata["last_layer"] == "block-output" and "last_layer" not in plain.metadata
    assert below.run["engram_keys"] == prefix.run["engram_keys"] != actadd.run["engram_keys"]
    assert actadd.run["results_format"] == RESULTS_FORMAT + "+actadd-last-block"
    assert below.run["results_format"] == prefix.run["results_format"] == RESULTS_FORMAT
    written_before = {**json.loads((tmp_path / "actadd" / "run.json").read_text()), "results_format": RESULTS_FORMAT}
    with pytest.raises(EngramEvalError, match=r"another engram-eval version .*use --force to recompute the run"):
        (tmp_path / "actadd" / "run.json").write_text(json.dumps(written_before))
        sweep(tiny, tiny_bank, tmp_path / "actadd", injection="actadd", layers=[2, last], strengths=[1.0], questions=["q1"])


def reference_sequence_logp(lm, engram, row, prompt: str, variant_ids: tuple, positions: str) -> float:
    """One variant's summed log-probability after the prompt, teacher-forced, in one forward pass with the scoped hook."""
    from reference import reference_steered

    with reference_steered(lm.model, lm.tokenizer, engram, row["strength"], prompt, mode="actadd", layer=row["layer"],
                           positions=positions, answer_ids=variant_ids[:-1]) as inputs:
        with torch.no_grad():
            logp = torch.log_softmax(lm.model(inputs_embeds=inputs.unsqueeze(0)).logits[0].float(), dim=-1)
    start = inputs.shape[0] - len(variant_ids)
    return sum(logp[start + i, token].item() for i, token in enumerate(variant_ids))


@pytest.mark.parametrize("positions", ["all", "prompt", "answer", "last"])
def test_each_position_scope_of_actadd_equals_a_hook_written_here(tiny, tiny_bank, tmp_path, positions):
    """Sequence scoring runs the prompt and the answer's tokens in one pass: the scope decides which of them the
    vector reaches (layer 0 through the input embeddings, deeper layers through the block's hook)."""
    from engram_eval.steer.prompts import prepare_question

    frame = pl.read_parquet(sweep(tiny, tiny_bank, tmp_path / "run", injection="actadd", positions=positions, scoring="sequence",
                                  layers=[0, 2, tiny.num_layers], strengths=[3.0], questions=["q1"]).results_path)
    assert set(frame["positions"]) == {positions}
    bank = load_bank(tiny_bank)
    question = bank.questions[0]
    prepared = prepare_question(tiny, question, "sequence")
    cells = frame.filter(pl.col("role") != "baseline")
    for row in cells.iter_rows(named=True):
        engram = raw_vectors(tiny, bank, row["engram"], row["layer"], 4, "actadd")
        for side, variants in (("correct", prepared.correct_ids), ("incorrect", prepared.incorrect_ids)):
            expected = torch.logsumexp(torch.tensor([reference_sequence_logp(tiny, engram, row, question.prompt, ids, positions)
                                                     for ids in variants]), dim=0).item()
            assert math.log(row[f"p_{side}"]) == pytest.approx(expected, rel=1e-4, abs=1e-5), (positions, row["engram"], row["layer"])
    if positions == "answer":  # the first answer token is predicted at the last prompt position, which it leaves alone
        baseline = frame.filter(pl.col("role") == "baseline")
        assert (cells["kl_next"] == 0).all() and (cells["top_token"] == baseline["top_token"][0]).all()


@pytest.mark.parametrize("positions", ["prompt", "answer", "last"])
def test_each_position_scope_generates_what_transformers_generate_does_with_the_hook(tiny, tiny_bank, tmp_path, positions):
    from engram_eval.run.generation import run_generate
    from reference import reference_generation

    result = sweep(tiny, tiny_bank, tmp_path / "run", injection="actadd", positions=positions, layers=[0, 2, tiny.num_layers],
                   strengths=[4.0], questions=["q1", "q2"])
    frame = pl.read_parquet(run_generate(tiny, result.out, cells="all", max_new_tokens=6, progress=False).generations_path)
    bank = load_bank(tiny_bank)
    assert set(frame["positions"]) == {positions}
    for row in frame.filter(pl.col("role") != "baseline").iter_rows(named=True):
        question = next(q for q in bank.questions if q.id == row["question_id"])
        engram = raw_vectors(tiny, bank, row["engram"], row["layer"], 4, "actadd")
        expected = reference_generation(tiny.model, tiny.tokenizer, engram, row["strength"], question.prompt, 6, mode="actadd",
                                        layer=row["layer"], positions=positions)
        assert list(row["token_ids"]) == [t for t in expected if t not in tiny.backend.eos_token_ids()][: len(row["token_ids"])]
        assert len(row["token_ids"]) == len([t for t in expected if t not in tiny.backend.eos_token_ids()]) or row["stop"] == "eos"


@pytest.mark.parametrize("options,message", [
    (dict(positions="prompt"), "--positions prompt: applies to actadd injection; prefix steers positions of its own (the "
                               "prefix, or the first k prompt tokens)"),
    (dict(injection="add", positions="last"), "--positions last: applies to actadd injection; add steers positions of its "
                                              "own (the prefix, or the first k prompt tokens)"),
    (dict(injection="actadd", positions="middle"), "--positions: unknown 'middle' (one of: all, prompt, answer, last)"),
])
def test_position_scopes_other_than_all_are_actadds_alone(tiny, tiny_bank, tmp_path, options, message):
    with pytest.raises(EngramEvalError) as error:
        sweep(tiny, tiny_bank, tmp_path / "run", **options)
    assert str(error.value) == message and not (tmp_path / "run").exists()
