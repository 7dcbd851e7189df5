"""Sweeps and generation on a real local Ray cluster (started once for these tests), with the tiny model."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch

import engram_eval.engram.store as store_module
from engram_eval.bank.banks import load_bank
from engram_eval.run.distributed import TEST_KILL_ONCE, RayOptions
from engram_eval.core.errors import EngramEvalError
from engram_eval.run.generation import run_generate
from engram_eval.run.rundir import PART_CHECKSUMS
from engram_eval.engram.store import EngramStore
from conftest import flat_sweep, wait_for

ray = pytest.importorskip("ray")
REPO = Path(__file__).resolve().parents[1]
KEY = ["question_id", "role", "engram", "layer", "strength"]
GRID = dict(layers=[1, 4], strengths=[0.5, 3.0], chunks=4, progress=False, warn=lambda message: None)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


@pytest.fixture
def one_thread():
    """The single-process reference at one thread, like each worker: float32 reductions then split alike."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def sorted_rows(path: Path) -> pl.DataFrame:
    return pl.read_parquet(path).drop("engram_key").sort(KEY, nulls_last=True)


def test_a_sharded_sweep_equals_the_single_process_sweep(cluster, tiny, tiny_bank, tmp_path, one_thread):
    single = flat_sweep(tiny, load_bank(tiny_bank), EngramStore(tmp_path / "s1"), tmp_path / "single", **GRID)
    sharded = flat_sweep(tiny, load_bank(tiny_bank), EngramStore(tmp_path / "s2"), tmp_path / "ray", ray=RayOptions(workers=2), **GRID)
    assert sorted_rows(sharded.results_path).equals(sorted_rows(single.results_path))
    assert sharded.run["distributed"] == {"ray": ray.__version__, "workers": 2, "gpus_per_worker": 0.0, "threads_per_worker": 1}
    assert sharded.run["run_id"] == single.run["run_id"]  # the workers are not a setting


def test_a_worker_killed_mid_question_has_its_question_retried(cluster, tiny, tiny_bank, tmp_path, monkeypatch, one_thread):
    marker = tmp_path / "killed"
    monkeypatch.setenv(TEST_KILL_ONCE, f"q2:{marker}")
    sharded = flat_sweep(tiny, load_bank(tiny_bank), EngramStore(tmp_path / "s"), tmp_path / "ray", ray=RayOptions(workers=2), **GRID)
    assert marker.exists()  # a worker did die on q2
    single = flat_sweep(tiny, load_bank(tiny_bank), EngramStore(tmp_path / "s"), tmp_path / "single", **GRID)
    assert sorted_rows(sharded.results_path).equals(sorted_rows(single.results_path))


def test_the_store_is_filled_once_by_the_driver(cluster, tiny, tiny_bank, tmp_path, monkeypatch):
    real, built = store_module.extract_engrams, []

    def counting(lm, ids, *args, **kwargs):
        built.append(len(ids))
        return real(lm, ids, *args, **kwargs)

    monkeypatch.setattr(store_module, "extract_engrams", counting)
    flat_sweep(tiny, load_bank(tiny_bank), EngramStore(tmp_path / "s"), tmp_path / "ray", ray=RayOptions(workers=2), **GRID)
    assert len(built) == 4 and len(EngramStore(tmp_path / "s").paths()) == 4  # one pass per source, in the driver


def test_generation_on_ray_equals_local_generation(cluster, tiny, tiny_bank, tmp_path, one_thread):
    result = flat_sweep(tiny, load_bank(tiny_bank), EngramStore(tmp_path / "s"), tmp_path / "run", **GRID)
    local = pl.read_parquet(run_generate(tiny, result.out, max_new_tokens=6, progress=False).generations_path)
    (result.out / "generations.parquet").unlink()
    for path in (result.out / "generation-parts").iterdir():
        path.unlink()
    sharded = run_generate(tiny, result.out, max_new_tokens=6, batch_size=8, progress=False, ray=RayOptions(workers=2))
    assert pl.read_parquet(sharded.generations_path).equals(local) and sharded.info["distributed"]["workers"] == 2


def test_a_killed_driver_leaves_whole_parts_and_a_rerun_resumes(cluster, tiny_model_dir, tiny_bank, tmp_path):
    def sweep_command(out: str) -> list[str]:
        return [sys.executable, "-m", "engram_eval.cli", "sweep", str(tiny_bank), "--model", str(tiny_model_dir), "--layers", "0-4",
                "--strengths", "0.5,1,1.5,2,3,4,5,6,8,10", "--chunks", "4", "--batch-size", "1", "--store", str(tmp_path / "s"),
                "--out", str(tmp_path / out), "--ray", cluster, "--workers", "1", "--quiet"]

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(sweep_command("cut"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "cut/parts"

    def recorded() -> int:
        """Parts run.json vouches for (a part is written, then its checksum: a kill between them recomputes it)."""
        try:
            return len(json.loads((tmp_path / "cut/run.json").read_text()).get(PART_CHECKSUMS, {}))
        except (OSError, ValueError):
            return 0

    wait_for(lambda: recorded() >= 1, process)
    assert process.poll() is None  # still running when killed
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = list(parts.glob("*.parquet"))
    assert 1 <= len(done) < 3 and not list(parts.glob(".*"))  # only whole part files
    for part in done:
        pl.read_parquet(part)
    subprocess.run(sweep_command("cut"), env=env, check=True, capture_output=True)
    assert json.loads((tmp_path / "cut/run.json").read_text())["cells"]["resumed"] > 0
    subprocess.run(sweep_command("whole"), env=env, check=True, capture_output=True)
    assert sorted_rows(tmp_path / "cut/results.parquet").equals(sorted_rows(tmp_path / "whole/results.parquet"))


def test_the_default_path_never_imports_ray(tiny_model_dir, tiny_bank, tmp_path):
    code = ("import sys; from click.testing import CliRunner; from engram_eval.cli import cli; "
            f"r = CliRunner().invoke(cli, ['sweep', {str(tiny_bank)!r}, '--model', {str(tiny_model_dir)!r}, '--layers', '1', "
            f"'--strengths', '1', '--chunks', '4', '--out', {str(tmp_path / 'run')!r}, '--store', {str(tmp_path / 's')!r}, '--quiet']); "
            "assert r.exit_code == 0, r.output; print(sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("args,message", [
    (["--ray", "127.0.0.1:1"], "--ray: no Ray cluster answers at 127.0.0.1:1 (waited 10 s)"),
    (["--ray", "auto", "--workers", "0"], "--workers: must be at least 1 (got 0)"),
    (["--workers", "2"], "--workers: only with --ray"),
    (["--ray", "auto", "--gpus-per-worker", "1"], "--gpus-per-worker: 1 GPUs asked for, but the cluster has 0"),
    (["--ray", "auto", "--workers", "3"], "--workers: 3 workers x 1 threads need 3 CPUs; the cluster has 2"),
])
def test_bad_ray_input_is_one_line(cluster, args, message, tiny_model_dir, tiny_bank, tmp_path):
    from click.testing import CliRunner

    from engram_eval.cli import cli

    result = CliRunner().invoke(cli, ["sweep", str(tiny_bank), "--model", str(tiny_model_dir), "--layers", "1", "--strengths", "1",
                                      "--chunks", "4", "--out", str(tmp_path / "run"), "--store", str(tmp_path / "s"), *args])
    assert result.exit_code == 2 and result.stderr == f"error: {message}\n", result.output
    assert not (tmp_path / "run").exists() and not (tmp_path / "s").exists()  # refused before any work


def test_a_model_without_a_name_to_load_is_refused_before_ray_starts(tiny, tmp_path):
    from engram_eval.run.distributed import RayExecutor
    from engram_eval.backend.model import random_init_model

    config = tmp_path / "small.config.json"
    config.write_text(json.dumps({"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                                  "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 700}))
    lm = random_init_model(config, tiny.tokenizer, device=tiny.device, dtype=tiny.dtype)
    with pytest.raises(EngramEvalError) as error:
        RayExecutor(lm, RayOptions("nowhere:1"))
    assert str(error.value) == "--ray: workers load the model by its --model name, and random-init small.config.json has none"


def test_ray_not_installed_says_how_to_install_it(monkeypatch):
    from engram_eval.run.distributed import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without the extra looks like to `import ray`
    with pytest.raises(EngramEvalError) as error:
        import_ray()
    assert str(error.value) == "--ray: Ray is not installed; install the extra: pip install 'engram-eval[ray]'"


def test_bench_measures_rays_throughput_against_this_process_in_one_run(cluster, tiny, tiny_bank):
    from engram_eval.bench.benchmark import bench_ray

    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        r = bench_ray(tiny, load_bank(tiny_bank), EngramStore(Path(folder) / "s"), Path(folder), [1, 4], [0.5, 3.0], 4, "prefix",
                      RayOptions(workers=2), questions=2)
    assert (r["ray_workers"], r["ray_threads_per_worker"]) == (2, 1)
    assert r["ray_throughput_ratio"] == pytest.approx(r["ray_cells_per_second"] / r["process_cells_per_second"])


def cli_run(*args):
    from click.testing import CliRunner

    from engram_eval.cli import cli

    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_sweep_and_generate_on_ray_from_the_command_line(cluster, tiny, tiny_model_dir, tiny_bank, tmp_path, one_thread):
    """--ray, --workers and --threads-per-worker reach the pool: run.json (and generation.json) record them, and the
    rows equal this process's, the neutral probe's included."""
    args = ["--model", tiny_model_dir, "--layers", "1,4", "--strengths", "0.5,3", "--chunks", "4", "--store", tmp_path / "s",
            "--neutral", "default", "-q"]
    sharded = cli_run("sweep", tiny_bank, *args, "--out", tmp_path / "ray", "--ray", cluster, "--workers", "2", "--threads-per-worker", "1")
    assert sharded.exit_code == 0, sharded.output
    assert cli_run("sweep", tiny_bank, *args, "--out", tmp_path / "local").exit_code == 0
    distributed = json.loads((tmp_path / "ray/run.json").read_text())["distributed"]
    assert (distributed["workers"], distributed["threads_per_worker"]) == (2, 1)
    assert sorted_rows(tmp_path / "ray/results.parquet").equals(sorted_rows(tmp_path / "local/results.parquet"))
    effects = [pl.read_parquet(tmp_path / run / "side_effects.parquet") for run in ("ray", "local")]
    assert effects[0].height == 4 * 2 * 2 and effects[0].equals(effects[1])
    generated = cli_run("generate", tmp_path / "ray", "--model", tiny_model_dir, "--max-new-tokens", "3", "--ray", cluster, "--workers", "1", "-q")
    assert generated.exit_code == 0, generated.output
    assert json.loads((tmp_path / "ray/generation.json").read_text())["distributed"]["workers"] == 1
    assert cli_run("generate", tmp_path / "local", "--model", tiny_model_dir, "--max-new-tokens", "3", "-q").exit_code == 0
    texts = [pl.read_parquet(tmp_path / run / "generations.parquet").sort("question_id", "engram", "layer", "strength", nulls_last=True)
             .select("question_id", "text") for run in ("ray", "local")]
    assert texts[0].equals(texts[1])
    busy = cli_run("sweep", tiny_bank, *args, "--out", tmp_path / "busy", "--ray", cluster, "--workers", "1", "--threads-per-worker", "3")
    assert busy.stderr == "error: --workers: 1 workers x 3 threads need 3 CPUs; the cluster has 2\n"


def test_generate_gpus_per_worker_reaches_the_cluster_check(cluster, tiny_model_dir, tmp_path):
    (tmp_path / "run").mkdir()
    refused = cli_run("generate", tmp_path / "run", "--model", tiny_model_dir, "--ray", cluster, "--gpus-per-worker", "0.5")
    assert refused.exit_code == 2 and refused.stderr == "error: --gpus-per-worker: 0.5 GPUs asked for, but the cluster has 0\n"


def test_bench_ray_options_reach_the_ray_benchmark(cluster, tiny_model_dir, tiny_bank, monkeypatch):
    import engram_eval.bench.benchmark as bench_module

    seen = []
    monkeypatch.setattr(bench_module, "run_bench", lambda *a, **k: seen.append(k["ray"]) or (_ for _ in ()).throw(EngramEvalError("stop")))
    result = cli_run("bench", "--model", tiny_model_dir, "--bank", tiny_bank, "--layers", "1", "--ray", cluster, "--workers", "1",
                     "--threads-per-worker", "2")
    assert result.stderr == "error: stop\n"
    assert seen == [RayOptions(cluster, 1, 0.0, 2)]
    assert cli_run("bench", "--bank", tiny_bank, "--ray", cluster, "--workers", "3").stderr == (
        "error: --workers: 3 workers x 1 threads need 3 CPUs; the cluster has 2\n")
