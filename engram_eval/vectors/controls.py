"""A steering vector's paired controls, per layer: a random direction of the same norm (seeded by the vector's
checksum and the layer, so every run draws the same one) and the negated vector. The dose-matched random control at
equal KL is the report's (engram_eval.report.dose), read along the random direction's coefficient grid."""

from __future__ import annotations

import hashlib

import torch

from .vector import SteeringVector

RANDOM_DIRECTION = "~random-direction"
NEGATED = "~negated"
VECTOR_CONTROLS = {RANDOM_DIRECTION: "random-direction", NEGATED: "negated"}  # name -> control kind


def control_seed(vector_sha256: str, layer: int) -> int:
    return int(hashlib.sha256(f"{vector_sha256}|{layer}".encode()).hexdigest()[:15], 16)


def random_direction(vector: SteeringVector, layer: int) -> torch.Tensor:
    """A standard Gaussian direction scaled to the vector's norm at the layer."""
    generator = torch.Generator().manual_seed(control_seed(vector.sha256, layer))
    v = vector.directions[layer]
    draw = torch.randn(v.numel(), generator=generator, dtype=torch.float32)
    return draw / draw.norm() * v.norm()


def control_direction(vector: SteeringVector, name: str, layer: int) -> torch.Tensor:
    return random_direction(vector, layer) if name == RANDOM_DIRECTION else -vector.directions[layer]


def raw_rows(vector: SteeringVector, direction: torch.Tensor, layer: int) -> torch.Tensor:
    """A cell's raw vectors: [1, hidden]; a clamp vector's with its bias (zero where it has none), [2, hidden]."""
    if vector.action == "clamp":
        return torch.stack([direction, vector.bias.get(layer, torch.zeros_like(direction))])
    return direction.unsqueeze(0)


def vector_raw(vector: SteeringVector, name: str, layers: list[int]) -> dict[tuple[str, int, int], torch.Tensor]:
    """Every cell's raw vectors by (vectors name, layer, k = 1): the vector's and its controls'."""
    raw = {}
    for layer in layers:
        raw[(name, layer, 1)] = raw_rows(vector, vector.directions[layer], layer)
        for control in VECTOR_CONTROLS:
            raw[(control, layer, 1)] = raw_rows(vector, control_direction(vector, control, layer), layer)
    return raw
