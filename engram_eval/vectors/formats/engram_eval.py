"""engram-eval's own vector file (`vectors export --format safetensors`, the store's files): direction.L in
engram-eval's numbering, with the action, bias and provenance in its metadata."""

from __future__ import annotations

from pathlib import Path

from ...core.registry import VECTOR_FORMATS
from ..vector import FORMAT_VERSION, SteeringVector
from .base import VectorFormat


@VECTOR_FORMATS.register
class EngramEvalVector(VectorFormat):
    name = "engram-eval"
    summary = "engram-eval's own vector file (.safetensors written by vectors export or the store)."
    suffixes = (".safetensors",)
    convention = "engram-eval's numbering: direction.L is added to the output of block L-1 (hidden_states[L])"

    def sniff(self, path: Path) -> bool:
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                return (f.metadata() or {}).get("format_version") == FORMAT_VERSION
        except Exception:
            return False

    def read(self, path: Path, layer: int | None) -> SteeringVector:
        vector = SteeringVector.load(path)
        vector.source = {"origin": vector.source}  # where the exported vector came from, kept whole
        return vector
