"""The typed summary (engram_eval.summarize): its frames recounted from the results rows, its JSON valid against the
checked-in schema, and summarize(RUN) the same as the CLI's report of that run."""

from __future__ import annotations

import json

import jsonschema
import polars as pl
import pytest
from decisive import (every_section_answers, every_section_frame, every_section_generations, every_section_run_with_probe,
                      every_section_side_effects)

import engram_eval
from engram_eval.report.rendering import render_json
from engram_eval.report.run_summary import SCHEMA_PATH, SCHEMA_VERSION, Rate, RunSummary
from engram_eval.report.summary import per_condition, summarize
from engram_eval.run.results import primary_rows

SCHEMA = json.loads(SCHEMA_PATH.read_text())


@pytest.fixture(scope="module")
def every_section() -> tuple[pl.DataFrame, RunSummary]:
    frame = every_section_frame()
    return frame, summarize(frame, every_section_run_with_probe(), generations=every_section_generations(), split=1,
                            side_effects=every_section_side_effects(frame), answers=every_section_answers(frame))


def test_the_schema_is_valid_and_versioned_with_the_summary():
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    assert SCHEMA["properties"]["schema_version"] == {"const": SCHEMA_VERSION}
    assert f"schema version {SCHEMA_VERSION}" in SCHEMA["title"]


def test_the_json_of_every_section_and_of_a_real_sweep_is_valid_against_the_schema(every_section, run):
    for summary in (every_section[1], summarize(*run)):
        page = json.loads(render_json(summary))
        jsonschema.validate(page, SCHEMA, cls=jsonschema.Draft202012Validator)
        assert page["schema_version"] == SCHEMA_VERSION
    broken = json.loads(render_json(every_section[1]))
    del broken["headline"]["by_kind"][0]["verdict"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA, cls=jsonschema.Draft202012Validator)


def test_the_frames_recount_the_results_rows(every_section):
    frame, summary = every_section
    rows = per_condition(frame.filter(primary_rows()))
    assert summary.cells.equals(rows)
    relevant = rows.filter(pl.col("role") == "relevant")
    flips = dict(relevant.group_by("question_id").agg(pl.col("flipped").sum()).iter_rows())
    breaks = dict(relevant.group_by("question_id").agg(pl.col("broken").sum()).iter_rows())
    questions = summary.questions
    assert questions["question_id"].to_list() == [q["question_id"] for q in summary["questions"]]
    assert dict(zip(questions["question_id"], questions["flips"])) == flips
    assert dict(zip(questions["question_id"], questions["breaks"])) == breaks
    best = relevant.sort("ratio", descending=True).group_by("question_id", maintain_order=True).first()
    assert dict(zip(questions["question_id"], questions["best_ratio"])) == dict(zip(best["question_id"], best["ratio"]))
    by_kind = summary.headline.by_kind
    for kind in by_kind["kind"]:
        cells = relevant if kind == "relevant" else rows.filter(pl.col("control_kind") == kind)
        wrong = cells.filter(~pl.col("correct_before")).group_by("question_id").agg(pl.col("flipped").any())
        row = by_kind.filter(pl.col("kind") == kind).row(0, named=True)
        assert (row["question_flip_rate_k"], row["question_flip_rate_n"]) == (wrong["flipped"].sum(), wrong.height)
    assert by_kind["kind"][0] == "relevant" and set(by_kind["kind"][1:]) == set(summary.controls["kind"])
    assert summary.headline.question_flip_rate == Rate.of(summary["headline"]["question_flip_rate"])
    shares = summary["header"]["largest_chunk_share"]
    assert {(r["engram"], r["layer"]): r["largest_chunk_share"] for r in summary.chunk_dominance.iter_rows(named=True)} == \
        {(name, int(layer)): share for name, by_layer in shares.items() for layer, share in by_layer.items()}
    tested = summary.controls.select("kind", "p_value", "verdict").to_dicts()
    assert tested == [{k: c[k] for k in ("kind", "p_value", "verdict")} for c in summary["controls"]]


def test_every_typed_section_is_filled_from_its_record(every_section):
    _, summary = every_section
    assert summary.side_effects.dose == "neutral_kl" and summary.side_effects.by_cell.height > 0
    assert summary.side_effects.tests.height == len(summary["dose_matched"]["entries"])
    assert summary.calibration.signals["name"].to_list() == [s["name"] for s in summary["calibration"]["signals"]]
    assert summary.generation.texts.height == len(summary["generation"]["texts"])
    assert summary.generation.confusion.filter(pl.col("probability") == "correct").row(0, named=True)["correct"] == \
        summary["generation"]["confusion"]["correct"]["correct"]
    assert summary.sink.by_kind["sink_mean"].to_list() == [k["sink"]["mean"] for k in summary["sink"]["by_kind"]]
    assert summary.header.questions == summary["header"]["questions"] and summary.header.subject == "the relevant engram"


def test_summarize_a_run_directory_reads_what_the_report_command_reads(tmp_path):
    from click.testing import CliRunner

    from engram_eval.cli import cli
    from engram_eval.run.rundir import RESULTS_FORMAT

    from decisive import decisive_frame, decisive_run

    out = tmp_path / "run"
    out.mkdir()
    decisive_frame().write_parquet(out / "results.parquet")
    (out / "run.json").write_text(json.dumps({**decisive_run(), "results_format": RESULTS_FORMAT, "num_layers": 4}))
    summary = engram_eval.summarize(out)
    assert isinstance(summary, RunSummary)
    run_json = json.loads((out / "run.json").read_text())
    assert rounded(summary.record) == rounded(summarize(pl.read_parquet(out / "results.parquet"), run_json).record)
    printed = json.loads(CliRunner().invoke(cli, ["report", str(out), "--format", "json"]).output)
    assert rounded({k: v for k, v in printed.items() if k != "sections"}) == \
        rounded(json.loads(json.dumps(summary.to_dict(), default=str)))


def rounded(value):
    """Floats to 12 significant digits: polars may sum the same rows in another order (the last bit of a mean moves)."""
    if isinstance(value, float):
        return float(f"{value:.12g}")
    if isinstance(value, dict):
        return {k: rounded(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [rounded(v) for v in value]
    return value
