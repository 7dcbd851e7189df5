"""Steering-vector modes: an imported, built or exported vector (engram_eval.vectors) added to, or clamped in, the
output of block L-1 at every position (or those --positions names), as its source tool does.

A cell's raw vectors are the vector's direction at L, [1, hidden] (clamp: with its bias, [2, hidden]). Scalings:
`coefficient` (--coefficients: c x v, the vector's own magnitude kept; c = 1 is the source tool's application) and
`norm` (--strengths: strength x s x v/|v|, s the mean row norm of block L-1's output over the prompt, as actadd)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..backend.model import LoadedModel
from ..core.registry import INJECTIONS
from ..core.spec import VECTOR_SCALINGS
from .injection import ActAdd

if TYPE_CHECKING:
    from .injection import Steering

TINY = torch.finfo(torch.float32).tiny


@INJECTIONS.register
class VectorAdd(ActAdd):
    name = "vector"
    summary = ("a steering vector (sweep --vector), c x v added to the output of block L-1 at every position (or those "
               "--positions names).")
    scalings = VECTOR_SCALINGS
    steers_vector = True
    scaling_refusal = "--scaling: a steering vector is scaled by --coefficients (its own magnitude) or --strengths (x s)"

    def unit(self, lm: LoadedModel, vectors: torch.Tensor, scaling: str) -> torch.Tensor:
        v = vectors[0].float()
        return v if scaling == "coefficient" else v / v.norm().clamp_min(TINY)

    def scaled(self, unit: torch.Tensor, strength: float, norm: float | None, scaling: str) -> torch.Tensor:
        return unit * strength if scaling == "coefficient" else unit * (strength * norm)


@INJECTIONS.register
class VectorClamp(VectorAdd):
    name = "vector-clamp"
    summary = ("a clamp vector (lm-eval's clamp action): h + u (c |v| - (h - bias) . u), u = v / |v|, at the output of "
               "block L-1.")

    def unit(self, lm: LoadedModel, vectors: torch.Tensor, scaling: str) -> torch.Tensor:
        return torch.stack([super().unit(lm, vectors, scaling), vectors[1].float()])

    def scaled(self, unit: torch.Tensor, strength: float, norm: float | None, scaling: str) -> torch.Tensor:
        return torch.stack([super().scaled(unit[0], strength, norm, scaling), unit[1]])

    def inputs(self, steering: Steering, vectors: torch.Tensor, body: torch.Tensor) -> torch.Tensor:
        return body  # a vector acts on block outputs (layer 1 and up), never on the embeddings

    def steer_block(self, steering: Steering, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        rows = steering.vectors.to(hidden.device, hidden.dtype)
        value = rows[:, 0].norm(dim=-1, keepdim=True)  # [batch, 1]
        unit = rows[:, 0] / value.clamp_min(TINY)
        projection = ((hidden - rows[:, 1].unsqueeze(1)) * unit.unsqueeze(1)).sum(-1, keepdim=True)  # [batch, n, 1]
        change = unit.unsqueeze(1) * (value.unsqueeze(1) - projection)
        mask = torch.tensor([row_layer == layer for row_layer in steering.layers], device=hidden.device, dtype=hidden.dtype)
        change = change * mask.view(-1, 1, 1)
        positions = steering.position_mask(hidden.shape[1], hidden.device, hidden.dtype)
        return hidden + (change if positions is None else change * positions.view(1, -1, 1))
