"""engram-eval report: a run directory -> table, markdown, json or html."""

from __future__ import annotations

from pathlib import Path

import click

from .app import cli, stdout

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
    from ..files import atomic_write_text
    from ..rendering import render_html, render_json, render_markdown, render_table
    from ..report import load_run, summarize

    summary = summarize(*load_run(run_dir), engram_role=engram_role)
    if output_format == "table":
        render_table(summary, stdout())
    elif output_format == "markdown":
        click.echo(render_markdown(summary))
    elif output_format == "json":
        click.echo(render_json(summary))
    else:
        path = run_dir / "report.html"
        atomic_write_text(path, render_html(summary))
        click.echo(str(path))
