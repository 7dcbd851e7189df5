import pytest

from engram_eval.report import decision_advice, load_run, summarize
from engram_eval.statistics import sign_flip_test, wilson_interval


@pytest.mark.parametrize("baseline,related,walk,expected", [
    (20.0, False, [], "confident and correct: don't use an engram"),
    (3.0, None, [], "correct, not confident: strength 1.0"),
    (0.5, False, [(1.0, 0.6), (5.0, 1.2)], "wrong: flips at layer 8, strength 5"),
    (0.5, False, [(1.0, 0.6), (5.0, 0.4)], "wrong: stop at strength 5 (ratio falling), no flip at layer 8"),
    (0.5, True, [(1.0, 0.6), (5.0, 0.7), (10.0, 0.8)], "wrong: no flip up to strength 10 at layer 8; wrong answer is topic-related, engram likely hurts"),
    (0.5, False, [(2.0, 3.0)], "wrong: search strengths 1-20 (none of them in this grid)"),
])
def test_decision_rule(baseline, related, walk, expected):
    assert decision_advice(baseline, related, walk, 8) == expected


def test_counts_and_rates_equal_a_recount_of_the_rows(run):
    frame, meta = run
    summary = summarize(frame, meta)
    rows = frame.to_dicts()
    base = {r["question_id"]: r for r in rows if r["role"] == "baseline"}
    relevant = [r for r in rows if r["role"] == "relevant"]
    for q in summary["questions"]:
        mine = [r for r in relevant if r["question_id"] == q["question_id"]]
        assert q["flips"] == sum(r["flipped"] for r in mine) and q["breaks"] == sum(r["broken"] for r in mine)
        assert q["clean_flips"] == sum(r["flipped"] and r["p_correct_rose"] and not r["collapsed"] for r in mine)
        assert q["flips_p_correct_fell"] == sum(r["flipped"] and not r["p_correct_rose"] for r in mine)
        assert q["flips_collapsed"] == sum(r["flipped"] and r["collapsed"] for r in mine)
        b = base[q["question_id"]]
        assert (q["baseline_ratio"], q["baseline_p_correct"], q["baseline_p_incorrect"]) == (b["baseline_ratio"], b["p_correct"], b["p_incorrect"])
        best = max(mine, key=lambda r: r["ratio"])
        assert (q["best"]["layer"], q["best"]["strength"], q["best"]["p_correct"]) == (best["layer"], best["strength"], best["p_correct"])
        assert q["best"]["improves_on_baseline"] == (best["ratio"] > b["baseline_ratio"])
        assert sum(q["cases"].values()) == len(mine)
    heat = summary["heatmaps"]["relevant"]
    for i, layer in enumerate(heat["layers"]):
        for j, strength in enumerate(heat["strengths"]):
            cell = [r for r in relevant if r["layer"] == layer and r["strength"] == strength]
            wrong = [r for r in cell if not r["correct_before"]]
            assert (heat["flip"][i][j]["k"], heat["flip"][i][j]["n"]) == (sum(r["flipped"] for r in wrong), len(wrong))
            correct = [r for r in cell if r["correct_before"]]
            assert (heat["break"][i][j]["k"], heat["break"][i][j]["n"]) == (sum(r["broken"] for r in correct), len(correct))
    wrong_questions = [qid for qid, r in base.items() if not r["correct_before"]]
    flipping = [qid for qid in wrong_questions if any(r["flipped"] for r in relevant if r["question_id"] == qid)]
    headline = summary["headline"]["question_flip_rate"]
    assert (headline["k"], headline["n"]) == (len(flipping), len(wrong_questions))
    clean = [qid for qid in wrong_questions
             if any(r["flipped"] and r["p_correct_rose"] and not r["collapsed"] for r in relevant if r["question_id"] == qid)]
    assert summary["headline"]["question_clean_flip_rate"]["k"] == len(clean)
    assert headline["ci95"] == (list(wilson_interval(len(flipping), len(wrong_questions))) if wrong_questions else None)


def test_controls_are_compared_on_the_same_cells(run):
    frame, meta = run
    rows = frame.to_dicts()
    rel = {(r["question_id"], r["layer"], r["strength"]): r for r in rows if r["role"] == "relevant"}
    for control in summarize(frame, meta)["controls"]:
        mine = [r for r in rows if r["role"] == "control" and r["control_kind"] == control["kind"]]
        per_question = {}
        for r in mine:
            per_question.setdefault(r["question_id"], []).append(rel[(r["question_id"], r["layer"], r["strength"])]["log_improvement"] - r["log_improvement"])
        differences = [sum(v) / len(v) for _, v in sorted(per_question.items())]
        assert control["mean_difference"] == pytest.approx(sum(differences) / len(differences))
        assert control["p_value"] == pytest.approx(sign_flip_test(differences))
        assert control["mean_log_improvement_control"] == pytest.approx(sum(r["log_improvement"] for r in mine) / len(mine))
        wrong = [r for r in mine if not r["correct_before"]]
        adjusted = sum(rel[(r["question_id"], r["layer"], r["strength"])]["flipped"] - r["flipped"] for r in wrong)
        assert control["adjusted_flips"] == adjusted
        assert control["breaks_relevant"] == sum(rel[(r["question_id"], r["layer"], r["strength"])]["broken"] for r in mine)
        assert control["breaks_control"] == sum(r["broken"] for r in mine)
        assert control["verdict"] == "too few questions to tell (n = 3)"  # 3 questions: the exact test's smallest p is 0.25


def test_semantic_sink_split(run):
    frame, meta = run
    relevant = [r for r in frame.to_dicts() if r["role"] == "relevant"]
    for group in summarize(frame, meta)["semantic_sink"]:
        mine = [r for r in relevant if r["related_wrong"] == group["related_wrong"]]
        assert group["flip"]["k"] == sum(r["flipped"] for r in mine)
        assert group["break"]["n"] == sum(r["correct_before"] for r in mine)




def test_the_generation_section_recounts_from_the_generations(tiny, tiny_bank, tmp_path):
    from engram_eval.generation import run_generate
    from engram_eval.report import load_generations, load_run
    from conftest import sweep

    result = sweep(tiny, tiny_bank, tmp_path / "run", layers=[1, 3], strengths=[1.0, 20.0])
    run_generate(tiny, result.out, cells="all", max_new_tokens=8, progress=False)
    generations = load_generations(result.out)
    g = summarize(*load_run(result.out), generations=generations)["generation"]
    rows = generations.to_dicts()
    for row in rows:
        row["probability"] = "correct" if row["ratio"] > 1 else "incorrect" if row["ratio"] < 1 else "tie"
    for p, verdicts in g["confusion"].items():
        for v, n in verdicts.items():
            assert n == sum(r["probability"] == p and r["verdict"] == v for r in rows)
    flipped = [r for r in rows if r["flipped"]]
    assert (g["flipped_says_correct_first"]["k"], g["flipped_says_correct_first"]["n"]) == (
        sum(r["first_answer"] == "correct" for r in flipped), len(flipped))
    assert g["cells"] == len(rows) == len(g["texts"])


def test_rag_priming_compares_the_four_conditions_on_the_same_questions(tiny, tmp_path):
    from engram_eval.report import load_run
    from engram_eval.statistics import mcnemar_exact
    from conftest import sweep, write_tiny_bank

    bank_path = write_tiny_bank(tmp_path)
    bank_path.write_text(bank_path.read_text().replace("  engram: topic\n", "  engram: topic\n  context: \"Alpha blockers come first.\"\n"))
    result = sweep(tiny, bank_path, tmp_path / "run", layers=[1, 3], strengths=[1.0, 20.0], context="both")
    frame, run = load_run(result.out)
    rag = summarize(frame, run)["rag"]
    rows = frame.to_dicts()
    assert rag["questions"] == 3 and [c["strength"] for c in rag["conditions"]][1] == 1.0
    base = {(r["question_id"], r["context"]): r["correct_before"] for r in rows if r["role"] == "baseline"}
    for c in rag["conditions"]:
        at = {(r["question_id"], r["context"]): r["correct_after"] for r in rows
              if r["role"] == "relevant" and (r["layer"], r["strength"]) == (c["layer"], c["strength"])}
        qs = ["q1", "q2", "q3"]
        assert c["no engram"]["k"] == sum(base[(q, False)] for q in qs)
        assert c["engram only"]["k"] == sum(at[(q, False)] for q in qs)
        assert c["context only"]["k"] == sum(base[(q, True)] for q in qs)
        assert c["engram + context"]["k"] == sum(at[(q, True)] for q in qs)
        b = sum(at[(q, True)] and not base[(q, True)] for q in qs)
        d = sum(base[(q, True)] and not at[(q, True)] for q in qs)
        assert (c["engram_context_only"], c["context_only"], c["p_value"]) == (b, d, mcnemar_exact(b, d))
    best = max(((r["layer"], r["strength"]) for r in rows if r["role"] == "relevant"),
               key=lambda cell: (sum(r["correct_after"] for r in rows if r["role"] == "relevant" and r["context"]
                                     and (r["layer"], r["strength"]) == cell), -cell[0], -cell[1]))
    assert (rag["conditions"][0]["layer"], rag["conditions"][0]["strength"]) == best
    assert sorted(q["question_id"] for q in summarize(frame, run)["questions"]) == [
        f"{q} {c}context" for q in ("q1", "q2", "q3") for c in "+-"]  # each condition is its own, labelled unit


def test_the_chunk_count_section_recounts_the_seed_table(tiny, tiny_bank, tmp_path):
    from engram_eval.bank import load_bank
    from engram_eval.rendering import render_markdown
    from engram_eval.report import load_run
    from engram_eval.statistics import bootstrap_mean_ci
    from conftest import sweep
    from reference import reference_engram

    result = sweep(tiny, tiny_bank, tmp_path / "run", layers=[1, 3], strengths=[1.0, 9.0], chunks=[2, 4, 8])
    frame, run = load_run(result.out)
    summary = summarize(frame, run)
    rows, bank = frame.to_dicts(), load_bank(tiny_bank)
    assert set(summary["heatmaps"]) == {"relevant k=2", "relevant k=4", "relevant k=8"}
    for c in summary["chunk_count"]:
        k = c["chunks"]
        sizes = []
        for name, source in bank.sources.items():
            n = len(tiny.tokenizer(source.text)["input_ids"])
            sizes += [n // k, n - (k - 1) * (n // k)]
        assert c["tokens_per_chunk"] == [min(sizes), max(sizes)]
        per_question = {}
        for r in rows:
            if r["role"] == "relevant" and r["chunks"] == k:
                per_question.setdefault(r["question_id"], []).append(r["log_improvement"])
        means = [sum(v) / len(v) for v in per_question.values()]
        assert c["mean_log_improvement"] == pytest.approx(sum(means) / len(means))
        assert c["mean_log_improvement_ci95"] == pytest.approx(bootstrap_mean_ci(means))
        rel = {(r["question_id"], r["layer"], r["strength"]): r["ratio"] for r in rows if r["role"] == "relevant" and r["chunks"] == k}
        anti = [r for r in rows if r["control_kind"] == "anti" and r["chunks"] == k]
        beats = sum(rel[(r["question_id"], r["layer"], r["strength"])] > r["ratio"] for r in anti)
        assert (c["directional"]["k"], c["directional"]["n"]) == (beats, len(anti))
        signals = []
        for layer in (1, 3):
            a = reference_engram(tiny.model, tiny.tokenizer, bank.sources["topic"].text, layer, k=k).flatten().double()
            b = reference_engram(tiny.model, tiny.tokenizer, bank.sources["anti"].text, layer, k=k).flatten().double()
            signals += [100 * (1 - (a @ b / (a.norm() * b.norm())).item())] * 3  # three questions share topic and anti
        assert c["anti_difference_signal"] == pytest.approx(sum(signals) / len(signals), abs=1e-4)
    assert "## Chunk count (the seed's table): per k" in render_markdown(summary)


def test_runs_of_models_of_different_depth_line_up_by_relative_depth(tiny_model_dir, shallow_model_dir, tiny_bank, tmp_path):
    import json as json_module

    from click.testing import CliRunner

    from engram_eval.cli import cli

    def sweep_cli(model, out, layers):
        args = ["sweep", tiny_bank, "--model", model, "--layers", layers, "--strengths", "1,8", "--chunks", "4", "--out", out,
                "--store", tmp_path / "store", "--quiet"]
        assert CliRunner().invoke(cli, [str(a) for a in args]).exit_code == 0

    sweep_cli(tiny_model_dir, tmp_path / "deep", "2,4")
    sweep_cli(shallow_model_dir, tmp_path / "shallow", "1,2")
    result = CliRunner().invoke(cli, ["report", str(tmp_path / "deep"), str(tmp_path / "shallow"), "--format", "json"])
    assert result.exit_code == 0, result.output
    deep, shallow = json_module.loads(result.stdout)["runs"]
    assert (deep["layers"], deep["depths"], shallow["layers"], shallow["depths"]) == ([2, 4], [0.5, 1.0], [1, 2], [0.5, 1.0])
    for run, path in ((deep, tmp_path / "deep"), (shallow, tmp_path / "shallow")):
        single = summarize(*load_run(path))
        assert run["question_flip_rate"] == single["headline"]["question_flip_rate"]
        assert run["controls"] == {c["kind"]: {"verdict": c["verdict"], "p_value": c["p_value"], "mean_difference": c["mean_difference"]}
                                   for c in single["controls"]}
        assert run["heatmaps"]["relevant"]["flip"] == single["heatmaps"]["relevant"]["flip"]
    markdown = CliRunner().invoke(cli, ["report", str(tmp_path / "deep"), str(tmp_path / "shallow"), "--format", "markdown"]).stdout
    assert "| layers (relative depth) | L2 (0.50), L4 (1.00) | L1 (0.50), L2 (1.00) |" in markdown
    other_bank = tmp_path / "other"
    other_bank.mkdir()
    from conftest import write_tiny_bank
    bank = write_tiny_bank(other_bank, {"q9": ("The antidote is", [" dantrolene"], [" cooling"])})
    args = ["sweep", bank, "--model", tiny_model_dir, "--layers", "2", "--strengths", "1", "--chunks", "4", "--out", tmp_path / "o",
            "--store", tmp_path / "store", "--quiet"]
    assert CliRunner().invoke(cli, [str(a) for a in args]).exit_code == 0
    refused = CliRunner().invoke(cli, ["report", str(tmp_path / "deep"), str(tmp_path / "o")])
    assert refused.exit_code == 2 and "the runs use different banks" in refused.stderr and "--allow-different-banks" in refused.stderr
    assert CliRunner().invoke(cli, ["report", str(tmp_path / "deep"), str(tmp_path / "o"), "--allow-different-banks"]).exit_code == 0
