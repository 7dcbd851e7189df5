"""Commands that read files only never load torch or transformers: checked in a fresh interpreter's sys.modules."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from decisive import decisive_frame, decisive_run

REPO = Path(__file__).resolve().parents[1]

PROBE = """
import sys
from engram_eval.cli import main
sys.argv = ["engram-eval", *{args!r}]
try:
    main()
except SystemExit as exc:
    code = exc.code
else:
    code = 0
print("LOADED", sorted(m for m in ("torch", "transformers", "safetensors") if m in sys.modules), "EXIT", code)
"""


def loaded(*args: str, cwd: Path = REPO) -> tuple[list[str], object, str]:
    result = subprocess.run([sys.executable, "-c", PROBE.format(args=[str(a) for a in args])], capture_output=True, text=True,
                            cwd=cwd)
    last = result.stdout.strip().splitlines()[-1]
    modules, code = last.removeprefix("LOADED ").split(" EXIT ")
    return eval(modules), code, result.stdout + result.stderr  # a list of names printed by the probe above


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    from engram_eval.run.rundir import RESULTS_FORMAT

    out = tmp_path_factory.mktemp("run")
    decisive_frame().write_parquet(out / "results.parquet")
    (out / "run.json").write_text(json.dumps({**decisive_run(), "results_format": RESULTS_FORMAT, "run_id": "decisive0001"}))
    return out


@pytest.mark.parametrize("args", [("--help",), ("report", "--help"), ("store", "gc", "--help"), ("check", "--help"), ("models",)])
def test_help_never_imports_torch(args):
    modules, code, output = loaded(*args)
    assert modules == [] and code in ("0", "None"), output


def test_report_check_and_bank_validate_read_files_only(run_dir, tmp_path):
    for output_format in ("table", "json", "markdown", "html"):
        modules, code, output = loaded("report", run_dir, "--format", output_format, "--output", tmp_path / f"r.{output_format}")
        assert modules == [] and code in ("0", "None"), output
    modules, code, output = loaded("report", run_dir, "--question", "q01")
    assert modules == [] and code in ("0", "None"), output
    modules, code, output = loaded("check", run_dir, "--baseline", tmp_path / "baseline.json", "--update")
    assert modules == [] and code in ("0", "None"), output
    modules, code, output = loaded("bank", "validate", "questions/medical_traps.yaml")
    assert modules == [] and code in ("0", "None"), output


def test_store_ls_show_and_gc_read_the_store_without_torch(tiny_model_dir, tmp_path):
    from engram_eval.cli import cli
    from click.testing import CliRunner

    source = tmp_path / "topic.txt"
    source.write_text("Alpha blockers first, then beta blockers.")
    built = CliRunner().invoke(cli, ["build", str(source), "--model", str(tiny_model_dir), "--chunks", "4", "--layers", "1-2",
                                     "--store", str(tmp_path / "store")])
    assert built.exit_code == 0, built.output
    for args in (("store", "ls"), ("store", "show", "topic"), ("store", "gc", "--dry-run")):
        modules, code, output = loaded(*args, "--store", tmp_path / "store")
        assert "torch" not in modules and "transformers" not in modules and code in ("0", "None"), output
    _, _, shown = loaded("store", "show", "topic", "--store", tmp_path / "store")
    import torch
    from safetensors.torch import load_file

    for tensor in load_file(next((tmp_path / "store").glob("*.safetensors"))).values():
        assert f"{tensor.norm(dim=1).mean().item():.4f}" in shown


HOLD_UNTIL_STDIN_CLOSES = """
import sys
from pathlib import Path
from engram_eval.core.locks import FileLock
with FileLock(Path(sys.argv[1]), "test"):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_commands_refuse_bad_input_paths_and_held_locks_before_importing_torch(run_dir, tmp_path):
    """The cheap checks come before torch (seconds to import) and the model: a refusal is as quick as --help."""
    empty = tmp_path / "empty"
    empty.mkdir()
    source = tmp_path / "s.txt"
    source.write_text("alpha")
    held = tmp_path / "held"
    held.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_UNTIL_STDIN_CLOSES, str(held / ".lock")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        (held / "results.parquet").write_bytes((run_dir / "results.parquet").read_bytes())
        refusals = {
            ("generate", empty): f"{empty}: no results.parquet",
            ("generate", held): f"run directory {held} is being written by pid {holder.pid}",
            ("generate", run_dir, "--ensemble", "0"): "--ensemble: must be at least 1",
            ("sweep", tmp_path / "missing.yaml"): "missing.yaml: bank file not found",
            ("sweep", "questions/ci.yaml", "--out", held): f"run directory {held} is being written by pid {holder.pid}",
            ("sweep", "questions/ci.yaml", "--neutral", tmp_path / "none.txt"): "--neutral",
            ("sweep", "questions/ci.yaml", "--scoring", "best"): "'best' is not one of",
            ("build", tmp_path / "missing.txt"): "missing.txt: source file not found",
            ("build", source, "--pooling", "max"): "'max' is not one of",
            ("compare", source): "give at least two source files",
            ("bench", "--bank", tmp_path / "missing.yaml"): "missing.yaml",
        }
        for args, message in refusals.items():
            modules, code, output = loaded(*args)
            assert modules == [] and code == "2" and message in output, (args, output)
    finally:
        holder.stdin.close()
        holder.wait()
