"""engram-eval generate: greedy text from a finished sweep's cells -> RUN/generations.parquet."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from ..core.errors import EngramEvalError
from ..core.spec import DEFAULT_ENSEMBLE_DECAY, Ensembling
from .app import batch_size_option, check_writable, cli, ray_options, run_model_options, stdout, stopped, wait_option, warning_printer


@cli.command()
@click.argument("run_dir", metavar="RUN", type=click.Path(file_okay=False, path_type=Path))
@run_model_options
@click.option("--cells", "selection", type=click.Choice(["default", "all", "baseline", "flips"]), default="default",
              show_default=True,
              help="default: per question and context condition, the baseline, every relevant-engram cell that flipped or "
                   "broke, and the best and worst cell (by ratio) of the relevant engram and of each control kind. all: every "
                   "row. baseline: the baseline rows. flips: the baseline and every flipped or broken cell of any engram.")
@click.option("--max-new-tokens", default=48, show_default=True, type=int, help="Tokens to generate per cell at most.")
@batch_size_option("Cells decoded together, or auto: as many as fit (cells of one question share their prefill length).")
@click.option("--force", is_flag=True, help="Replace generations made with other settings.")
@click.option("--ensemble", "ensemble_size", default=1, show_default=True, type=int,
              help="Temporal ensembling (ACT): the next-token distribution is the weighted mean of the distributions under the "
                   "newest M engrams (with --reextract, one per decode step; fewer at the first steps), each injected as the "
                   "cell's before the whole current context, greedy argmax of the mean. No KV cache. M > 1 or --reextract "
                   "writes RUN/generations-ensemble.parquet beside the plain RUN/generations.parquet.")
@click.option("--ensemble-decay", default=DEFAULT_ENSEMBLE_DECAY, show_default=True, type=float,
              help="m in ACT's weights w_i = exp(-m i), i = 0 the newest engram, normalised (0: a plain mean).")
@click.option("--reextract", is_flag=True,
              help="At every decode step, extract the cell's engram again from its source read after the current state "
                   "(the prompt and the tokens generated so far, a blank line, the source; only the source's positions "
                   "pooled). --ensemble 1 --reextract is continuous re-injection. Null prefixes have no source and stay.")
@ray_options
@wait_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bar (piped, the progress is plain lines).")
def generate(run_dir: Path, load_lm, selection: str, max_new_tokens: int, batch_size: int | None, force: bool,
             ensemble_size: int, ensemble_decay: float, reextract: bool, ray, wait: bool, quiet: bool) -> None:
    """Decode greedily from a finished sweep's cells, with each cell's engram injected as in the sweep (prefix and add
    in the prefill, seen through the KV cache; actadd at every position), and judge each text: does it say the correct
    answer, the incorrect one, which first (word boundaries, case-insensitive)? Writes RUN/generations.parquet;
    `engram-eval report RUN` then compares the probability verdict with the text. Resumable like sweep."""
    from ..run.rundir import GenerationFiles, read_run_json, recorded_model, refuse_if_written

    ensembling = Ensembling(ensemble_size, ensemble_decay, reextract).check()
    if max_new_tokens < 1:
        raise EngramEvalError(f"--max-new-tokens: must be at least 1 (got {max_new_tokens})")
    if not (run_dir / "results.parquet").is_file():
        raise EngramEvalError(f"{run_dir}: no results.parquet (finish the sweep with `engram-eval sweep ... --out {run_dir}` first)")
    check_writable(run_dir, "RUN")
    refuse_if_written(run_dir, wait)  # before torch and the model, which take seconds
    recorded = recorded_model(read_run_json(run_dir) or {})
    from ..core.progress import silenced
    from ..run.generation import run_generate

    with silenced(quiet):  # a first load prepares the model, with its own progress
        lm = load_lm(recorded)
    try:
        with silenced(quiet):
            result = run_generate(lm, run_dir, cells=selection, max_new_tokens=max_new_tokens,
                                  batch_size=batch_size, force=force, progress=not quiet,
                                  ray=ray, wait=wait, warn=warning_printer(), ensembling=ensembling)
    except KeyboardInterrupt as exc:
        parts = GenerationFiles(run_dir, ensembling.plain).parts
        stopped(exc, f": finished questions are kept in {parts}; rerun the same command to resume")
    timings = result.info["timings"]
    table = Table(title=f"generate {run_dir}", show_header=False)
    table.add_row("cells", f"{result.info['generations']} ({selection}), at most {max_new_tokens} tokens each")
    if timings["tokens"]:
        table.add_row("time", f"{timings['seconds']:.1f} s ({timings['tokens_per_second']} tokens/s)")
    else:
        table.add_row("time", "nothing left to generate: every question was already done (resumed)")
    table.add_row("generations", str(result.generations_path))
    table.add_row("next", f"engram-eval report {run_dir}")
    stdout().print(table)
