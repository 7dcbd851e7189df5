"""llama.cpp control vectors (`--control-vector`), as repeng's ControlVector.export_gguf writes them: a GGUF of
architecture `controlvector` with `controlvector.model_hint`, `controlvector.layer_count` and one float tensor
`direction.N` per layer, read and written with the `gguf` package."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ...core.errors import EngramEvalError
from ...core.registry import VECTOR_FORMATS
from ..vector import SteeringVector
from .base import VectorFormat, block_outputs

ARCHITECTURE = "controlvector"


def _field(reader, key: str):
    field = reader.get_field(key)
    return None if field is None else field.contents()


@VECTOR_FORMATS.register
class ControlVectorGGUF(VectorFormat):
    name = "gguf"
    summary = "llama.cpp / repeng control vector (.gguf: direction.N tensors, controlvector.model_hint)."
    suffixes = (".gguf",)
    convention = ("llama.cpp adds direction.N to the output of decoder block N (0-based; direction.0 is never applied), "
                  "which is engram-eval's layer N+1")

    def read(self, path: Path, layer: int | None) -> SteeringVector:
        from gguf import GGUFReader

        try:
            reader = GGUFReader(path)
        except Exception as exc:  # the gguf package raises ValueError, struct or numpy errors on a bad file
            raise EngramEvalError(f"{path}: not a readable GGUF file ({exc})") from None
        architecture = _field(reader, "general.architecture")
        if architecture != ARCHITECTURE:
            raise EngramEvalError(f"{path}: a GGUF of architecture '{architecture}', not a control vector "
                                  f"('{ARCHITECTURE}'): is this a model file?")
        blocks: dict[int, torch.Tensor] = {}
        skipped = []
        for tensor in reader.tensors:
            if not tensor.name.startswith("direction."):
                continue
            index = tensor.name.removeprefix("direction.")
            if not index.isdigit():
                raise EngramEvalError(f"{path}: tensor '{tensor.name}' is not direction.N")
            if int(index) == 0:
                skipped.append(tensor.name)  # llama.cpp's loader refuses layer 0: nothing acts there
                continue
            blocks[int(index)] = torch.from_numpy(np.array(tensor.data, dtype=np.float32).reshape(-1))
        if not blocks:
            raise EngramEvalError(f"{path}: no direction.N tensor (N >= 1)")
        count = _field(reader, f"{ARCHITECTURE}.layer_count")
        if count is not None and int(count) != len(blocks) + len(skipped):
            raise EngramEvalError(f"{path}: controlvector.layer_count says {count}, the file has "
                                  f"{len(blocks) + len(skipped)} direction tensors")
        directions, layer_map = block_outputs(blocks, str(path))
        hint = _field(reader, f"{ARCHITECTURE}.model_hint")
        return SteeringVector(directions, model_hint=str(hint) if hint else None,
                              source={"layer_map": layer_map, **({"skipped": skipped} if skipped else {})})


def write_gguf(vector: SteeringVector, path: Path, model_hint: str) -> None:
    """repeng's export_gguf layout: direction.N for the block whose output each layer's direction is added to (N =
    layer - 1); llama.cpp's --control-vector-scaled factor is the coefficient."""
    from gguf import GGUFWriter

    if vector.action != "add":
        raise EngramEvalError(f"{path}: llama.cpp control vectors add; a {vector.action} vector has no GGUF form")
    if 0 in vector.directions:
        raise EngramEvalError(f"{path}: a direction at layer 0 (the embeddings) has no llama.cpp form (direction.0 is "
                              "never applied)")
    writer = GGUFWriter(str(path), ARCHITECTURE)
    writer.add_string(f"{ARCHITECTURE}.model_hint", model_hint)
    writer.add_uint32(f"{ARCHITECTURE}.layer_count", len(vector.directions))
    for layer, v in vector.directions.items():
        writer.add_tensor(f"direction.{layer - 1}", v.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
