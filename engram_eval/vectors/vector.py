"""One steering vector: per-layer directions in engram-eval's numbering, how the source tool applies them, and where
they came from; saved as safetensors with the provenance in its metadata.

Layer L is hidden_states[L]: the output of decoder block L-1 (0-based), the residual stream the vector is added to.
Every format maps its own numbering to this one at import (docs/interop.md); the mapping is recorded."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..core.errors import EngramEvalError
from ..core.files import atomic_replace, write_failure

ACTIONS = ("add", "clamp")  # add: h + c v at every position; clamp (lm-eval): h's component along v set to c |v|
FORMAT_VERSION = "1"


@dataclass
class SteeringVector:
    """directions: layer (hidden_states index, 1..num_layers) -> float32 [hidden], with the source's own multiplier
    (lm-eval's steering_coefficient) already in it, so coefficient 1 is the source tool's application. add: h + v at
    every position; clamp: h + u (|v| - (h - bias) . u), u = v / |v| (lm-eval's clamp to |v| along u). bias (clamp
    only): layer -> the bias lm-eval subtracts before it projects."""

    directions: dict[int, torch.Tensor]
    action: str = "add"
    bias: dict[int, torch.Tensor] = field(default_factory=dict)
    model_hint: str | None = None  # what the source says the vector is for (a GGUF's controlvector.model_hint)
    source: dict = field(default_factory=dict)  # format, file, sha256, convention, layer_map {source's key: layer}

    def __post_init__(self) -> None:
        self.directions = {int(layer): v.detach().float().reshape(-1).cpu() for layer, v in sorted(self.directions.items())}
        self.bias = {int(layer): b.detach().float().reshape(-1).cpu() for layer, b in sorted(self.bias.items())}

    @property
    def layers(self) -> list[int]:
        return sorted(self.directions)

    @property
    def width(self) -> int:
        return next(iter(self.directions.values())).numel()

    def check(self, what: str) -> SteeringVector:
        """Shape and values: one line naming `what` (the file) when a direction is empty, ragged or not finite."""
        if not self.directions:
            raise EngramEvalError(f"{what}: carries no direction")
        if self.action not in ACTIONS:
            raise EngramEvalError(f"{what}: action '{self.action}' is not supported (one of: {', '.join(ACTIONS)})")
        widths = {v.numel() for v in self.directions.values()} | {b.numel() for b in self.bias.values()}
        if len(widths) != 1:
            raise EngramEvalError(f"{what}: its directions have different widths ({', '.join(map(str, sorted(widths)))})")
        for layer, v in self.directions.items():
            if not torch.isfinite(v).all():
                raise EngramEvalError(f"{what}: the direction at layer {layer} is not finite")
            if self.action == "clamp" and not v.norm() > 0:
                raise EngramEvalError(f"{what}: the clamp direction at layer {layer} is zero")
        if self.bias and self.action != "clamp":
            raise EngramEvalError(f"{what}: a bias applies to the clamp action only (lm-eval refuses it with add)")
        return self

    def check_model(self, what: str, num_layers: int, hidden_size: int, model_type: str | None) -> SteeringVector:
        """The vector against the model: its width, its layers and (a GGUF's) model hint, one line each."""
        if self.width != hidden_size:
            raise EngramEvalError(f"{what}: the vector is {self.width} wide; the model's residual stream is {hidden_size}")
        outside = [layer for layer in self.layers if not 1 <= layer <= num_layers]
        if outside:
            raise EngramEvalError(f"{what}: layer {outside[0]} (in engram-eval's numbering) is outside the model's blocks "
                                  f"1..{num_layers}; {self.source.get('convention', '')}".rstrip("; "))
        if self.model_hint and model_type and self.model_hint != model_type:
            raise EngramEvalError(f"{what}: model_hint '{self.model_hint}' does not match the model's type '{model_type}' "
                                  "(--ignore-model-hint to import it anyway)")
        return self

    @property
    def sha256(self) -> str:
        """The vector's identity: its action and every tensor's layer and bytes."""
        digest = hashlib.sha256(self.action.encode())
        for prefix, tensors in (("direction", self.directions), ("bias", self.bias)):
            for layer, v in tensors.items():
                digest.update(f"{prefix}.{layer}".encode())
                digest.update(v.numpy().tobytes())
        return digest.hexdigest()

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"direction.{layer}": v.contiguous() for layer, v in self.directions.items()},
                **{f"bias.{layer}": b.contiguous() for layer, b in self.bias.items()}}

    def save(self, path: Path) -> None:
        """One safetensors file, written whole or not at all."""
        metadata = {"format_version": FORMAT_VERSION, "action": self.action,
                    "model_hint": self.model_hint or "", "source": json.dumps(self.source, sort_keys=True),
                    "sha256": self.sha256}
        try:
            atomic_replace(path, lambda tmp: save_file(self.tensors(), str(tmp), metadata=metadata))
        except OSError as exc:
            raise EngramEvalError(write_failure(path, exc)) from None

    @classmethod
    def load(cls, path: Path) -> SteeringVector:
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise EngramEvalError(f"{path}: not a readable vector file ({exc})") from None
        try:
            directions = {int(k.split(".", 1)[1]): v for k, v in tensors.items() if k.startswith("direction.")}
            bias = {int(k.split(".", 1)[1]): v for k, v in tensors.items() if k.startswith("bias.")}
            vector = cls(directions, metadata.get("action", "add"), bias,
                         metadata.get("model_hint") or None, json.loads(metadata.get("source", "{}")))
        except (ValueError, json.JSONDecodeError) as exc:
            raise EngramEvalError(f"{path}: not an engram-eval vector file ({exc})") from None
        vector.check(str(path))
        if metadata.get("sha256") and metadata["sha256"] != vector.sha256:
            raise EngramEvalError(f"{path}: its tensors do not match the checksum in its metadata (the file changed)")
        return vector
