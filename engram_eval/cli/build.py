"""engram-eval build: source texts -> engrams in the store."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from ..core.errors import EngramEvalError
from .app import (
    chunks_option,
    cli,
    extraction_options,
    model_options,
    outside_option,
    stdout,
    store_option,
    warning_printer,
)
from .store import metadata_layers


@cli.command()
@click.argument("sources", nargs=-1, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--bank", type=click.Path(dir_okay=False, path_type=Path), help="Build every source of this question bank.")
@model_options
@chunks_option
@click.option("--layers", "layers_text", default="all", show_default=True,
              help="Layers to store: 'all', '4,8,12' or '10-20'. Layer L is hidden_states[L]; 0 is the embedding output.")
@extraction_options
@store_option
@click.option("--force", is_flag=True, help="Rebuild even when the store already holds the engram.")
@outside_option
@click.option("--quiet", "-q", is_flag=True, help="No progress bar (piped, the progress is plain lines).")
def build(sources: tuple[Path, ...], bank: Path | None, load_lm, chunks_text: str, layers_text: str, extraction,
          store_dir: str, force: bool, allow_outside_paths: bool, quiet: bool) -> None:
    """Turn text files (or a bank's sources) into engrams for every requested layer and k, from one forward pass
    each (per window), saved as safetensors files in the store (one file per k)."""
    from ..bank.banks import load_bank, paraphrase_name
    from ..core.progress import progress_bar, silenced
    from ..core.files import read_text
    from ..engram.dominance import dominance, dominance_warning
    from .parsing import parse_layers
    from .parsing import parse_chunks

    chunks = parse_chunks(chunks_text)
    extraction.check(chunks)
    named: list[tuple[str, str]] = []
    for path in sources:
        text = read_text(path, "source file")
        if not text.strip():
            raise EngramEvalError(f"{path}: source file is empty")
        named.append((path.stem, text))
    if bank is not None:
        named += [(paraphrase_name(s.name, i), text) for s in load_bank(bank, allow_outside_paths).sources.values()
                  for i, text in enumerate(s.texts)]  # a source's paraphrases too (`files: [...]`)
    if not named:
        raise EngramEvalError("build: give source files, or --bank BANK.yaml")
    from ..engram.store import EngramStore, engram_warnings  # torch: after the checks above

    with silenced(quiet):  # a first load prepares the model, with its own progress
        lm = load_lm()
    layers = parse_layers(layers_text, lm.num_layers)
    store = EngramStore(store_dir)
    warn = warning_printer()
    table = Table(title=f"engrams ({lm.name}, {lm.short_fingerprint})")
    for column in ("source", "status", "tokens", "layers", "chunks", "file"):
        table.add_column(column)
    dominated, rows = [], []
    with silenced(quiet), progress_bar(len(named), "build", "source") as bar:
        for name, text in named:
            built = store.ensure_all(lm, name, text, layers, chunks, extraction, force=force)
            bar.update()
            rows.append((name, built))
    for name, built in rows:
        for k, (stored, status) in built.items():
            for warning in engram_warnings(name, stored):
                warn(warning)
            if (where := dominance(name if len(chunks) == 1 else f"{name} k={k}", stored.engram.layers)) is not None:
                dominated.append(where)
            table.add_row(name, status, str(stored.engram.n_tokens) + (" (truncated)" if stored.engram.truncated else ""),
                          metadata_layers(stored.metadata["layers"]), str(k), str(stored.path))
    if (merged := dominance_warning(dominated)) is not None:
        warn(merged)
    stdout().print(table)
