"""engram-eval check: the regression gate."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.table import Table

from ..core.errors import EngramEvalError
from ..report.check import DEFAULT_ATOL, DEFAULT_RTOL
from .app import cli, stdout


@cli.command()
@click.argument("run_dir", metavar="RUN", type=click.Path(file_okay=False, path_type=Path))
@click.option("--baseline", "baseline_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Committed baseline summary (JSON) to compare with.")
@click.option("--rtol", default=DEFAULT_RTOL, show_default=True, type=click.FloatRange(min=0), help="Relative tolerance on log ratios.")
@click.option("--atol", default=DEFAULT_ATOL, show_default=True, type=click.FloatRange(min=0), help="Absolute tolerance on log ratios.")
@click.option("--update", is_flag=True, help="Rewrite the baseline from this run instead of comparing.")
def check(run_dir: Path, baseline_path: Path, rtol: float, atol: float, update: bool) -> None:
    """Regression gate: exit 0 when the run matches the baseline (per-question baseline log ratios, per-cell
    log ratios, flips and breaks, totals) within tolerance; exit 1 with a table of what moved (on stdout)
    otherwise. A run whose settings (bank, model, grid, scoring, injection, ...) differ from the baseline's is
    refused before any value is compared."""
    from ..report.check import compare, differing_settings, read_baseline, summarize_run, write_baseline
    from ..report.summary import load_run

    frame, run = load_run(run_dir)
    if run.get("partial"):
        raise EngramEvalError(f"{run_dir}: the sweep has not finished ({run['partial']['questions_done']} questions done); "
                              "check compares whole runs")
    current = summarize_run(frame, run)
    if update:
        write_baseline(baseline_path, current)
        click.echo(f"baseline {baseline_path} updated ({current['totals']['cells']} cells)")
        return
    baseline = read_baseline(baseline_path)
    if differing := differing_settings(current, baseline):
        raise EngramEvalError(f"{run_dir} was run with other settings than {baseline_path}: {'; '.join(differing)}")
    drifts = compare(current, baseline, rtol=rtol, atol=atol)
    if not drifts:
        click.echo(f"check passed: {current['totals']['cells']} cells and {current['totals']['questions']} questions "
                   f"within rtol={rtol:g}, atol={atol:g} of {baseline_path}")
        return
    table = Table(title=f"check failed: {len(drifts)} values moved beyond rtol={rtol:g}, atol={atol:g}")
    for column in ("what", "baseline", "now", "difference"):
        table.add_column(column)
    for drift in drifts:
        table.add_row(drift.what, str(drift.baseline), str(drift.current), "-" if drift.difference is None else f"{drift.difference:+.3g}")
    stdout().print(table)
    sys.exit(1)
