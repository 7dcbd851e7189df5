"""A bare vector: the one 1-D tensor of a safetensors file, placed at --layer in engram-eval's numbering."""

from __future__ import annotations

from pathlib import Path

import torch

from ...core.errors import EngramEvalError
from ...core.registry import VECTOR_FORMATS
from .base import BareVectorFormat


@VECTOR_FORMATS.register
class PlainSafetensors(BareVectorFormat):
    name = "safetensors"
    summary = "one 1-D tensor in a .safetensors file, at --layer."
    suffixes = (".safetensors",)

    def sniff(self, path: Path) -> bool:
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())  # a tensor named by a layer number is steering-vectors'
                return len(keys) == 1 and not keys[0].isdigit() and not (f.metadata() or {}).get("format_version")
        except Exception:
            return False

    def array(self, path: Path) -> tuple[torch.Tensor, str]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise EngramEvalError(f"{path}: not a readable safetensors file ({exc})") from None
        if len(tensors) != 1:
            raise EngramEvalError(f"{path}: holds {len(tensors)} tensors; a plain vector file holds one")
        (key, value), = tensors.items()
        return value, f"{path}: tensor '{key}'"
