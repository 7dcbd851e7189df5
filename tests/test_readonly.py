"""A read-only folder: one line naming it, before the model loads where a model is needed, never `OSError: [Errno 30]`.

The folder is made read-only for this process the way the operating system reports it (os.access says no; creating a
file there raises EROFS), so the test needs no privileges to mount a file system."""

import errno
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

import engram_eval.backend.model as model_module
from engram_eval.core import files
from engram_eval.cli import cli


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def swept(tiny_model_dir, tiny_bank, tmp_path):
    args = ["sweep", tiny_bank, "--model", tiny_model_dir, "--layers", "1", "--strengths", "1", "--chunks", "4",
            "--store", tmp_path / "store", "--out", tmp_path / "run", "--quiet"]
    assert run(*args).exit_code == 0
    return tmp_path / "run", args


@pytest.fixture
def read_only(monkeypatch):
    """make(folder): from now on, folder is on a read-only file system as far as this process can tell."""
    folders: list[Path] = []
    real_access, real_create = os.access, files.create_exclusive

    def inside(path) -> bool:
        return any(Path(path).absolute().is_relative_to(folder) for folder in folders)

    def access(path, mode, *args, **kwargs):
        return False if inside(path) and mode & os.W_OK else real_access(path, mode, *args, **kwargs)

    def create_exclusive(path):
        if inside(Path(path).parent):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_create(path)

    monkeypatch.setattr(os, "access", access)
    monkeypatch.setattr(files, "create_exclusive", create_exclusive)  # where atomic_replace creates its temporary
    return lambda folder: folders.append(Path(folder).absolute())


def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the folder was checked")

    monkeypatch.setattr(model_module, "load_model", refuse)


def test_sweep_and_its_resume_name_a_read_only_out_before_the_model_loads(swept, read_only, monkeypatch):
    out, args = swept
    read_only(out)
    no_model_loads(monkeypatch)
    result = run(*args)
    assert result.exit_code == 2 and result.stderr == f"error: --out {out}: not writable ({out} is read-only)\n"
    result = run(*args[:-2], out / "new", "--quiet")
    assert result.exit_code == 2 and result.stderr == f"error: --out {out / 'new'}: not writable ({out} is read-only)\n"
    assert not (out / "new").exists()


def test_generate_report_html_and_check_update_name_the_read_only_folder(swept, read_only, monkeypatch, tiny_model_dir, tmp_path):
    out, _ = swept
    read_only(out)
    read_only(tmp_path / "baselines")
    (tmp_path / "baselines").mkdir()
    result = run("report", out, "--format", "html")
    assert result.exit_code == 2 and result.stderr == f"error: cannot write {out / 'report.html'} (Read-only file system)\n"
    result = run("check", out, "--baseline", tmp_path / "baselines/b.json", "--update")
    assert result.exit_code == 2 and result.stderr == f"error: cannot write {tmp_path / 'baselines/b.json'} (Read-only file system)\n"
    no_model_loads(monkeypatch)
    result = run("generate", out, "--model", tiny_model_dir, "--quiet")
    assert result.exit_code == 2 and result.stderr == f"error: RUN {out}: not writable ({out} is read-only)\n"
