"""What every vector format is and shares: the VectorFormat class, the block-output mapping and safe readers."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

from ...core.errors import EngramEvalError
from ..vector import SteeringVector

if TYPE_CHECKING:
    from ...backend.interface import Backend


class VectorFormat:
    name: ClassVar[str]
    summary: ClassVar[str]  # its --format help
    suffixes: ClassVar[tuple[str, ...]]  # what `--format auto` recognises it by
    convention: ClassVar[str]  # the source's layer numbering, and the mapping to engram-eval's (docs/interop.md)
    takes_layer: ClassVar[bool] = False  # the file names no layer: --layer says where it acts

    def read(self, path: Path, layer: int | None) -> SteeringVector:
        raise NotImplementedError

    def verify(self, vector: SteeringVector, backend: Backend, what: str) -> None:
        """What only the model can confirm of the mapping (nothing, unless the format overrides this)."""

    def sniff(self, path: Path) -> bool:
        """Whether a file with one of the suffixes is this format's (several formats share .pt)."""
        return True


def block_outputs(source: dict[int, torch.Tensor], what: str) -> tuple[dict[int, torch.Tensor], dict[str, int]]:
    """Directions keyed by 0-based decoder block, added to that block's output -> keyed by hidden_states index (N+1),
    with the mapping as recorded."""
    for block in source:
        if block < 0:
            raise EngramEvalError(f"{what}: layer {block} is negative; a block index counts from 0")
    return {block + 1: v for block, v in source.items()}, {str(block): block + 1 for block in sorted(source)}


def read_pt(path: Path) -> object:
    """A .pt file's tensors and plain containers, never an arbitrary object: torch.load(weights_only=True)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's note on the pickle protocol: the refusal below says what matters
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError or others for a file it refuses
        first = str(exc).strip().split(". ")[0] if str(exc).strip() else type(exc).__name__
        raise EngramEvalError(f"{path}: not loadable with torch.load(weights_only=True), which reads tensors and plain "
                              f"containers only and never unpickles code ({first})") from None


def as_vector(value: object, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise EngramEvalError(f"{what}: expected a tensor, found {type(value).__name__}")
    if value.dim() == 2 and 1 in value.shape:
        value = value.reshape(-1)
    if value.dim() != 1 or not value.is_floating_point():
        raise EngramEvalError(f"{what}: expected a 1-D float vector, found shape {tuple(value.shape)} of {value.dtype}")
    return value


PLAIN_CONVENTION = ("the file names no layer; --layer L is engram-eval's numbering: added to the output of decoder "
                    "block L-1 (hidden_states[L])")


class BareVectorFormat(VectorFormat):
    """A file of one 1-D array that names no layer: --layer (engram-eval's numbering) says where it acts."""

    convention = PLAIN_CONVENTION
    takes_layer = True

    def array(self, path: Path) -> tuple[torch.Tensor, str]:
        """The file's one array, and what to call it in an error."""
        raise NotImplementedError

    def read(self, path: Path, layer: int | None) -> SteeringVector:
        if layer is None or layer < 1:
            raise EngramEvalError(f"--layer: {layer}; a vector acts on a block's output, layer 1 or more")
        vector, what = self.array(path)
        return SteeringVector({layer: as_vector(vector, what)}, source={"layer_map": {"--layer": layer}})
