"""engram-eval bench: throughput against the seed loop and the machine's matmul rate."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from ..core.errors import EngramEvalError
from ..core.registry import INJECTIONS
from ..core.spec import SEED_METHOD, RayOptions
from .app import batch_size_option, cli, model_options, registry_option, stderr, stdout


@cli.command()
@model_options
@click.option("--bank", "bank_path", default="questions/medical_traps.yaml", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="Question bank to sweep.")
@click.option("--layers", "layers_text", default="8,12,16,20,24", show_default=True, help="Layers of the sweep grid.")
@click.option("--strengths", "strengths_text", default="0.5,1,2,5,10,20", show_default=True, help="Strengths of the sweep grid.")
@click.option("--loop-cells", default=120, show_default=True, type=click.IntRange(min=1),
              help="Cells timed with the seed's per-cell loop (its rate is compared with the sweep's).")
@batch_size_option("Sweep batch size, or auto.")
@registry_option("--injection", INJECTIONS, SEED_METHOD.injection, help="Injection mode of the sweep and of the per-cell loop it is compared with.")
@click.option("--generation-cells", default=12, show_default=True, type=click.IntRange(min=0),
              help="Cells of the sweep's default generation selection also decoded with one model.generate call each "
                   "(the batched generator's reference); 0 skips the generation benchmark.")
@click.option("--ray", "ray_address", metavar="auto|ADDRESS",
              help="Also measure Ray's overhead: the first questions swept by this process and by Ray workers (--workers, "
                   "--threads-per-worker), alternated; e.g. 2 workers x 1 thread against 1 process x 2 threads.")
@click.option("--workers", type=int, default=2, show_default=True, help="With --ray: worker processes.")
@click.option("--threads-per-worker", type=int, default=1, show_default=True, help="With --ray: CPU threads each worker takes.")
@click.option("--random-init", "random_config", type=click.Path(dir_okay=False, path_type=Path),
              help="Benchmark a randomly initialised model built from this config.json instead of --model's weights "
                   "(--model still gives the tokenizer, device and dtype), e.g. benchmarks/qwen2.5-7b.config.json on a GPU.")
@click.option("--report", "report_runs", multiple=True, type=click.Path(file_okay=False, exists=True, path_type=Path),
              metavar="RUN", help="Instead of the sweep: time `engram-eval report RUN` (table, json, html) in fresh "
                                  "interpreters on one CPU thread, with peak memory, as a ratio to reading the run's "
                                  "results.parquet; repeat for the side-by-side report of several runs. Loads no model.")
@click.option("--trials", default=3, show_default=True, type=click.IntRange(min=1), help="With --report: runs of each "
                                                                                          "measure (the median is shown).")
def bench(load_lm, bank_path: Path, layers_text: str, strengths_text: str, loop_cells: int, batch_size: int | None,
          injection: str, generation_cells: int, ray_address: str | None, workers: int, threads_per_worker: int,
          random_config: Path | None, report_runs: tuple[Path, ...], trials: int) -> None:
    """Measure, in one run: build and sweep throughput, the seed's per-cell loop on the same cells, the machine's
    dense matmul throughput, and the ratios between them (speedup, fraction of matmul FLOP/s), plus peak memory.

    The loop and a matmul probe run before each question of the sweep (outside its timings), so that all three see
    the same contention on a shared machine; the fraction of the run's best matmul throughput is printed too.

    With --report RUN: only the report's cost, against reading the run's Parquet (no model is loaded)."""
    if report_runs:
        return _bench_report(list(report_runs), trials)
    from ..bank.banks import load_bank
    from .parsing import parse_layers
    from .parsing import parse_strengths

    if ray_address is not None and random_config is not None:
        raise EngramEvalError("--ray: not with --random-init (workers load --model's weights by name)")
    strengths = parse_strengths(strengths_text)
    bank = load_bank(bank_path)
    ray = None
    if ray_address is not None:
        from ..run.distributed import plan_workers

        ray = RayOptions(ray_address, workers, 0.0, threads_per_worker)
        plan_workers(ray)
    from ..bench.benchmark import run_bench  # torch: after the checks above

    lm = load_lm()
    if random_config is not None:
        from ..backend.model import random_init_model

        with stderr.status(f"building a random-init model from {random_config} ..."):
            lm = random_init_model(random_config, lm.tokenizer, device=lm.device, dtype=lm.dtype)
    with stderr.status("benchmarking ..."):
        r = run_bench(lm, bank, parse_layers(layers_text, lm.num_layers), strengths, loop_cells=loop_cells,
                      batch_size=batch_size, injection=injection,
                      generation_cells=generation_cells, ray=ray)
    table = Table(title=f"engram-eval bench: {lm.name} on {r['device']} ({r['dtype']}, {r['threads']} threads, {injection} injection)")
    for column in ("measure", "value"):
        table.add_column(column)
    table.add_row(f"build: {r['layers']} layers, one pass per source", f"{r['sources']} sources in {r['build_seconds']:.2f} s")
    table.add_row("build: seed, one pass per layer", f"{r['seed_build_seconds']:.2f} s")
    table.add_row("build speedup", f"{r['build_speedup']:.1f}x")
    table.add_row("sweep throughput", f"{r['sweep_cells_per_second']:.2f} cells/s ({r['cells']} cells)")
    table.add_row("seed per-cell loop", f"{r['loop_cells_per_second']:.2f} cells/s ({r['loop_cells']} cells)")
    table.add_row("sweep speedup over the loop", f"{r['sweep_speedup']:.2f}x")
    table.add_row("achieved / matmul FLOP/s, matmul probed between questions",
                  f"{r['achieved_flops'] / 1e9:.1f} / {r['matmul_flops'] / 1e9:.1f} GFLOP/s = {100 * r['roofline_fraction']:.0f}%")
    table.add_row("achieved / best matmul FLOP/s of the run",
                  f"{r['achieved_flops'] / 1e9:.1f} / {r['matmul_flops_best'] / 1e9:.1f} GFLOP/s = {100 * r['roofline_fraction_of_best']:.0f}%")
    table.add_row("peak RSS", f"{r['peak_rss_mib']:.0f} MiB")
    if r["sweep_rss_end_mib"] is not None:
        table.add_row("sweep RSS: first quarter / whole sweep", f"{r['sweep_rss_quarter_mib']:.0f} / {r['sweep_rss_end_mib']:.0f} MiB")
    table.add_row("neutral probe (--neutral default) / the sweep",
                  f"{100 * r['side_effects_cost']:.0f}% of its time ({r['side_effect_cells']} distinct cells, "
                  f"{r['side_effects_seconds']:.2f} s)")
    table.add_row("sweep with --record-attention (eager attention) / without", f"{r['attention_cost']:.2f}x the time")
    table.add_row("--pooling learned: one step / one forward pass of its objective",
                  f"{r['learned_seconds_per_step']:.3f} s / {r['learned_forward_seconds']:.3f} s = {r['learned_step_over_forward']:.1f}x "
                  f"({r['learned_default_seconds']:.1f} s per source, layer and k at the default 200 steps)")
    table.add_row("start-up: --help / report of the bench's run / python -c pass",
                  f"{r['startup_help_seconds']:.2f} s ({r['startup_help_ratio']:.1f}x) / {r['startup_report_seconds']:.2f} s "
                  f"({r['startup_report_ratio']:.1f}x) / {r['startup_python_seconds']:.3f} s (targets: under 1 s and 3 s)")
    if "ray_throughput_ratio" in r:
        table.add_row(f"Ray: {r['ray_workers']} workers x {r['ray_threads_per_worker']} thread(s)", f"{r['ray_cells_per_second']:.2f} cells/s")
        table.add_row(f"this process: {r['process_threads']} threads, same cells", f"{r['process_cells_per_second']:.2f} cells/s")
        table.add_row("Ray throughput / this process's", f"{100 * r['ray_throughput_ratio']:.0f}% (overhead target: under 10%)")
    if "generation_speedup" in r:
        table.add_row("generation: batched, default selection", f"{r['generation_tokens_per_second']:.1f} tokens/s ({r['generation_cells']} cells)")
        table.add_row("generation: model.generate per cell", f"{r['generation_reference_tokens_per_second']:.1f} tokens/s "
                                                             f"({r['generation_reference_cells']} of the same cells)")
        table.add_row("generation speedup", f"{r['generation_speedup']:.2f}x")
    if "ensemble_token_cost" in r:
        table.add_row("generate --ensemble 3 --reextract: per token / plain batched's",
                      f"{r['ensemble_seconds_per_token']:.3f} s = {r['ensemble_token_cost']:.1f}x plain batched generation's cost")
    stdout().print(table)


REPORT_TARGETS = (3.0, 500.0)  # seconds and MiB of `report` on the 192-question capitals run (docs/performance.md)


def _bench_report(run_dirs: list[Path], trials: int) -> None:
    from ..bench.report_bench import bench_report
    from ..report.summary import load_run

    frames = [load_run(run_dir)[0] for run_dir in run_dirs]  # one line naming a run that cannot be read, before any timing
    with stderr.status("benchmarking the report ..."):
        r = bench_report(run_dirs, trials)
    read = r["read"]
    size = f"{frames[0]['question_id'].n_unique()} questions, {frames[0].height} rows"
    table = Table(title=f"engram-eval bench --report: {r['run']} ({size}; {r['threads']} thread, fresh interpreters, median of "
                        f"{r['trials']}; targets: under {REPORT_TARGETS[0]:g} s and {REPORT_TARGETS[1]:g} MiB)")
    for column in ("measure", "wall", "peak memory", "wall / reading the Parquet"):
        table.add_column(column)
    table.add_row("read results.parquet (polars)", f"{read['seconds']:.2f} s", f"{read['peak_mib']:.0f} MiB", "1x")
    for name, row in r["reports"].items():
        table.add_row(name, f"{row['seconds']:.2f} s", f"{row['peak_mib']:.0f} MiB", f"{row['ratio_to_read']:.1f}x")
    stdout().print(table)
