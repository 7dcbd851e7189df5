"""Injection: raw engram vectors -> what a cell does to the model.

Modes (`--injection`), each a class registered in INJECTIONS: `prefix` (the seed's: k scaled vectors before the
prompt), `add` (added to the first k prompt embeddings) and `actadd` (activation addition: strength x s x u added to
the residual stream after block L-1 at the positions `--positions` scopes: every one by default). Scalings
(`--scaling`, prefix and add): `global` (the seed's one scalar) and `per-chunk`. A steering vector's (`sweep --vector`,
engram_eval.vectors): `vector-add` (c x v added after block L-1, its magnitude kept; with --strengths, strength x s x
v/|v|) and `vector-clamp` (lm-eval's clamp); a vector cell's raw vectors are its direction at L, [1, hidden] (clamp:
with its bias, [2, hidden])."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Iterator

import torch

from ..backend.interface import Backend
from ..backend.model import LoadedModel
from ..core.errors import EngramEvalError
from ..core.registry import INJECTIONS
from ..core.spec import SCALINGS, VECTOR_SCALINGS, Method

if TYPE_CHECKING:
    from .grid import Cell


def mean_row_norm(x: torch.Tensor) -> torch.Tensor:
    return x.float().norm(dim=1).mean()


def scale_engram(vectors: torch.Tensor, embedding_norm: float, strength: float, scaling: str = "global") -> torch.Tensor:
    """global (seed): one scalar so the engram's mean row norm equals the embeddings', times strength.
    per-chunk: every vector to the embeddings' mean row norm times strength, so no chunk dominates."""
    vectors = vectors.float()
    if scaling == "per-chunk":
        return vectors / vectors.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) * embedding_norm * strength
    return vectors * (embedding_norm / mean_row_norm(vectors)) * strength


def engram_start(lm: LoadedModel, method: Method, prompt_ids: tuple[int, ...]) -> int:
    """The prompt positions that stay before a prefix or an added engram: 1 for a BOS the tokenizer put first (unless
    --prefix-at start), else 0."""
    return 1 if method.prefix_at == "after-bos" and lm.starts_with_bos(prompt_ids) else 0


def check_strengths_fit(strengths: list[float], embedding_norm: float, dtype: torch.dtype) -> None:
    """Every strength's scale (strength x the embedding norm) must be finite in float32, where vectors are scaled, and
    in the dtype the model computes in: 1e39 is a float64 number but overflows float32, and would make every cell NaN."""
    for strength in strengths:
        for compute in dict.fromkeys((torch.float32, dtype)):
            if not torch.isfinite(torch.tensor(strength * embedding_norm, dtype=torch.float64).to(compute)):
                raise EngramEvalError(f"--strengths: strength {strength:g} times the embedding norm ({embedding_norm:.4g}) "
                                      f"overflows {str(compute).removeprefix('torch.')} (largest {torch.finfo(compute).max:.4g})")


def direction(vectors: torch.Tensor) -> torch.Tensor:
    """actadd's u: the unit vector of the mean of the engram's k raw vectors."""
    mean = vectors.float().mean(dim=0)
    return mean / mean.norm().clamp_min(torch.finfo(torch.float32).tiny)


@torch.inference_mode()
def residual_norms(lm: LoadedModel, prompt_ids: tuple[int, ...], layers: list[int]) -> dict[int, float]:
    """actadd's s per layer: the mean row norm of block L-1's unsteered output over the prompt's positions
    (layer 0: of the prompt's input embeddings), from one forward pass over the prompt."""
    embeds = lm.backend.embed(torch.tensor([prompt_ids], device=lm.device))
    captured: dict[int, torch.Tensor] = {0: embeds[0]}
    blocks = lm.backend.blocks()
    handles = [blocks[layer - 1].register_forward_hook(_capture(captured, layer)) for layer in set(layers) if layer > 0]
    try:
        lm.backend.last_hidden(embeds)
    finally:
        for handle in handles:
            handle.remove()
    return {layer: captured[layer].float().norm(dim=-1).mean().item() for layer in layers}


def _capture(captured: dict[int, torch.Tensor], layer: int):
    def hook(module, args, output):
        captured[layer] = (output[0] if isinstance(output, tuple) else output)[0]
    return hook


class Injection:
    """An injection mode: how a cell's engram enters the model. The class attributes are what the sweep, generation
    and the benchmark need to know of a mode; the methods do the work."""

    name: ClassVar[str]
    summary: ClassVar[str]  # its --injection help
    prefix_positions: ClassVar[bool] = False  # the engram's k vectors are extra positions before the prompt
    needs_k_prompt_tokens: ClassVar[bool] = False  # the prompt must have at least k tokens
    site_depends_on_layer: ClassVar[bool] = False  # a null prefix (the same vectors at every layer) differs per layer
    hooks_blocks: ClassVar[bool] = False  # adds to decoder blocks' outputs while the model runs
    scopes_positions: ClassVar[bool] = False  # steers every position unless --positions scopes it (Steering.position_mask)
    signed_strengths: ClassVar[bool] = False  # a negative strength subtracts what a positive one adds
    takes_learned: ClassVar[bool] = True  # injects input-embedding vectors, which --pooling learned optimises
    steers_vector: ClassVar[bool] = False  # applies a steering vector (sweep --vector), not an engram
    action: ClassVar[str | None] = None  # the steering vector's action it applies (SteeringVector.action)
    scalings: ClassVar[tuple[str, ...]] = SCALINGS
    scaling_refusal: ClassVar[str] = ""  # the error for a --scaling it does not take

    def residual_norms(self, lm: LoadedModel, prompt_ids: tuple[int, ...], layers: list[int],
                       scaling: str = "global") -> dict[int, float]:
        """What the mode measures of the prompt before it scales, under this scaling (nothing, unless it overrides
        this)."""
        return {}

    def unit(self, lm: LoadedModel, vectors: torch.Tensor, scaling: str) -> torch.Tensor:
        """The injected vectors at strength 1, from an engram's raw vectors."""
        return scale_engram(vectors, lm.embedding_norm, 1.0, scaling)

    def scaled(self, unit: torch.Tensor, strength: float, norm: float | None, scaling: str) -> torch.Tensor:
        return unit * strength

    def steer_block(self, steering: Steering, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """A hooked block's output [batch, positions, hidden] with the rows at `layer` steered (hooks_blocks modes)."""
        return hidden + steering.added(layer, steering.vectors.to(hidden.device, hidden.dtype), hidden.shape[1])

    def inputs(self, steering: Steering, vectors: torch.Tensor, body: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def next_inputs(self, steering: Steering, embeds: torch.Tensor) -> torch.Tensor:
        """The embeddings of tokens generated after the prefill (the prefill's injection is in the KV cache)."""
        return embeds


@INJECTIONS.register
class Prefix(Injection):
    name = "prefix"
    summary = "prepend the k scaled vectors to the prompt's embeddings (seed mode)."
    prefix_positions = True

    def inputs(self, steering: Steering, vectors: torch.Tensor, body: torch.Tensor) -> torch.Tensor:
        start = steering.start
        return torch.cat([body[:, :start], vectors, body[:, start:]], dim=1)


@INJECTIONS.register
class Add(Injection):
    name = "add"
    summary = "add them to the embeddings of the first k prompt tokens."
    needs_k_prompt_tokens = True
    signed_strengths = True

    def inputs(self, steering: Steering, vectors: torch.Tensor, body: torch.Tensor) -> torch.Tensor:
        steered = body.clone()
        steered[:, steering.start : steering.start + vectors.shape[1]] += vectors
        return steered


@INJECTIONS.register
class ActAdd(Injection):
    name = "actadd"
    summary = ("activation addition, strength x s x u added to the output of block L-1 at every position (or those "
               "--positions names; u: unit mean of the engram's raw vectors at L, from that block's output, before the "
               "final norm at the last layer; s: the mean row norm of that output over the prompt).")
    site_depends_on_layer = True
    hooks_blocks = True
    scopes_positions = True
    signed_strengths = True
    takes_learned = False
    scalings = ("global",)
    scaling_refusal = "--scaling: applies to prefix and add injection; actadd scales its direction by the residual stream's own norm"

    def residual_norms(self, lm: LoadedModel, prompt_ids: tuple[int, ...], layers: list[int],
                       scaling: str = "global") -> dict[int, float]:
        return {} if scaling == "coefficient" else residual_norms(lm, prompt_ids, layers)  # c x v needs no s

    def unit(self, lm: LoadedModel, vectors: torch.Tensor, scaling: str) -> torch.Tensor:
        return direction(vectors)

    def scaled(self, unit: torch.Tensor, strength: float, norm: float | None, scaling: str) -> torch.Tensor:
        return unit * (strength * norm)

    def inputs(self, steering: Steering, vectors: torch.Tensor, body: torch.Tensor) -> torch.Tensor:
        return body + steering.added(0, vectors, body.shape[1])  # layer 0: the input embeddings

    def next_inputs(self, steering: Steering, embeds: torch.Tensor) -> torch.Tensor:
        """Layer 0 adds to generated tokens too, as its scope says (deeper layers get it from the hooks)."""
        return self.inputs(steering, steering.vectors.to(embeds.device, embeds.dtype), embeds)


@INJECTIONS.register
class VectorAdd(ActAdd):
    name = "vector-add"
    action = "add"  # the SteeringVector.action it applies
    summary = ("a steering vector (sweep --vector), c x v added to the output of block L-1 at every position (or those "
               "--positions names).")
    scalings = VECTOR_SCALINGS
    steers_vector = True
    scaling_refusal = "--scaling: a steering vector is scaled by --coefficients (its own magnitude) or --strengths (x s)"

    def unit(self, lm: LoadedModel, vectors: torch.Tensor, scaling: str) -> torch.Tensor:
        v = vectors[0].float()
        return v if scaling == "coefficient" else v / v.norm().clamp_min(torch.finfo(torch.float32).tiny)

    def scaled(self, unit: torch.Tensor, strength: float, norm: float | None, scaling: str) -> torch.Tensor:
        return unit * strength if scaling == "coefficient" else unit * (strength * norm)


@INJECTIONS.register
class VectorClamp(VectorAdd):
    name = "vector-clamp"
    action = "clamp"
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
        unit = rows[:, 0] / value.clamp_min(torch.finfo(torch.float32).tiny)
        projection = ((hidden - rows[:, 1].unsqueeze(1)) * unit.unsqueeze(1)).sum(-1, keepdim=True)  # [batch, n, 1]
        change = unit.unsqueeze(1) * (value.unsqueeze(1) - projection)
        mask = torch.tensor([row_layer == layer for row_layer in steering.layers], device=hidden.device, dtype=hidden.dtype)
        change = change * mask.view(-1, 1, 1)
        positions = steering.position_mask(hidden.shape[1], hidden.device, hidden.dtype)
        return hidden + (change if positions is None else change * positions.view(1, -1, 1))


def vector_injection(action: str) -> str:
    """The mode that applies a steering vector of this action (add, clamp)."""
    return next(name for name in INJECTIONS if INJECTIONS[name].steers_vector and INJECTIONS[name].action == action)


@dataclass
class Steering:
    """What a batch of cells does to the model, one row each. prefix and add: vectors [batch, k, hidden], already
    scaled; actadd and vector-add: vectors [batch, hidden] (strength x s x u; c x v) and the layer of each row; vector-clamp:
    [batch, 2, hidden] (c x v, and the bias)."""

    mode: str
    vectors: torch.Tensor
    layers: list[int] | None = None
    positions: str = "all"  # --positions: all, prompt, answer (and generated), last (the last prompt position and after)
    prompt_end: int = 0  # positions before this are the prompt's in the inputs the model runs next; 0 while decoding
    start: int = 0  # prefix and add: the prompt positions that stay before the engram (1: a BOS the tokenizer put first)

    @property
    def injection(self) -> Injection:
        return INJECTIONS[self.mode]

    @property
    def prefix_length(self) -> int:
        return self.vectors.shape[1] if self.injection.prefix_positions else 0

    def body_positions(self, n: int) -> list[int]:
        """Where each of the n unsteered input positions sits in the steered inputs."""
        k = self.prefix_length
        return [i if i < self.start else i + k for i in range(n)]

    def inputs(self, body: torch.Tensor) -> torch.Tensor:
        """The input embeddings [batch, positions, hidden] with the engram in them."""
        return self.injection.inputs(self, self.vectors.to(body.device, body.dtype), body)

    def next_inputs(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.injection.next_inputs(self, embeds)

    def rows_at(self, layer: int, vectors: torch.Tensor) -> torch.Tensor:
        """The rows' vectors where the row's layer is `layer`, zero elsewhere."""
        mask = torch.tensor([row_layer == layer for row_layer in self.layers], device=vectors.device, dtype=vectors.dtype)
        return vectors * mask.unsqueeze(-1)

    def position_mask(self, n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | None:
        """[n]: 1 where the scope steers among n positions whose first prompt_end are the prompt's (the rest: the
        answer's, or tokens generated); None for every position."""
        if self.positions == "all":
            return None
        index = torch.arange(n, device=device)
        after = index >= self.prompt_end
        steered = {"prompt": ~after, "answer": after, "last": after | (index == self.prompt_end - 1)}[self.positions]
        return steered.to(dtype)

    def added(self, layer: int, vectors: torch.Tensor, n: int) -> torch.Tensor:
        """What the rows at `layer` add to n positions: [batch, n or 1, hidden]."""
        rows = self.rows_at(layer, vectors).unsqueeze(1)
        mask = self.position_mask(n, vectors.device, vectors.dtype)
        return rows if mask is None else rows * mask.view(1, n, 1)

    @contextmanager
    def active(self, backend: Backend) -> Iterator[None]:
        """A mode that hooks blocks (actadd): while block L-1 runs, add each row's vector to its output at every
        position."""
        handles = []
        if self.injection.hooks_blocks:
            blocks = backend.blocks()
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
            steered = self.injection.steer_block(self, layer, hidden)
            return (steered, *output[1:]) if isinstance(output, tuple) else steered
        return hook


class CellVectors:
    """Turns cells into the Steering of a batch, for one prompt: each cell's vectors at strength 1 (the mode's unit:
    the scaled engram, or actadd's direction u) times its strength (and what the mode measured of the prompt, actadd's
    s). Work shared by cells is done once."""

    def __init__(self, lm: LoadedModel, raw: dict[tuple[str, int, int], torch.Tensor], method: Method,
                 prompt_ids: tuple[int, ...], cells: list[Cell], norms: dict[int, float] | None = None):
        """method: how the run steers (its injection, scaling, positions); norms: what the mode measured of this prompt
        already (actadd's s by layer), else measured here."""
        self.injection, self.positions, self.prompt_end = method.injection, method.positions, len(prompt_ids)
        self.scaling = method.scaling
        self.start = engram_start(lm, method, prompt_ids)
        self.mode = method.mode
        self.norms = norms if norms is not None else self.mode.residual_norms(lm, prompt_ids, sorted({c.layer for c in cells}),
                                                                              method.scaling)
        self.unit: dict[tuple[str, int, int], torch.Tensor] = {}
        for cell in cells:
            key = (cell.vectors_name, cell.layer, cell.chunks)
            if key not in self.unit:
                self.unit[key] = self.mode.unit(lm, raw[key], method.scaling).to(lm.device)

    def vector(self, cell: Cell) -> torch.Tensor:
        return self.mode.scaled(self.unit[(cell.vectors_name, cell.layer, cell.chunks)], cell.strength, self.norms.get(cell.layer),
                                self.scaling)

    def steering(self, cells: list[Cell]) -> Steering:
        return Steering(self.injection, torch.stack([self.vector(cell) for cell in cells]), [cell.layer for cell in cells],
                        self.positions, self.prompt_end, self.start)
