import json

import polars as pl
import pytest

import engram_eval.run.sweep as sweep_module
from engram_eval.core.errors import EngramEvalError
from engram_eval.run.rundir import RESULTS_FORMAT
from conftest import sweep
from engram_eval.report.summary import load_run, summarize
from engram_eval.report.rendering import render_markdown


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
    stopped = json.loads((tmp_path / "cut/run.json").read_text())
    assert (stopped["status"], stopped["questions_done"]) == ("interrupted", 1)
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


def stop_after_first_question(monkeypatch, exception: BaseException) -> None:
    real_score = sweep_module.score_cells
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise exception
        return real_score(*args, **kwargs)

    monkeypatch.setattr(sweep_module, "score_cells", failing)


def test_a_failed_run_says_so_with_the_reason(tiny, tiny_bank, tmp_path, monkeypatch):
    stop_after_first_question(monkeypatch, RuntimeError("device lost\nsecond line"))
    with pytest.raises(RuntimeError):
        sweep(tiny, tiny_bank, tmp_path / "run")
    stopped = json.loads((tmp_path / "run/run.json").read_text())
    assert (stopped["status"], stopped["reason"], stopped["questions_done"]) == ("failed", "RuntimeError: device lost second line", 1)


def test_report_on_an_unfinished_run_covers_the_finished_questions_under_a_banner(tiny, tiny_bank, tmp_path, monkeypatch):
    stop_after_first_question(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        sweep(tiny, tiny_bank, tmp_path / "run")
    frame, run = load_run(tmp_path / "run")
    assert run["partial"] == {"questions_done": 1, "questions": 3}
    assert frame.equals(pl.read_parquet(tmp_path / "run/parts/00000-q1.parquet"))
    markdown = render_markdown(summarize(frame, run))
    assert "> **partial: 1 of 3 questions (the sweep has not finished; rerun it with the same command to complete the run)**" in markdown


def test_force_with_other_settings_removes_everything_derived_from_the_old_run(tiny, tiny_bank, tmp_path):
    out = tmp_path / "run"
    sweep(tiny, tiny_bank, out)
    (out / "report.html").write_text("old")
    (out / "generations.parquet").write_text("old")
    (out / "generation-parts").mkdir()
    (out / "generation-parts/00000-q1.parquet").write_text("old")
    (out / "notes.txt").write_text("mine")
    sweep(tiny, tiny_bank, out, strengths=[2.0], force=True)
    assert sorted(p.name for p in out.iterdir()) == ["answers.parquet", "notes.txt", "parts", "results.parquet", "run.json"]
    assert pl.read_parquet(out / "answers.parquet")["strength"].drop_nulls().unique().to_list() == [2.0]  # the new run's


def test_an_unreadable_run_json_is_named_as_run_json(tiny, tiny_bank, tmp_path):
    out = tmp_path / "run"
    sweep(tiny, tiny_bank, out)
    (out / "run.json").write_text("{not json")
    with pytest.raises(EngramEvalError) as error:
        load_run(out)
    assert str(error.value).startswith(f"{out / 'run.json'}: unreadable run.json (")
    with pytest.raises(EngramEvalError) as error:
        sweep(tiny, tiny_bank, out)
    assert str(error.value) == (f"{out / 'run.json'}: unreadable run.json; rerun with --force to rewrite it: the parts "
                                "computed with the same settings are kept, the rest recomputed")
    forced = sweep(tiny, tiny_bank, out, force=True).run
    assert forced["status"] == "complete" and forced["cells"]["computed"] == 0


def test_parts_of_another_results_format_are_not_resumed(tiny, tiny_bank, tmp_path):
    out = tmp_path / "run"
    sweep(tiny, tiny_bank, out)
    run = json.loads((out / "run.json").read_text())
    del run["results_format"]  # as engram-eval 0.1.0 wrote it
    (out / "run.json").write_text(json.dumps(run))
    with pytest.raises(EngramEvalError) as error:
        sweep(tiny, tiny_bank, out)
    assert str(error.value) == (f"--out {out} holds parts written by another engram-eval version (results format unrecorded, "
                                f"now {RESULTS_FORMAT}); use --force to recompute the run")


def test_report_and_generate_refuse_a_run_of_another_results_format(tiny, tiny_bank, tmp_path):
    from engram_eval.run.generation import run_generate

    out = tmp_path / "run"
    sweep(tiny, tiny_bank, out)
    run = json.loads((out / "run.json").read_text())
    run["results_format"] = "0ld"
    (out / "run.json").write_text(json.dumps(run))
    message = f"{out} was written by another engram-eval version (results format 0ld, now {RESULTS_FORMAT}); rerun its sweep with --force"
    for call in (lambda: load_run(out), lambda: run_generate(tiny, out, progress=False)):
        with pytest.raises(EngramEvalError) as error:
            call()
        assert str(error.value) == message
