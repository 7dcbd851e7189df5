"""engram-eval sweep: a bank over the layer x strength grid -> a run directory."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import click
from rich.table import Table

from ..errors import EngramEvalError
from ..injection import DEFAULT_INJECTION, INJECTIONS
from .app import (
    batch_size_option,
    chunks_option,
    cli,
    extraction_options,
    model_options,
    outside_option,
    ray_options,
    stderr,
    stdout,
    store_option,
    warning_printer,
)


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
@click.option("--injection", type=click.Choice(INJECTIONS.names()), default=DEFAULT_INJECTION, show_default=True,
              help=INJECTIONS.help())
@click.option("--scaling", type=click.Choice(["global", "per-chunk"]), default="global", show_default=True,
              help="global: one scalar so the engram's mean row norm is the embeddings' (seed). per-chunk: every vector to "
                   "the embeddings' mean row norm, so no chunk dominates. prefix and add only.")
@click.option("--context", type=click.Choice(["with", "without", "both"]), default="with", show_default=True,
              help="Questions with a retrieved context (context or context_file in the bank) are scored with it (the prompt "
                   "is the context, a blank line, then the prompt), without it, or both, each condition with its own "
                   "baseline (the `context` column).")
@extraction_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Run directory [default: reports/BANK-MODEL].")
@store_option
@batch_size_option("Cells per forward pass, or auto: the largest that fits free memory (backs off on out-of-memory).")
@click.option("--questions", "question_ids", help="Only these question ids, comma-separated.")
@click.option("--force", is_flag=True, help="Replace a run in --out that has different settings.")
@outside_option
@click.option("--record-attention", is_flag=True,
              help="Add, per cell, the share of the last prompt position's attention (mean over heads and layers) on the k "
                   "engram positions (add, actadd: the first k prompt positions) and on position 0. Runs eager attention "
                   "(slower; see `engram-eval bench`).")
@click.option("--strict", is_flag=True,
              help="Treat the bank's warnings (a double or missing space before the answers, an answer whose first token "
                   "is whitespace, a bank without controls) as errors.")
@ray_options
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or engram log (warnings are still shown).")
def sweep(bank_path: Path, load_lm, layers_text: str, strengths_text: str, chunks_text: str, scoring: str, injection: str,
          scaling: str, context: str, extraction, out: Path | None, store_dir: str, batch_size: int | None, question_ids: str | None, force: bool,
          allow_outside_paths: bool, record_attention: bool, strict: bool, ray, quiet: bool) -> None:
    """Score a question bank over the layer x strength grid for each question's relevant engram and its negative
    controls, plus one baseline per question, into RUN/results.parquet and RUN/run.json. An interrupted sweep
    (Ctrl-C: exit status 130) rerun with the same command resumes from the questions already done."""
    from ..bank import load_bank
    from .parsing import parse_layers
    from ..injection import check_injection
    from ..store import EngramStore
    from ..sweep import run_sweep
    from .parsing import parse_chunks, parse_strengths

    chunks = parse_chunks(chunks_text)
    extraction.check(chunks)
    check_injection(injection, scaling)
    strengths = parse_strengths(strengths_text)
    bank = load_bank(bank_path, allow_outside_paths)
    if question_ids:
        bank = bank.select([q.strip() for q in question_ids.split(",") if q.strip()])
    warn = warning_printer()
    for warning in bank.lint():  # the textual checks, before the model loads
        if strict:
            raise EngramEvalError(f"{warning} (--strict)")
        warn(warning)
    lm = load_lm()
    layers = parse_layers(layers_text, lm.num_layers)
    out = out or Path("reports") / f"{bank.name}-{lm.name}"
    try:
        result = run_sweep(
            lm, bank, EngramStore(store_dir), out, layers=layers, strengths=strengths,
            chunks=chunks[0] if len(chunks) == 1 else chunks, scoring=scoring,
            injection=injection, scaling=scaling, extraction=extraction, context=context, record_attention=record_attention, ray=ray,
            batch_size=batch_size,
            force=force, strict=strict, progress=not quiet, log=(lambda m: None) if quiet else stderr.print, warn=warn,
        )
    except KeyboardInterrupt:
        stopped = json.loads((out / "run.json").read_text())
        click.echo(f"interrupted: {stopped['questions_done']} of {len(stopped['settings']['questions'])} questions are "
                   f"finished and kept in {out}; resume with the same command: {shlex.join(['engram-eval', *sys.argv[1:]])}",
                   err=True)
        sys.exit(130)
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
    stdout().print(table)
