"""Vector formats, one module each, registered in VECTOR_FORMATS (engram_eval.core.registry): a format reads a file
into a SteeringVector in engram-eval's layer numbering and says, in `convention`, how it maps the source's.

A new format is one module here (a VectorFormat subclass with @VECTOR_FORMATS.register), its name in the registry's
list, and its test."""

from __future__ import annotations

from importlib import import_module
from pathlib import Path

from ...core.errors import EngramEvalError
from ...core.registry import VECTOR_FORMATS
from ..vector import SteeringVector
from .base import read_pt


def detect(path: Path) -> str:
    """--format auto: the format the file's suffix (and, for .pt, its contents) says."""
    if path.suffix in (".pt", ".pth"):
        read_pt(path)  # a file torch refuses without unpickling: say so, not "unknown format"
    candidates = [name for name in VECTOR_FORMATS if path.name.endswith(VECTOR_FORMATS[name].suffixes)]
    matching = [name for name in candidates if VECTOR_FORMATS[name].sniff(path)]
    if len(matching) != 1:
        options = ", ".join(VECTOR_FORMATS.names())
        found = "none" if not matching else " and ".join(matching)
        raise EngramEvalError(f"{path}: cannot tell its format (matches: {found}); name it with --format ({options})")
    return matching[0]


def read_vector(path: Path, format_name: str = "auto", layer: int | None = None) -> SteeringVector:
    """A file -> its SteeringVector, checked; one line naming the file for anything it cannot read."""
    if not path.is_file():
        raise EngramEvalError(f"{path}: no such file")
    name = detect(path) if format_name == "auto" else VECTOR_FORMATS.check(format_name)
    fmt = VECTOR_FORMATS[name]
    if fmt.takes_layer and layer is None:
        raise EngramEvalError(f"--layer: {path} ({name}) names no layer; say which layer the vector acts at "
                              "(engram-eval's numbering: L adds to the output of block L-1)")
    if not fmt.takes_layer and layer is not None:
        raise EngramEvalError(f"--layer: {name} files name their layers ({fmt.convention})")
    vector = fmt.read(path, layer)
    vector.source = {**vector.source, "format": name, "convention": fmt.convention}
    return vector.check(str(path))


for _name in VECTOR_FORMATS.names():  # each format's module registers it: a new format is its module and its name
    import_module(f"{__name__}.{_name.replace('-', '_')}")
