import polars as pl
import pytest

import engram_eval.sweep as sweep_module
from engram_eval.errors import EngramEvalError
from conftest import sweep


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
