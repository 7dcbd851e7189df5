"""A bare vector: a 1-D .npy array (numpy, allow_pickle off), placed at --layer in engram-eval's numbering."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...core.errors import EngramEvalError
from ...core.registry import VECTOR_FORMATS
from ..vector import SteeringVector
from .base import PLAIN_CONVENTION, VectorFormat, at_layer


@VECTOR_FORMATS.register
class PlainNpy(VectorFormat):
    name = "npy"
    summary = "one 1-D array in a .npy file (read without pickle), at --layer."
    suffixes = (".npy",)
    convention = PLAIN_CONVENTION
    takes_layer = True

    def read(self, path: Path, layer: int | None) -> SteeringVector:
        try:
            array = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as exc:
            raise EngramEvalError(f"{path}: not a readable .npy array without pickle ({exc})") from None
        if array.dtype.kind != "f":
            raise EngramEvalError(f"{path}: a {array.dtype} array; expected floats")
        return at_layer(torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)), layer, str(path))
