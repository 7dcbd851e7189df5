"""engram-eval report: a run directory -> table, markdown, json or html."""

from __future__ import annotations

import io
from pathlib import Path

import click
from rich.console import Console

from ..core.errors import EngramEvalError
from .app import cli, stdout


@cli.command()
@click.argument("run_dirs", metavar="RUN [RUN ...]", nargs=-1, required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--format", "output_format", type=click.Choice(["table", "markdown", "json", "html"]), default="table",
              show_default=True, help="table: rich terminal output; markdown: short, for CI step summaries; json: every number "
                                      "for machines; html: RUN/report.html, one self-contained interactive page that works offline.")
@click.option("--engram-role", type=click.Choice(["relevant", "control", "all"]), default="relevant", show_default=True,
              help="Which engrams get heatmaps: the relevant one, each control kind, or all.")
@click.option("--output", "output_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the report to this file instead of stdout (html: instead of RUN/report.html).")
@click.option("--allow-different-banks", is_flag=True, help="Put runs of different banks side by side.")
@click.option("--question", "question_id", help="Drill down to one question: per cell, each answer's probability and its boost "
                                                "against the baseline, the sink score, the top variants and tokens, the texts.")
@click.option("--split", "split_seed", type=int,
              help="Pick the best cell on a random half of the questions (this seed; each half gets half the baseline-wrong "
                   "and half the baseline-correct questions) and report its rates on the other half.")
@click.option("--doses", "doses_text", default="0.05,0.2,0.5,1", show_default=True,
              help="The dose-matched comparison's target doses, in nats of KL: the neutral probe's neutral_kl when the sweep "
                   "ran with --neutral, else each question's kl_next; the relevant engram and each control are compared at "
                   "each dose, interpolated along the strength axis.")
@click.option("--ladder", "ladder_runs", multiple=True, type=click.Path(file_okay=False, path_type=Path), metavar="RUN",
              help="Another run of the bank (a learned-engram run, say) whose engram joins the RAG section's ladder: no "
                   "engram / null prefix / each run's engram / the context in the prompt, on the same questions. Repeatable.")
def report(run_dirs: tuple[Path, ...], output_format: str, engram_role: str, output_path: Path | None,
           allow_different_banks: bool, question_id: str | None, split_seed: int | None, doses_text: str,
           ladder_runs: tuple[Path, ...]) -> None:
    """Summarize a sweep: per-question baselines, best cells, calibration cases and decision-rule advice;
    layer x strength heatmaps of flip and fragile-correct rates; headline rates with 95% Wilson intervals;
    relevant-vs-control comparison with a paired sign-flip test; the semantic-sink split; with generations
    (`engram-eval generate`), the probability verdict against the generated text; with both context conditions
    (`sweep --context both`), RAG priming. A sweep that has not finished is reported on the questions done so far,
    under a "partial" banner. Several RUNs are put side by side: per run the model, layers as relative depth,
    baseline accuracy, flip and fragile-correct rates, control verdicts, heatmaps by depth and the chunk-count table
    (runs of different banks are refused unless --allow-different-banks). Controls are also compared at equal
    disturbance (dose-matched), with each kind's side effects (from `sweep --neutral`, else the next-token KL)."""
    from ..core.files import atomic_write_text
    from ..report.comparison import summarize_runs
    from ..report.dose import load_side_effects, parse_doses
    from ..report.sink import load_answers
    from ..report.drilldown import question_drilldown, question_drilldowns
    from ..report.html_report import render_html
    from ..report.rendering import render_drilldown, render_json, render_markdown, render_side_by_side, render_table
    from ..report.summary import load_generations, load_run, summarize

    run_dir = run_dirs[0]
    doses = parse_doses(doses_text)
    if output_format == "html":
        output_path = output_path or (run_dir / "report.html" if len(run_dirs) == 1 else Path("report.html"))
    if output_path is not None and not output_path.parent.is_dir():
        raise EngramEvalError(f"--output: folder {output_path.parent} does not exist")
    if len(run_dirs) > 1 and question_id is not None:
        raise EngramEvalError("--question: give one RUN")
    if len(run_dirs) > 1:
        comparison = summarize_runs([(str(path), *load_run(path)) for path in run_dirs], allow_different_banks)
        render = lambda console=None: render_side_by_side(comparison, output_format, console)  # noqa: E731
    elif question_id is not None:
        drill = question_drilldown(load_run(run_dir)[0], question_id, load_generations(run_dir))
        render = lambda console=None: render_drilldown(drill, output_format, console)  # noqa: E731
    else:
        frame, run = load_run(run_dir)
        generations = load_generations(run_dir)
        summary = summarize(frame, run, engram_role=engram_role, generations=generations, split=split_seed,
                            side_effects=load_side_effects(run_dir, run), doses=doses,
                            ladder=[(str(path), *load_run(path)) for path in ladder_runs],
                            ensembled=load_generations(run_dir, ensembled=True), answers=load_answers(run_dir, run))
        drills = lambda: question_drilldowns(frame, generations)  # noqa: E731
        renderers = {"markdown": render_markdown, "json": render_json, "html": lambda summary: render_html(summary, drills())}
        render = lambda console=None: render_table(summary, console) if output_format == "table" else renderers[output_format](summary)  # noqa: E731
    if output_format == "table":
        if output_path is None:
            return render(stdout())
        buffer = io.StringIO()
        render(Console(file=buffer, width=160, color_system=None))
        text = buffer.getvalue()
    else:
        text = render() + "\n"
    if output_path is None:
        return click.echo(text, nl=False)
    atomic_write_text(output_path, text)
    click.echo(str(output_path))
