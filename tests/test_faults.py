"""Faults: kill -9 during build and sweep, concurrent builds, failed writes."""

import errno
import json
import re
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

import engram_eval.engram.store as store_module
from engram_eval.bank.banks import load_bank
from engram_eval.core.errors import EngramEvalError
from engram_eval.engram.store import EngramStore
from conftest import flat_sweep, wait_for

REPO = Path(__file__).resolve().parents[1]
GRID = ["--layers", "0-4", "--strengths", "0.5,1,1.5,2,3,4,5,6,8,10", "--chunks", "4", "--batch-size", "1", "--quiet"]


def command(*args) -> list[str]:
    return [sys.executable, "-m", "engram_eval.cli", *map(str, args)]


def run_to_end(args, cwd) -> None:
    subprocess.run(command(*args), cwd=cwd, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(REPO)})


def kill_when(args, cwd, ready, delay: float = 0.0) -> bool:
    """Start the command, SIGKILL it `delay` seconds after ready(pid) first holds -> whether it was still running."""
    process = subprocess.Popen(command(*args), cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    wait_for(lambda: ready(process.pid), process)
    time.sleep(delay)
    running = process.poll() is None
    process.send_signal(signal.SIGKILL)
    process.wait()
    return running


def count(folder: Path, pattern: str) -> int:
    return len(list(folder.glob(pattern))) if folder.exists() else 0


def test_sweep_killed_at_several_points_ends_identical(tiny_model_dir, tiny_bank, tmp_path):
    whole = [tiny_bank, "--model", tiny_model_dir, *GRID, "--store", tmp_path / "store-a", "--out", tmp_path / "whole"]
    run_to_end(["sweep", *whole], tmp_path)
    cut = [tiny_bank, "--model", tiny_model_dir, *GRID, "--store", tmp_path / "store-b", "--out", tmp_path / "cut"]
    store, parts = tmp_path / "store-b", tmp_path / "cut/parts"
    kill_points = [  # mid-build, just after the first part, just after the second part
        (lambda pid: count(store, "*.safetensors") >= 1, 0.0),
        (lambda pid: count(parts, "*.parquet") >= 1, 0.0),
        (lambda pid: count(parts, "*.parquet") >= 2, 0.0),
    ]
    killed_while_running = [kill_when(["sweep", *cut], tmp_path, ready, delay) for ready, delay in kill_points]
    assert killed_while_running == [True] * 3
    for path in EngramStore(store).paths():
        EngramStore(store).load(path)  # verifies the checksum
    assert count(parts, "*.parquet") == 2 and not (tmp_path / "cut/results.parquet").exists()
    run_to_end(["sweep", *cut], tmp_path)
    key = ["question_id", "role", "engram", "layer", "strength"]
    expected = pl.read_parquet(tmp_path / "whole/results.parquet").drop("engram_key").sort(key, nulls_last=True)
    got = pl.read_parquet(tmp_path / "cut/results.parquet").drop("engram_key").sort(key, nulls_last=True)
    assert got.equals(expected)


def many_sources_bank(folder: Path, n: int = 40) -> Path:
    """A bank whose build takes long enough (n sources) that a kill lands while it still runs, even on a busy machine."""
    sources = "\n".join(f'  s{i}: {{text: "Source {i}: alpha blockers first, then beta blockers. {"more words " * i}"}}' for i in range(n))
    path = folder / "many.yaml"
    path.write_text(f"name: many\nsources:\n{sources}\nquestions:\n  - {{id: q, prompt: 'The drug is', correct: [' alpha'], "
                    "incorrect: [' beta'], engram: s0, controls: [s1]}\n")
    return path


def test_build_killed_at_several_points_leaves_no_partial_files(tiny_model_dir, tmp_path):
    bank = many_sources_bank(tmp_path)
    args = ["build", "--bank", bank, "--model", tiny_model_dir, "--chunks", "4", "--store", tmp_path / "store"]
    run_to_end([*args[:-1], tmp_path / "reference"], tmp_path)
    folder = tmp_path / "store"
    kill_points = [  # after the first file, in the middle of a write (a temporary file exists), just after one
        (lambda pid: count(folder, "*.safetensors") >= 1, 0.0),
        (lambda pid: count(folder, f".tmp-{pid}-*") >= 1, 0.0),
        (lambda pid: count(folder, f".tmp-{pid}-*") >= 1, 0.001),
    ]
    assert [kill_when([*args, "--force"], tmp_path, ready, delay) for ready, delay in kill_points] == [True] * 3
    store = EngramStore(folder)
    for path in store.paths():
        store.load(path)
    run_to_end(args, tmp_path)
    assert not list((tmp_path / "store").glob(".tmp-*"))  # a later write removed what killed writers left
    reference = {p.name: EngramStore(p.parent).load(p).engram.layers for p in EngramStore(tmp_path / "reference").paths()}
    built = {p.name: EngramStore(p.parent).load(p).engram.layers for p in EngramStore(tmp_path / "store").paths()}
    assert reference.keys() == built.keys() and len(built) == 40
    assert all(all((built[n][l] == reference[n][l]).all() for l in reference[n]) for n in reference)


def test_two_concurrent_builds_never_corrupt_the_store(tiny_model_dir, tiny_bank, tmp_path):
    args = ["build", "--bank", tiny_bank, "--model", tiny_model_dir, "--chunks", "4", "--store", tmp_path / "store", "--force"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    processes = [subprocess.Popen(command(*args), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    assert [p.wait() for p in processes] == [0, 0]
    store = EngramStore(tmp_path / "store")
    assert len(store.paths()) == 4 and not list((tmp_path / "store").glob(".tmp-*"))
    for path in store.paths():
        store.load(path)


def safetensors_disk_full() -> Exception:
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")


@pytest.mark.parametrize("error,expected", [
    (lambda: OSError(errno.ENOSPC, "No space left on device"), "no space left on {folder}"),
    (safetensors_disk_full, "no space left on {folder}"),
    (lambda: OSError(errno.EACCES, "Permission denied"), "cannot write {path} (Permission denied)"),
])
def test_failed_store_write_is_clear_and_keeps_earlier_files(tiny, tmp_path, monkeypatch, error, expected):
    store = EngramStore(tmp_path)
    first, _ = store.ensure(tiny, "topic", "alpha first", layers=[1], chunks=4)
    before = first.path.read_bytes()

    def failing_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise error()

    monkeypatch.setattr(store_module, "save_file", failing_save)
    with pytest.raises(EngramEvalError) as raised:
        store.ensure(tiny, "topic", "alpha first", layers=[1], chunks=4, force=True)
    assert str(raised.value) == f"store: {expected.format(folder=tmp_path, path=first.path)}; earlier files are intact"
    assert first.path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [first.path.name]


@pytest.mark.parametrize("error", [lambda: OSError(errno.ENOSPC, "No space left on device"),
                                   lambda: pl.exceptions.ComputeError("failed to write: No space left on device (os error 28)")])
def test_failed_results_write_is_clear_and_resumable(tiny, tiny_bank, tmp_path, monkeypatch, error):
    def no_space(self, path, *args, **kwargs):
        Path(path).write_bytes(b"PAR1 half")
        raise error()

    monkeypatch.setattr(pl.DataFrame, "write_parquet", no_space)
    with pytest.raises(EngramEvalError) as raised:
        flat_sweep(tiny, load_bank(tiny_bank), EngramStore(tmp_path / "s"), tmp_path / "run", layers=[1], strengths=[1.0], chunks=4, progress=False)
    assert str(raised.value) == f"no space left on {tmp_path / 'run/parts'}; finished questions are kept, rerun to resume"
    assert json.loads((tmp_path / "run/run.json").read_text())["status"] == "failed"
    assert [p.name for p in (tmp_path / "run/parts").iterdir()] == []  # no temporary left behind
    monkeypatch.undo()
    result = flat_sweep(tiny, load_bank(tiny_bank), EngramStore(tmp_path / "s"), tmp_path / "run", layers=[1], strengths=[1.0], chunks=4, progress=False)
    assert pl.read_parquet(result.results_path).height == 3 * 5


def test_bank_yaml_cannot_construct_python_objects(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text('name: !!python/object/apply:os.system ["echo pwned"]\nsources: {}\nquestions: []\n')
    with pytest.raises(EngramEvalError) as error:
        load_bank(path)
    assert str(error.value).startswith(f"{path}:1:7: YAML error: could not determine a constructor for the tag")


def test_package_never_unpickles_or_builds_shell_commands():
    files = sorted((REPO / "engram_eval").rglob("*.py"))
    assert REPO / "engram_eval/cli/sweep.py" in files  # every subfolder, the command line's included
    source = "\n".join(p.read_text() for p in files)
    for forbidden in ("import pickle", "shell=True", "os.system", "yaml.unsafe_load", "trust_remote_code=True"):
        assert forbidden not in source, forbidden
    calls = re.findall(r"torch\.load\(([^)]*)\)", source)  # .pt vector files: tensors and plain containers only
    assert calls and all("weights_only=True" in arguments for arguments in calls), calls
    assert not re.search(r"(?<![.\w])(eval|exec)\(", source)  # model.eval() is fine; builtin eval/exec are not


def test_ctrl_c_prints_how_to_resume_exits_130_and_records_interrupted(tiny_model_dir, tiny_bank, tmp_path):
    out = tmp_path / "run"
    args = ["sweep", tiny_bank, "--model", tiny_model_dir, *GRID, "--store", tmp_path / "store", "--out", out]
    process = subprocess.Popen(command(*args), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
    wait_for(lambda: count(out / "parts", "*.parquet") >= 1, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate()
    run = json.loads((out / "run.json").read_text())
    done = count(out / "parts", "*.parquet")
    assert process.returncode == 130 and run["status"] == "interrupted" and run["questions_done"] == done < 3
    assert stderr.splitlines()[-1] == (f"interrupted: {done} of 3 questions are finished and kept in {out}; resume with the "
                                       f"same command: engram-eval {' '.join(map(str, args))}")
    assert "Traceback" not in stderr
    run_to_end(args, tmp_path)
    assert json.loads((out / "run.json").read_text())["status"] == "complete"
