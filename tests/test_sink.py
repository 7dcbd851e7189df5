"""The semantic sink, measured per answer, on the embedded SmolLM2 and a bank built so the answer is known: a source
that names the related wrong answer many times and the unrelated one never. RUN/answers.parquet holds every variant's
log-probability (checked against a plain forward pass), reads in polars and duckdb; the sink is positive there, and
the paired statistic is scipy's permutation test on the differences recounted here."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
import torch
from scipy.stats import permutation_test

from conftest import sweep
from engram_eval.report.sink import load_answers, sink_summary

QUESTIONS = {  # id: (prompt, correct, related wrong, unrelated wrong)
    "au": ("The capital of Australia is", " Canberra", " Sydney", " Nairobi"),
    "ca": ("The capital of Canada is", " Ottawa", " Toronto", " Lima"),
    "tr": ("The capital of Turkey is", " Ankara", " Istanbul", " Oslo"),
    "ch": ("The capital of Switzerland is", " Bern", " Zurich", " Hanoi"),
}
RELATED = {"au": "Sydney", "ca": "Toronto", "tr": "Istanbul", "ch": "Zurich"}


@pytest.fixture(scope="module")
def sink_run(real, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sink")
    sources = "\n".join(
        f"  src_{qid}: {{text: \"{' '.join([f'{city} is a great city.'] * 12)}\"}}" for qid, city in RELATED.items())
    questions = "\n".join(
        f"  - {{id: {qid}, prompt: \"{prompt}\", correct: [\"{c}\"], incorrect: [\"{r}\"], incorrect_unrelated: [\"{u}\"], "
        f"engram: src_{qid}, controls: [stars], related_wrong: true}}" for qid, (prompt, c, r, u) in QUESTIONS.items())
    bank = folder / "sink.yaml"
    bank.write_text(f"name: sink\nsources:\n{sources}\n  stars: {{text: \"The stars shine at night over the quiet sea "
                    f"and the hills.\", kind: irrelevant}}\nquestions:\n{questions}\n")
    sweep(real, bank, folder / "run", layers=[8, 16], strengths=[1.0, 5.0], chunks=4)
    return folder / "run"


def test_answers_table_is_every_variants_logp(real, sink_run):
    answers = pl.read_parquet(sink_run / "answers.parquet")
    results = pl.read_parquet(sink_run / "results.parquet")
    assert answers.height == results.height * 3  # three variants a question
    for qid, (prompt, *variants) in QUESTIONS.items():
        ids = torch.tensor([real.tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(real.model(ids).logits[0, -1].float(), dim=-1)
        base = answers.filter((pl.col("question_id") == qid) & (pl.col("role") == "baseline"))
        assert base["answer_role"].to_list() == ["correct", "related wrong", "unrelated wrong"]
        for variant, got in zip(variants, base["logp"]):
            token = real.tokenizer(variant, add_special_tokens=False)["input_ids"][0]
            assert math.isclose(got, logp[token].item(), abs_tol=1e-4)
    relevant = results.filter(pl.col("role") != "baseline").join(
        answers.filter(pl.col("answer_role") == "correct"), on=["question_id", "engram", "layer", "strength"])
    assert np.allclose(relevant["logp"], np.log(relevant["p_correct"]), atol=1e-9)  # the side of one variant is that variant
    import duckdb

    counted = duckdb.sql(f"select answer_role, count(*) from '{sink_run / 'answers.parquet'}' group by 1 order by 1").fetchall()
    assert counted == [(role, results.height) for role in ("correct", "related wrong", "unrelated wrong")]


def test_the_sink_is_positive_where_the_source_names_the_related_answer(sink_run):
    run = json.loads((sink_run / "run.json").read_text())
    answers = load_answers(sink_run, run)
    sink = sink_summary(answers)
    relevant = sink["by_kind"][0]
    assert relevant["kind"] == "relevant" and relevant["questions"] == 4 and relevant["sink"]["mean"] > 0
    # recounted: per question, the mean over cells of (Δ related - Δ unrelated), against the baseline
    base = answers.filter(pl.col("role") == "baseline")
    cells = answers.filter(pl.col("role") == "relevant")
    per_question = []
    for qid in QUESTIONS:
        b = {r["answer_role"]: r["logp"] for r in base.filter(pl.col("question_id") == qid).to_dicts()}
        rows = cells.filter(pl.col("question_id") == qid)
        values = []
        for (layer, strength), group in rows.group_by(["layer", "strength"]):
            got = {r["answer_role"]: r["logp"] for r in group.to_dicts()}
            values.append((got["related wrong"] - b["related wrong"]) - (got["unrelated wrong"] - b["unrelated wrong"]))
        per_question.append(sum(values) / len(values))
    assert relevant["sink"]["mean"] == pytest.approx(sum(per_question) / 4, abs=1e-12)
    # the paired test at one cell equals scipy's, on differences recounted here
    test = next(t for t in sink["tests"] if t["measure"] == "sink" and t["layer"] == 16 and t["strength"] == 5.0)
    differences = []
    for qid in QUESTIONS:
        b = {r["answer_role"]: r["logp"] for r in base.filter(pl.col("question_id") == qid).to_dicts()}

        def sink_of(role: str) -> float:
            got = {r["answer_role"]: r["logp"] for r in answers.filter(
                (pl.col("question_id") == qid) & (pl.col("layer") == 16) & (pl.col("strength") == 5.0)
                & (pl.coalesce(pl.col("control_kind"), pl.col("role")) == role)).to_dicts()}
            return (got["related wrong"] - b["related wrong"]) - (got["unrelated wrong"] - b["unrelated wrong"])
        differences.append(sink_of("relevant") - sink_of("irrelevant"))
    expected = permutation_test((np.array(differences),), np.mean, permutation_type="samples", n_resamples=2 ** 4,
                                alternative="two-sided").pvalue
    assert test["p_value"] == pytest.approx(expected) and test["mean_difference"] == pytest.approx(np.mean(differences))


def test_the_report_prints_the_sink_line(sink_run):
    from click.testing import CliRunner

    from engram_eval.cli import cli

    report = CliRunner().invoke(cli, ["report", str(sink_run), "--format", "markdown"])
    assert report.exit_code == 0, report.output
    assert "semantic sink: related wrong answers rose +" in report.stdout and "nats more than unrelated ones" in report.stdout
    data = json.loads(CliRunner().invoke(cli, ["report", str(sink_run), "--format", "json"]).stdout)
    assert data["sink"]["by_kind"][0]["kind"] == "relevant"


def test_a_bank_without_unrelated_answers_measures_nothing(tmp_path):
    answers = pl.DataFrame({"run_id": ["r"] * 2, "question_id": ["q"] * 2, "context": [None, None], "engram": [None, "e"],
                            "role": ["baseline", "relevant"], "control_kind": [None, None], "paraphrase": [None, None],
                            "sample": [None, None], "layer": [None, 1], "strength": [None, 1.0], "chunks": [4, 4],
                            "repeated": [False, False], "scoring": ["first-token"] * 2, "variant": [" a", " a"],
                            "answer_role": ["correct", "correct"], "logp": [-1.0, -0.5]})
    assert sink_summary(answers) is None and sink_summary(None) is None


def test_bank_validate_refuses_an_unrelated_answer_that_does_not_tokenise_apart(tmp_path):
    from click.testing import CliRunner

    from engram_eval.cli import cli

    bank = tmp_path / "bad.yaml"
    bank.write_text("name: bad\nsources:\n  s: {text: 'alpha beta gamma delta epsilon'}\nquestions:\n"
                    "  - {id: q1, prompt: 'The capital of France is', correct: [' Paris'], incorrect: [' Lyon'], "
                    "incorrect_unrelated: [' Parisian'], engram: s, related_wrong: true}\n")
    result = CliRunner().invoke(cli, ["bank", "validate", str(bank), "--model", "smollm2-135m"])
    assert result.exit_code == 2 and result.stderr == (
        f"error: {bank}: question 'q1': correct ' Paris' and incorrect_unrelated ' Parisian' share their first token "
        "('ĠParis', id 7042), so first-token scoring cannot tell them apart\n")


def test_the_html_report_plots_the_three_deltas_per_kind(sink_run):
    from click.testing import CliRunner

    from engram_eval.cli import cli

    result = CliRunner().invoke(cli, ["report", str(sink_run), "--format", "html"])
    assert result.exit_code == 0, result.output
    page = (sink_run / "report.html").read_text()
    assert "id=\"sink-bars\"" in page and "Δ log p(related wrong)" in page and "Δ log p(unrelated wrong)" in page


def test_runs_side_by_side_carry_each_runs_sink(sink_run):
    from engram_eval.report.comparison import summarize_runs
    from engram_eval.report.summary import load_run

    comparison = summarize_runs([(str(sink_run), *load_run(sink_run)), (str(sink_run), *load_run(sink_run))])
    run = json.loads((sink_run / "run.json").read_text())
    expected = {k["kind"]: k["sink"] for k in sink_summary(load_answers(sink_run, run))["by_kind"]}
    assert comparison["runs"][0]["sink"] == expected == comparison["runs"][1]["sink"]


def test_the_findings_section_shows_the_measurement(sink_run):
    import sys

    from conftest import REPO, load_script

    sys.path.insert(0, str(REPO / "docs"))
    try:
        script = load_script("docs/findings_sink.py")
    finally:
        sys.path.remove(str(REPO / "docs"))
    text = "\n".join(script.section([("SmolLM2, constructed", str(sink_run))]))
    run = json.loads((sink_run / "run.json").read_text())
    from engram_eval.report.summary import load_run, summarize

    sink = summarize(*load_run(sink_run), answers=load_answers(sink_run, run))["sink"]
    for kind in sink["by_kind"]:
        row = f"| SmolLM2, constructed | {kind['kind']} | {kind['questions']} | {script.measured(kind['correct'])} |"
        assert row in text and script.measured(kind["sink"]) in text
    held, _ = script.holds(sink)
    assert ("A semantic sink, on this bank and model." in text) == held
    tests = [t for t in sink["tests"] if t["measure"] == "sink"]
    wins = sum(t["verdict"] == "relevant beats controls" for t in tests)
    assert f"In {wins} of {len(tests)} cell x control tests" in text


def test_the_side_rule_the_report_applies_is_each_scorings():
    from engram_eval.core.registry import SCORINGS
    from engram_eval.core.spec import LOGSUMEXP_SIDES

    logprobs = torch.tensor([[-1.0, -2.0, -0.5]])
    for name in SCORINGS:
        side = SCORINGS[name].side(logprobs)
        expected = torch.logsumexp(logprobs, dim=1) if name in LOGSUMEXP_SIDES else logprobs.max(dim=1).values
        assert torch.allclose(side, expected)


def test_the_sink_at_equal_dose_is_the_interpolated_difference(sink_run):
    from engram_eval.report.dose import at_dose
    from engram_eval.report.summary import load_run, summarize

    frame, run = load_run(sink_run)
    summary = summarize(frame, run, answers=load_answers(sink_run, run), doses=(0.2, 0.5, 1.0))
    assert max(e["questions"] for e in summary["sink"]["dose_matched"]) >= 2
    results = frame.filter(pl.col("role") != "baseline")
    answers = load_answers(sink_run, run)
    base = answers.filter(pl.col("role") == "baseline")
    for entry in summary["sink"]["dose_matched"]:
        differences = []
        for qid in QUESTIONS:
            b = {r["answer_role"]: r["logp"] for r in base.filter(pl.col("question_id") == qid).to_dicts()}
            per_layer = []
            for layer in (8, 16):
                values = {}
                for kind in ("relevant", entry["control"]):
                    is_kind = (pl.col("role") == "relevant") if kind == "relevant" else (pl.col("control_kind") == kind)
                    rows = results.filter((pl.col("question_id") == qid) & (pl.col("layer") == layer) & is_kind).sort("strength")
                    sinks = []
                    for strength in rows["strength"]:
                        got = {r["answer_role"]: r["logp"] for r in answers.filter(
                            (pl.col("question_id") == qid) & (pl.col("layer") == layer) & (pl.col("strength") == strength)
                            & (pl.coalesce(pl.col("control_kind"), pl.col("role")) == kind)).to_dicts()}
                        sinks.append((got["related wrong"] - b["related wrong"]) - (got["unrelated wrong"] - b["unrelated wrong"]))
                    values[kind], _ = at_dose(rows["strength"].to_list(), rows["kl_next"].cast(pl.Float64).to_list(), sinks, entry["dose"])
                if all(v is not None for v in values.values()):
                    per_layer.append(values["relevant"] - values[entry["control"]])
            if per_layer:
                differences.append(sum(per_layer) / len(per_layer))
        assert entry["questions"] == len(differences)
        if differences:
            assert entry["mean_difference"] == pytest.approx(sum(differences) / len(differences), abs=1e-9)


def test_a_vector_run_measures_the_sink_against_its_controls(real, sink_run, tmp_path):
    from engram_eval.core.spec import Execution, Observer, SweepSpec
    from engram_eval.engram.store import EngramStore
    from engram_eval.run.sweep import run_sweep
    from engram_eval.vectors.store import VectorStore
    from engram_eval.vectors.vector import SteeringVector
    from engram_eval.bank.banks import load_bank

    bank = load_bank(sink_run.parent / "sink.yaml")
    vector = SteeringVector({8: torch.randn(real.hidden_size, generator=torch.Generator().manual_seed(5)) * 4})
    VectorStore(tmp_path / "store").save("v", vector)
    stored = VectorStore(tmp_path / "store").load("v")
    spec = SweepSpec.build(layers=[8], strengths=[1.0, 4.0], chunks=1, injection="vector-add", scaling="coefficient", vector="v")
    run_sweep(real, bank, EngramStore(tmp_path / "store"), tmp_path / "run", spec, execution=Execution(),
              observer=Observer(progress=False), vector=stored)
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    sink = sink_summary(load_answers(tmp_path / "run", run))
    assert [k["kind"] for k in sink["by_kind"]] == ["relevant", "negated", "random-direction"]
    assert {t["control"] for t in sink["tests"]} == {"negated", "random-direction"}
