"""engram-eval store: inspect and tidy the engram store."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from ..core.errors import EngramEvalError
from ..core.spec import SEED_POOLING, format_layers
from .app import Group, cli, stdout, store_option

SPARKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    """One character per value, scaled to the largest."""
    top = max(values) or 1.0
    return "".join(SPARKS[min(len(SPARKS) - 1, int(v / top * len(SPARKS)))] for v in values)


def metadata_layers(text: str) -> str:
    return format_layers([int(v) for v in text.split(",")])


@cli.group(cls=Group)
def store() -> None:
    """Inspect and tidy the engram store."""


@store.command("ls")
@store_option
def store_ls(store_dir: str) -> None:
    """List the engrams in the store; a file that cannot be read is listed as corrupt."""
    from ..engram.files import StoreFiles

    engram_store = StoreFiles.existing(store_dir)
    table = Table(title=f"engram store {store_dir}")
    for column in ("name", "key", "model", "layers", "chunks", "pooling", "tokens", "size", "path"):
        table.add_column(column)
    for path in engram_store.paths():
        size = f"{path.stat().st_size / 1024:.0f} KiB"
        try:
            meta = engram_store.read_metadata(path)
        except EngramEvalError:
            name = path.name.removesuffix(".safetensors").rsplit(".", 1)[0]
            table.add_row(name, StoreFiles.key_of(path), "[red]corrupt[/]", "-", "-", "-", "-", size, str(path))
            continue
        table.add_row(meta["source_name"], meta["key"], f"{meta['model']} ({meta['model_fingerprint'][:12]})",
                      metadata_layers(meta["layers"]), meta["chunks"], meta.get("pooling", SEED_POOLING), meta["n_tokens"], size, str(path))
    stdout().print(table)


@store.command("show")
@click.argument("name")
@store_option
def store_show(name: str, store_dir: str) -> None:
    """Show one engram's metadata and, per layer, its mean vector norm, its chunks' norms as a sparkline and the
    largest chunk's share of the summed norms (NAME: source name, file name or key). When several engrams carry
    NAME, they are listed and you give the key."""
    from ..engram.dominance import DOMINANCE_THRESHOLD, chunk_norms, chunk_shares
    from ..engram.files import StoreFiles

    engram_store = StoreFiles.existing(store_dir)
    paths = engram_store.find(name)
    if not paths:
        raise EngramEvalError(f"store {store_dir}: no engram named '{name}' (see `engram-eval store ls`)")
    if len(paths) > 1:
        table = Table(title=f"engrams named '{name}'")
        for column in ("key", "chunks", "pooling", "layers", "tokens", "path"):
            table.add_column(column)
        for path in paths:
            meta = engram_store.read_metadata(path)
            table.add_row(meta["key"], meta["chunks"], meta.get("pooling", SEED_POOLING), metadata_layers(meta["layers"]), meta["n_tokens"], str(path))
        stdout().print(table)
        raise EngramEvalError(f"store {store_dir}: {len(paths)} engrams are named '{name}'; give one of their keys")
    layers, metadata = engram_store.read_layers(paths[0])
    meta = Table(title=str(paths[0]), show_header=False)
    for key in sorted(metadata):
        meta.add_row(key, metadata[key])
    stdout().print(meta)
    norms = Table(title=f"norms per layer: chunks 0..{len(next(iter(layers.values()))) - 1} left to right; "
                        f"a largest share above {DOMINANCE_THRESHOLD:.0%} dominates the engram")
    for column in ("layer", "mean norm", "chunk norms", "largest chunk: share"):
        norms.add_column(column, justify="left" if column == "chunk norms" else "right")
    for layer, vectors in layers.items():
        row_norms = chunk_norms(vectors)
        shares = chunk_shares(vectors)
        share = float(shares.max())
        largest = f"{int(shares.argmax())}: {100 * share:.0f}%"
        norms.add_row(str(layer), f"{row_norms.mean():.4f}", sparkline(row_norms.tolist()),
                      f"[bold red]{largest}[/]" if share > DOMINANCE_THRESHOLD else largest)
    stdout().print(norms)


@store.command("rm")
@click.argument("names", metavar="KEY|NAME...", nargs=-1, required=True)
@store_option
def store_rm(names: tuple[str, ...], store_dir: str) -> None:
    """Remove engrams by key (or key prefix of 6+ characters), file name, or source name (every engram of that
    source). Corrupt files can be removed by the key in their file name."""
    from ..engram.files import StoreFiles

    engram_store = StoreFiles.existing(store_dir)
    targets: list[Path] = []
    for name in names:
        found = engram_store.find(name)
        if not found:
            raise EngramEvalError(f"store {store_dir}: no engram named '{name}' (see `engram-eval store ls`)")
        targets += [path for path in found if path not in targets]
    for path in targets:
        path.unlink()
        click.echo(f"removed {path}")


@store.command("gc")
@store_option
@click.option("--runs", "run_roots", multiple=True, type=click.Path(file_okay=False, path_type=Path),
              help="Also remove every engram that no run under these folders (searched recursively for run.json) "
                   "references. Without it, gc removes temporary files only. Repeat for several folders.")
@click.option("--dry-run", is_flag=True, help="List what would be removed, remove nothing.")
@click.option("--yes", is_flag=True, help="Remove engrams without asking for confirmation.")
def store_gc(store_dir: str, run_roots: tuple[Path, ...], dry_run: bool, yes: bool) -> None:
    """Remove temporary files left by killed writers; with --runs, also the engrams no run under those folders uses.

    A run written with --out elsewhere is unknown to gc: name every folder that holds runs. A run that a sweep is
    writing now keeps the engrams it has recorded and every engram built since it started. The engrams to remove and
    the ones kept are listed, and removing engrams asks for confirmation unless --yes."""
    from datetime import datetime

    from ..core.locks import holder_text
    from ..engram.files import StoreFiles, run_engram_keys, runs_in_progress

    engram_store = StoreFiles.existing(store_dir)
    for root in run_roots:
        if not root.is_dir():
            raise EngramEvalError(f"--runs: {root} is not a folder")
    temporaries = engram_store.stale_temporaries()
    engrams = engram_store.unreferenced(run_engram_keys(list(run_roots))) if run_roots else []
    for run_dir, holder in runs_in_progress(list(run_roots)):
        try:
            since = datetime.fromisoformat(holder["since"]).timestamp()
        except (KeyError, TypeError, ValueError):
            since = 0.0  # a holder that says nothing readable: keep every engram
        click.echo(f"run {run_dir} is being written by {holder_text(holder)}: engrams built since it started are kept")
        engrams = [path for path in engrams if path.stat().st_mtime < since]
    kept = [path for path in engram_store.paths() if path not in engrams]
    verb = "would remove" if dry_run else "removing"
    for path in temporaries + engrams:
        click.echo(f"{verb} {path}")
    for path in kept:
        click.echo(f"keeping {path}")
    if engrams and not dry_run and not yes:
        click.confirm(f"remove {len(engrams)} engram(s) that no run under {', '.join(map(str, run_roots))} uses?", abort=True, err=True)
    if not dry_run:
        for path in temporaries + engrams:
            path.unlink(missing_ok=True)
    scope = "" if run_roots else " (engrams are removed only with --runs)"
    click.echo(f"{len(temporaries)} temporary file(s) and {len(engrams)} engram(s) {'to remove' if dry_run else 'removed'}; "
               f"{len(kept)} engram(s) kept{scope}")
