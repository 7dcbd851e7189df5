"""engram-eval bank: import datasets into banks, validate banks, and count what they hold."""

from __future__ import annotations

import math
from collections import Counter
from statistics import median
from pathlib import Path

import click
from rich.table import Table

from ..core.errors import EngramEvalError
from ..core.spec import SEED_METHOD
from .app import Group, cli, outside_option, stderr, stdout, warning_printer


@cli.group(cls=Group)
def bank() -> None:
    """Import datasets into question banks; validate and describe banks."""


@bank.command("import")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--hf", "hf_spec", metavar="NAME[:CONFIG][:SPLIT]",
              help="A Hugging Face dataset instead of FILE (through the `datasets` library): a hub name, or a folder written "
                   "by save_to_disk.")
@click.option("--format", "format_", type=click.Choice(["mc", "completion"]), default="mc", show_default=True,
              help="mc: question, choices, answer -> a lettered list scored on the letters. completion: prompt, correct, "
                   "incorrect -> scored on the answers' first tokens.")
@click.option("--map", "map_text", required=True, metavar="FIELD=COLUMN,...",
              help="Columns for the fields. mc: question, choices (a list column, or several as choices=A+B+C+D), answer (an "
                   "index, a letter or the choice's text). completion: prompt, correct, incorrect (text or lists). Both: "
                   "source (required: each question's relevant engram text), and optionally id, topic, context, "
                   "related_wrong, tags.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="The bank to write [default: FILE's name with .yaml, here]; sources go to a folder beside it, BANK-sources/.")
@click.option("--name", help="The bank's name [default: --out's stem].")
@click.option("--template", default="{question}\n{choices}\nAnswer:", show_default=True,
              help="mc prompt: {question} and {choices} (the options lettered 'A) ...', one per line).")
@click.option("--controls", "controls_text",
              help="Controls for every question, comma-separated, from: the null prefixes (~gaussian, ...), irrelevant (a "
                   "bundled text on stellar classification) and random (a random-words text drawn with --seed) "
                   "[default: all of them].")
@click.option("--limit", type=click.IntRange(min=1), help="A reproducible random subset of this many records (--seed), in file order.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of --limit's subset and of the random-words control.")
@click.option("--source-per-topic", is_flag=True, help="Questions with the same topic share one source (their texts, joined).")
@click.option("--answer-base", type=click.Choice(["0", "1"]), default="0", show_default=True,
              help="A numeric answer counts the choices from 0 or from 1.")
@click.option("--chat/--no-chat", default=False, show_default=True,
              help="Put every prompt through the model's chat template (the bank's `chat: true`), with the mc letters "
                   "as the reply starts them ('A', no leading space); an instruct model asked without it often puts its "
                   "probability on the end-of-turn token instead of a letter.")
@click.option("--force", is_flag=True, help="Replace an existing bank and its sources folder.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar over the records (piped, the progress is plain lines).")
def bank_import(file: Path | None, hf_spec: str | None, format_: str, map_text: str, out: Path | None, name: str | None,
                template: str, controls_text: str | None, limit: int | None, seed: int, source_per_topic: bool, answer_base: str,
                chat: bool, force: bool, quiet: bool) -> None:
    """Turn a dataset (.jsonl, .json, .csv, .parquet, or --hf) into a bank: every record a question with its relevant
    source and the chosen controls, checked like every bank (an answer out of range, a duplicate id or a missing
    column is one line naming the record; nothing is written then)."""
    from ..bank.importer import ImportSpec, build_bank, import_controls, parse_map, read_table, write_bank

    if (file is None) == (hf_spec is None):
        raise EngramEvalError("bank import: give FILE or --hf NAME, not both")
    controls = import_controls() if controls_text is None else tuple(c.strip() for c in controls_text.split(",") if c.strip())
    spec = ImportSpec(format=format_, mapping=parse_map(map_text, format_), template=template, controls=controls, limit=limit,
                      seed=seed, source_per_topic=source_per_topic, answer_base=int(answer_base), chat=chat)
    stem = file.stem if file is not None else Path(hf_spec.split(":")[0]).name.replace("/", "_")
    out = out or Path(f"{stem}.yaml")
    from ..core.progress import silenced

    frame, record = read_table(file, hf_spec)
    where = str(file) if file is not None else f"--hf {hf_spec}"
    with silenced(quiet):
        data, sources = build_bank(frame, spec, name or out.stem, record, where)
    description = f"Imported from {where} by `engram-eval bank import` ({format_}, {len(data['questions'])} questions)."
    written = write_bank(data, sources, out, name or out.stem, description, spec, force)
    click.echo(f"{written}: {len(data['questions'])} questions, {len(sources)} sources (+ controls: {', '.join(spec.controls)})")


@bank.command("validate")
@click.argument("bank_path", metavar="BANK", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", "model_spec", help="Also check each question's answers on this model's tokenizer (distinct first "
                                            "tokens, no whitespace first token).")
@click.option("--baseline", is_flag=True,
              help="With --model: load the model and show every question's baseline (p(correct), p(incorrect), their "
                   "mass, the top token), without a sweep, and warn where the answers are off-distribution.")
@click.option("--strict", is_flag=True, help="Treat warnings as errors.")
@outside_option
def bank_validate(bank_path: Path, model_spec: str | None, baseline: bool, strict: bool, allow_outside_paths: bool) -> None:
    """Check a bank: schema, files, duplicate ids, spacing mistakes; with --model, the first-token checks sweep makes
    (and the multi-token answers first-token scoring cuts short); with --baseline, each question's baseline, for
    designing a bank."""
    from ..bank.banks import load_bank

    loaded = load_bank(bank_path, allow_outside_paths)
    warnings = loaded.lint()
    if baseline and model_spec is None:
        raise EngramEvalError("--baseline: give --model too (the baseline is the model's)")
    if model_spec is not None:
        from ..steer.prompts import check_lengths, context_conditions, multi_token_warning, prepare_question, variant_token_warnings

        lm = _baseline_model(model_spec) if baseline else _tokenizer_model(model_spec)
        prepared = [prepare_question(lm, question, SEED_METHOD.scoring, bank_path, condition)
                    for question in loaded.questions for condition in context_conditions(question, "both")]
        check_lengths(prepared, lm.max_positions, bank_path)
        for one in prepared:
            warnings += variant_token_warnings(lm, one, bank_path)
        if advice := multi_token_warning(lm, prepared, SEED_METHOD.scoring, bank_path):
            warnings.append(advice)
        if baseline:
            warnings += _print_baselines(lm, prepared, bank_path)
    warnings = list(dict.fromkeys(warnings))
    if strict and warnings:
        raise EngramEvalError(f"{warnings[0]} (--strict)")
    warn = warning_printer()
    for warning in warnings:
        warn(warning)
    checked = " and its first tokens on " + model_spec if model_spec else ""
    click.echo(f"{bank_path}: {len(loaded.questions)} questions, {len(loaded.sources)} sources{checked}: valid"
               + (f", {len(warnings)} warning(s)" if warnings else ""))


@bank.command("stats")
@click.argument("bank_path", metavar="BANK", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", "model_spec", default="smollm2-135m", show_default=True, help="The tokenizer prompt lengths are counted with.")
@outside_option
def bank_stats(bank_path: Path, model_spec: str, allow_outside_paths: bool) -> None:
    """Count what a bank holds: questions, sources, controls per kind, prompt lengths in tokens."""
    from ..bank.banks import load_bank
    from ..core.registry import NULL_PREFIXES
    from ..engram.nulls import NULL_KIND
    from ..steer.prompts import prompt_token_ids

    loaded = load_bank(bank_path, allow_outside_paths)
    lm = _tokenizer_model(model_spec)
    lengths = sorted(len(prompt_token_ids(lm, q, bank_path, context=True)) for q in loaded.questions)
    kinds = Counter(NULL_KIND if control in NULL_PREFIXES else loaded.kind_of(control)
                    for question in loaded.questions for control in question.controls)
    sources = Counter(source.kind for source in loaded.sources.values())
    table = Table(title=f"bank {loaded.name} ({bank_path})", show_header=False)
    table.add_row("questions", str(len(loaded.questions)))
    table.add_row("with a context", str(sum(q.context is not None for q in loaded.questions)))
    table.add_row("sources", f"{len(loaded.sources)} ({', '.join(f'{k} {n}' for k, n in sorted(sources.items()))})")
    table.add_row("controls per kind (question x control)", ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "none")
    table.add_row(f"prompt tokens ({model_spec}): min / median / max", f"{lengths[0]} / {median(lengths):g} / {lengths[-1]}")
    stdout().print(table)


def _baseline_model(spec: str):
    from ..backend.model import load_model

    with stderr.status(f"loading model {spec} ..."):
        return load_model(spec)


def _print_baselines(lm, prepared: list, bank_path: Path) -> list[str]:
    """Each question's baseline under the seed's first-token scoring, as the sweep's baseline row has it -> the
    off-distribution warnings."""
    from ..run.results import off_distribution_reason, off_distribution_warning
    from ..steer.prompts import end_tokens
    from ..steer.scoring import score_cells

    ends, off = end_tokens(lm), {}
    table = Table(title=f"baselines on {lm.name} ({SEED_METHOD.scoring} scoring)")
    for column in ("question", "p(correct)", "p(incorrect)", "mass", "ratio", "top token (p)"):
        table.add_column(column, justify="left" if column in ("question", "top token (p)") else "right")
    for one in prepared:
        scores, _ = score_cells(lm, one, [], {}, SEED_METHOD, 1)
        p_correct, p_incorrect = (math.exp(scores[f"logp_{side}"][0]) for side in ("correct", "incorrect"))
        top, p_top = scores["top_token"][0], math.exp(scores["logp_top"][0])
        label = one.question.id + ("" if one.context is None else " +context" if one.context else " -context")
        table.add_row(label, f"{p_correct:.3g}", f"{p_incorrect:.3g}", f"{p_correct + p_incorrect:.3g}",
                      f"{p_correct / p_incorrect:.3g}" if p_incorrect else "inf", f"{top!r} ({p_top:.2f})")
        if why := off_distribution_reason(p_correct + p_incorrect, top, p_top, ends):
            off[label] = why
    stdout().print(table)
    return [off_distribution_warning(bank_path, off, len(prepared))] if off else []


def _tokenizer_model(spec: str):
    """Just what the checks need: the model's tokenizer (no weights are loaded)."""
    from ..backend.model import load_tokenizer

    return load_tokenizer(spec)
