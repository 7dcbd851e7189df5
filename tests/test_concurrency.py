"""Concurrency and signals: one writer per run directory, unique temporaries, SIGTERM treated like Ctrl-C."""

import json
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from engram_eval.core.errors import EngramEvalError, Terminated
from engram_eval.core.files import atomic_write_text
from engram_eval.core.locks import FileLock, is_held, read_holder
from conftest import wait_for

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
GRID = ["--layers", "0-4", "--strengths", "0.5,1,2,3,4,5,6,8,10,12", "--chunks", "4", "--batch-size", "1", "--quiet"]

HOLD = """
import sys
from pathlib import Path
from engram_eval.core.locks import FileLock
with FileLock(Path(sys.argv[1]), "test"):
    print("held", flush=True)
    sys.stdin.read()
"""


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process holding the lock at `path` until release(it) (returns once it holds it): no clock decides when."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, env=ENV)
    assert process.stdout.readline().strip() == "held"
    return process


def release(holder: subprocess.Popen) -> None:
    holder.stdin.close()
    holder.wait()


def cli(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engram_eval.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env=ENV)


def test_a_held_lock_names_its_holder_and_wait_waits(tmp_path):
    path = tmp_path / ".lock"
    holder = hold_lock(path)
    assert is_held(path)
    with pytest.raises(EngramEvalError) as raised:
        FileLock(path, "run directory X", hint=", or pass --wait").acquire()
    message = str(raised.value)
    assert message.startswith(f"run directory X is being written by pid {holder.pid} on host {socket.gethostname()} since ")
    assert message.endswith(f"(lock {path}); wait for it to finish, or pass --wait")
    with pytest.raises(EngramEvalError) as checked:
        FileLock(path, "run directory X", hint=", or pass --wait").refuse_if_held()  # the same line, nothing taken
    assert str(checked.value) == message and is_held(path)
    said = []

    def waiting(message: str) -> None:  # the waiter says that it waits; only then does the holder let go
        said.append(message)
        release(holder)

    with FileLock(path, "run directory X", wait=True, on_message=waiting):
        assert holder.poll() is not None  # acquired only once the holder had finished
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert len(said) == 1
    assert said[0].startswith(f"waiting for pid {holder.pid} on host {socket.gethostname()} since ")
    assert said[0].endswith(", which is writing run directory X")
    assert not path.exists() and not is_held(path)  # released: the lock file is gone


def test_the_lock_of_a_killed_holder_is_taken_over_with_a_message(tmp_path):
    path = tmp_path / ".lock"
    holder = hold_lock(path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert path.exists() and not is_held(path)  # left behind, held by nobody
    said = []
    with FileLock(path, "run directory X", on_message=said.append):
        pass
    assert len(said) == 1 and said[0].startswith(f"took over the lock on run directory X left by pid {holder.pid} on host ")
    assert said[0].endswith("which no longer runs")


def write_many(path: str, tag: str, times: int, queue) -> None:
    errors = 0
    for i in range(times):
        try:
            atomic_write_text(Path(path), f"{tag} {i} " + "x" * 4000 + " end\n")
        except Exception:
            errors += 1
    queue.put(errors)


def test_two_processes_writing_one_path_never_collide_and_a_reader_never_sees_a_torn_file(tmp_path):
    target = tmp_path / "run.json"
    atomic_write_text(target, "start " + "x" * 4000 + " end\n")
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    writers = [context.Process(target=write_many, args=(str(target), tag, 400, queue)) for tag in "ab"]
    for writer in writers:
        writer.start()
    torn = reads = 0
    while any(w.is_alive() for w in writers):
        text = target.read_text()
        reads += 1
        torn += not text.endswith(" end\n")
    for writer in writers:
        writer.join()
    assert [queue.get(), queue.get()] == [0, 0] and torn == 0 and reads > 0
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]  # no temporary left behind


def test_a_second_sweep_into_a_running_run_directory_fails_naming_the_holder(tiny_model_dir, tiny_bank, tmp_path):
    def sweep_args(strengths: str) -> list:
        return ["sweep", tiny_bank, "--model", tiny_model_dir, "--layers", "0-4", "--strengths", strengths, "--chunks", "4",
                "--batch-size", "1", "--quiet", "--store", tmp_path / "store", "--out", tmp_path / "run"]

    first = subprocess.Popen([sys.executable, "-m", "engram_eval.cli", *map(str, sweep_args("0.5,1,2"))], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    lock = tmp_path / "run/.lock"
    # Held, and its holder written (flock comes a moment before the record): a pause between the two would leave a
    # lock that names no one, which is not what this test is about.
    assert wait_for(lambda: is_held(lock) and read_holder(lock).get("pid") == first.pid, first), first.stderr.read()
    first.send_signal(signal.SIGSTOP)  # paused while it holds the lock, however fast or slow this machine is
    try:
        second = cli(*sweep_args("1,5,20"), "--force", cwd=tmp_path)
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait() == 0, first.stderr.read()
    assert second.returncode == 2 and second.stderr.count("\n") == 1, second.stderr
    assert second.stderr.startswith(f"error: run directory {tmp_path / 'run'} is being written by pid {first.pid} on host ")
    run = json.loads((tmp_path / "run/run.json").read_text())
    frame = pl.read_parquet(tmp_path / "run/results.parquet")
    assert run["status"] == "complete" and sorted(frame["strength"].drop_nulls().unique()) == run["settings"]["strengths"]
    waited = cli(*sweep_args("1,5,20"), "--force", "--wait", cwd=tmp_path)
    assert waited.returncode == 0, waited.stderr
    assert sorted(pl.read_parquet(tmp_path / "run/results.parquet")["strength"].drop_nulls().unique()) == [1.0, 5.0, 20.0]


@pytest.mark.parametrize("command,signum", [("sweep", signal.SIGTERM), ("build", signal.SIGTERM), ("sweep", signal.SIGINT),
                                            ("build", signal.SIGINT), ("generate", signal.SIGTERM)])
def test_sigterm_stops_like_ctrl_c(tiny_model_dir, tiny_bank, tmp_path, command, signum):
    if command == "sweep":
        args = ["sweep", tiny_bank, "--model", tiny_model_dir, *GRID, "--store", tmp_path / "store", "--out", tmp_path / "run"]
        ready = lambda: len(list((tmp_path / "run/parts").glob("*.parquet"))) >= 1  # noqa: E731
    elif command == "generate":
        assert cli("sweep", tiny_bank, "--model", tiny_model_dir, "--layers", "1", "--strengths", "1,2", "--chunks", "4", "-q",
                   "--store", tmp_path / "store", "--out", tmp_path / "run", cwd=tmp_path).returncode == 0
        args = ["generate", tmp_path / "run", "--model", tiny_model_dir, "--cells", "all", "--max-new-tokens", "300",
                "--batch-size", "1", "-q"]
        ready = lambda: len(list((tmp_path / "run/generation-parts").glob("*.parquet"))) >= 1  # noqa: E731
    else:
        args = ["build", "--bank", tiny_bank, "--model", tiny_model_dir, "--chunks", "4", "--layers", "0-4", "--store", tmp_path / "store"]
        ready = lambda: (tmp_path / "store").exists()  # noqa: E731
    process = subprocess.Popen([sys.executable, "-m", "engram_eval.cli", *map(str, args)], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    wait_for(ready, process)
    process.send_signal(signum)
    code, stderr = process.wait(), process.stderr.read()
    if code == 0:
        pytest.skip("the command finished before the signal arrived")
    word, status = ("terminated", 143) if signum == signal.SIGTERM else ("interrupted", 130)
    assert code == status and "Traceback" not in stderr and stderr.strip().splitlines()[-1].startswith(word), stderr
    assert not list((tmp_path / "store").glob(".tmp-*"))
    if command == "generate":
        info = json.loads((tmp_path / "run/generation.json").read_text())
        assert info["status"] == "terminated" and "rerun the same command to resume" in stderr
        assert not (tmp_path / "run/.lock").exists()
    if command == "sweep":
        run = json.loads((tmp_path / "run/run.json").read_text())
        assert run["status"] == word and "resume with the same command" in stderr
        assert not (tmp_path / "run/.lock").exists()
        assert cli(*args, cwd=tmp_path).returncode == 0
        assert json.loads((tmp_path / "run/run.json").read_text())["status"] == "complete"


def test_generate_waits_for_the_writer_that_holds_its_run_directory(tiny_model_dir, tiny_bank, tmp_path):
    out = tmp_path / "run"
    assert cli("sweep", tiny_bank, "--model", tiny_model_dir, "--layers", "1", "--strengths", "1", "--chunks", "4",
               "--store", tmp_path / "store", "--out", out, "-q", cwd=tmp_path).returncode == 0
    holder = hold_lock(out / ".lock")
    refused = cli("generate", out, "--model", tiny_model_dir, "--max-new-tokens", "2", "-q", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.startswith(
        f"error: run directory {out} is being written by pid {holder.pid} on host "), refused.stderr
    assert not (out / "generation.json").exists()
    waiter = subprocess.Popen([sys.executable, "-m", "engram_eval.cli", "generate", str(out), "--model", str(tiny_model_dir),
                               "--max-new-tokens", "2", "-q", "--wait"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env=ENV)
    said = waiter.stderr.readline()  # the holder lets go only once the waiter has said that it waits
    assert said.startswith(f"warning: waiting for pid {holder.pid} on host "), said + waiter.stderr.read()
    assert waiter.poll() is None and not (out / "generation.json").exists()
    release(holder)
    assert waiter.wait() == 0, waiter.stderr.read()
    assert json.loads((out / "generation.json").read_text())["status"] == "complete"


@pytest.mark.parametrize("interrupt,code,word", [(KeyboardInterrupt, 130, "interrupted"), (Terminated, 143, "terminated")])
def test_ctrl_c_or_sigterm_while_the_model_loads_is_one_line(tmp_path, monkeypatch, interrupt, code, word):
    from click.testing import CliRunner

    import engram_eval.backend.model as model_module
    from engram_eval.cli import cli as command_line

    def loading(*args, **kwargs):
        raise interrupt()

    monkeypatch.setattr(model_module, "load_model", loading)
    source = tmp_path / "s.txt"
    source.write_text("alpha")
    for args in (["build", str(source), "--store", str(tmp_path / "store")],
                 ["sweep", str(REPO / "questions/medical_traps.yaml"), "--out", str(tmp_path / "run"), "-q"]):
        result = CliRunner().invoke(command_line, args, catch_exceptions=False)
        assert result.exit_code == code and result.stderr == f"{word}\n" and "Traceback" not in result.output, result.output
    assert not (tmp_path / "store").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_the_moment_a_temporary_is_created_leaves_no_temporary(tmp_path, monkeypatch, signum):
    """The signal arrives right after the temporary exists (where the build's SIGTERM test once hit), with another
    thread alive, as in a full run (polars' and torch's pools): the kernel may hand the signal to that thread, and the
    handler still raises in the main one. The temporary is removed either way."""
    import threading

    from engram_eval.core import files
    from engram_eval.core.errors import Terminated, raise_terminated

    real_create = files.create_exclusive
    created = []

    def create_then_signal(path):
        real_create(path)
        created.append(path)
        os.kill(os.getpid(), signum)
        time.sleep(0.5)  # the handler runs here at the latest

    stop_waiting = threading.Event()
    bystander = threading.Thread(target=stop_waiting.wait, daemon=True)
    bystander.start()
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    monkeypatch.setattr(files, "create_exclusive", create_then_signal)
    written = []
    try:
        with pytest.raises(Terminated if signum == signal.SIGTERM else KeyboardInterrupt):
            files.atomic_write_text(tmp_path / "out.txt", "text")
            written.append(True)
    finally:
        signal.signal(signal.SIGTERM, previous)
        stop_waiting.set()
        bystander.join()
    assert created and not written and list(tmp_path.iterdir()) == []
