"""engram-eval store: inspect and tidy the engram store."""

from __future__ import annotations

import click
from rich.table import Table

from ..errors import EngramEvalError
from .app import Group, cli, stdout, store_option
from .build import _layers_text

@cli.group(cls=Group)
def store() -> None:
    """Inspect the engram store."""


@store.command("ls")
@store_option
def store_ls(store_dir: str) -> None:
    """List the engrams in the store."""
    from ..store import EngramStore

    engram_store = EngramStore(store_dir)
    table = Table(title=f"engram store {store_dir}")
    for column in ("name", "model", "layers", "chunks", "tokens", "size", "path"):
        table.add_column(column)
    for path in engram_store.paths():
        meta = engram_store.read_metadata(path)
        size = f"{path.stat().st_size / 1024:.0f} KiB"
        table.add_row(meta["source_name"], f"{meta['model']} ({meta['model_fingerprint'][:12]})", _layers_text(meta["layers"]),
                      meta["chunks"], meta["n_tokens"], size, str(path))
    stdout.print(table)


@store.command("show")
@click.argument("name")
@store_option
def store_show(name: str, store_dir: str) -> None:
    """Show one engram's metadata and per-layer mean vector norms (NAME: source name, file name or key)."""
    from ..store import EngramStore

    engram_store = EngramStore(store_dir)
    paths = engram_store.find(name)
    if not paths:
        raise EngramEvalError(f"store {store_dir}: no engram named '{name}' (see `engram-eval store ls`)")
    for path in paths:
        stored = engram_store.load(path)
        meta = Table(title=str(path), show_header=False)
        for key in sorted(stored.metadata):
            meta.add_row(key, stored.metadata[key])
        stdout.print(meta)
        norms = Table(title="mean vector norm per layer")
        norms.add_column("layer", justify="right")
        norms.add_column("mean norm", justify="right")
        for layer, vectors in stored.engram.layers.items():
            norms.add_row(str(layer), f"{vectors.norm(dim=1).mean().item():.4f}")
        stdout.print(norms)
