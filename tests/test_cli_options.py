"""Every command-line option, end to end: the command run through click's CliRunner on the tiny model, its *effect*
checked against the library called with the same setting (or against a computation written here).

OPTION_TESTS maps each option of docs/cli.md to the test that checks it; test_every_option_has_an_effect_test fails
when an option is added without one."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import numpy as np
import polars as pl
import pytest
import yaml
from click.testing import CliRunner
from conftest import REPO, TINY_SOURCES, assert_same_results, sweep, write_tiny_bank

from engram_eval.cli import cli
from engram_eval.cli.docs import _commands
from engram_eval.engram.extraction import Extraction
from engram_eval.core.errors import EngramEvalError

GRID = ["--layers", "1,2", "--strengths", "1,4", "--chunks", "4"]
LIBRARY_GRID = dict(layers=[1, 2], strengths=[1.0, 4.0], chunks=4)

OPTION_TESTS = {
    "--version": "test_version_prints_the_package_version",
    # vectors
    "sweep --vector": "test_vectors_cli.py::test_import_sweep_report",
    "sweep --coefficients": "test_vectors_cli.py::test_import_sweep_report",
    "vectors import --model": "test_model_options_reach_the_loader_of_every_command",
    "vectors import --device": "test_model_options_reach_the_loader_of_every_command",
    "vectors import --dtype": "test_model_options_reach_the_loader_of_every_command",
    "vectors import --trust-remote-code": "test_model_options_reach_the_loader_of_every_command",
    "vectors import --threads": "test_threads_hold_while_every_model_command_runs_and_are_restored",
    "vectors build --model": "test_model_options_reach_the_loader_of_every_command",
    "vectors build --device": "test_model_options_reach_the_loader_of_every_command",
    "vectors build --dtype": "test_model_options_reach_the_loader_of_every_command",
    "vectors build --trust-remote-code": "test_model_options_reach_the_loader_of_every_command",
    "vectors build --threads": "test_threads_hold_while_every_model_command_runs_and_are_restored",
    "vectors import --name": "test_vectors_cli.py::test_import_options",
    "vectors import --store": "test_vectors_cli.py::test_import_options",
    "vectors import --format": "test_vectors_cli.py::test_import_options",
    "vectors import --layer": "test_vectors_cli.py::test_import_options",
    "vectors import --force": "test_vectors_cli.py::test_import_options",
    "vectors import --ignore-model-hint": "test_vectors_cli.py::test_import_options",
    "vectors build --pairs": "test_vectors_cli.py::test_export_engram_and_build",
    "vectors build --name": "test_vectors_cli.py::test_export_engram_and_build",
    "vectors build --layers": "test_vectors_cli.py::test_export_engram_and_build",
    "vectors build --read": "test_vectors_cli.py::test_export_engram_and_build",
    "vectors build --store": "test_vectors_cli.py::test_export_engram_and_build",
    "vectors build --force": "test_vectors_cli.py::test_export_engram_and_build",
    "vectors export --engram": "test_vectors_cli.py::test_export_engram_and_build",
    "vectors export --out": "test_vectors_cli.py::test_export_engram_and_build",
    "vectors export --model-hint": "test_vectors_cli.py::test_export_engram_and_build",
    "vectors export --store": "test_vectors_cli.py::test_export_engram_and_build",
    "vectors export --layers": "test_vectors_cli.py::test_export_engram_and_build",
    "vectors export --force": "test_vectors_cli.py::test_export_engram_and_build",
    "vectors ls --store": "test_vectors_cli.py::test_import_options",
    # sweep
    "sweep --model": "test_model_options_reach_the_loader_of_every_command",
    "sweep --device": "test_model_options_reach_the_loader_of_every_command",
    "sweep --dtype": "test_sweep_dtype_equals_the_library_on_a_model_loaded_in_that_dtype",
    "sweep --trust-remote-code": "test_trust_remote_code_loads_a_models_own_code_only_when_asked",
    "sweep --layers": "test_sweep_option_equals_the_library_with_the_same_setting",
    "sweep --strengths": "test_sweep_option_equals_the_library_with_the_same_setting",
    "sweep --chunks": "test_sweep_option_equals_the_library_with_the_same_setting",
    "sweep --scoring": "test_sweep_option_equals_the_library_with_the_same_setting",
    "sweep --injection": "test_sweep_option_equals_the_library_with_the_same_setting",
    "sweep --scaling": "test_sweep_option_equals_the_library_with_the_same_setting",
    "sweep --context": "test_sweep_option_equals_the_library_with_the_same_setting",
    "sweep --positions": "test_sweep_option_equals_the_library_with_the_same_setting",
    "sweep --prefix-at": "test_architectures.py::test_prefix_at_start_puts_the_engram_before_the_bos",
    "sweep --pooling": "test_sweep_option_equals_the_library_with_the_same_setting",
    "sweep --skip-tokens": "test_sweep_option_equals_the_library_with_the_same_setting",
    "sweep --window": "test_sweep_option_equals_the_library_with_the_same_setting",
    "sweep --max-tokens": "test_sweep_option_equals_the_library_with_the_same_setting",
    "sweep --learn-objective": "test_sweep_option_equals_the_library_with_the_same_setting",
    "sweep --learn-steps": "test_sweep_option_equals_the_library_with_the_same_setting",
    "sweep --learn-lr": "test_sweep_option_equals_the_library_with_the_same_setting",
    "sweep --learn-seed": "test_sweep_option_equals_the_library_with_the_same_setting",
    "sweep --learn-probes": "test_learned.py::test_learn_probes_file_on_the_command_line",
    "sweep --record-attention": "test_sweep_option_equals_the_library_with_the_same_setting",
    "sweep --reextract": "test_sweep_option_equals_the_library_with_the_same_setting",
    "sweep --sample": "test_variability.py::test_sample_options_on_the_command_line_equal_the_library",
    "sweep --sample-seed": "test_variability.py::test_sample_options_on_the_command_line_equal_the_library",
    "sweep --questions": "test_sweep_option_equals_the_library_with_the_same_setting",
    "sweep --out": "test_sweep_out_store_and_batch_size",
    "sweep --store": "test_sweep_out_store_and_batch_size",
    "sweep --batch-size": "test_sweep_out_store_and_batch_size",
    "sweep --threads": "test_sweep_threads_reach_torch_while_it_sweeps_and_change_no_number",
    "sweep --force": "test_sweep_force_replaces_a_run_of_other_settings",
    "sweep --wait": "test_concurrency.py::test_a_second_sweep_into_a_running_run_directory_fails_naming_the_holder",
    "sweep --allow-outside-paths": "test_allow_outside_paths_admits_a_source_outside_the_banks_folder",
    "sweep --strict": "test_sweep_strict_turns_the_banks_warnings_into_errors",
    "sweep --ray": "test_distributed.py::test_sweep_and_generate_on_ray_from_the_command_line",
    "sweep --workers": "test_distributed.py::test_sweep_and_generate_on_ray_from_the_command_line",
    "sweep --gpus-per-worker": "test_distributed.py::test_bad_ray_input_is_one_line",
    "sweep --threads-per-worker": "test_distributed.py::test_sweep_and_generate_on_ray_from_the_command_line",
    "sweep --quiet": "test_quiet_silences_the_progress_bar_and_the_engram_log",
    "sweep --neutral": "test_side_effects.py::test_the_cli_writes_side_effects_and_names_them_in_its_summary",
    # generate
    "generate --model": "test_model_options_reach_the_loader_of_every_command",
    "generate --threads": "test_threads_hold_while_every_model_command_runs_and_are_restored",
    "generate --device": "test_model_options_reach_the_loader_of_every_command",
    "generate --dtype": "test_model_options_reach_the_loader_of_every_command",
    "generate --trust-remote-code": "test_model_options_reach_the_loader_of_every_command",
    "generate --cells": "test_generate_cells_decodes_exactly_the_selected_rows",
    "generate --max-new-tokens": "test_generate_max_new_tokens_and_batch_size_equal_the_library",
    "generate --batch-size": "test_generate_max_new_tokens_and_batch_size_equal_the_library",
    "generate --force": "test_generate_force_replaces_generations_of_other_settings",
    "generate --ensemble": "test_ensemble.py::test_ensemble_options_on_the_command_line_equal_the_library",
    "generate --ensemble-decay": "test_ensemble.py::test_ensemble_options_on_the_command_line_equal_the_library",
    "generate --reextract": "test_ensemble.py::test_ensemble_options_on_the_command_line_equal_the_library",
    "generate --wait": "test_concurrency.py::test_generate_waits_for_the_writer_that_holds_its_run_directory",
    "generate --ray": "test_distributed.py::test_sweep_and_generate_on_ray_from_the_command_line",
    "generate --workers": "test_distributed.py::test_sweep_and_generate_on_ray_from_the_command_line",
    "generate --gpus-per-worker": "test_distributed.py::test_generate_gpus_per_worker_reaches_the_cluster_check",
    "generate --threads-per-worker": "test_distributed.py::test_sweep_and_generate_on_ray_from_the_command_line",
    "generate --quiet": "test_quiet_silences_the_progress_bar_and_the_engram_log",
    # report
    "report --format": "test_report_formats_and_output",
    "report --output": "test_report_formats_and_output",
    "report --engram-role": "test_report_engram_role_picks_the_heatmaps",
    "report --allow-different-banks": "test_report_allow_different_banks",
    "report --question": "test_report_question_drills_down_to_that_questions_rows",
    "report --split": "test_report_split_chooses_on_the_seeds_half",
    "report --doses": "test_dose.py::test_doses_option_sets_the_targets_and_bad_doses_are_one_line",
    "report --ladder": "test_experiments.py::test_the_rag_ladder_recounts_each_rung_on_the_same_questions_across_runs",
    # check
    "check --baseline": "test_check_tolerances_and_update",
    "check --rtol": "test_check_tolerances_and_update",
    "check --atol": "test_check_tolerances_and_update",
    "check --update": "test_check_tolerances_and_update",
    # bench
    "bench --model": "test_model_options_reach_the_loader_of_every_command",
    "bench --threads": "test_threads_hold_while_every_model_command_runs_and_are_restored",
    "bench --device": "test_model_options_reach_the_loader_of_every_command",
    "bench --dtype": "test_model_options_reach_the_loader_of_every_command",
    "bench --trust-remote-code": "test_model_options_reach_the_loader_of_every_command",
    "bench --bank": "test_bench_options_reach_the_benchmark",
    "bench --report": "test_cli_report_check.py::test_bench_report_times_each_format_against_reading_the_parquet",
    "bench --trials": "test_cli_report_check.py::test_bench_report_runs_each_measure_trials_times",
    "bench --layers": "test_bench_options_reach_the_benchmark",
    "bench --strengths": "test_bench_options_reach_the_benchmark",
    "bench --loop-cells": "test_bench_options_reach_the_benchmark",
    "bench --batch-size": "test_bench_options_reach_the_benchmark",
    "bench --injection": "test_bench_options_reach_the_benchmark",
    "bench --generation-cells": "test_bench_options_reach_the_benchmark",
    "bench --random-init": "test_bench_options_reach_the_benchmark",
    "bench --ray": "test_distributed.py::test_bench_ray_options_reach_the_ray_benchmark",
    "bench --workers": "test_distributed.py::test_bench_ray_options_reach_the_ray_benchmark",
    "bench --threads-per-worker": "test_distributed.py::test_bench_ray_options_reach_the_ray_benchmark",
    # build
    "build --bank": "test_build_options_store_the_librarys_engrams",
    "build --model": "test_model_options_reach_the_loader_of_every_command",
    "build --threads": "test_threads_hold_while_every_model_command_runs_and_are_restored",
    "build --device": "test_model_options_reach_the_loader_of_every_command",
    "build --dtype": "test_model_options_reach_the_loader_of_every_command",
    "build --trust-remote-code": "test_model_options_reach_the_loader_of_every_command",
    "build --chunks": "test_build_options_store_the_librarys_engrams",
    "build --layers": "test_build_options_store_the_librarys_engrams",
    "build --pooling": "test_build_options_store_the_librarys_engrams",
    "build --skip-tokens": "test_build_options_store_the_librarys_engrams",
    "build --window": "test_build_options_store_the_librarys_engrams",
    "build --max-tokens": "test_build_options_store_the_librarys_engrams",
    "build --learn-objective": "test_build_options_store_the_librarys_engrams",
    "build --learn-steps": "test_build_options_store_the_librarys_engrams",
    "build --learn-lr": "test_build_options_store_the_librarys_engrams",
    "build --learn-seed": "test_build_options_store_the_librarys_engrams",
    "build --learn-probes": "test_learned.py::test_learn_probes_file_on_the_command_line",
    "build --store": "test_build_options_store_the_librarys_engrams",
    "build --force": "test_build_force_rebuilds",
    "build --quiet": "test_long_commands_print_plain_progress_lines_when_piped_and_quiet_silences_them",
    "build --allow-outside-paths": "test_allow_outside_paths_admits_a_source_outside_the_banks_folder",
    # compare
    "compare --bank": "test_compare_options_equal_the_library",
    "compare --model": "test_compare_options_equal_the_library",
    "compare --threads": "test_threads_hold_while_every_model_command_runs_and_are_restored",
    "compare --device": "test_model_options_reach_the_loader_of_every_command",
    "compare --dtype": "test_model_options_reach_the_loader_of_every_command",
    "compare --trust-remote-code": "test_model_options_reach_the_loader_of_every_command",
    "compare --layers": "test_compare_options_equal_the_library",
    "compare --depths": "test_compare_options_equal_the_library",
    "compare --chunks": "test_compare_options_equal_the_library",
    "compare --pooling": "test_compare_options_equal_the_library",
    "compare --skip-tokens": "test_compare_options_equal_the_library",
    "compare --window": "test_compare_options_equal_the_library",
    "compare --max-tokens": "test_compare_options_equal_the_library",
    "compare --learn-objective": "test_compare_options_equal_the_library",
    "compare --learn-steps": "test_compare_options_equal_the_library",
    "compare --learn-lr": "test_compare_options_equal_the_library",
    "compare --learn-seed": "test_compare_options_equal_the_library",
    "compare --learn-probes": "test_learned.py::test_learn_probes_file_on_the_command_line",
    "compare --store": "test_compare_options_equal_the_library",
    "compare --out": "test_compare_options_equal_the_library",
    "compare --allow-outside-paths": "test_allow_outside_paths_admits_a_source_outside_the_banks_folder",
    # bank
    "bank import --hf": "test_bank_import.py::test_a_saved_hugging_face_dataset_imports_like_a_file",
    "bank import --format": "test_bank_import.py::test_completion_format_optional_fields_and_sources_per_topic",
    "bank import --map": "test_bank_import.py::test_each_file_format_gives_the_hand_written_bank",
    "bank import --out": "test_bank_import_naming_template_controls_answer_base_and_force",
    "bank import --name": "test_bank_import_naming_template_controls_answer_base_and_force",
    "bank import --template": "test_bank_import_naming_template_controls_answer_base_and_force",
    "bank import --controls": "test_bank_import_naming_template_controls_answer_base_and_force",
    "bank import --limit": "test_bank_import.py::test_limit_and_seed_pick_a_reproducible_subset_in_file_order",
    "bank import --seed": "test_bank_import.py::test_limit_and_seed_pick_a_reproducible_subset_in_file_order",
    "bank import --source-per-topic": "test_bank_import.py::test_completion_format_optional_fields_and_sources_per_topic",
    "bank import --answer-base": "test_bank_import_naming_template_controls_answer_base_and_force",
    "bank import --force": "test_bank_import_naming_template_controls_answer_base_and_force",
    "bank import --quiet": "test_long_commands_print_plain_progress_lines_when_piped_and_quiet_silences_them",
    "bank import --chat": "test_bank_import.py::test_chat_import_letters_the_reply_starts_with_and_the_template_applied",
    "bank stats --model": "test_bank_stats_and_validate_options",
    "bank stats --allow-outside-paths": "test_allow_outside_paths_admits_a_source_outside_the_banks_folder",
    "bank validate --model": "test_bank_stats_and_validate_options",
    "bank validate --strict": "test_bank_stats_and_validate_options",
    "bank validate --baseline": "test_bank_validate_baseline_equals_the_sweeps_baseline_rows",
    "bank validate --allow-outside-paths": "test_allow_outside_paths_admits_a_source_outside_the_banks_folder",
    # store
    "store gc --store": "test_store_commands_act_on_the_store_given",
    "store gc --runs": "test_store_gc_runs_and_dry_run",
    "store gc --dry-run": "test_store_gc_runs_and_dry_run",
    "store gc --yes": "test_store_gc_runs_and_dry_run",
    "store ls --store": "test_store_commands_act_on_the_store_given",
    "store rm --store": "test_store_commands_act_on_the_store_given",
    "store show --store": "test_store_commands_act_on_the_store_given",
}


def run(*args, **kwargs):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False, **kwargs)


def ok(result):
    assert result.exit_code == 0, result.output
    return result


def every_option() -> list[str]:
    names = []
    for path in _commands(cli, []):
        command = cli
        for name in path:
            command = command.commands[name]
        for param in command.params:
            if isinstance(param, click.Option) and param.name != "help":
                names.append(" ".join([*path, max(param.opts, key=len)]))
    return names


def test_every_option_has_an_effect_test():
    options = every_option()
    assert sorted(options) == sorted(OPTION_TESTS), "an option without an entry in OPTION_TESTS (or a stale entry)"
    here = {name for name in globals() if name.startswith("test_")}
    for option, test in OPTION_TESTS.items():
        if "::" in test:
            module, name = test.split("::")
            assert re.search(rf"^def {name}\(", (REPO / "tests" / module).read_text(), re.M), f"{option}: {test} is not a test"
        else:
            assert test in here, f"{option}: {test} is not a test of this module"


def test_version_prints_the_package_version():
    from importlib.metadata import version

    assert ok(run("--version")).stdout == f"engram-eval, version {version('engram-eval')}\n"


# ---------------------------------------------------------------- sweep


def context_bank(folder: Path) -> Path:
    """The tiny bank, with a retrieved passage on q1 (for --context)."""
    path = write_tiny_bank(folder)
    path.write_text(path.read_text().replace("  engram: topic\n", '  engram: topic\n  context: "Alpha blockers come first."\n', 1))
    return path


@pytest.fixture(scope="module")
def bank_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bank")
    context_bank(folder)
    return folder


@pytest.fixture(scope="module")
def default_sweep(tiny_model_dir, bank_dir, tmp_path_factory) -> pl.DataFrame:
    folder = tmp_path_factory.mktemp("default")
    ok(run("sweep", bank_dir / "tiny.yaml", "--model", tiny_model_dir, *GRID, "--out", folder / "run", "--store", folder / "store", "-q"))
    return pl.read_parquet(folder / "run/results.parquet")


# Two float32 log-probabilities of magnitude ~10 each carry ~1e-6 of rounding, so their difference (a log ratio) moves
# by a few 1e-6 when a batch is grouped otherwise or, at 2 threads, when MKL's kernels see the model's weights at other
# memory alignments (a second load): measured 3.3e-6 (batch size 3 vs auto) and 5.3e-6 (pca, two loads).
FLOAT32_LOG_ATOL = 1e-5

SWEEP_EFFECTS = [
    (["--layers", "3"], {"layers": [3]}),
    (["--strengths", "2,6"], {"strengths": [2.0, 6.0]}),
    (["--chunks", "4,8"], {"chunks": [4, 8]}),
    (["--scoring", "sequence"], {"scoring": "sequence"}),
    (["--scoring", "sequence-max"], {"scoring": "sequence-max"}),
    (["--scoring", "sequence-mean"], {"scoring": "sequence-mean"}),
    (["--injection", "add", "--chunks", "2"], {"injection": "add", "chunks": 2}),
    (["--injection", "actadd"], {"injection": "actadd"}),
    (["--injection", "actadd", "--positions", "last"], {"injection": "actadd", "positions": "last"}),
    (["--injection", "actadd", "--strengths=-2,6"], {"injection": "actadd", "strengths": [-2.0, 6.0]}),
    (["--scaling", "per-chunk"], {"scaling": "per-chunk"}),
    (["--context", "without"], {"context": "without"}),
    (["--context", "both"], {"context": "both"}),
    (["--pooling", "last"], {"extraction": Extraction(pooling="last")}),
    (["--pooling", "pca"], {"extraction": Extraction(pooling="pca")}),
    (["--skip-tokens", "1"], {"extraction": Extraction(skip_tokens=1)}),
    (["--window", "8"], {"extraction": Extraction(window=8)}),
    (["--max-tokens", "10"], {"extraction": Extraction(max_tokens=10)}),
    (["--pooling", "learned", "--learn-steps", "2", "--learn-lr", "0.05"], {"extraction": Extraction(pooling="learned", learn_steps=2, learn_lr=0.05)}),
    (["--pooling", "learned", "--learn-steps", "2", "--learn-objective", "distill", "--learn-seed", "1"],
     {"extraction": Extraction(pooling="learned", learn_steps=2, learn_objective="distill", learn_seed=1)}),
    (["--record-attention"], {"record_attention": True}),
    (["--reextract"], {"reextract": True}),
    (["--questions", "q3,q1"], {"questions": ["q1", "q3"]}),
]


@pytest.mark.parametrize("args,setting", SWEEP_EFFECTS, ids=[" ".join(a) for a, _ in SWEEP_EFFECTS])
def test_sweep_option_equals_the_library_with_the_same_setting(args, setting, tiny, tiny_model_dir, bank_dir, default_sweep, tmp_path):
    """The command with the option gives the rows (run_id included: it hashes every setting) of run_sweep called with
    that setting, and they are not the default's: the option reached the computation."""
    ok(run("sweep", bank_dir / "tiny.yaml", "--model", tiny_model_dir, *GRID, *args, "--out", tmp_path / "cli",
           "--store", tmp_path / "store", "-q"))
    got = pl.read_parquet(tmp_path / "cli/results.parquet")
    expected = pl.read_parquet(sweep(tiny, bank_dir / "tiny.yaml", tmp_path / "lib", **{**LIBRARY_GRID, **setting}).results_path)
    assert_same_results(got, expected, atol=FLOAT32_LOG_ATOL)
    assert got["run_id"][0] != default_sweep["run_id"][0]
    changed = got.height != default_sweep.height or any(not got[c].equals(default_sweep[c]) for c in got.columns if c != "run_id")
    assert changed, f"{args}: the rows are the default's"


def test_sweep_dtype_equals_the_library_on_a_model_loaded_in_that_dtype(tiny_model_dir, bank_dir, default_sweep, tmp_path):
    from engram_eval.backend.model import load_model

    ok(run("sweep", bank_dir / "tiny.yaml", "--model", tiny_model_dir, "--dtype", "bfloat16", *GRID, "--out", tmp_path / "cli",
           "--store", tmp_path / "store", "-q"))
    got = pl.read_parquet(tmp_path / "cli/results.parquet")
    half = load_model(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    expected = pl.read_parquet(sweep(half, bank_dir / "tiny.yaml", tmp_path / "lib", **LIBRARY_GRID).results_path)
    assert_same_results(got, expected)
    assert got["model_fingerprint"][0] == half.fingerprint != default_sweep["model_fingerprint"][0]
    assert json.loads((tmp_path / "cli/run.json").read_text())["dtype"] == "bfloat16"


def test_sweep_out_store_and_batch_size(tiny_model_dir, bank_dir, default_sweep, tmp_path, monkeypatch):
    """--batch-size changes how cells are grouped, not a number; --out and --store say where things go; without
    --out the run lands in reports/BANK-MODEL."""
    import engram_eval.run.sweep as sweep_module

    sizes = []
    real_score = sweep_module.score_question
    monkeypatch.setattr(sweep_module, "score_question", lambda *a, **k: sizes.append(a[6]) or real_score(*a, **k))
    monkeypatch.chdir(tmp_path)
    ok(run("sweep", bank_dir / "tiny.yaml", "--model", tiny_model_dir, *GRID, "--batch-size", "3", "--store", "mystore", "-q"))
    out = tmp_path / "reports" / f"tiny-{tiny_model_dir.name}"
    got = pl.read_parquet(out / "results.parquet")
    assert_same_results(got, default_sweep, atol=FLOAT32_LOG_ATOL)
    assert sizes == [3, 3, 3]
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["batch_size"] == 3
    stored = {p.name.split(".")[1] for p in (tmp_path / "mystore").glob("*.safetensors")}
    assert stored == set(run_json["engram_keys"].values())
    ok(run("sweep", bank_dir / "tiny.yaml", "--model", tiny_model_dir, *GRID, "--out", "elsewhere", "--store", "mystore", "-q"))
    assert_same_results(pl.read_parquet(tmp_path / "elsewhere/results.parquet"), default_sweep)


def test_sweep_threads_reach_torch_while_it_sweeps_and_change_no_number(tiny_model_dir, bank_dir, default_sweep, tmp_path,
                                                                        monkeypatch):
    import torch

    import engram_eval.run.sweep as sweep_module

    seen, before = [], torch.get_num_threads()
    real_score = sweep_module.score_question
    monkeypatch.setattr(sweep_module, "score_question", lambda *a, **k: seen.append(torch.get_num_threads()) or real_score(*a, **k))
    wanted = 1 if before != 1 else 2
    ok(run("sweep", bank_dir / "tiny.yaml", "--model", tiny_model_dir, *GRID, "--threads", str(wanted), "--out", tmp_path / "run",
           "--store", tmp_path / "store", "-q"))
    assert seen == [wanted] * 3 and torch.get_num_threads() == before  # set while it sweeps, restored after
    assert json.loads((tmp_path / "run/run.json").read_text())["threads"] == wanted
    assert_same_results(pl.read_parquet(tmp_path / "run/results.parquet"), default_sweep, atol=FLOAT32_LOG_ATOL)
    refused = run("sweep", bank_dir / "tiny.yaml", "--model", tiny_model_dir, *GRID, "--threads", "0")
    assert refused.exit_code == 2 and "--threads" in refused.stderr and len(refused.stderr.splitlines()) == 1


def test_sweep_force_replaces_a_run_of_other_settings(tiny_model_dir, bank_dir, tmp_path):
    common = ["sweep", bank_dir / "tiny.yaml", "--model", tiny_model_dir, "--layers", "1", "--chunks", "4", "--out", tmp_path / "run",
              "--store", tmp_path / "store", "-q"]
    ok(run(*common, "--strengths", "1"))
    refused = run(*common, "--strengths", "2")
    assert refused.exit_code == 2 and "--force" in refused.stderr
    assert pl.read_parquet(tmp_path / "run/results.parquet")["strength"].drop_nulls().unique().to_list() == [1.0]
    ok(run(*common, "--strengths", "2", "--force"))
    assert pl.read_parquet(tmp_path / "run/results.parquet")["strength"].drop_nulls().unique().to_list() == [2.0]


def test_sweep_strict_turns_the_banks_warnings_into_errors(tiny_model_dir, tmp_path):
    bank = write_tiny_bank(tmp_path, {"q1": ("The drug is ", [" alpha"], [" beta"])})
    args = ["sweep", bank, "--model", tiny_model_dir, "--layers", "1", "--strengths", "1", "--chunks", "4", "--out", tmp_path / "run",
            "--store", tmp_path / "store", "-q"]
    warned = ok(run(*args))
    assert "warning:" in warned.stderr and "space" in warned.stderr
    strict = run(*args, "--strict", "--force")
    assert strict.exit_code == 2 and strict.stderr.startswith("error:") and strict.stderr.rstrip().endswith("(--strict)")


def test_quiet_silences_the_progress_bar_and_the_engram_log(tiny_model_dir, bank_dir, tmp_path, monkeypatch):
    """Under CliRunner stderr is no terminal, so tqdm draws no bar either way: what --quiet hands the library is
    checked (the sweep's observer, generate's progress=False), and the engram log it silences is read."""
    import engram_eval.run.generation as generation
    import engram_eval.run.sweep as sweep_module

    progress = []
    for module, name in ((sweep_module, "run_sweep"), (generation, "run_generate")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _real=real, **k: progress.append(k["observer"].progress if "observer" in k
                                                                                    else k["progress"]) or _real(*a, **k))
    args = ["--model", tiny_model_dir, "--layers", "1", "--strengths", "1", "--chunks", "4", "--store", tmp_path / "store"]
    loud = ok(run("sweep", bank_dir / "tiny.yaml", *args, "--out", tmp_path / "a"))
    quiet = ok(run("sweep", bank_dir / "tiny.yaml", *args, "--out", tmp_path / "b", "-q"))
    assert "engram topic: built" in loud.stderr and "engram topic" not in quiet.stderr
    assert all(line.startswith("warning: ") for line in quiet.stderr.splitlines())  # warnings are still shown
    ok(run("generate", tmp_path / "a", "--model", tiny_model_dir, "--max-new-tokens", "2"))
    ok(run("generate", tmp_path / "b", "--model", tiny_model_dir, "--max-new-tokens", "2", "--quiet"))
    assert progress == [True, False, True, False]


def test_long_commands_print_plain_progress_lines_when_piped_and_quiet_silences_them(tiny_model_dir, bank_dir, tmp_path,
                                                                                       monkeypatch):
    """Under CliRunner stderr is a pipe: each long command prints plain progress lines (here every update: the line
    interval set to 0), the last one at 100% with its rate and ETA; --quiet prints none, down to a learned engram's
    steps inside a sweep."""
    import engram_eval.core.progress as progress
    from test_bank_import import RECORDS, write

    monkeypatch.setattr(progress, "PLAIN_EVERY_SECONDS", 0.0)
    line = re.compile(r"^(\w[\w ]*): (\d+)/(\d+) (\w+)s \((\d+)%\), .+/s, \d\d:\d\d elapsed, ETA .+$")

    def last_lines(stderr: str) -> dict[str, tuple[int, int, str]]:
        found = {}
        for text in stderr.splitlines():
            if m := line.match(text):
                found[m[1]] = (int(m[2]), int(m[3]), m[4])
        return found

    sources = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for path in sources:
        path.write_text("alpha beta gamma delta epsilon zeta")
    build = ["build", *sources, "--model", tiny_model_dir, "--chunks", "2", "--layers", "1", "--store", tmp_path / "store"]
    assert last_lines(ok(run(*build)).stderr)["build"] == (2, 2, "source")
    assert last_lines(ok(run(*build, "--force", "--quiet")).stderr) == {}
    data = write(tmp_path, ".jsonl", RECORDS)
    imported = ["bank", "import", data, "--map", "id=qid,question=q,choices=options,answer=gold,source=why", "--out",
                tmp_path / "imported.yaml"]
    assert last_lines(ok(run(*imported)).stderr)["import"] == (len(RECORDS), len(RECORDS), "record")
    assert last_lines(ok(run(*imported, "--force", "-q")).stderr) == {}
    sweep = ["sweep", bank_dir / "tiny.yaml", "--model", tiny_model_dir, "--layers", "1", "--strengths", "1", "--chunks", "2",
             "--pooling", "learned", "--learn-steps", "3", "--store", tmp_path / "store2"]
    loud = last_lines(ok(run(*sweep, "--out", tmp_path / "loud")).stderr)
    assert loud["sweep"][0] == loud["sweep"][1] and loud["sweep"][2] == "cell" and "learn" in " ".join(loud)
    assert last_lines(ok(run(*sweep, "--out", tmp_path / "quiet", "--quiet")).stderr) == {}


# ---------------------------------------------------------------- model options


def model_command_arguments(command: str, bank_dir: Path) -> list:
    """What each command that loads the model needs before it loads it, written in the current folder."""
    Path("a.txt").write_text("alpha beta gamma delta")
    Path("b.txt").write_text("beta gamma delta alpha")
    Path("run").mkdir()
    Path("run/results.parquet").write_bytes(b"")
    Path("p.yaml").write_text("pairs:\n  - {positive: alpha beta, negative: beta alpha}\n")
    __import__("numpy").save("v.npy", __import__("numpy").ones(32, dtype="float32"))
    return {"sweep": [bank_dir / "tiny.yaml"], "generate": ["run"], "bench": ["--bank", bank_dir / "tiny.yaml"], "build": ["a.txt"],
            "compare": ["a.txt", "b.txt"], "vectors import": ["v.npy", "--layer", "1", "--name", "v"],
            "vectors build": ["--pairs", "p.yaml", "--name", "v"]}[command]


MODEL_COMMANDS = ["sweep", "generate", "bench", "build", "compare", "vectors import", "vectors build"]


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_model_options_reach_the_loader_of_every_command(command, tiny_model_dir, bank_dir, tmp_path, monkeypatch):
    """--model, --device, --dtype and --trust-remote-code arrive at load_model as given; then --device cuda:0 on this
    CPU machine is refused there, in one line (the value is used, not replaced by a default)."""
    import engram_eval.backend.model as model_module

    calls = []

    def spy(spec, **kwargs):
        calls.append((spec, kwargs))
        raise model_module.EngramEvalError("stopped by the test")

    monkeypatch.chdir(tmp_path)
    target = model_command_arguments(command, bank_dir)
    options = ["--model", tiny_model_dir, "--device", "cpu", "--dtype", "float16", "--trust-remote-code"]
    with monkeypatch.context() as patched:
        patched.setattr(model_module, "load_model", spy)
        stopped = run(*command.split(), *target, *options)
    assert stopped.stderr == "error: stopped by the test\n"
    assert calls == [(str(tiny_model_dir), {"device": "cpu", "dtype": "float16", "trust_remote_code": True})]
    no_cuda = run(*command.split(), *target, "--model", tiny_model_dir, "--device", "cuda:0")
    assert no_cuda.exit_code == 2 and no_cuda.stderr == "error: --device: 'cuda:0' asked for, but no CUDA device is available\n"


@pytest.mark.parametrize("command", MODEL_COMMANDS)
def test_threads_hold_while_every_model_command_runs_and_are_restored(command, tiny_model_dir, bank_dir, tmp_path, monkeypatch):
    """--threads N: torch runs with N threads from the model's loading on (the spy sees them), and as before after."""
    import torch

    import engram_eval.backend.model as model_module

    seen, before = [], torch.get_num_threads()
    wanted = 1 if before != 1 else 2

    def spy(spec, **kwargs):
        seen.append(torch.get_num_threads())
        raise model_module.EngramEvalError("stopped by the test")

    monkeypatch.chdir(tmp_path)
    target = model_command_arguments(command, bank_dir)
    with monkeypatch.context() as patched:
        patched.setattr(model_module, "load_model", spy)
        stopped = run(*command.split(), *target, "--model", tiny_model_dir, "--threads", str(wanted))
    assert stopped.stderr == "error: stopped by the test\n" and seen == [wanted] and torch.get_num_threads() == before
    refused = run(*command.split(), *target, "--threads", "0")
    assert refused.exit_code == 2 and "--threads" in refused.stderr and len(refused.stderr.splitlines()) == 1


CUSTOM_CONFIG = "from transformers import LlamaConfig\n\n\nclass HalvedConfig(LlamaConfig):\n    model_type = 'halved-llama'\n"
CUSTOM_MODEL = """from transformers import LlamaForCausalLM

from .configuration_halved import HalvedConfig


class HalvedForCausalLM(LlamaForCausalLM):
    config_class = HalvedConfig

    def __init__(self, config):
        super().__init__(config)
        # the model's own code: its numbers differ from the plain architecture's
        self.lm_head.register_forward_hook(lambda module, args, output: output / 2)
"""


def test_trust_remote_code_loads_a_models_own_code_only_when_asked(tiny_model_dir, bank_dir, default_sweep, tmp_path):
    import shutil

    from engram_eval.backend.model import load_model

    custom = tmp_path / "halved"
    shutil.copytree(tiny_model_dir, custom)
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="halved-llama", architectures=["HalvedForCausalLM"],
                  auto_map={"AutoConfig": "configuration_halved.HalvedConfig", "AutoModelForCausalLM": "modeling_halved.HalvedForCausalLM"})
    (custom / "config.json").write_text(json.dumps(config))
    (custom / "configuration_halved.py").write_text(CUSTOM_CONFIG)
    (custom / "modeling_halved.py").write_text(CUSTOM_MODEL)
    args = ["sweep", bank_dir / "tiny.yaml", "--model", custom, *GRID, "--store", tmp_path / "store", "-q"]
    refused = run(*args, "--out", tmp_path / "refused")
    assert refused.exit_code == 2 and not (tmp_path / "refused").exists()
    assert refused.stderr == (f"error: --model: '{custom}' ships its own code, which runs when it loads; engram-eval runs none "
                              "unless you pass --trust-remote-code (read that code first)\n")
    ok(run(*args, "--out", tmp_path / "cli", "--trust-remote-code"))
    got = pl.read_parquet(tmp_path / "cli/results.parquet")
    lm = load_model(str(custom), device="cpu", trust_remote_code=True)
    assert type(lm.model).__name__ == "HalvedForCausalLM"
    assert_same_results(got, pl.read_parquet(sweep(lm, bank_dir / "tiny.yaml", tmp_path / "lib", **LIBRARY_GRID).results_path))
    assert not got["p_correct"].equals(default_sweep["p_correct"])


# ---------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def flipping_run(tiny, tmp_path_factory) -> Path:
    """A tiny run with flips and breaks, so every --cells selection is a different set of rows."""
    folder = tmp_path_factory.mktemp("flipping")
    result = sweep(tiny, write_tiny_bank(folder), folder / "run", layers=[1, 2, 4], strengths=[1.0, 5.0, 20.0])
    return result.out


def row_key(row: dict) -> tuple:
    return (row["question_id"], row["role"], row["engram"], row["layer"], row["strength"], row["chunks"], row["context"])


def expected_selection(frame: pl.DataFrame, selection: str) -> set[tuple]:
    """The --cells rule, written out row by row."""
    rows = frame.to_dicts()
    if selection == "all":
        return {row_key(r) for r in rows}
    baseline = {row_key(r) for r in rows if r["role"] == "baseline"}
    if selection == "baseline":
        return baseline
    moved = {row_key(r) for r in rows if r["role"] != "baseline" and (r["flipped"] or r["broken"])}
    if selection == "flips":
        return baseline | moved
    chosen = set(baseline) | {row_key(r) for r in rows if r["role"] == "relevant" and (r["flipped"] or r["broken"])}
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["role"] != "baseline":
            groups.setdefault((r["question_id"], r["context"], r["control_kind"] or r["role"]), []).append(r)
    for cells in groups.values():
        chosen.add(row_key(max(cells, key=lambda r: r["ratio"])))
        chosen.add(row_key(min(cells, key=lambda r: r["ratio"])))
    return chosen


def test_generate_cells_decodes_exactly_the_selected_rows(tiny_model_dir, flipping_run):
    results = pl.read_parquet(flipping_run / "results.parquet")
    assert results["flipped"].any() and results["broken"].any()
    sizes = set()
    for selection in ("default", "all", "baseline", "flips"):
        ok(run("generate", flipping_run, "--model", tiny_model_dir, "--cells", selection, "--max-new-tokens", "1", "--force", "-q"))
        generated = pl.read_parquet(flipping_run / "generations.parquet")
        keys = [row_key(r) for r in generated.to_dicts()]
        assert len(keys) == len(set(keys)) and set(keys) == expected_selection(results, selection), selection
        sizes.add(len(keys))
    assert len(sizes) == 4  # four different selections


def test_generate_max_new_tokens_and_batch_size_equal_the_library(tiny, tiny_model_dir, tmp_path, monkeypatch):
    import engram_eval.run.generation as generation

    bank = write_tiny_bank(tmp_path)
    a = sweep(tiny, bank, tmp_path / "a", layers=[1], strengths=[5.0]).out
    b = sweep(tiny, bank, tmp_path / "b", layers=[1], strengths=[5.0]).out
    sizes = []
    real = generation.generate_in_batches
    monkeypatch.setattr(generation, "generate_in_batches", lambda lm, todo, n, size, *r, **k: sizes.append(size) or real(lm, todo, n, size, *r, **k))
    ok(run("generate", a, "--model", tiny_model_dir, "--cells", "all", "--max-new-tokens", "3", "--batch-size", "2", "-q"))
    assert sizes and set(sizes) == {2}
    got = pl.read_parquet(a / "generations.parquet")
    expected = pl.read_parquet(generation.run_generate(tiny, b, cells="all", max_new_tokens=3, progress=False).generations_path)
    assert got.select("question_id", "engram", "text", "token_ids").equals(expected.select("question_id", "engram", "text", "token_ids"))
    assert got["n_tokens"].max() == 3 and json.loads((a / "generation.json").read_text())["settings"]["max_new_tokens"] == 3


def test_generate_force_replaces_generations_of_other_settings(tiny, tiny_model_dir, tmp_path):
    out = sweep(tiny, write_tiny_bank(tmp_path), tmp_path / "run", layers=[1], strengths=[5.0]).out
    ok(run("generate", out, "--model", tiny_model_dir, "--max-new-tokens", "1", "-q"))
    refused = run("generate", out, "--model", tiny_model_dir, "--max-new-tokens", "2", "-q")
    assert refused.exit_code == 2 and "--force" in refused.stderr
    assert pl.read_parquet(out / "generations.parquet")["n_tokens"].max() == 1
    ok(run("generate", out, "--model", tiny_model_dir, "--max-new-tokens", "2", "--force", "-q"))
    assert pl.read_parquet(out / "generations.parquet")["n_tokens"].max() == 2


# ---------------------------------------------------------------- report


def test_report_formats_and_output(flipping_run, tmp_path):
    from engram_eval.report.rendering import render_json, render_markdown
    from engram_eval.report.summary import load_generations, load_run, summarize

    frame, run_json = load_run(flipping_run)
    summary = summarize(frame, run_json, generations=load_generations(flipping_run))
    as_json = ok(run("report", flipping_run, "--format", "json")).stdout
    assert json.loads(as_json) == json.loads(render_json(summary))
    assert {k: v for k, v in json.loads(as_json).items() if k != "sections"} == json.loads(json.dumps(summary.to_dict(), default=str))
    markdown = ok(run("report", flipping_run, "--format", "markdown")).stdout
    assert markdown == render_markdown(summary) + "\n"
    table = ok(run("report", flipping_run)).stdout
    assert "Headline" in table and "## Headline" not in table and not table.lstrip().startswith("{")
    html_path = flipping_run / "report.html"
    assert ok(run("report", flipping_run, "--format", "html")).stdout == f"{html_path}\n"
    assert html_path.read_text().startswith("<!doctype html>")
    for output_format, expected in (("json", as_json), ("markdown", markdown), ("table", table)):
        target = tmp_path / f"report.{output_format}"
        assert ok(run("report", flipping_run, "--format", output_format, "--output", target)).stdout == f"{target}\n"
        assert target.read_text() == expected, output_format
    ok(run("report", flipping_run, "--format", "html", "--output", tmp_path / "page.html"))
    assert (tmp_path / "page.html").read_text() == html_path.read_text()


def test_report_engram_role_picks_the_heatmaps(flipping_run):
    def heatmaps(*args):
        return sorted(json.loads(ok(run("report", flipping_run, "--format", "json", *args)).stdout)["heatmaps"])

    assert heatmaps() == heatmaps("--engram-role", "relevant") == ["relevant"]
    assert heatmaps("--engram-role", "control") == ["anti", "irrelevant", "random"]
    assert heatmaps("--engram-role", "all") == ["anti", "irrelevant", "random", "relevant"]


def test_report_allow_different_banks(tiny, flipping_run, tmp_path):
    other = sweep(tiny, write_tiny_bank(tmp_path, {"q9": ("The antidote is", [" dantrolene"], [" ice"])}), tmp_path / "other",
                  layers=[1], strengths=[1.0]).out
    refused = run("report", flipping_run, other)
    assert refused.exit_code == 2 and "--allow-different-banks" in refused.stderr
    both = json.loads(ok(run("report", flipping_run, other, "--allow-different-banks", "--format", "json")).stdout)
    assert [r["run"] for r in both["runs"]] == [str(flipping_run), str(other)]


def test_report_question_drills_down_to_that_questions_rows(flipping_run):
    frame = pl.read_parquet(flipping_run / "results.parquet").filter(pl.col("question_id") == "q2")
    drill = json.loads(ok(run("report", flipping_run, "--question", "q2", "--format", "json")).stdout)
    assert drill["question_id"] == "q2"
    (condition,) = drill["conditions"]
    cells = frame.filter(pl.col("role") != "baseline")
    assert condition["baseline"]["p_correct"] == frame.filter(pl.col("role") == "baseline")["p_correct"][0]
    assert sorted((c["engram"], c["layer"], c["strength"], c["p_correct"]) for c in condition["cells"]) == sorted(
        cells.select("engram", "layer", "strength", "p_correct").rows())
    table = ok(run("report", flipping_run, "--question", "q2")).stdout
    assert "q2" in table and "q1:" not in table


def test_report_split_chooses_on_the_seeds_half(flipping_run):
    base = pl.read_parquet(flipping_run / "results.parquet").filter(pl.col("role") == "baseline").sort("question_id")
    for seed in (0, 3):
        rng, chosen = np.random.default_rng(seed), []  # stratified: half of each, an odd wrong one to the choosing half
        for correct in (False, True):
            stratum = base.filter(pl.col("correct_before") == correct)["question_id"].to_list()
            order = [stratum[i] for i in rng.permutation(len(stratum))]
            chosen += order[: len(stratum) // 2 if correct else (len(stratum) + 1) // 2]
        data = json.loads(ok(run("report", flipping_run, "--split", seed, "--format", "json")).stdout)["split"]
        assert (data["seed"], data["chosen_on"], data["measured_on"]) == (seed, sorted(chosen), sorted(set(base["question_id"]) - set(chosen)))
        table = ok(run("report", flipping_run, "--split", seed)).stdout
        assert f"Held-out best cell (--split {seed})" in table
    assert json.loads(ok(run("report", flipping_run, "--format", "json")).stdout)["split"] is None


# ---------------------------------------------------------------- check


def test_check_tolerances_and_update(flipping_run, tmp_path):
    from engram_eval.report.check import summarize_run
    from engram_eval.report.summary import load_run

    baseline = tmp_path / "baseline.json"
    assert ok(run("check", flipping_run, "--baseline", baseline, "--update")).stdout.startswith(f"baseline {baseline} updated")
    assert json.loads(baseline.read_text()) == json.loads(json.dumps(summarize_run(*load_run(flipping_run))))
    assert ok(run("check", flipping_run, "--baseline", baseline)).stdout.startswith("check passed")
    data = json.loads(baseline.read_text())
    key = next(k for k, c in data["cells"].items() if abs(c["log_ratio"]) > 0.1)
    data["cells"][key]["log_ratio"] *= 1.001  # a relative drift of 1e-3
    drifted = tmp_path / "drifted.json"
    drifted.write_text(json.dumps(data))
    failed = run("check", flipping_run, "--baseline", drifted)
    assert failed.exit_code == 1 and key in failed.stdout
    assert run("check", flipping_run, "--baseline", drifted, "--atol", "0", "--rtol", "1e-2").exit_code == 0
    assert run("check", flipping_run, "--baseline", drifted, "--atol", "0", "--rtol", "1e-4").exit_code == 1
    assert run("check", flipping_run, "--baseline", drifted, "--rtol", "0", "--atol", "1").exit_code == 0
    assert run("check", flipping_run, "--baseline", drifted, "--rtol", "0", "--atol", "1e-6").exit_code == 1
    missing = run("check", flipping_run, "--baseline", tmp_path / "none.json")
    assert missing.stderr == f"error: --baseline {tmp_path / 'none.json'}: not found (create it with --update)\n"


# ---------------------------------------------------------------- bench


def test_bench_options_reach_the_benchmark(tiny_model_dir, bank_dir, tmp_path, monkeypatch):
    import engram_eval.bench.benchmark as bench_module

    calls = []
    real = bench_module.run_bench

    def spy(lm, bank, layers, strengths, **kwargs):
        calls.append((lm.num_layers, lm.description, bank.name, layers, strengths, kwargs))
        return real(lm, bank, layers, strengths, **kwargs)

    monkeypatch.setattr(bench_module, "run_bench", spy)
    shown = ok(run("bench", "--model", tiny_model_dir, "--bank", bank_dir / "tiny.yaml", "--layers", "1,3", "--strengths", "2",
                   "--loop-cells", "2", "--batch-size", "3", "--injection", "actadd", "--generation-cells", "1")).stdout
    assert calls[-1][2:] == ("tiny", [1, 3], [2.0], {"loop_cells": 2, "batch_size": 3, "injection": "actadd", "generation_cells": 1,
                                                      "ray": None})
    assert "actadd injection" in shown and "generation speedup" in shown
    config = tmp_path / "small.config.json"
    config.write_text(json.dumps({"model_type": "llama", "hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2,
                                  "num_key_value_heads": 1, "num_hidden_layers": 3, "vocab_size": 700}))

    def stop(lm, bank, layers, strengths, **kwargs):
        calls.append((lm.num_layers, lm.description, bank.name, layers, strengths, kwargs))
        raise EngramEvalError("stopped by the test")

    monkeypatch.setattr(bench_module, "run_bench", stop)
    stopped = run("bench", "--model", tiny_model_dir, "--bank", bank_dir / "tiny.yaml", "--layers", "1", "--strengths", "1",
                  "--generation-cells", "0", "--random-init", config)
    assert stopped.stderr == "error: stopped by the test\n"
    assert calls[-1][:2] == (3, "random-init small.config.json, float32")
    assert calls[-1][5] == {"loop_cells": 120, "batch_size": None, "injection": "prefix", "generation_cells": 0, "ray": None}


# ---------------------------------------------------------------- build


EXTRACTION_EFFECTS = [  # build and compare: each extraction option against the library's extraction
    ([], Extraction()),
    (["--pooling", "last"], Extraction(pooling="last")),
    (["--pooling", "pca"], Extraction(pooling="pca")),
    (["--skip-tokens", "1"], Extraction(skip_tokens=1)),
    (["--window", "8"], Extraction(window=8)),
    (["--max-tokens", "10"], Extraction(max_tokens=10)),
    (["--pooling", "learned", "--learn-steps", "2"], Extraction(pooling="learned", learn_steps=2)),
    (["--pooling", "learned", "--learn-steps", "2", "--learn-lr", "0.05", "--learn-seed", "3"],
     Extraction(pooling="learned", learn_steps=2, learn_lr=0.05, learn_seed=3)),
    (["--pooling", "learned", "--learn-steps", "2", "--learn-objective", "distill"],
     Extraction(pooling="learned", learn_steps=2, learn_objective="distill")),
]


@pytest.mark.parametrize("args,extraction", EXTRACTION_EFFECTS, ids=[" ".join(a) or "seed" for a, _ in EXTRACTION_EFFECTS])
def test_build_options_store_the_librarys_engrams(args, extraction, tiny, tiny_model_dir, bank_dir, tmp_path):
    from engram_eval.engram.extraction import extract_engram
    from engram_eval.engram.store import EngramStore

    ok(run("build", "--bank", bank_dir / "tiny.yaml", "--model", tiny_model_dir, "--chunks", "2,4", "--layers", "1,3", *args,
           "--store", tmp_path / "store"))
    store = EngramStore(tmp_path / "store")
    stored = [store.load(path) for path in store.paths()]
    assert sorted((s.metadata["source_name"], s.engram.chunks) for s in stored) == sorted((n, k) for n in TINY_SOURCES for k in (2, 4))
    for s in stored:
        expected = extract_engram(tiny, TINY_SOURCES[s.metadata["source_name"]], [1, 3], chunks=s.engram.chunks, extraction=extraction)
        assert sorted(s.engram.layers) == [1, 3] and s.engram.n_tokens == expected.n_tokens
        for layer in (1, 3):
            assert s.engram.layers[layer].equal(expected.layers[layer]), (s.metadata["source_name"], layer)


def test_build_force_rebuilds(tiny_model_dir, tmp_path):
    source = tmp_path / "a.txt"
    source.write_text("alpha beta gamma delta epsilon")
    args = ["build", source, "--model", tiny_model_dir, "--chunks", "2", "--layers", "1", "--store", tmp_path / "store"]
    assert "built" in ok(run(*args)).stdout
    (path,) = (tmp_path / "store").glob("*.safetensors")
    path.write_bytes(path.read_bytes())  # same content, new inode: a rebuild replaces the file
    inode = path.stat().st_ino
    assert "cached" in ok(run(*args)).stdout and path.stat().st_ino == inode
    rebuilt = ok(run(*args, "--force")).stdout
    assert "built" in rebuilt and "cached" not in rebuilt and path.stat().st_ino != inode


# ---------------------------------------------------------------- compare




@pytest.mark.parametrize("args,extraction", EXTRACTION_EFFECTS, ids=[" ".join(a) or "seed" for a, _ in EXTRACTION_EFFECTS])
def test_compare_options_equal_the_library(args, extraction, tiny, tiny_model_dir, shallow_model_dir, bank_dir, tmp_path):
    from engram_eval.engram.geometry import compare_engrams
    from engram_eval.backend.model import load_model
    from engram_eval.engram.store import EngramStore

    names = ["topic", "anti", "stars"]
    out = tmp_path / "geometry.parquet"
    ok(run("compare", "--bank", bank_dir / "tiny.yaml", *names, "--model", tiny_model_dir, "--layers", "1,3", "--chunks", "2,4",
           *args, "--store", tmp_path / "store", "--out", out))
    got = pl.read_parquet(out)
    texts = {name: TINY_SOURCES[name] for name in TINY_SOURCES}
    pairs = [("topic", "anti"), ("topic", "stars"), ("anti", "stars")]
    expected = compare_engrams(tiny, texts, pairs, [1, 3], [2, 4], extraction, EngramStore(tmp_path / "lib-store"))
    assert_same_results(got.drop("depth"), expected)
    assert got["depth"].to_list() == [layer / 4 for layer in got["layer"]]
    assert {p.name.split(".")[1] for p in (tmp_path / "store").glob("*.safetensors")} == {
        p.name.split(".")[1] for p in (tmp_path / "lib-store").glob("*.safetensors")}
    if not args:  # --depths and two --model: each model at its own layer round(depth x layers)
        ok(run("compare", "--bank", bank_dir / "tiny.yaml", "topic", "anti", "--model", tiny_model_dir, "--model", shallow_model_dir,
               "--depths", "0.5", "--chunks", "2", "--store", tmp_path / "store", "--out", out))
        got = pl.read_parquet(out)
        shallow = load_model(str(shallow_model_dir), device="cpu")
        assert got.select("model", "layer").rows() == [(tiny.name, 2), (shallow.name, 1)]
        expected = compare_engrams(shallow, {"topic": texts["topic"], "anti": texts["anti"]}, [("topic", "anti")], [1], [2], extraction,
                                   EngramStore(tmp_path / "lib-store"))
        assert got["cosine"][1] == pytest.approx(expected["cosine"][0], rel=1e-6)


# ---------------------------------------------------------------- --allow-outside-paths


def test_allow_outside_paths_admits_a_source_outside_the_banks_folder(tiny_model_dir, tmp_path):
    (tmp_path / "outside.txt").write_text(TINY_SOURCES["topic"])
    folder = tmp_path / "bank"
    folder.mkdir()
    bank = write_tiny_bank(folder)
    bank.write_text(re.sub(r"  topic: \{text: .*\}", "  topic: {file: ../outside.txt, kind: relevant}", bank.read_text()))
    tiny = ["--model", tiny_model_dir]
    commands = {
        "sweep": ["sweep", bank, *tiny, "--layers", "1", "--strengths", "1", "--chunks", "4", "--out", tmp_path / "run",
                  "--store", tmp_path / "store", "-q"],
        "build": ["build", "--bank", bank, *tiny, "--chunks", "4", "--layers", "1", "--store", tmp_path / "store"],
        "compare": ["compare", "--bank", bank, "topic", "anti", *tiny, "--layers", "1", "--chunks", "4", "--store", tmp_path / "store"],
        "bank stats": ["bank", "stats", bank, *tiny],
        "bank validate": ["bank", "validate", bank],
    }
    for name, args in commands.items():
        refused = run(*args)
        assert refused.exit_code == 2 and "outside" in refused.stderr and "--allow-outside-paths" in refused.stderr, name
        ok(run(*args, "--allow-outside-paths"))
    from engram_eval.bank.banks import load_bank

    assert load_bank(bank, allow_outside_paths=True).sources["topic"].text == TINY_SOURCES["topic"]


# ---------------------------------------------------------------- bank


def test_bank_import_naming_template_controls_answer_base_and_force(tmp_path, monkeypatch):
    from test_bank_import import RECORDS, write

    from engram_eval.bank.banks import load_bank

    data = write(tmp_path, ".jsonl", [{**r, "gold": r["gold"] + 1} for r in RECORDS])
    out = tmp_path / "made" / "mine.yaml"
    out.parent.mkdir()
    args = ["bank", "import", data, "--map", "id=qid,question=q,choices=options,answer=gold,source=why", "--out", out,
            "--name", "my-bank", "--template", "Q: {question}\n{choices}\nA:", "--controls", "~gaussian,random", "--answer-base", "1"]
    ok(run(*args))
    bank = load_bank(out)
    assert bank.name == "my-bank" and (out.parent / "mine-sources").is_dir()
    first = RECORDS[0]
    assert bank.questions[0].prompt == f"Q: {first['q']}\nA) Venus\nB) Mars\nC) Jupiter\nA:"
    assert [q.correct for q in bank.questions] == [(f" {'ABC'[r['gold']]}",) for r in RECORDS]  # 1-based answers, read as such
    assert all(q.controls == ("~gaussian", "random") for q in bank.questions)
    assert "irrelevant" not in bank.sources and bank.sources["random"].kind == "random"
    refused = run(*args)
    assert refused.exit_code == 2 and "--force" in refused.stderr
    ok(run(*args[:-2], "--answer-base", "0", "--force"))
    assert [q.correct for q in load_bank(out).questions] == [(f" {'ABC'[r['gold'] + 1]}",) for r in RECORDS]  # now read 0-based
    monkeypatch.chdir(tmp_path)
    ok(run("bank", "import", data, "--map", "id=qid,question=q,choices=options,answer=gold,source=why", "--answer-base", "1"))
    assert load_bank(tmp_path / "data.yaml").name == "data" and (tmp_path / "data-sources").is_dir()  # --out's default: here


def test_bank_stats_and_validate_options(tiny_model_dir, tmp_path):
    from engram_eval.backend.model import load_tokenizer

    bank = write_tiny_bank(tmp_path, {"q1": ("The drug is", ["  alpha"], [" beta"]), "q2": ("Before glucose you must give", [" thiamine"], [" insulin"]),
                                      "q3": ("The antidote for this poisoning is", [" dantrolene"], [" ice"]),
                                      "q4": ("First", [" alpha"], [" beta"])})
    plain = ok(run("bank", "validate", bank))
    assert plain.stderr == "" and plain.stdout == f"{bank}: 4 questions, 4 sources: valid\n"
    checked = ok(run("bank", "validate", bank, "--model", tiny_model_dir))
    assert "variant '  alpha' starts with the whitespace token" in checked.stderr and "its first tokens on" in checked.stdout
    strict = run("bank", "validate", bank, "--model", tiny_model_dir, "--strict")
    assert strict.exit_code == 2 and strict.stderr.startswith("error: ") and strict.stderr.endswith("(--strict)\n")
    assert run("bank", "validate", bank, "--strict").exit_code == 0  # no warning without the tokenizer checks
    tokenizer = load_tokenizer(str(tiny_model_dir)).tokenizer
    lengths = sorted(len(tokenizer(q)["input_ids"]) for q in ("The drug is", "Before glucose you must give",
                                                                "The antidote for this poisoning is", "First"))
    median = (lengths[1] + lengths[2]) / 2
    stats = ok(run("bank", "stats", bank, "--model", tiny_model_dir)).stdout
    assert f"{lengths[0]} / {median:g} / {lengths[3]}" in stats


def test_bank_validate_baseline_equals_the_sweeps_baseline_rows(tiny, tiny_model_dir, tmp_path):
    """--baseline prints what the sweep's baseline rows hold, per question, and names the off-distribution ones in one
    warning; without --model it is refused."""
    from conftest import sweep

    from engram_eval.run.results import OFF_DISTRIBUTION_MASS

    bank = write_tiny_bank(tmp_path)
    base = pl.read_parquet(sweep(tiny, bank, tmp_path / "run", layers=[1], strengths=[1.0]).results_path).filter(pl.col("role") == "baseline")
    shown = ok(run("bank", "validate", bank, "--model", tiny_model_dir, "--baseline"))
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]] for line in shown.stdout.splitlines()
            if line.startswith("│")}
    for row in base.iter_rows(named=True):
        got = rows[row["question_id"]]
        assert got[:4] == [f"{row['p_correct']:.3g}", f"{row['p_incorrect']:.3g}", f"{row['mass']:.3g}", f"{row['ratio']:.3g}"]
        assert got[4] == f"{row['top_token']!r} ({row['p_top']:.2f})"
    off = base.filter(pl.col("mass") < OFF_DISTRIBUTION_MASS)["question_id"].to_list()
    assert off  # a random-init model's answers hold almost none of the probability
    (warning,) = [line for line in shown.stderr.splitlines() if "off-distribution" in line]
    assert warning.startswith(f"warning: {bank}: {len(off)} of {base.height} question(s) have their answers off-distribution")
    assert all(f"'{q}' (its answers hold" in warning for q in off[:3])
    refused = run("bank", "validate", bank, "--baseline")
    assert refused.exit_code == 2 and refused.stderr == "error: --baseline: give --model too (the baseline is the model's)\n"


# ---------------------------------------------------------------- store


def test_store_commands_act_on_the_store_given(tiny_model_dir, tmp_path):
    source = tmp_path / "a.txt"
    for name, text in (("one", "alpha beta gamma delta epsilon"), ("two", "epsilon delta gamma beta alpha")):
        source.write_text(text)
        ok(run("build", source, "--model", tiny_model_dir, "--chunks", "2", "--layers", "1", "--store", tmp_path / name))
    (tmp_path / "two/.tmp-999999999-x.safetensors").write_bytes(b"partial")
    (path_one,) = (tmp_path / "one").glob("*.safetensors")
    (path_two,) = (tmp_path / "two").glob("a.*.safetensors")
    from engram_eval.engram.store import EngramStore

    key_one, key_two = EngramStore.key_of(path_one), EngramStore.key_of(path_two)
    listed = ok(run("store", "ls", "--store", tmp_path / "one")).stdout
    assert key_one in listed and key_two not in listed
    assert key_one in ok(run("store", "show", "a", "--store", tmp_path / "one")).stdout
    ok(run("store", "gc", "--store", tmp_path / "two", "--runs", tmp_path, "--dry-run"))
    ok(run("store", "rm", "a", "--store", tmp_path / "one"))
    assert not path_one.exists() and path_two.exists()
    ok(run("store", "gc", "--store", tmp_path / "two", "--runs", tmp_path / "one", "--yes"))
    assert not (tmp_path / "two/.tmp-999999999-x.safetensors").exists()


def test_store_gc_runs_and_dry_run(tiny, tmp_path):
    """Without --runs gc removes temporaries only (a run written elsewhere must not lose its engrams); with --runs it
    lists what it removes and keeps, and asks before removing engrams unless --yes."""
    from engram_eval.engram.store import EngramStore

    store = EngramStore(tmp_path / "store")
    kept, _ = store.ensure(tiny, "kept", "alpha beta gamma delta", layers=[1], chunks=2)
    dropped, _ = store.ensure(tiny, "dropped", "beta gamma delta alpha", layers=[1], chunks=2)
    stale = tmp_path / "store/.tmp-999999999-x.safetensors"
    stale.write_bytes(b"partial")
    (tmp_path / "runs/a").mkdir(parents=True)
    (tmp_path / "runs/a/run.json").write_text(json.dumps({"engram_keys": {"kept": kept.key}}))
    (tmp_path / "empty").mkdir()
    listing = sorted([kept.path, dropped.path])
    alone = ok(run("store", "gc", "--store", tmp_path / "store")).stdout
    assert alone == (f"removing {stale}\n" + "".join(f"keeping {p}\n" for p in listing)
                     + "1 temporary file(s) and 0 engram(s) removed; 2 engram(s) kept (engrams are removed only with --runs)\n")
    assert not stale.exists() and kept.path.exists() and dropped.path.exists()
    dry = ok(run("store", "gc", "--store", tmp_path / "store", "--runs", tmp_path / "runs", "--dry-run")).stdout
    assert dry == (f"would remove {dropped.path}\nkeeping {kept.path}\n"
                   "0 temporary file(s) and 1 engram(s) to remove; 1 engram(s) kept\n") and dropped.path.exists()
    refused = run("store", "gc", "--store", tmp_path / "store", "--runs", tmp_path / "runs", input="n\n")
    assert refused.exit_code == 1 and "Aborted" in refused.output and dropped.path.exists()
    confirmed = ok(run("store", "gc", "--store", tmp_path / "store", "--runs", tmp_path / "runs", input="y\n"))
    assert "remove 1 engram(s) that no run under" in confirmed.stderr and not dropped.path.exists()
    again, _ = store.ensure(tiny, "dropped", "beta gamma delta alpha", layers=[1], chunks=2)
    removed = ok(run("store", "gc", "--store", tmp_path / "store", "--runs", tmp_path / "runs", "--runs", tmp_path / "empty", "--yes")).stdout
    assert removed == f"removing {again.path}\nkeeping {kept.path}\n0 temporary file(s) and 1 engram(s) removed; 1 engram(s) kept\n"
    assert kept.path.exists() and not again.path.exists()
