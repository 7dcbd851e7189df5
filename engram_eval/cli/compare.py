"""engram-eval compare: engram geometry — the seeds' cosine and difference signal, with their confounds."""

from __future__ import annotations

from pathlib import Path

import click
from rich.table import Table

from ..core.errors import EngramEvalError
from .app import chunks_option, cli, extraction_options, outside_option, stderr, stdout, store_option, threads_option, threads_set


@cli.command()
@click.argument("sources", metavar="[FILE.txt ... | NAME ...]", nargs=-1)
@click.option("--bank", "bank_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Take the sources from this bank: the NAMEs given (every pair of them, null prefixes allowed), or with "
                   "none, each question's relevant engram against each of its controls.")
@click.option("--model", "model_specs", multiple=True, default=["smollm2-135m"], show_default=True,
              help="Embedded alias, local Hugging Face directory, .gguf file or hub id; repeat to compare the same pairs on "
                   "several models.")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available, else cpu), cpu, cuda or cuda:N.")
@click.option("--dtype", default="auto", show_default=True, help="auto (bfloat16 on cuda, float32 on cpu), float32, bfloat16 or float16.")
@click.option("--trust-remote-code", is_flag=True, help="Allow model code from the model's repository to run (off by default).")
@click.option("--layers", "layers_text", default="8,12,16,20,24", show_default=True,
              help="Layers to compare at: '8,12,16', '10-20' or 'all' (valid for every --model).")
@click.option("--depths", "depths_text",
              help="Instead of --layers, relative depths such as '0.25,0.5,0.75': layer round(depth x number of layers) "
                   "of each model, so models of different depth line up.")
@chunks_option
@extraction_options
@store_option
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Also write every row to this Parquet file.")
@outside_option
@threads_option
def compare(sources: tuple[str, ...], bank_path: Path | None, model_specs: tuple[str, ...], device: str, dtype: str,
            trust_remote_code: bool, layers_text: str, depths_text: str | None, chunks_text: str, extraction, store_dir: str,
            out: Path | None, allow_outside_paths: bool, threads: int | None) -> None:
    """Compare engrams pair by pair: cosine of the flattened k x hidden engrams (the seeds' number), its angle, the
    difference signal 100 x (1 - cosine), chunk-by-chunk cosines, the norm ratio, the cosine without chunk 0 (the first
    token's massive activation), the cosine centred on the reference set's mean engram (all sources of the bank, or all
    given files) with and without chunk 0, both sources' token counts (flagged when they differ by more than 20%:
    the chunks then average spans of other sizes, which centring does not undo), and how many leading tokens the two
    sources share (flagged when that covers a whole chunk: those states are identical under causal attention)."""
    import polars as pl

    from ..bank.banks import load_bank
    from ..core.files import atomic_write_parquet, read_text
    from .parsing import parse_layers
    from .parsing import parse_chunks

    chunks = parse_chunks(chunks_text)
    extraction.check(chunks)
    depths = parse_depths(depths_text) if depths_text else None
    if bank_path is not None:
        from ..engram.geometry import bank_pairs

        texts, pairs = bank_pairs(load_bank(bank_path, allow_outside_paths), list(sources))
    else:
        if len(sources) < 2:
            raise EngramEvalError("compare: give at least two source files, or --bank BANK.yaml (nothing to compare)")
        texts = {}
        for source in map(Path, sources):
            if source.stem in texts:
                raise EngramEvalError(f"compare: two sources are named '{source.stem}'")
            texts[source.stem] = read_text(source, "source file")
        pairs = [(a, b) for i, a in enumerate(texts) for b in list(texts)[i + 1:]]
    if out is not None and not out.parent.is_dir():
        raise EngramEvalError(f"--out: folder {out.parent} does not exist")
    from ..backend.model import load_model  # torch: after the checks above
    from ..engram.geometry import compare_engrams
    from ..engram.store import EngramStore

    frames = []
    with threads_set(threads):
        for spec in model_specs:
            with stderr.status(f"loading model {spec} ..."):
                lm = load_model(spec, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
            layers = sorted({round(d * lm.num_layers) for d in depths}) if depths else parse_layers(layers_text, lm.num_layers)
            frames.append(compare_engrams(lm, texts, pairs, layers, chunks, extraction, EngramStore(store_dir))
                          .with_columns(depth=pl.col("layer") / lm.num_layers))
    frame = pl.concat(frames)
    _print(frame, several_models=len(model_specs) > 1)
    if out is not None:
        atomic_write_parquet(out, frame)
        click.echo(str(out))


def parse_depths(text: str) -> list[float]:
    from .parsing import parse_numbers

    depths = parse_numbers(text, float, "--depths", "fractions like '0.25,0.5,0.75'")
    for depth in depths:
        if not 0 <= depth <= 1:
            raise EngramEvalError(f"--depths: {depth} is not a relative depth between 0 and 1")
    return depths


def _tokens(row: dict) -> str:
    counts = " / ".join("-" if n is None else str(n) for n in (row["tokens_a"], row["tokens_b"]))
    return counts + (" [bold red](differ > 20%)[/]" if row["token_counts_differ"] else "")


def _print(frame, several_models: bool) -> None:
    table = Table(title="engram geometry (difference signal = 100 x (1 - cosine), in %)")
    columns = (["model"] if several_models else []) + ["a", "b", "layer", "k", "cosine", "angle", "difference signal",
                                                        "chunk cos min / median", "norm ratio", "centred cos",
                                                        "cos without chunk 0", "centred cos without chunk 0", "tokens a / b",
                                                        "shared prefix tokens"]
    for column in columns:
        table.add_column(column, justify="left" if column in ("model", "a", "b") else "right")
    for r in frame.iter_rows(named=True):
        shared = "-" if r["shared_prefix_tokens"] is None else str(r["shared_prefix_tokens"]) + (
            " [bold red](covers a chunk)[/]" if r["shared_prefix_covers_a_chunk"] else "")
        cells = [r["a"], r["b"], str(r["layer"]), str(r["chunks"]), f"{r['cosine']:.5f}", f"{r['angle_deg']:.2f}°",
                 f"{r['difference_signal']:.4f}", f"{r['chunk_cosine_min']:.3f} / {r['chunk_cosine_median']:.3f}",
                 f"{r['norm_ratio']:.3f}", "-" if r["centered_cosine"] is None else f"{r['centered_cosine']:.3f}",
                 "-" if r["cosine_without_first_chunk"] is None else f"{r['cosine_without_first_chunk']:.5f}",
                 "-" if r["centered_cosine_without_first_chunk"] is None else f"{r['centered_cosine_without_first_chunk']:.3f}",
                 _tokens(r), shared]
        table.add_row(*([r["model"]] if several_models else []), *cells)
    stdout().print(table)
