import math

import pytest

from engram_eval.bank.banks import load_bank
from engram_eval.bench.benchmark import MatmulProbe, cell_flops, question_flops, run_bench, seed_loop


def llama_non_embedding_parameters(config) -> int:
    """Counted by hand from a Llama config: attention, MLP and two norms per layer, plus the final norm."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (config.head_dim or h // config.num_attention_heads)
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * i + 2 * h
    return config.num_hidden_layers * per_layer + h


@pytest.mark.parametrize("model", ["tiny", "real"])
def test_cell_flops_count_non_embedding_parameters_per_token_and_the_head_per_scored_position(model, request):
    lm = request.getfixturevalue(model)
    config = lm.model.config
    expected = 2 * llama_non_embedding_parameters(config) * 50 + 2 * config.hidden_size * config.vocab_size * 3
    assert cell_flops(lm, 50, scored_positions=3) == expected


def test_question_flops_are_the_baseline_pass_plus_one_pass_per_cell(tiny, tiny_bank):
    bank = load_bank(tiny_bank)
    question = bank.questions[0]
    prompt_len = len(tiny.tokenizer(question.prompt)["input_ids"])
    cells = (1 + len(question.controls)) * 2 * 3
    expected = cell_flops(tiny, prompt_len) + cells * cell_flops(tiny, 4 + prompt_len)
    assert question_flops(tiny, bank, question, [1, 4], [0.5, 1.0, 3.0], chunks=4) == expected


def test_seed_loop_runs_the_first_cells_of_a_question_and_stops(tiny, tiny_bank):
    bank = load_bank(tiny_bank)
    question = bank.questions[0]
    assert seed_loop(tiny, bank, question, [1, 4], [0.5, 3.0], 4, max_cells=3)[0] == 3
    assert seed_loop(tiny, bank, question, [1, 4], [0.5, 3.0], 4, max_cells=100)[0] == (1 + len(question.controls)) * 4


def test_matmul_probe_measures_positive_throughput_and_best_is_the_maximum_of_trials(monkeypatch):
    import torch

    probe = MatmulProbe(torch.device("cpu"), torch.float32, n=64)
    assert probe.rate(0.01) > 0
    rates = iter([3.0, 7.0, 5.0])
    monkeypatch.setattr(probe, "rate", lambda seconds: next(rates))
    assert probe.best(trials=3) == 7.0


@pytest.mark.parametrize("injection", ["prefix", "actadd"])
def test_bench_ratios_are_computed_from_the_same_run(tiny, tiny_bank, injection):
    bank = load_bank(tiny_bank)
    r = run_bench(tiny, bank, [1, 4], [0.5, 3.0], chunks=4, loop_cells=6, probe_seconds=0.05, injection=injection)
    cells_per_question = [(1 + len(q.controls)) * 4 for q in bank.questions]
    assert r["cells"] == sum(n + 1 for n in cells_per_question)
    assert r["loop_cells"] == sum(min(n, math.ceil(6 / len(bank.questions))) for n in cells_per_question)
    assert r["sweep_speedup"] == pytest.approx(r["sweep_cells_per_second"] / r["loop_cells_per_second"])
    assert r["roofline_fraction"] == pytest.approx(r["achieved_flops"] / r["matmul_flops"])
    assert r["roofline_fraction_of_best"] == pytest.approx(r["achieved_flops"] / r["matmul_flops_best"])
    # The best probe bounds every probe, so it also bounds their time-weighted mean.
    assert r["matmul_flops"] <= r["matmul_flops_best"]
    # FLOPs per cell of the whole sweep, counted by hand: baseline (prompt only) + cells (4 prefix vectors + prompt, or
    # the prompt alone for actadd).
    config = tiny.model.config
    per_token, head = 2 * llama_non_embedding_parameters(config), 2 * config.hidden_size * config.vocab_size
    hand = 0
    for question, n in zip(bank.questions, cells_per_question):
        prompt_len = len(tiny.tokenizer(question.prompt)["input_ids"])
        hand += per_token * prompt_len + head + n * (per_token * ((4 if injection == "prefix" else 0) + prompt_len) + head)
    assert r["achieved_flops"] / r["sweep_cells_per_second"] == pytest.approx(hand / r["cells"])
    assert r["build_speedup"] == pytest.approx(r["seed_build_seconds"] / r["build_seconds"])
    assert (r["sources"], r["layers"], r["device"], r["dtype"], r["injection"]) == (4, 2, "cpu", "float32", injection)
    # Generation: the batched generator and model.generate per cell, measured in the same run, on the same selection.
    assert r["generation_speedup"] == pytest.approx(r["generation_tokens_per_second"] / r["generation_reference_tokens_per_second"])
    assert r["generation_reference_cells"] == 12 and r["generation_cells"] >= 12
    # generate --ensemble 3 --reextract: its seconds per token over plain batched generation's, from the same run.
    assert r["ensemble_seconds_per_token"] > 0
    assert r["ensemble_token_cost"] == pytest.approx(r["ensemble_seconds_per_token"] * r["generation_tokens_per_second"])
    assert r["attention_cost"] > 0
    # The neutral probe: the same run resumed with it; its distinct cells are the grid's (4 engrams x 2 layers x 2
    # strengths), its cost the probe's seconds over the sweep's.
    assert r["side_effect_cells"] == 4 * 2 * 2 and r["side_effects_seconds"] > 0
    assert r["side_effects_cost"] == pytest.approx(r["side_effects_seconds"] / r["sweep_seconds"])
    # --pooling learned: its steps (no plateau at lr 1) over one forward pass of its objective, and 200 of them.
    assert r["learned_steps"] == 8 and r["learned_forward_seconds"] > 0
    assert r["learned_step_over_forward"] == pytest.approx(r["learned_seconds_per_step"] / r["learned_forward_seconds"])
    assert r["learned_default_seconds"] == pytest.approx(200 * r["learned_seconds_per_step"])
    # Start-up, in fresh interpreters: each ratio is its time over `python -c pass`'s, from the same run.
    assert r["startup_help_ratio"] == pytest.approx(r["startup_help_seconds"] / r["startup_python_seconds"])
    assert r["startup_report_ratio"] == pytest.approx(r["startup_report_seconds"] / r["startup_python_seconds"])
    assert min(r["startup_python_seconds"], r["startup_help_seconds"], r["startup_report_seconds"]) > 0


@pytest.mark.parametrize("injection,null_cells", [("prefix", 3), ("actadd", 2 * 3)])
def test_question_flops_count_a_null_prefix_once_per_strength_except_with_actadd(tiny, tmp_path, injection, null_cells):
    from conftest import write_tiny_bank

    text = write_tiny_bank(tmp_path).read_text().replace("controls: [stars, noise, anti]", "controls: [stars, ~gaussian]")
    (tmp_path / "tiny.yaml").write_text(text)
    bank = load_bank(tmp_path / "tiny.yaml")
    question = bank.questions[0]
    prompt_len = len(tiny.tokenizer(question.prompt)["input_ids"])
    prefix = 4 if injection == "prefix" else 0
    expected = cell_flops(tiny, prompt_len) + (2 * 2 * 3 + null_cells) * cell_flops(tiny, prefix + prompt_len)
    assert question_flops(tiny, bank, question, [1, 4], [0.5, 1.0, 3.0], chunks=4, injection=injection) == expected


def test_alternated_sweeps_run_each_variant_twice_in_the_order_a_b_b_a(tiny, tiny_bank, tmp_path, monkeypatch):
    import engram_eval.bench.benchmark as bench_module
    from dataclasses import replace

    from engram_eval.bench.benchmark import alternated_sweeps
    from engram_eval.core.spec import Execution, SweepSpec
    from engram_eval.engram.store import EngramStore

    order = []  # recorded as each sweep returns, not read off file times
    real = bench_module.run_sweep
    monkeypatch.setattr(bench_module, "run_sweep", lambda *a, **k: (r := real(*a, **k), order.append(
        "with" if a[4].method.record_attention else "without"))[0])

    without = SweepSpec.build(layers=[1], strengths=[1.0], chunks=4)
    with_attention = replace(without, method=replace(without.method, record_attention=True))
    runs = alternated_sweeps(tiny, load_bank(tiny_bank), EngramStore(tmp_path / "s"), tmp_path,
                             {"without": (without, Execution()), "with": (with_attention, Execution())}, 2)
    assert [r.run["settings"]["record_attention"] for r in runs["without"] + runs["with"]] == [False, False, True, True]
    assert all(r.run["settings"]["questions"] == ["q1", "q2"] for r in runs["without"] + runs["with"])
    assert order == ["without", "with", "with", "without"]
