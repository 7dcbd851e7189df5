"""engram-eval vectors: steering vectors from other tools (import), from contrastive pairs (build) and out to them
(export), kept in STORE/vectors/ and swept with `sweep --vector NAME`."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from ..core.errors import EngramEvalError
from ..core.registry import VECTOR_FORMATS
from ..core.spec import format_layers
from .app import Group, cli, model_options, stdout, store_option



@cli.group(cls=Group)
def vectors() -> None:
    """Steering vectors: import them from llama.cpp / repeng, steering-vectors, lm-eval or plain arrays, build CAA
    vectors from contrastive pairs, export them and engrams as llama.cpp control vectors; sweep with --vector NAME."""


def _check_new(store_dir: str, name: str, force: bool) -> None:
    from ..vectors.store import check_name

    path = Path(store_dir) / "vectors" / f"{check_name(name)}.safetensors"
    if path.exists() and not force:
        raise EngramEvalError(f"{path}: a vector named '{name}' is already stored (--force replaces it)")


def _stored_table(title: str, name: str, vector, path: Path) -> None:
    table = Table(title=title, show_header=False)
    table.add_row("name", name)
    table.add_row("format", str(vector.source.get("format", "-")))
    table.add_row("action", vector.action)
    table.add_row("layers", format_layers(vector.layers) + "  (engram-eval's numbering: L adds to block L-1's output)")
    if layer_map := vector.source.get("layer_map"):
        shown = ", ".join(f"{source}->{layer}" for source, layer in list(layer_map.items())[:6])
        table.add_row("mapped", shown + (" ..." if len(layer_map) > 6 else ""))
    norms = [float(v.norm()) for v in vector.directions.values()]
    table.add_row("norms", f"{min(norms):.4g} to {max(norms):.4g}")
    table.add_row("file", str(path))
    table.add_row("next", f"engram-eval sweep BANK --vector {name}")
    stdout().print(table)


@vectors.command("import")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--name", required=True, help="The name to store it under (sweep --vector NAME).")
@click.option("--format", "format_name", default="auto", show_default=True,
              type=click.Choice(("auto", *VECTOR_FORMATS.names())),
              help="auto: by the file's suffix and contents. " + " ".join(
                  f"{name}: {summary}" for name, summary in (
                      ("gguf", "llama.cpp / repeng control vector."), ("steering-vectors", "a layer_activations dict (.pt or .safetensors)."),
                      ("lm-eval", "a steered-model .pt (hookpoint -> steering_vector, ...)."),
                      ("engram-eval", "a file `vectors export` wrote."), ("safetensors", "one 1-D tensor, at --layer."),
                      ("npy", "one 1-D array, at --layer."))))
@click.option("--layer", type=int, help="Where a file that names no layer (safetensors, npy) acts: engram-eval's layer L, "
                                        "the output of block L-1.")
@click.option("--ignore-model-hint", is_flag=True, help="Import a GGUF whose controlvector.model_hint names another model type.")
@model_options
@store_option
@click.option("--force", is_flag=True, help="Replace a stored vector of the same name.")
def vectors_import(file: Path, name: str, format_name: str, layer: int | None, ignore_model_hint: bool, load_lm,
                   store_dir: str, force: bool) -> None:
    """Read FILE's vector in its tool's layer convention, map it to engram-eval's (docs/interop.md), check it
    against the model (width, layers, model hint) and store it. .pt files are read with torch.load(weights_only=True):
    nothing is unpickled."""
    if not file.is_file():
        raise EngramEvalError(f"{file}: no such file")
    _check_new(store_dir, name, force)
    from ..vectors.formats import read_vector
    from ..vectors.store import VectorStore

    vector = read_vector(file, format_name, layer)
    lm = load_lm()
    vector.check_model(str(file), lm.num_layers, lm.hidden_size, None if ignore_model_hint else lm.family)
    VECTOR_FORMATS[vector.source["format"]].verify(vector, lm.backend, str(file))
    from ..core.files import file_sha256

    vector.source.update(file=str(file.resolve()), file_sha256=file_sha256(file), model=lm.name)
    path = VectorStore(store_dir).save(name, vector, force)
    _stored_table(f"imported {file.name}", name, vector, path)


@vectors.command("build")
@click.option("--pairs", "pairs_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="YAML: `pairs: [{positive: TEXT, negative: TEXT}, ...]`.")
@click.option("--name", required=True, help="The name to store it under.")
@click.option("--layers", "layers_text", default="all", show_default=True,
              help="Layers to build it at (engram-eval's numbering, 1 or more): '8,16', '10-20' or 'all' (1..last).")
@click.option("--read", type=click.Choice(("last", "mean")), default="last", show_default=True,
              help="Each text's activation: its last token's (steering-vectors' read_token_index=-1) or the mean of its tokens'.")
@model_options
@store_option
@click.option("--force", is_flag=True, help="Replace a stored vector of the same name.")
def vectors_build(pairs_path: Path, name: str, layers_text: str, read: str, load_lm, store_dir: str, force: bool) -> None:
    """Contrastive activation addition: the mean over pairs of (positive - negative) activation at the output of each
    block, as steering-vectors' train_steering_vector computes it."""
    from ..vectors.caa import read_pairs

    pairs = read_pairs(pairs_path)
    _check_new(store_dir, name, force)
    from ..vectors.caa import build_caa
    from ..vectors.store import VectorStore
    from .parsing import parse_layers

    lm = load_lm()
    layers = parse_layers(layers_text, lm.num_layers)
    if layers_text.strip() == "all":
        layers = [layer for layer in layers if layer > 0]
    vector = build_caa(lm, pairs, layers, read)
    vector.source.update(pairs_file=str(pairs_path.resolve()))
    path = VectorStore(store_dir).save(name, vector, force)
    _stored_table(f"built from {len(pairs)} pairs", name, vector, path)


@vectors.command("export")
@click.argument("name", required=False)
@click.option("--engram", help="Export a stored engram instead (source name, file name or key): at each layer the mean "
                               "of its k vectors.")
@click.option("--layers", "layers_text", help="Only these layers (engram-eval's numbering).  [default: all it has]")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="FILE.gguf (llama.cpp control vector, direction.N = layer N+1) or FILE.safetensors (engram-eval's).")
@click.option("--model-hint", help="The GGUF's controlvector.model_hint (the model type, e.g. llama).  [default: the "
                                   "vector's own]")
@store_option
@click.option("--force", is_flag=True, help="Replace --out if it exists.")
def vectors_export(name: str | None, engram: str | None, layers_text: str | None, out: Path, model_hint: str | None,
                   store_dir: str, force: bool) -> None:
    """Write a stored vector (NAME) or engram (--engram) as a llama.cpp control-vector GGUF or a safetensors file;
    importing the export gives back the same tensors."""
    if (name is None) == (engram is None):
        raise EngramEvalError("vectors export: name a stored vector (NAME) or an engram (--engram), one of them")
    kind = {".gguf": "gguf", ".safetensors": "safetensors"}.get(out.suffix)
    if kind is None:
        raise EngramEvalError(f"--out: {out} ends in neither .gguf nor .safetensors")
    if out.exists() and not force:
        raise EngramEvalError(f"--out: {out} exists (--force replaces it)")
    from ..core.files import atomic_replace
    from ..vectors.formats.gguf import write_gguf
    from ..vectors.store import VectorStore

    if engram is not None:
        from ..vectors.engrams import engram_vector

        layers = None if layers_text is None else export_layers(layers_text)
        vector = engram_vector(store_dir, engram, layers, model_hint)
    else:
        vector = VectorStore(store_dir).load(name).vector
        if layers_text is not None:
            keep = export_layers(layers_text)
            if missing := [layer for layer in keep if layer not in vector.directions]:
                raise EngramEvalError(f"--layers: vector '{name}' has no layer {missing[0]}")
            vector.directions = {layer: vector.directions[layer] for layer in keep}
    if kind == "gguf":
        hint = model_hint or vector.model_hint
        if not hint:
            raise EngramEvalError("--model-hint: the vector records no model type; name it (e.g. llama) for llama.cpp")
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_replace(out, lambda tmp: write_gguf(vector, tmp, hint))
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        vector.save(out)
    stdout().print(f"wrote {out} ({kind}, layers {format_layers(vector.layers)})")


def export_layers(text: str) -> list[int]:
    """--layers of `vectors export`: layer numbers, checked against what the vector or engram carries (no model here)."""
    from .parsing import parse_numbers

    return parse_numbers(text, int, "--layers", "layer numbers like '8,16'")


@vectors.command("ls")
@store_option
def vectors_ls(store_dir: str) -> None:
    """List the stored vectors."""
    from ..vectors.store import VectorStore

    store = VectorStore(store_dir)
    table = Table(title=f"vectors in {store.dir}")
    for column in ("name", "format", "action", "layers", "model hint", "path"):
        table.add_column(column)
    for name in store.names():
        try:
            vector = store.load(name).vector
        except EngramEvalError as exc:
            table.add_row(name, "[red]unreadable[/]", "-", "-", "-", str(exc))
            continue
        table.add_row(name, str(vector.source.get("format", "-")), vector.action, format_layers(vector.layers),
                      vector.model_hint or "-", str(store.path(name)))
    stdout().print(table)
