"""Injection: raw engram vectors -> what a cell does to the model.

Modes (`--injection`): `prefix` (the seed's: k scaled vectors before the prompt), `add` (added to the first k prompt
embeddings) and `actadd` (activation addition: strength x s x u added to the residual stream after block L-1 at every
position). Scalings (`--scaling`, prefix and add): `global` (the seed's one scalar) and `per-chunk`."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import torch

from .errors import EngramEvalError
from .model import LoadedModel

if TYPE_CHECKING:
    from .grid import Cell

INJECTIONS = ("prefix", "add", "actadd")
SCALINGS = ("global", "per-chunk")


def mean_row_norm(x: torch.Tensor) -> torch.Tensor:
    return x.float().norm(dim=1).mean()


def scale_engram(vectors: torch.Tensor, embedding_norm: float, strength: float, scaling: str = "global") -> torch.Tensor:
    """global (seed): one scalar so the engram's mean row norm equals the embeddings', times strength.
    per-chunk: every vector to the embeddings' mean row norm times strength, so no chunk dominates."""
    vectors = vectors.float()
    if scaling == "per-chunk":
        return vectors / vectors.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) * embedding_norm * strength
    return vectors * (embedding_norm / mean_row_norm(vectors)) * strength


def check_injection(injection: str, scaling: str) -> None:
    if injection not in INJECTIONS:
        raise EngramEvalError(f"--injection: unknown '{injection}' (one of: {', '.join(INJECTIONS)})")
    if scaling not in SCALINGS:
        raise EngramEvalError(f"--scaling: unknown '{scaling}' (one of: {', '.join(SCALINGS)})")
    if injection == "actadd" and scaling != "global":
        raise EngramEvalError("--scaling: applies to prefix and add injection; actadd scales its direction by the "
                              "residual stream's own norm")


def direction(vectors: torch.Tensor) -> torch.Tensor:
    """actadd's u: the unit vector of the mean of the engram's k raw vectors."""
    mean = vectors.float().mean(dim=0)
    return mean / mean.norm().clamp_min(torch.finfo(torch.float32).tiny)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    base = model.base_model
    return base.layers if hasattr(base, "layers") else base.h


@torch.inference_mode()
def residual_norms(lm: LoadedModel, prompt_ids: tuple[int, ...], layers: list[int]) -> dict[int, float]:
    """actadd's s per layer: the mean row norm of block L-1's unsteered output over the prompt's positions
    (layer 0: of the prompt's input embeddings), from one forward pass over the prompt."""
    embeds = lm.model.get_input_embeddings()(torch.tensor([prompt_ids], device=lm.device))
    captured: dict[int, torch.Tensor] = {0: embeds[0]}
    blocks = decoder_layers(lm.model)
    handles = [blocks[layer - 1].register_forward_hook(_capture(captured, layer)) for layer in set(layers) if layer > 0]
    try:
        lm.model.base_model(inputs_embeds=embeds, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return {layer: captured[layer].float().norm(dim=-1).mean().item() for layer in layers}


def _capture(captured: dict[int, torch.Tensor], layer: int):
    def hook(module, args, output):
        captured[layer] = (output[0] if isinstance(output, tuple) else output)[0]
    return hook


@dataclass
class Steering:
    """What a batch of cells does to the model, one row each. prefix and add: vectors [batch, k, hidden], already
    scaled; actadd: vectors [batch, hidden] (strength x s x u) and the layer of each row."""

    mode: str
    vectors: torch.Tensor
    layers: list[int] | None = None

    @property
    def prefix_length(self) -> int:
        return self.vectors.shape[1] if self.mode == "prefix" else 0

    def inputs(self, body: torch.Tensor) -> torch.Tensor:
        """The input embeddings [batch, positions, hidden] with the engram in them (prefix, add, or actadd at layer 0)."""
        vectors = self.vectors.to(body.device, body.dtype)
        if self.mode == "prefix":
            return torch.cat([vectors, body], dim=1)
        if self.mode == "add":
            steered = body.clone()
            steered[:, : vectors.shape[1]] += vectors
            return steered
        return body + self._rows_at(0, vectors).unsqueeze(1)

    def next_inputs(self, embeds: torch.Tensor) -> torch.Tensor:
        """The embeddings of tokens generated after the prefill: prefix and add are in the KV cache already; actadd at
        layer 0 adds to every position, these included (deeper layers get it from the hooks)."""
        if self.mode != "actadd":
            return embeds
        return embeds + self._rows_at(0, self.vectors.to(embeds.device, embeds.dtype)).unsqueeze(1)

    def _rows_at(self, layer: int, vectors: torch.Tensor) -> torch.Tensor:
        """The rows' vectors where the row's layer is `layer`, zero elsewhere."""
        mask = torch.tensor([row_layer == layer for row_layer in self.layers], device=vectors.device, dtype=vectors.dtype)
        return vectors * mask.unsqueeze(-1)

    @contextmanager
    def active(self, model: torch.nn.Module) -> Iterator[None]:
        """actadd: while the block runs, add each row's vector to block L-1's output at every position."""
        handles = []
        if self.mode == "actadd":
            blocks = decoder_layers(model)
            for layer in sorted(set(self.layers) - {0}):
                handles.append(blocks[layer - 1].register_forward_hook(self._adder(layer)))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _adder(self, layer: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            steered = hidden + self._rows_at(layer, self.vectors.to(hidden.device, hidden.dtype)).unsqueeze(1)
            return (steered, *output[1:]) if isinstance(output, tuple) else steered
        return hook


class CellVectors:
    """Turns cells into the Steering of a batch, for one prompt: the scaled engram (prefix, add) or strength x s x u
    (actadd) of each cell, from the raw vectors by (engram, layer, k). Work shared by cells is done once."""

    def __init__(self, lm: LoadedModel, raw: dict[tuple[str, int, int], torch.Tensor], injection: str, scaling: str,
                 prompt_ids: tuple[int, ...], cells: list[Cell]):
        self.injection = injection
        self.norms = residual_norms(lm, prompt_ids, sorted({c.layer for c in cells})) if injection == "actadd" else {}
        self.unit: dict[tuple[str, int, int], torch.Tensor] = {}  # strength 1: scaled engram, or direction u
        for cell in cells:
            key = (cell.engram, cell.layer, cell.chunks)
            if key not in self.unit:
                vectors = raw[key]
                unit = direction(vectors) if injection == "actadd" else scale_engram(vectors, lm.embedding_norm, 1.0, scaling)
                self.unit[key] = unit.to(lm.device)

    def vector(self, cell: Cell) -> torch.Tensor:
        unit = self.unit[(cell.engram, cell.layer, cell.chunks)]
        return unit * (cell.strength * self.norms[cell.layer]) if self.injection == "actadd" else unit * cell.strength

    def steering(self, cells: list[Cell]) -> Steering:
        return Steering(self.injection, torch.stack([self.vector(cell) for cell in cells]), [cell.layer for cell in cells])
