"""A bare vector: a 1-D .npy array (numpy, allow_pickle off), placed at --layer in engram-eval's numbering."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...core.errors import EngramEvalError
from ...core.registry import VECTOR_FORMATS
from .base import BareVectorFormat


@VECTOR_FORMATS.register
class PlainNpy(BareVectorFormat):
    name = "npy"
    summary = "one 1-D array in a .npy file (read without pickle), at --layer."
    suffixes = (".npy",)

    def array(self, path: Path) -> tuple[torch.Tensor, str]:
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise EngramEvalError(f"{path}: not a readable .npy array without pickle ({exc})") from None
        if array.dtype.kind != "f":
            raise EngramEvalError(f"{path}: a {array.dtype} array; expected floats")
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)), str(path)
