"""Checksummed Parquet: a flipped byte is named, a corrupt or truncated part is computed again, a lost run.json keeps
the parts of the same settings, and gc spares what a running sweep uses."""

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from click.testing import CliRunner
from safetensors import safe_open

from engram_eval.cli import cli

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def swept(tiny_model_dir, tiny_bank, tmp_path):
    args = ["sweep", tiny_bank, "--model", tiny_model_dir, "--layers", "1,2", "--strengths", "1,5", "--chunks", "4",
            "--store", tmp_path / "store", "--out", tmp_path / "run", "--quiet"]
    result = run(*args)
    assert result.exit_code == 0, result.output
    return tmp_path / "run", args


def test_run_json_records_every_part_and_the_merged_file(swept):
    out, _ = swept
    recorded = json.loads((out / "run.json").read_text())
    parts = sorted((out / "parts").glob("*.parquet"))
    assert recorded["part_sha256"] == {part.name: sha256(part) for part in parts} and len(parts) == 3
    assert recorded["results_sha256"] == sha256(out / "results.parquet")


@pytest.mark.parametrize("where", [0.2, 0.5, 0.8])
def test_a_flipped_byte_in_results_is_named_by_report_check_and_generate(swept, tiny_model_dir, tmp_path, where):
    out, _ = swept
    results = out / "results.parquet"
    flip(results, int(results.stat().st_size * where))
    expected = (f"error: {results}: checksum mismatch with {out / 'run.json'} (the file changed after it was written); "
                "rerun the sweep's command to merge it again from its parts\n")
    for args in (("report", out), ("report", out, "--format", "json"), ("check", out, "--baseline", tmp_path / "b.json", "--update"),
                 ("generate", out, "--model", tiny_model_dir, "--quiet")):
        result = run(*args)
        assert result.exit_code == 2 and result.stderr == expected, (args, result.output)
    assert not (tmp_path / "b.json").exists() and not (out / "generations.parquet").exists()


def test_a_corrupt_or_truncated_part_is_computed_again_on_resume(swept):
    out, args = swept
    reference = pl.read_parquet(out / "results.parquet").drop("run_id")
    parts = sorted((out / "parts").glob("*.parquet"))
    flip(parts[0], parts[0].stat().st_size // 2)
    parts[2].write_bytes(parts[2].read_bytes()[:100])
    (out / "results.parquet").unlink()
    resumed = run(*args)
    assert resumed.exit_code == 0, resumed.output
    assert f"warning: {parts[0]}: checksum mismatch (corrupt); computing it again" in resumed.stderr
    assert f"warning: {parts[2]}: checksum mismatch (corrupt); computing it again" in resumed.stderr
    cells = json.loads((out / "run.json").read_text())["cells"]
    per_question = reference.height // 3
    assert cells["computed"] == 2 * per_question and cells["resumed"] == per_question
    assert pl.read_parquet(out / "results.parquet").drop("run_id").equals(reference)


def test_a_part_not_recorded_is_computed_again(swept):
    out, args = swept
    recorded = json.loads((out / "run.json").read_text())
    del recorded["part_sha256"]["00001-q2.parquet"]  # the writer died between the part and run.json
    (out / "run.json").write_text(json.dumps(recorded))
    resumed = run(*args)
    assert resumed.exit_code == 0 and "checksum mismatch" not in resumed.stderr, resumed.output
    cells = json.loads((out / "run.json").read_text())["cells"]
    assert cells["computed"] == cells["total"] // 3


def test_an_unreadable_run_json_offers_the_way_that_keeps_the_parts(swept):
    out, args = swept
    reference = pl.read_parquet(out / "results.parquet")
    (out / "run.json").write_text("{ not json")
    refused = run(*args)
    assert refused.exit_code == 2 and refused.stderr == (
        f"error: {out / 'run.json'}: unreadable run.json; rerun with --force to rewrite it: the parts computed with the "
        "same settings are kept, the rest recomputed\n")
    forced = run(*args, "--force")
    assert forced.exit_code == 0, forced.output
    assert "kept 3 part(s) computed with these settings" in forced.stderr
    cells = json.loads((out / "run.json").read_text())["cells"]
    assert cells["computed"] == 0 and cells["resumed"] == cells["total"] == reference.height
    assert pl.read_parquet(out / "results.parquet").equals(reference)


def test_a_flipped_byte_in_generations_is_named_by_report(swept, tiny_model_dir):
    out, _ = swept
    assert run("generate", out, "--model", tiny_model_dir, "--max-new-tokens", "3", "--quiet").exit_code == 0
    info = json.loads((out / "generation.json").read_text())
    generations = out / "generations.parquet"
    assert info["generations_sha256"] == sha256(generations)
    assert set(info["part_sha256"]) == {p.name for p in (out / "generation-parts").glob("*.parquet")}
    flip(generations, generations.stat().st_size // 2)
    result = run("report", out)
    assert result.exit_code == 2 and result.stderr.startswith(f"error: {generations}: checksum mismatch with "
                                                              f"{out / 'generation.json'}")


HOLD = """
import sys, time
from pathlib import Path
from engram_eval.core.locks import FileLock
with FileLock(Path(sys.argv[1]), "test"):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_gc_keeps_what_a_running_sweep_recorded_and_built(swept, tiny_model_dir, tmp_path):
    out, _ = swept
    recorded = json.loads((out / "run.json").read_text())
    assert set(recorded["engram_keys"]) == {"topic", "anti", "stars", "noise"}
    other = tmp_path / "runs/other"
    other.mkdir(parents=True)
    (other / "run.json").write_text(json.dumps({"status": "running", "engram_keys": {}}))
    an_hour_ago = time.time() - 3600  # the fixture's engrams were built before the other sweep started, by the clock
    for path in (tmp_path / "store").glob("*.safetensors"):
        os.utime(path, (an_hour_ago, an_hour_ago))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(other / ".lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=ENV)
    try:
        assert holder.stdout.readline().strip() == "held"
        extra = tmp_path / "extra.txt"
        extra.write_text("A text built while the other sweep runs.")
        assert run("build", extra, "--model", tiny_model_dir, "--chunks", "4", "--layers", "1", "--store", tmp_path / "store").exit_code == 0
        result = run("store", "gc", "--store", tmp_path / "store", "--runs", tmp_path / "runs", "--yes")
        assert result.exit_code == 0, result.output
        assert f"run {other} is being written by pid {holder.pid} on host " in result.stdout
        assert list((tmp_path / "store").glob("extra.*.safetensors"))  # kept: built after the running sweep started
    finally:
        holder.kill()
        holder.wait()
    # the first run is not under --runs and not running: its engrams, built before the other started, were removed
    assert not list((tmp_path / "store").glob("topic.*.safetensors"))


def test_concurrent_builds_of_different_layers_keep_both(tiny_model_dir, tiny_bank, tmp_path):
    def build(layers: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "engram_eval.cli", "build", "--bank", str(tiny_bank), "--model",
                                 str(tiny_model_dir), "--chunks", "4", "--layers", layers, "--store", str(tmp_path / "store")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)

    processes = [build("1"), build("3")]
    assert [p.wait() for p in processes] == [0, 0], [p.stderr.read() for p in processes]
    files = sorted((tmp_path / "store").glob("*.safetensors"))
    assert len(files) == 4
    for path in files:
        with safe_open(str(path), framework="numpy") as f:
            assert sorted(f.keys()) == ["layer.1", "layer.3"] and f.metadata()["layers"] == "1,3", path
    assert not list((tmp_path / "store").glob(".lock-*")) and not list((tmp_path / "store").glob(".tmp-*"))
