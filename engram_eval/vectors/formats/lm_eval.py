"""lm-eval's `steered` model (`--model steered --model_args steer_path=FILE.pt`): a dict hookpoint -> {steering_vector,
steering_coefficient, action: add | clamp, bias, head_index}. Read with torch.load(weights_only=True); lm-eval's own
loader unpickles."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ...core.errors import EngramEvalError
from ...core.registry import VECTOR_FORMATS
from ..vector import ACTIONS, SteeringVector

if TYPE_CHECKING:
    from ...backend.interface import Backend
from .base import VectorFormat, as_vector, block_outputs, read_pt

BLOCK_HOOKPOINT = re.compile(r"^(?:.*\.)?(?:layers|h|blocks|layer)\.(\d+)$")  # a decoder block's module name
FIELDS = {"steering_vector", "steering_coefficient", "action", "bias", "head_index"}


def _is_steer_config(content: object) -> bool:
    return (isinstance(content, dict) and bool(content) and all(isinstance(k, str) for k in content)
            and all(isinstance(v, dict) and "steering_vector" in v for v in content.values()))


@VECTOR_FORMATS.register
class LmEvalSteered(VectorFormat):
    name = "lm-eval"
    summary = "lm-eval's steered model file (.pt: hookpoint -> steering_vector, steering_coefficient, action, bias)."
    suffixes = (".pt", ".pth")
    convention = ("lm-eval hooks the output of the module named by the hookpoint in model.base_model; a decoder block "
                  "'layers.N' (0-based) is engram-eval's layer N+1")

    def sniff(self, path: Path) -> bool:
        try:
            return _is_steer_config(read_pt(path))
        except EngramEvalError:
            return False

    def read(self, path: Path, layer: int | None) -> SteeringVector:
        content = read_pt(path)
        if not _is_steer_config(content):
            raise EngramEvalError(f"{path}: not an lm-eval steer file (hookpoint -> {{steering_vector, ...}})")
        actions = {str(info.get("action", "add")) for info in content.values()}
        if len(actions) != 1 or not actions <= set(ACTIONS):
            raise EngramEvalError(f"{path}: actions {sorted(actions)}: one action per file, add or clamp")
        action = actions.pop()
        blocks: dict[int, torch.Tensor] = {}
        biases: dict[int, torch.Tensor] = {}
        hookpoints: dict[str, int] = {}
        for hookpoint, info in content.items():
            what = f"{path}: hookpoint '{hookpoint}'"
            if unknown := set(info) - FIELDS:
                raise EngramEvalError(f"{what}: unknown field {sorted(unknown)[0]!r}")
            if info.get("head_index") is not None:
                raise EngramEvalError(f"{what}: head_index steers one attention head; only block outputs are supported")
            match = BLOCK_HOOKPOINT.match(hookpoint)
            if not match:
                raise EngramEvalError(f"{what}: not a decoder block's output (like 'layers.N'); only block outputs are "
                                      "supported")
            block = int(match.group(1))
            if block in blocks:
                raise EngramEvalError(f"{what}: block {block} is steered twice")
            vector = as_vector(info["steering_vector"], what).float()
            coefficient = float(info.get("steering_coefficient", 1.0))
            if action == "add":
                if info.get("bias") is not None:
                    raise EngramEvalError(f"{what}: a bias with action add (lm-eval refuses it too)")
                blocks[block] = vector * coefficient
            else:  # clamp to `coefficient` along the unit vector: kept as that unit vector times the value
                if not vector.norm() > 0:
                    raise EngramEvalError(f"{what}: a zero clamp direction")
                blocks[block] = vector / vector.norm() * coefficient
                if info.get("bias") is not None:
                    biases[block] = as_vector(info["bias"], f"{what} bias").float()
            hookpoints[hookpoint] = block
        directions, layer_map = block_outputs(blocks, str(path))
        return SteeringVector(directions, action, {b + 1: v for b, v in biases.items()},
                              source={"layer_map": layer_map, "hookpoints": {h: b + 1 for h, b in hookpoints.items()}})

    def verify(self, vector: SteeringVector, backend: Backend, what: str) -> None:
        """Each hookpoint must name the decoder block the mapping says, looked up as lm-eval does."""
        blocks = backend.blocks()
        for hookpoint, layer in vector.source.get("hookpoints", {}).items():
            if backend.hookpoint(hookpoint) is not blocks[layer - 1]:
                raise EngramEvalError(f"{what}: hookpoint '{hookpoint}' is not decoder block {layer - 1} of this model")
