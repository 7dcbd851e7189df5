"""engram-eval sweep: a bank over the layer x strength grid -> a run directory."""

from __future__ import annotations

import functools
import json
import shlex
from dataclasses import replace
import sys
from pathlib import Path
from typing import Callable

import click
from rich.table import Table

from ..core.errors import EngramEvalError
from ..core.registry import INJECTIONS, SCORINGS
from ..core.spec import CONTEXTS, POSITIONS, PREFIX_PLACES, SCALINGS, SEED_METHOD, Execution, Extraction, Grid, Method, Observer, SweepSpec
from .app import (
    batch_size_option,
    check_writable,
    chunks_option,
    cli,
    extraction_options,
    model_options,
    outside_option,
    ray_options,
    registry_option,
    stderr,
    stdout,
    stopped,
    store_option,
    wait_option,
    warning_printer,
)
from .parsing import parse_chunks, parse_layers, parse_strengths

DEFAULT_STRENGTHS_TEXT = "0.5,1,2,5,10,20"
DEFAULT_COEFFICIENTS_TEXT = "0.5,1,2,4,8"
DEFAULT_LAYERS_TEXT = "8,12,16,20,24"


def spec_options(command: Callable) -> Callable:
    """--layers, --strengths, --chunks, the method's options, the extraction's, --record-attention and --questions ->
    `spec` (engram_eval.core.spec.SweepSpec, not yet checked: its check reads the modes' classes, which import torch, so
    the command checks it after its cheap checks of the bank, paths and lock; its layers are the defaults until `with_layers`) and `layers_text`
    (resolved once the model's depth is known)."""

    @click.option("--layers", "layers_text",
                  help="Layers to inject from: '8,12,16', '10-20' or 'all'.  [default: 8,12,16,20,24; with --vector: "
                       "every layer the vector carries]")
    @click.option("--strengths", "strengths_text",
                  help="Strength multipliers on the seed scaling (finite, not 0). Negative ones subtract the engram "
                       "(add, actadd and vectors only); pass them as --strengths=-2,2. With --vector: strength x s x v/|v| "
                       "(s: the mean norm of the residual stream over the prompt at the layer, as actadd).  "
                       f"[default: {DEFAULT_STRENGTHS_TEXT}]")
    @click.option("--vector", metavar="NAME",
                  help="Steer with a stored steering vector (`engram-eval vectors import` or `vectors build`) instead of "
                       "the bank's engrams: each question gets the vector and its controls (a random direction of the same "
                       "norm per layer, seeded; the vector negated) over its layers x coefficients. Its action (add, or "
                       "lm-eval's clamp) picks --injection vector-add or vector-clamp.")
    @click.option("--coefficients", "coefficients_text",
                  help="With --vector: multiples of the vector as stored, its magnitude kept (1 = the source tool's own "
                       "application: llama.cpp's scale, repeng's and steering-vectors' multiplier, lm-eval's "
                       f"steering_coefficient). Negative ones subtract it.  [default with --vector: {DEFAULT_COEFFICIENTS_TEXT}]")
    @chunks_option
    @registry_option("--scoring", SCORINGS, SEED_METHOD.scoring)
    @registry_option("--injection", INJECTIONS, SEED_METHOD.injection)
    @click.option("--scaling", type=click.Choice(SCALINGS), default=SEED_METHOD.scaling, show_default=True,
                  help="global: one scalar so the engram's mean row norm is the embeddings' (seed). per-chunk: every vector "
                       "to the embeddings' mean row norm, so no chunk dominates. prefix and add only.")
    @click.option("--context", type=click.Choice(CONTEXTS), default=SEED_METHOD.context, show_default=True,
                  help="Questions with a retrieved context (context or context_file in the bank) are scored with it (the "
                       "prompt is the context, a blank line, then the prompt), without it, or both, each condition with its "
                       "own baseline (the `context` column).")
    @click.option("--positions", type=click.Choice(POSITIONS), default=SEED_METHOD.positions, show_default=True,
                  help="Where actadd adds its vector: every position; the prompt's only; the answer's only (the scored "
                       "answer tokens, and in `generate` the generated ones); or the last prompt position and every one "
                       "after it. actadd only (prefix and add steer positions of their own).")
    @click.option("--prefix-at", type=click.Choice(PREFIX_PLACES), default=SEED_METHOD.prefix_at, show_default=True,
                  help="prefix and add: where the engram goes when the tokenizer puts a BOS token first (Gemma, Llama 3): "
                       "right after it, so BOS stays first as in training, or at the very start, before it. A tokenizer "
                       "that adds no BOS (SmolLM2, Qwen) makes both the same. run.json records whether it added one.")
    @extraction_options
    @click.option("--record-attention", is_flag=True,
                  help="Add, per cell, the share of the last prompt position's attention (mean over heads and layers) on the "
                       "k engram positions (add, actadd: the first k prompt positions) and on position 0. Runs eager "
                       "attention (slower; see `engram-eval bench`).")
    @click.option("--reextract", is_flag=True,
                  help="Prompt-conditioned engrams: each question's engrams (relevant and controls) are extracted from the "
                       "source read after its prompt (prompt, a blank line, the source; only the source's positions are "
                       "pooled), one per question, cached in the store under a key that includes the prompt's sha256.")
    @click.option("--sample", "samples", type=int, default=0,
                  help="N engrams per source drawn from a Gaussian fitted to its paraphrases (a bank source with "
                       "`files: [...]`), per layer and chunk: mean + sum_j z_j (v_j - mean) / sqrt(P - 1), z ~ N(0, 1); "
                       "rows carry `sample` (0-based) beside the paraphrases' own rows.  [default: none]")
    @click.option("--sample-seed", type=int, default=0, show_default=True, help="The seed of --sample's draws.")
    @click.option("--questions", "question_ids", help="Only these question ids, comma-separated.")
    @functools.wraps(command)
    def wrapper(layers_text: str | None, strengths_text: str | None, vector: str | None, coefficients_text: str | None,
                chunks_text: str, scoring: str, injection: str, scaling: str, context: str, positions: str, prefix_at: str,
                extraction: Extraction, record_attention: bool, reextract: bool, samples: int, sample_seed: int,
                question_ids: str | None, **kwargs):
        questions = None if not question_ids else tuple(q.strip() for q in question_ids.split(",") if q.strip())
        chunks = tuple(parse_chunks(chunks_text))
        if coefficients_text is not None and vector is None:
            raise EngramEvalError("--coefficients: applies to --vector (an engram is scaled by --strengths)")
        if vector is not None:  # a vector's own grid: its magnitude (or x s), k = 1, injection by its action (set on load)
            if coefficients_text is not None and strengths_text is not None:
                raise EngramEvalError("--coefficients, --strengths: give one (coefficients keep the vector's magnitude; "
                                      "strengths scale its direction to the residual stream's norm)")
            scaling = "norm" if strengths_text is not None else "coefficient"
            strengths = parse_strengths(strengths_text or coefficients_text or DEFAULT_COEFFICIENTS_TEXT, "--strengths"
                                        if strengths_text is not None else "--coefficients")
            chunks = (1,)
        else:
            strengths = parse_strengths(strengths_text or DEFAULT_STRENGTHS_TEXT)
        spec = SweepSpec(Grid(strengths=tuple(strengths), chunks=chunks, samples=samples, sample_seed=sample_seed),
                         Method(injection, scaling, scoring, context, record_attention, positions, reextract, prefix_at,
                                vector), extraction, questions)
        return command(spec=spec, layers_text=layers_text, **kwargs)

    return wrapper


@cli.command()
@click.argument("bank_path", metavar="BANK", type=click.Path(dir_okay=False, path_type=Path))
@model_options
@spec_options
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Run directory [default: reports/BANK-MODEL].")
@store_option
@batch_size_option("Cells per forward pass, or auto: the largest that fits free memory (backs off on out-of-memory).")
@click.option("--force", is_flag=True, help="Replace a run in --out that has different settings.")
@outside_option
@click.option("--strict", is_flag=True,
              help="Treat the bank's warnings (a double or missing space before the answers, an answer whose first token "
                   "is whitespace, a bank without controls) as errors.")
@click.option("--neutral", "neutral_text", metavar="FILE|default",
              help="Also probe every cell's side effects on a neutral passage (a UTF-8 text file of at least 16 tokens, or "
                   "`default`: a bundled everyday passage of about 200 tokens): the mean KL of the steered to the unsteered "
                   "next-token distribution over its positions and the perplexity ratio, into RUN/side_effects.parquet "
                   "(each cell once; resumable; not a setting of the run, so it can be added to a finished run).")
@ray_options
@wait_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bar or engram log (warnings are still shown); piped, the progress is plain lines.")
def sweep(bank_path: Path, load_lm, spec: SweepSpec, layers_text: str, out: Path | None, store_dir: str,
          batch_size: int | None, force: bool, allow_outside_paths: bool, strict: bool, neutral_text: str | None, ray,
          wait: bool, quiet: bool) -> None:
    """Score a question bank over the layer x strength grid for each question's relevant engram and its negative
    controls, plus one baseline per question, into RUN/results.parquet and RUN/run.json. An interrupted sweep
    (Ctrl-C: exit status 130; SIGTERM: 143) rerun with the same command resumes from the questions already done. One
    sweep or generate writes a run directory at a time."""
    from ..bank.banks import load_bank
    from ..bank.passages import read_passage
    from ..run.rundir import refuse_if_written

    bank = load_bank(bank_path, allow_outside_paths)
    neutral = None if neutral_text is None else read_passage(neutral_text)
    if spec.questions is not None:
        bank = bank.select(list(spec.questions))
    warn = warning_printer()
    for warning in bank.lint():  # the textual checks, before the model loads
        if strict:
            raise EngramEvalError(f"{warning} (--strict)")
        warn(warning)
    check_writable(out or Path("reports"), "--out")
    if out is not None:
        refuse_if_written(out, wait)
    name = spec.method.vector
    if name is not None and not (Path(store_dir) / "vectors" / f"{name}.safetensors").is_file():
        raise EngramEvalError(f"--vector: no vector named '{name}' in {Path(store_dir) / 'vectors'} (`engram-eval vectors "
                              "import` or `vectors build` stores one)")
    stored = None
    if name is not None:  # its action picks the mode (unless --injection names one, which the spec's check refuses)
        from ..steer.injection import vector_injection
        from ..vectors.store import VectorStore

        stored = VectorStore(store_dir).load(name)
        if spec.method.injection == SEED_METHOD.injection:
            spec = replace(spec, method=replace(spec.method, injection=vector_injection(stored.vector.action)))
    spec = spec.check()  # imports the modes' module (torch): after the checks above, which take a fraction of a second
    from ..core.progress import silenced
    from ..engram.store import EngramStore
    from ..run.sweep import run_sweep

    with silenced(quiet):  # a first load prepares the model, with its own progress
        lm = load_lm()
    if layers_text is None and stored is not None:
        spec = spec.with_layers([layer for layer in stored.vector.layers if layer <= lm.num_layers])
    else:
        spec = spec.with_layers(parse_layers(layers_text or DEFAULT_LAYERS_TEXT, lm.num_layers))
    out = out or Path("reports") / f"{bank.name}-{lm.name}"
    observer = Observer(progress=not quiet, log=(lambda m: None) if quiet else stderr.print, warn=warn)
    try:
        with silenced(quiet):  # the bars deep in the library too (a learned engram's steps)
            result = run_sweep(lm, bank, EngramStore(store_dir), out, spec, execution=Execution(batch_size, ray),
                               force=force, strict=strict, wait=wait, neutral=neutral, observer=observer, vector=stored)
    except KeyboardInterrupt as exc:
        try:
            run = json.loads((out / "run.json").read_text())
            done = f"{run['questions_done']} of {len(run['settings']['questions'])} questions are finished and kept in {out}"
        except (OSError, ValueError, KeyError, TypeError):
            done = f"finished questions are kept in {out}"
        stopped(exc, f": {done}; resume with the same command: {shlex.join(['engram-eval', *sys.argv[1:]])}")
    _sweep_summary(result)


def _sweep_summary(result) -> None:
    import polars as pl

    from ..run.results import primary_rows

    everything = pl.read_parquet(result.results_path)
    frame = everything.filter(primary_rows())
    base = frame.filter(pl.col("role") == "baseline")
    cells = frame.filter(pl.col("role") != "baseline")
    table = Table(title=f"sweep {result.run['run_id']}", show_header=False)
    table.add_row("questions", f"{base.height} ({base['correct_before'].sum()} correct at baseline, "
                               f"{(~base['correct_before']).sum()} wrong)")
    for role in ("relevant", "control"):
        part = cells.filter(pl.col("role") == role)
        table.add_row(f"{role} cells", f"{part.height}: {part['flipped'].sum()} flips, {part['broken'].sum()} breaks")
    if variants := everything.height - frame.height:
        table.add_row("variant cells", f"{variants} (other paraphrases and samples of a source; the report's variability section)")
    timings = result.run["timings"]
    table.add_row("time", f"{timings['total_seconds']:.1f} s ({timings['cells_per_second']} cells/s)")
    table.add_row("results", str(result.results_path))
    if "side_effects_seconds" in timings:
        effects = pl.read_parquet(result.out / "side_effects.parquet")
        table.add_row("side effects", f"{result.out / 'side_effects.parquet'}: {effects.height} cells, neutral KL "
                                      f"{effects['neutral_kl'].min():.3g} to {effects['neutral_kl'].max():.3g} nats "
                                      f"({timings['side_effects_seconds']:.1f} s)")
    table.add_row("next", f"engram-eval report {result.out}")
    stdout().print(table)
