"""steering-vectors' SteeringVector.layer_activations (layer -> tensor, layer_type decoder_block) saved as a .pt
(torch.save of the dict, or of {"layer_activations": ..., "layer_type": ...}) or a safetensors file whose tensors
are named by their layer number."""

from __future__ import annotations

from pathlib import Path

from ...core.errors import EngramEvalError
from ...core.registry import VECTOR_FORMATS
from ..vector import SteeringVector
from .base import VectorFormat, as_vector, block_outputs, read_pt


def _layer_dict(content: object) -> dict | None:
    if isinstance(content, dict) and "layer_activations" in content:
        content = content["layer_activations"]
    if isinstance(content, dict) and content and all(isinstance(k, int) or (isinstance(k, str) and k.isdigit()) for k in content):
        return content
    return None


@VECTOR_FORMATS.register
class SteeringVectorsDict(VectorFormat):
    name = "steering-vectors"
    summary = ("steering-vectors' layer_activations dict (.pt via torch.save, or .safetensors with tensors named by "
               "layer).")
    suffixes = (".pt", ".pth", ".safetensors")
    convention = ("steering-vectors (layer_type decoder_block) adds layer_activations[N] to the output of decoder block "
                  "N (0-based), which is engram-eval's layer N+1")

    def sniff(self, path: Path) -> bool:
        if path.suffix == ".safetensors":
            from safetensors import safe_open
            try:
                with safe_open(str(path), framework="pt") as f:
                    return bool(list(f.keys())) and all(key.isdigit() for key in f.keys())
            except Exception:
                return False
        try:
            return _layer_dict(read_pt(path)) is not None
        except EngramEvalError:
            return False

    def read(self, path: Path, layer: int | None) -> SteeringVector:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            content: object = load_file(str(path))
        else:
            content = read_pt(path)
        if isinstance(content, dict) and content.get("layer_type", "decoder_block") != "decoder_block":
            raise EngramEvalError(f"{path}: layer_type '{content['layer_type']}' is not supported (decoder_block only)")
        layers = _layer_dict(content)
        if layers is None:
            raise EngramEvalError(f"{path}: not a steering-vectors layer_activations dict (layer number -> tensor)")
        blocks = {int(k): as_vector(v, f"{path}: layer {k}") for k, v in layers.items()}
        directions, layer_map = block_outputs(blocks, str(path))
        return SteeringVector(directions, source={"layer_map": layer_map})
