"""engram-eval models: the embedded models, whether each is installed, and how to install it."""

from __future__ import annotations

import click
from rich.table import Table

from .app import cli, stdout


@cli.command()
def models() -> None:
    """List the embedded models (`--model NAME` anywhere a model is taken): architecture, layers, hidden size, chat or
    base, installed or not, and the one command that installs it. Any local Hugging Face directory, .gguf file or hub
    id works too. Reads package metadata only (no torch, no weights)."""
    from rich.markup import escape

    from ..backend.embedded import DEFAULT_MODEL, EMBEDDED_MODELS, cache_dir

    table = Table(title="embedded models")
    for column in ("name", "architecture", "layers", "hidden size", "kind", "installed", "install with"):
        table.add_column(column, justify="right" if column in ("layers", "hidden size") else "left")
    for name, model in EMBEDDED_MODELS.items():
        table.add_row(name + (" (default)" if name == DEFAULT_MODEL else ""), model.architecture, str(model.layers),
                      str(model.hidden_size), "chat" if model.chat else "base", "yes" if model.installed else "no",
                      escape(model.install))
    stdout().print(table)
    click.echo(f"Each is dequantized once, on first use, into {cache_dir()} ($ENGRAM_EVAL_CACHE sets the folder).", err=True)
