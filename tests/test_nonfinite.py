"""Non-finite numbers and edited metadata are refused in one line, never passed on as UNSCORABLE cells."""

import hashlib
import json
import math

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import engram_eval.run.sweep as sweep_module
import engram_eval.engram.store as store_module
from engram_eval.bank.banks import load_bank
from engram_eval.cli import cli
from engram_eval.core.errors import EngramEvalError
from engram_eval.engram.store import EngramStore
from conftest import flat_sweep


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def one_line(result) -> str:
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.stderr.count("\n") == 1, result.stderr
    return result.stderr.removeprefix("error: ").strip()


def rewrite(path, arrays: dict, metadata: dict) -> None:
    """A store file as a tamperer writes it: new arrays, the checksum recomputed (name, shape, raw bytes, in order)."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(f"{name}:{tuple(arrays[name].shape)}".encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    save_file(arrays, str(path), metadata={**metadata, "tensors_sha256": digest.hexdigest()})


@pytest.fixture
def built(tiny_model_dir, tiny_bank, tmp_path):
    result = run("build", "--bank", tiny_bank, "--model", tiny_model_dir, "--chunks", "4", "--layers", "1", "--store", tmp_path / "store")
    assert result.exit_code == 0, result.output
    path = next((tmp_path / "store").glob("topic.*.safetensors"))
    with safe_open(str(path), framework="numpy") as f:
        metadata = f.metadata()
    return path, load_file(str(path)), metadata


@pytest.mark.parametrize("damage,why", [
    (lambda v: v.__setitem__((2, 3), np.nan), "layer 1 holds a non-finite value (NaN or inf)"),
    (lambda v: v.__setitem__((0, 0), np.inf), "layer 1 holds a non-finite value (NaN or inf)"),
    (lambda v: v.__setitem__(1, 0.0), "layer 1 has an all-zero chunk (norm 0)"),
])
def test_a_nan_inf_or_zero_engram_is_refused_by_sweep_and_store_show(built, tiny_model_dir, tiny_bank, tmp_path, damage, why):
    path, arrays, metadata = built
    damage(arrays["layer.1"])
    rewrite(path, arrays, metadata)
    expected = (f"store file {path} is unusable: {why}; remove it with `engram-eval store rm {path.name.split('.')[1]} "
                f"--store {tmp_path / 'store'}` (the next build or sweep rebuilds it)")
    swept = run("sweep", tiny_bank, "--model", tiny_model_dir, "--chunks", "4", "--layers", "1", "--strengths", "1",
                "--store", tmp_path / "store", "--out", tmp_path / "run", "--quiet")
    assert one_line(swept) == expected
    assert not (tmp_path / "run/results.parquet").exists()
    assert one_line(run("store", "show", path.name, "--store", tmp_path / "store")) == expected


@pytest.mark.parametrize("edit,problem", [
    ({"n_tokens": "many"}, "its metadata's 'n_tokens' is 'many', not a count"),
    ({"truncated": None}, "its metadata lacks 'truncated'"),
    ({"chunks": "8"}, "layer 1 has 4 rows, not its 8 chunks"),
    ({"layers": "1,2"}, "its metadata lists layers 1,2, its tensors [1]"),
])
def test_edited_store_metadata_is_one_line_with_the_rm_hint(built, tmp_path, edit, problem):
    path, arrays, metadata = built
    edited = {k: v for k, v in {**metadata, **edit}.items() if v is not None}
    rewrite(path, arrays, {k: v for k, v in edited.items() if k != "tensors_sha256"})
    message = one_line(run("store", "show", path.name, "--store", tmp_path / "store"))
    assert message == (f"store file {path} is unusable: {problem}; remove it with `engram-eval store rm "
                       f"{path.name.split('.')[1]} --store {tmp_path / 'store'}` (the next build or sweep rebuilds it)")
    removed = run("store", "rm", path.name.split(".")[1], "--store", tmp_path / "store")
    assert removed.exit_code == 0 and not path.exists()


def test_a_strength_that_overflows_float32_is_refused_before_any_work(tiny_model_dir, tiny_bank, tmp_path):
    with np.errstate(over="ignore"):
        assert math.isfinite(1e39) and not np.isfinite(np.float32(1e39))
    result = run("sweep", tiny_bank, "--model", tiny_model_dir, "--chunks", "4", "--layers", "1", "--strengths", "1,1e39",
                 "--store", tmp_path / "store", "--out", tmp_path / "run", "--quiet")
    message = one_line(result)
    assert message.startswith("--strengths: strength 1e+39 times the embedding norm (") and "overflows float32" in message
    assert not (tmp_path / "run").exists() and not (tmp_path / "store").exists()


def test_a_non_finite_probability_fails_its_question_by_name(tiny, tiny_bank, tmp_path, monkeypatch):
    real = sweep_module.score_cells

    def overflowing(lm, prepared, cells, *args, **kwargs):
        scores, size = real(lm, prepared, cells, *args, **kwargs)
        if prepared.question.id == "q2":
            scores["logp_correct"][3] = float("nan")
        return scores, size

    monkeypatch.setattr(sweep_module, "score_cells", overflowing)
    with pytest.raises(EngramEvalError) as raised:
        flat_sweep(tiny, load_bank(tiny_bank), EngramStore(tmp_path / "s"), tmp_path / "run", layers=[1], strengths=[1.0, 2.0],
                   chunks=4, progress=False)
    assert str(raised.value).startswith("question 'q2': 1 row(s) have non-finite probabilities, the first at engram ")
    run_json = json.loads((tmp_path / "run/run.json").read_text())
    assert run_json["status"] == "failed" and run_json["reason"].startswith("question 'q2'")
    assert not (tmp_path / "run/results.parquet").exists()
    assert [p.name for p in (tmp_path / "run/parts").iterdir()] == ["00000-q1.parquet"]  # q1 kept; q2 is no case
    assert pl.read_parquet(tmp_path / "run/parts/00000-q1.parquet")["case"].drop_nulls().ne("UNSCORABLE").all()


def test_build_refuses_an_engram_the_model_made_non_finite(tiny, tmp_path, monkeypatch):
    real = store_module.extract_engrams

    def overflowing(*args, **kwargs):
        built = real(*args, **kwargs)
        for engram in built.values():
            for layer, vectors in engram.layers.items():
                engram.layers[layer] = vectors.clone()
                engram.layers[layer][0, 0] = float("inf")
        return built

    monkeypatch.setattr(store_module, "extract_engrams", overflowing)
    store = EngramStore(tmp_path / "store")
    with pytest.raises(EngramEvalError) as raised:
        store.ensure(tiny, "topic", "alpha first", layers=[1], chunks=4)
    path = store.paths()[0] if store.paths() else None
    assert path is None
    assert str(raised.value).startswith("source 'topic': its engram cannot be used (layer 1 holds a non-finite value (NaN or inf)); "
                                        f"nothing written to {tmp_path / 'store'}/topic.")
