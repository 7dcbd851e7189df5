"""engram-eval bank: import datasets into banks, validate banks, and count what they hold."""

from __future__ import annotations

from collections import Counter
from statistics import median
from pathlib import Path

import click
from rich.table import Table

from ..core.errors import EngramEvalError
from ..core.spec import SEED_METHOD
from .app import Group, cli, outside_option, stdout, warning_printer


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
@click.option("--force", is_flag=True, help="Replace an existing bank and its sources folder.")
def bank_import(file: Path | None, hf_spec: str | None, format_: str, map_text: str, out: Path | None, name: str | None,
                template: str, controls_text: str | None, limit: int | None, seed: int, source_per_topic: bool, answer_base: str,
                force: bool) -> None:
    """Turn a dataset (.jsonl, .json, .csv, .parquet, or --hf) into a bank: every record a question with its relevant
    source and the chosen controls, checked like every bank (an answer out of range, a duplicate id or a missing
    column is one line naming the record; nothing is written then)."""
    from ..bank.importer import ImportSpec, build_bank, import_controls, parse_map, read_table, write_bank

    if (file is None) == (hf_spec is None):
        raise EngramEvalError("bank import: give FILE or --hf NAME, not both")
    spec = ImportSpec(format=format_, mapping=parse_map(map_text, format_), template=template,
                      controls=import_controls() if controls_text is None else tuple(c.strip() for c in controls_text.split(",") if c.strip()), limit=limit, seed=seed,
                      source_per_topic=source_per_topic, answer_base=int(answer_base))
    stem = file.stem if file is not None else Path(hf_spec.split(":")[0]).name.replace("/", "_")
    out = out or Path(f"{stem}.yaml")
    frame, record = read_table(file, hf_spec)
    where = str(file) if file is not None else f"--hf {hf_spec}"
    data, sources = build_bank(frame, spec, name or out.stem, record, where)
    description = f"Imported from {where} by `engram-eval bank import` ({format_}, {len(data['questions'])} questions)."
    written = write_bank(data, sources, out, name or out.stem, description, spec, force)
    click.echo(f"{written}: {len(data['questions'])} questions, {len(sources)} sources (+ controls: {', '.join(spec.controls)})")


@bank.command("validate")
@click.argument("bank_path", metavar="BANK", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--model", "model_spec", help="Also check each question's answers on this model's tokenizer (distinct first "
                                            "tokens, no whitespace first token).")
@click.option("--strict", is_flag=True, help="Treat warnings as errors.")
@outside_option
def bank_validate(bank_path: Path, model_spec: str | None, strict: bool, allow_outside_paths: bool) -> None:
    """Check a bank: schema, files, duplicate ids, spacing mistakes; with --model, the first-token checks sweep makes."""
    from ..bank.banks import load_bank

    loaded = load_bank(bank_path, allow_outside_paths)
    warnings = loaded.lint()
    if model_spec is not None:
        from ..steer.prompts import context_conditions, prepare_question, variant_token_warnings

        lm = _tokenizer_model(model_spec)
        for question in loaded.questions:
            for condition in context_conditions(question, "both"):
                prepared = prepare_question(lm, question, SEED_METHOD.scoring, bank_path, condition)
                warnings += variant_token_warnings(lm, prepared, bank_path)
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
    kinds = Counter(NULL_KIND if control in NULL_PREFIXES else loaded.sources[control].kind
                    for question in loaded.questions for control in question.controls)
    sources = Counter(source.kind for source in loaded.sources.values())
    table = Table(title=f"bank {loaded.name} ({bank_path})", show_header=False)
    table.add_row("questions", str(len(loaded.questions)))
    table.add_row("with a context", str(sum(q.context is not None for q in loaded.questions)))
    table.add_row("sources", f"{len(loaded.sources)} ({', '.join(f'{k} {n}' for k, n in sorted(sources.items()))})")
    table.add_row("controls per kind (question x control)", ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) or "none")
    table.add_row(f"prompt tokens ({model_spec}): min / median / max", f"{lengths[0]} / {median(lengths):g} / {lengths[-1]}")
    stdout().print(table)


def _tokenizer_model(spec: str):
    """Just what the checks need: the model's tokenizer (no weights are loaded)."""
    from ..backend.model import load_tokenizer

    return load_tokenizer(spec)
