"""The wheel, not the checkout: built with pip, installed non-editable into a fresh virtualenv (its dependencies are
the ones already installed, reached through a .pth file), and run from outside the checkout. An editable install
hides a package left out of the wheel; this does not."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import polars as pl
import pytest
from conftest import REPO, sweep


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, Path]:
    """(the fresh environment's engram-eval script, the wheel)."""
    root = tmp_path_factory.mktemp("wheel")
    # From the files git would commit (tracked, and untracked but not ignored): a build/ folder a local build left
    # behind holds modules that no longer exist, and setuptools would pack them.
    source = root / "source"
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, listed):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", root / "dist",
                    source], check=True, cwd=root, capture_output=True)
    (wheel,) = (root / "dist").glob("engram_eval-*.whl")
    env = root / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", env], check=True)
    python = env / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], check=True,
                               capture_output=True, text=True).stdout.strip())
    # The dependencies installed here, as a plain path: .pth files inside it (this checkout's editable install) are
    # not read, so engram_eval can only come from the wheel.
    (site / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--quiet", wheel],
                   check=True, capture_output=True)
    return env / "bin" / "engram-eval", wheel


def test_the_wheel_holds_every_subpackage(installed):
    _, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    packages = sorted(str(p.parent.relative_to(REPO)) for p in (REPO / "engram_eval").rglob("__init__.py"))
    assert packages and all(f"{package}/__init__.py" in names for package in packages)
    modules = sorted(str(p.relative_to(REPO)) for p in (REPO / "engram_eval").rglob("*.py"))
    assert sorted(n for n in names if n.endswith(".py")) == modules
    assert {"engram_eval/report/report.schema.json", "engram_eval/bank/neutral.txt"} <= set(names)  # data the code reads


def test_the_installed_cli_runs_a_sweep_outside_the_checkout(installed, tiny, tiny_model_dir, tiny_bank, tmp_path):
    script, _ = installed
    where = subprocess.run([script.parent / "python", "-c", "import engram_eval; print(engram_eval.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(script.parent.parent)) and not where.startswith(str(REPO / "engram_eval"))
    help_text = subprocess.run([script, "--help"], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert all(command in help_text for command in ("build", "sweep", "generate", "report", "check", "bench", "bank", "store"))
    options = ["--layers", "1,2", "--strengths", "1,4", "--chunks", "4", "--questions", "q1,q3"]
    done = subprocess.run([script, "sweep", tiny_bank, "--model", tiny_model_dir, *options, "--out", tmp_path / "run",
                           "--store", tmp_path / "store", "--neutral", "default", "--quiet"], cwd=tmp_path, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    # the bundled neutral passage is package data: the wheel's copy, the checkout's text
    passage = REPO / "engram_eval/bank/neutral.txt"
    effects = pl.read_parquet(tmp_path / "run/side_effects.parquet")
    assert effects.height == 4 * 2 * 2
    assert set(effects["passage_sha256"]) == {hashlib.sha256(passage.read_bytes()).hexdigest()}
    expected = sweep(tiny, tiny_bank, tmp_path / "library", layers=[1, 2], strengths=[1.0, 4.0], chunks=4, questions=["q1", "q3"])
    got, want = pl.read_parquet(tmp_path / "run/results.parquet"), pl.read_parquet(expected.results_path)
    assert got.equals(want)
    assert json.loads((tmp_path / "run/run.json").read_text())["run_id"] == expected.run["run_id"]
    # the bundled distillation probes are package data too: a build from the wheel records the checkout's probes' sha256
    source = tmp_path / "topic.txt"
    source.write_text("Alpha blockers first, then beta blockers. " * 4)
    built = subprocess.run([script, "build", source, "--model", tiny_model_dir, "--layers", "1", "--chunks", "4", "--pooling",
                            "learned", "--learn-objective", "distill", "--learn-steps", "1", "--store", tmp_path / "learned"],
                           cwd=tmp_path, capture_output=True, text=True)
    assert built.returncode == 0, built.stderr
    from engram_eval.engram.files import StoreFiles

    probes = [line.strip() for line in (REPO / "engram_eval/engram/learn_probes.txt").read_text().splitlines() if line.strip()]
    [path] = (tmp_path / "learned").glob("*.safetensors")
    assert StoreFiles(tmp_path / "learned").read_metadata(path)["learn_probes_sha256"] == hashlib.sha256(
        "\n".join(probes).encode()).hexdigest()
