"""The grid: which cells a question has (engram x layer x strength, for each context condition) and the raw vectors
each cell's engram brings. `sweep` scores these cells; `generate` decodes from them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backend.model import LoadedModel
from ..bank.banks import Bank, Question
from ..bank.expressions import Expression
from ..core.registry import INJECTIONS, NULL_PREFIXES
from ..engram.nulls import NULL_KIND, null_prefix
from ..engram.store import StoredEngram


@dataclass(frozen=True)
class Cell:
    engram: str  # a bank source's name, an expression over them (`a - b`), or a null prefix's ~name
    engram_key: str | None  # the store key (an expression: the same expression over its sources' keys; None: a null prefix)
    role: str  # relevant or control
    control_kind: str | None
    layer: int
    strength: float
    chunks: int
    context: bool | None = None  # with the question's retrieved context, without it, or the question has none

    @property
    def is_null(self) -> bool:
        return self.control_kind == NULL_KIND


def injected(cell: Cell, injection: str) -> tuple:
    """What a cell puts into the model, as a key: a null prefix is the same at every layer, unless the mode's
    injection site is the layer (actadd). Cells with one key are computed once."""
    layer = None if cell.is_null and not INJECTIONS[injection].site_depends_on_layer else cell.layer
    return cell.engram, layer, cell.strength, cell.chunks


def distinct_injections(cells: list[Cell], injection: str) -> tuple[list[Cell], list[int]]:
    """-> (the cells that inject something different, first of each; for every cell, the index of its distinct one)."""
    first_of: dict[tuple, int] = {}
    distinct: list[Cell] = []
    for cell in cells:
        if injected(cell, injection) not in first_of:
            first_of[injected(cell, injection)] = len(distinct)
            distinct.append(cell)
    return distinct, [first_of[injected(cell, injection)] for cell in cells]


def question_engrams(question: Question) -> list[tuple[str, str]]:
    """(engram name, role) in grid order: the relevant engram, then the controls."""
    return [(question.engram, "relevant"), *[(name, "control") for name in question.controls]]


def question_cells(question: Question, bank: Bank, keys: dict[tuple[str, int], str], layers: list[int],
                   strengths: list[float], chunks: list[int], context: bool | None = None) -> list[Cell]:
    """Grid order: k, then engram (relevant first), layer, strength. keys: store key by (source name, k)."""
    cells = []
    for k in chunks:
        for name, role in question_engrams(question):
            null = name in NULL_PREFIXES
            kind = NULL_KIND if null else bank.kind_of(name) if role == "control" else None
            key = None if null else engram_key(bank, name, k, keys)
            for layer in layers:
                for strength in strengths:
                    cells.append(Cell(name, key, role, kind, layer, strength, k, context))
    return cells


def engram_key(bank: Bank, name: str, k: int, keys: dict[tuple[str, int], str]) -> str:
    """A source's store key; an expression's is the expression over its sources' keys (`3f2a... - 9c01...`)."""
    expression = bank.expression(name)
    return str(Expression(tuple((weight, keys[(source, k)]) for weight, source in expression.terms)))


def engram_vectors(bank: Bank, name: str, layer: int, k: int, engrams: dict[tuple[str, int], StoredEngram]) -> torch.Tensor:
    """A source's or an expression's raw vectors at a layer: the terms' weighted sum, chunk by chunk, in float32."""
    return bank.expression(name).combine(lambda source: engrams[(source, k)].engram.layers[layer].float())


def raw_vectors(lm: LoadedModel, bank: Bank, engrams: dict[tuple[str, int], StoredEngram], layers: list[int],
                chunks: list[int]) -> dict[tuple[str, int, int], torch.Tensor]:
    """Every engram's unscaled vectors by (name, layer, k), expressions combined; a null prefix is the same at every
    layer."""
    raw = {(name, layer, k): stored.engram.layers[layer] for (name, k), stored in engrams.items() for layer in layers}
    combined = {name for q in bank.questions for name in (q.engram, *q.controls) if name not in NULL_PREFIXES and name not in bank.sources}
    for name in sorted(combined):
        raw.update({(name, layer, k): engram_vectors(bank, name, layer, k, engrams) for layer in layers for k in chunks})
    nulls = {name for q in bank.questions for name in q.controls if name in NULL_PREFIXES}
    for name in sorted(nulls):
        for k in chunks:
            vectors = null_prefix(name, lm, k)
            raw.update({(name, layer, k): vectors for layer in layers})
    return raw
