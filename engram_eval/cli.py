"""The engram-eval command line: a thin layer over the library (model -> engram -> store -> sweep -> report)."""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Callable

import click
from rich.console import Console
from rich.table import Table

from . import __version__
from .check import DEFAULT_ATOL, DEFAULT_RTOL
from .errors import EngramEvalError

stderr = Console(stderr=True)
stdout = Console()


class CliError(click.ClickException):
    exit_code = 2

    def show(self, file=None) -> None:
        click.echo(f"error: {self.message}", err=True)


class Group(click.Group):
    """Turns the library's EngramEvalError into one line on stderr and exit status 2, no traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EngramEvalError as exc:
            raise CliError(str(exc)) from None


def model_options(command: Callable) -> Callable:
    @click.option("--model", "model_spec", default="smollm2-135m", show_default=True,
                  help="Embedded alias (smollm2-135m), local Hugging Face directory, .gguf file or hub id.")
    @click.option("--device", default="auto", show_default=True, help="auto (cuda if available, else cpu), cpu, cuda or cuda:N.")
    @click.option("--dtype", default="auto", show_default=True,
                  help="auto (bfloat16 on cuda, float32 on cpu), float32, bfloat16 or float16.")
    @click.option("--trust-remote-code", is_flag=True, help="Allow model code from the model's repository to run (off by default).")
    @functools.wraps(command)
    def wrapper(model_spec: str, device: str, dtype: str, trust_remote_code: bool, **kwargs):
        from .model import load_model

        def load():
            with stderr.status(f"loading model {model_spec} ..."):
                return load_model(model_spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code)

        return command(load_lm=load, **kwargs)

    return wrapper


store_option = click.option("--store", "store_dir", default="store", show_default=True, type=click.Path(file_okay=False),
                            help="Engram store directory.")
chunks_option = click.option("--chunks", default=16, show_default=True, type=int, help="Number of chunk-mean vectors per engram (k).")
max_tokens_option = click.option("--max-tokens", default=2048, show_default=True, type=click.IntRange(min=1),
                                 help="Truncate source texts at this many tokens (reported when it happens).")
outside_option = click.option("--allow-outside-paths", is_flag=True, help="Allow bank source files outside the bank's folder.")


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="engram-eval")
def cli() -> None:
    """Measure engram activation steering honestly: build engrams, sweep a question bank over a layer x
    strength grid with negative controls, report flips, fragile-correct answers and calibration cases,
    and gate regressions in CI."""


@cli.command()
@click.argument("sources", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--bank", type=click.Path(dir_okay=False, path_type=Path), help="Build every source of this question bank.")
@model_options
@chunks_option
@click.option("--layers", "layers_text", default="all", show_default=True,
              help="Layers to store: 'all', '4,8,12' or '10-20'. Layer L is hidden_states[L]; 0 is the embedding output.")
@max_tokens_option
@store_option
@click.option("--force", is_flag=True, help="Rebuild even when the store already holds the engram.")
@outside_option
def build(sources: tuple[Path, ...], bank: Path | None, load_lm, chunks: int, layers_text: str, max_tokens: int,
          store_dir: str, force: bool, allow_outside_paths: bool) -> None:
    """Turn text files (or a bank's sources) into engrams for every requested layer, from one forward pass
    each, saved as safetensors files in the store."""
    from tqdm import tqdm

    from .bank import load_bank
    from .files import read_text
    from .engram import check_chunks, parse_layers
    from .store import EngramStore

    check_chunks(chunks)
    named: list[tuple[str, str]] = []
    for path in sources:
        text = read_text(path, "source file")
        if not text.strip():
            raise EngramEvalError(f"{path}: source file is empty")
        named.append((path.stem, text))
    if bank is not None:
        named += [(s.name, s.text) for s in load_bank(bank, allow_outside_paths).sources.values()]
    if not named:
        raise EngramEvalError("build: give source files, or --bank BANK.yaml")
    lm = load_lm()
    layers = parse_layers(layers_text, lm.num_layers)
    store = EngramStore(store_dir)
    table = Table(title=f"engrams ({lm.name}, {lm.short_fingerprint})")
    for column in ("source", "status", "tokens", "layers", "chunks", "file"):
        table.add_column(column)
    for name, text in tqdm(named, desc="build", unit="source", disable=None):
        stored, status = store.ensure(lm, name, text, layers, chunks, max_tokens, force=force)
        if stored.engram.truncated:
            stderr.print(f"[yellow]warning:[/] source '{name}' truncated to {max_tokens} tokens (--max-tokens)")
        table.add_row(name, status, str(stored.engram.n_tokens) + (" (truncated)" if stored.engram.truncated else ""),
                      _layers_text(stored.metadata["layers"]), str(chunks), str(stored.path))
    stdout.print(table)


def _layers_text(layers: str) -> str:
    values = [int(v) for v in layers.split(",")]
    contiguous = values == list(range(values[0], values[-1] + 1))
    return f"{values[0]}-{values[-1]}" if contiguous and len(values) > 2 else layers


@cli.group(cls=Group)
def store() -> None:
    """Inspect the engram store."""


@store.command("ls")
@store_option
def store_ls(store_dir: str) -> None:
    """List the engrams in the store."""
    from .store import EngramStore

    engram_store = EngramStore(store_dir)
    table = Table(title=f"engram store {store_dir}")
    for column in ("name", "model", "layers", "chunks", "tokens", "size", "path"):
        table.add_column(column)
    for path in engram_store.paths():
        meta = engram_store.read_metadata(path)
        size = f"{path.stat().st_size / 1024:.0f} KiB"
        table.add_row(meta["source_name"], f"{meta['model']} ({meta['model_fingerprint'][:12]})", _layers_text(meta["layers"]),
                      meta["chunks"], meta["n_tokens"], size, str(path))
    stdout.print(table)


@store.command("show")
@click.argument("name")
@store_option
def store_show(name: str, store_dir: str) -> None:
    """Show one engram's metadata and per-layer mean vector norms (NAME: source name, file name or key)."""
    from .store import EngramStore

    engram_store = EngramStore(store_dir)
    paths = engram_store.find(name)
    if not paths:
        raise EngramEvalError(f"store {store_dir}: no engram named '{name}' (see `engram-eval store ls`)")
    for path in paths:
        stored = engram_store.load(path)
        meta = Table(title=str(path), show_header=False)
        for key in sorted(stored.metadata):
            meta.add_row(key, stored.metadata[key])
        stdout.print(meta)
        norms = Table(title="mean vector norm per layer")
        norms.add_column("layer", justify="right")
        norms.add_column("mean norm", justify="right")
        for layer, vectors in stored.engram.layers.items():
            norms.add_row(str(layer), f"{vectors.norm(dim=1).mean().item():.4f}")
        stdout.print(norms)


@cli.command()
@click.argument("bank_path", metavar="BANK", type=click.Path(dir_okay=False, path_type=Path))
@model_options
@click.option("--layers", "layers_text", default="8,12,16,20,24", show_default=True, help="Layers to inject from: '8,12,16', '10-20' or 'all'.")
@click.option("--strengths", "strengths_text", default="0.5,1,2,5,10,20", show_default=True,
              help="Strength multipliers on the seed scaling (finite, > 0).")
@chunks_option
@click.option("--scoring", type=click.Choice(["first-token", "sequence", "sequence-max", "sequence-mean"]), default="first-token",
              show_default=True,
              help="first-token: seed mode, max over variants of their first token's probability. sequence: summed "
                   "log-probability of each variant's tokens, logsumexp per side; sequence-max: the same, max per side; "
                   "sequence-mean: mean per-token log-probability (long answers are not penalised), max per side.")
@click.option("--injection", type=click.Choice(["prefix"]), default="prefix", show_default=True,
              help="prefix: prepend the k scaled vectors to the prompt's embeddings (seed mode).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Run directory [default: reports/BANK-MODEL].")
@store_option
@click.option("--batch-size", default="auto", show_default=True,
              help="Cells per forward pass, or auto: the largest that fits free memory (backs off on out-of-memory).")
@click.option("--questions", "question_ids", help="Only these question ids, comma-separated.")
@max_tokens_option
@click.option("--force", is_flag=True, help="Replace a run in --out that has different settings.")
@outside_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or engram log.")
def sweep(bank_path: Path, load_lm, layers_text: str, strengths_text: str, chunks: int, scoring: str, injection: str,
          out: Path | None, store_dir: str, batch_size: str, question_ids: str | None, max_tokens: int, force: bool,
          allow_outside_paths: bool, quiet: bool) -> None:
    """Score a question bank over the layer x strength grid for each question's relevant engram and its negative
    controls, plus one baseline per question, into RUN/results.parquet and RUN/run.json. An interrupted sweep
    rerun with the same --out resumes from the questions already done."""
    from .bank import load_bank
    from .engram import check_chunks, parse_layers
    from .store import EngramStore
    from .sweep import parse_strengths, run_sweep

    check_chunks(chunks)
    strengths = parse_strengths(strengths_text)
    if batch_size != "auto" and not (batch_size.isdigit() and int(batch_size) >= 1):
        raise EngramEvalError(f"--batch-size: '{batch_size}' is not 'auto' or a whole number >= 1")
    bank = load_bank(bank_path, allow_outside_paths)
    if question_ids:
        bank = bank.select([q.strip() for q in question_ids.split(",") if q.strip()])
    lm = load_lm()
    layers = parse_layers(layers_text, lm.num_layers)
    out = out or Path("reports") / f"{bank.name}-{lm.name}"
    result = run_sweep(
        lm, bank, EngramStore(store_dir), out, layers=layers, strengths=strengths, chunks=chunks, scoring=scoring,
        injection=injection, batch_size=None if batch_size == "auto" else int(batch_size), max_tokens=max_tokens,
        force=force, progress=not quiet, log=(lambda m: None) if quiet else stderr.print,
    )
    _sweep_summary(result)


def _sweep_summary(result) -> None:
    import polars as pl

    frame = pl.read_parquet(result.results_path)
    base = frame.filter(pl.col("role") == "baseline")
    cells = frame.filter(pl.col("role") != "baseline")
    table = Table(title=f"sweep {result.run['run_id']}", show_header=False)
    table.add_row("questions", f"{base.height} ({base['correct_before'].sum()} correct at baseline, "
                               f"{(~base['correct_before']).sum()} wrong)")
    for role in ("relevant", "control"):
        part = cells.filter(pl.col("role") == role)
        table.add_row(f"{role} cells", f"{part.height}: {part['flipped'].sum()} flips, {part['broken'].sum()} breaks")
    timings = result.run["timings"]
    table.add_row("time", f"{timings['total_seconds']:.1f} s ({timings['cells_per_second']} cells/s)")
    table.add_row("results", str(result.results_path))
    table.add_row("next", f"engram-eval report {result.out}")
    stdout.print(table)


@cli.command()
@click.argument("run_dir", metavar="RUN", type=click.Path(file_okay=False, path_type=Path))
@click.option("--format", "output_format", type=click.Choice(["table", "markdown", "json", "html"]), default="table",
              show_default=True, help="table: rich terminal output; markdown: for CI step summaries; json: the same numbers "
                                      "for machines; html: writes RUN/report.html with heatmap images.")
@click.option("--engram-role", type=click.Choice(["relevant", "control", "all"]), default="relevant", show_default=True,
              help="Which engrams get heatmaps: the relevant one, each control kind, or all.")
def report(run_dir: Path, output_format: str, engram_role: str) -> None:
    """Summarize a sweep: per-question baselines, best cells, calibration cases and decision-rule advice;
    layer x strength heatmaps of flip and fragile-correct rates; headline rates with 95% Wilson intervals;
    relevant-vs-control comparison with a paired sign-flip test; the semantic-sink split."""
    from .files import atomic_write_text
    from .rendering import render_html, render_json, render_markdown, render_table
    from .report import load_run, summarize

    summary = summarize(*load_run(run_dir), engram_role=engram_role)
    if output_format == "table":
        render_table(summary, stdout if stdout.is_terminal else Console(width=160))
    elif output_format == "markdown":
        click.echo(render_markdown(summary))
    elif output_format == "json":
        click.echo(render_json(summary))
    else:
        path = run_dir / "report.html"
        atomic_write_text(path, render_html(summary))
        click.echo(str(path))


@cli.command()
@click.argument("run_dir", metavar="RUN", type=click.Path(file_okay=False, path_type=Path))
@click.option("--baseline", "baseline_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Committed baseline summary (JSON) to compare with.")
@click.option("--rtol", default=DEFAULT_RTOL, show_default=True, type=click.FloatRange(min=0), help="Relative tolerance on log ratios.")
@click.option("--atol", default=DEFAULT_ATOL, show_default=True, type=click.FloatRange(min=0), help="Absolute tolerance on log ratios.")
@click.option("--update", is_flag=True, help="Rewrite the baseline from this run instead of comparing.")
def check(run_dir: Path, baseline_path: Path, rtol: float, atol: float, update: bool) -> None:
    """Regression gate: exit 0 when the run matches the baseline (per-question baseline log ratios, per-cell
    log ratios, flips and breaks, totals) within tolerance; exit 1 with a table of what moved otherwise."""
    from .check import compare, read_baseline, summarize_run, write_baseline
    from .report import load_run

    current = summarize_run(load_run(run_dir)[0])
    if update:
        write_baseline(baseline_path, current)
        click.echo(f"baseline {baseline_path} updated ({current['totals']['cells']} cells)")
        return
    drifts = compare(current, read_baseline(baseline_path), rtol=rtol, atol=atol)
    if not drifts:
        click.echo(f"check passed: {current['totals']['cells']} cells and {current['totals']['questions']} questions "
                   f"within rtol={rtol:g}, atol={atol:g} of {baseline_path}")
        return
    table = Table(title=f"check failed: {len(drifts)} values moved beyond rtol={rtol:g}, atol={atol:g}")
    for column in ("what", "baseline", "now", "difference"):
        table.add_column(column)
    for drift in drifts:
        table.add_row(drift.what, str(drift.baseline), str(drift.current), "-" if drift.difference is None else f"{drift.difference:+.3g}")
    Console(stderr=True, width=160).print(table)
    sys.exit(1)


@cli.command()
@model_options
@click.option("--bank", "bank_path", default="questions/medical_traps.yaml", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="Question bank to sweep.")
@click.option("--layers", "layers_text", default="8,12,16,20,24", show_default=True, help="Layers of the sweep grid.")
@click.option("--strengths", "strengths_text", default="0.5,1,2,5,10,20", show_default=True, help="Strengths of the sweep grid.")
@click.option("--loop-cells", default=120, show_default=True, type=click.IntRange(min=1),
              help="Cells timed with the seed's per-cell loop (its rate is compared with the sweep's).")
@click.option("--batch-size", default="auto", show_default=True, help="Sweep batch size, or auto.")
@click.option("--random-init", "random_config", type=click.Path(dir_okay=False, path_type=Path),
              help="Benchmark a randomly initialised model built from this config.json instead of --model's weights "
                   "(--model still gives the tokenizer, device and dtype), e.g. benchmarks/qwen2.5-7b.config.json on a GPU.")
def bench(load_lm, bank_path: Path, layers_text: str, strengths_text: str, loop_cells: int, batch_size: str,
          random_config: Path | None) -> None:
    """Measure, in one run: build and sweep throughput, the seed's per-cell loop on the same cells, the machine's
    dense matmul throughput, and the ratios between them (speedup, fraction of matmul FLOP/s), plus peak memory.

    The loop and a matmul probe run before each question of the sweep (outside its timings), so that all three see
    the same contention on a shared machine; the fraction of the run's best matmul throughput is printed too."""
    from .bank import load_bank
    from .bench import run_bench
    from .engram import parse_layers
    from .sweep import parse_strengths

    strengths = parse_strengths(strengths_text)
    bank = load_bank(bank_path)
    lm = load_lm()
    if random_config is not None:
        from .model import random_init_model

        with stderr.status(f"building a random-init model from {random_config} ..."):
            lm = random_init_model(random_config, lm.tokenizer, device=lm.device, dtype=lm.dtype)
    with stderr.status("benchmarking ..."):
        r = run_bench(lm, bank, parse_layers(layers_text, lm.num_layers), strengths, loop_cells=loop_cells,
                      batch_size=None if batch_size == "auto" else int(batch_size))
    table = Table(title=f"engram-eval bench: {lm.name} on {r['device']} ({r['dtype']}, {r['threads']} threads)")
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
    stdout.print(table)


def main() -> None:
    cli(prog_name="engram-eval")


if __name__ == "__main__":
    sys.exit(main())
