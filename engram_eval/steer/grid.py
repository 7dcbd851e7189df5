"""The grid: which cells a question has (engram x layer x strength, for each context condition) and the raw vectors
each cell's engram brings. `sweep` scores these cells; `generate` decodes from them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backend.model import LoadedModel
from ..bank.banks import Bank, Question, paraphrase_name, sample_name
from ..bank.expressions import Expression
from ..core.registry import NULL_PREFIXES
from ..core.spec import Method
from ..engram.nulls import NULL_KIND, null_prefix
from ..engram.store import StoredEngram
from ..engram.variability import sample_draws, sampled_engram
from ..vectors.controls import VECTOR_CONTROLS


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
    paraphrase: int | None = None  # which of its source's paraphrases (None: the source has one text)
    sample: int | None = None  # which engram drawn from its source's paraphrases (`--sample`)

    @property
    def is_null(self) -> bool:
        return self.control_kind == NULL_KIND

    @property
    def vectors_name(self) -> str:
        """The name its raw vectors are held under: the engram's, a paraphrase's or a sample's."""
        if self.sample is not None:
            return sample_name(self.engram, self.sample)
        return paraphrase_name(self.engram, self.paraphrase or 0)

    @property
    def is_variant(self) -> bool:
        """Another paraphrase's or a sample's cell: beside the source's own (paraphrase 0), not instead of it."""
        return self.sample is not None or bool(self.paraphrase)


def injected(cell: Cell, method: Method) -> tuple:
    """What a cell puts into the model, as a key: a null prefix is the same at every layer, unless the mode's
    injection site is the layer (actadd). Cells with one key are computed once."""
    layer = None if cell.is_null and not method.mode.site_depends_on_layer else cell.layer
    return cell.vectors_name, layer, cell.strength, cell.chunks


def distinct_injections(cells: list[Cell], method: Method) -> tuple[list[Cell], list[int]]:
    """-> (the cells that inject something different, first of each; for every cell, the index of its distinct one)."""
    first_of: dict[tuple, int] = {}
    distinct: list[Cell] = []
    for cell in cells:
        if injected(cell, method) not in first_of:
            first_of[injected(cell, method)] = len(distinct)
            distinct.append(cell)
    return distinct, [first_of[injected(cell, method)] for cell in cells]


def question_engrams(question: Question) -> list[tuple[str, str]]:
    """(engram name, role) in grid order: the relevant engram, then the controls."""
    return [(question.engram, "relevant"), *[(name, "control") for name in question.controls]]


def question_cells(question: Question, bank: Bank, keys: dict[tuple[str, int], str], layers: list[int],
                   strengths: list[float], chunks: list[int], context: bool | None = None, samples: int = 0,
                   sample_seed: int = 0) -> list[Cell]:
    """Grid order: k, then engram (relevant first), its variants (a source with paraphrases: each paraphrase, then
    each sample), layer, strength. keys: store key by (source or paraphrase name, k)."""
    cells = []
    for k in chunks:
        for name, role in question_engrams(question):
            null = name in NULL_PREFIXES
            kind = NULL_KIND if null else bank.kind_of(name) if role == "control" else None
            for paraphrase, sample in engram_variants(bank, name, samples):
                key = None if null else variant_key(bank, name, k, keys, paraphrase, sample, sample_seed)
                for layer in layers:
                    for strength in strengths:
                        cells.append(Cell(name, key, role, kind, layer, strength, k, context, paraphrase, sample))
    return cells


def engram_variants(bank: Bank, name: str, samples: int) -> list[tuple[int | None, int | None]]:
    """(paraphrase, sample) of each row an engram gives per grid cell: one for an engram of one text; for a source with
    paraphrases, one per paraphrase and one per sample drawn from them."""
    count = bank.paraphrases(name)
    if count == 1:
        return [(None, None)]
    return [(i, None) for i in range(count)] + [(None, j) for j in range(samples)]


def variant_key(bank: Bank, name: str, k: int, keys: dict[tuple[str, int], str], paraphrase: int | None,
                sample: int | None, sample_seed: int) -> str:
    """A paraphrase's store key; a sample's names its draw and the paraphrases it is drawn from."""
    if sample is not None:
        spanned = ",".join(keys[(paraphrase_name(name, i), k)] for i in range(bank.paraphrases(name)))
        return f"sample {sample} seed {sample_seed} of {spanned}"
    if paraphrase:
        return keys[(paraphrase_name(name, paraphrase), k)]
    return engram_key(bank, name, k, keys)


def engram_key(bank: Bank, name: str, k: int, keys: dict[tuple[str, int], str]) -> str:
    """A source's store key; an expression's is the expression over its sources' keys (`3f2a... - 9c01...`)."""
    expression = bank.expression(name)
    return str(Expression(tuple((weight, keys[(source, k)]) for weight, source in expression.terms)))


def engram_vectors(bank: Bank, name: str, layer: int, k: int, engrams: dict[tuple[str, int], StoredEngram]) -> torch.Tensor:
    """A source's or an expression's raw vectors at a layer: the terms' weighted sum, chunk by chunk, in float32."""
    return bank.expression(name).combine(lambda source: engrams[(source, k)].engram.layers[layer].float())


def raw_vectors(lm: LoadedModel, bank: Bank, engrams: dict[tuple[str, int], StoredEngram], layers: list[int],
                chunks: list[int], samples: int = 0, sample_seed: int = 0) -> dict[tuple[str, int, int], torch.Tensor]:
    """Every engram's unscaled vectors by (name, layer, k) (a cell's vectors_name), expressions combined, samples
    drawn; a null prefix is the same at every layer."""
    raw = {(name, layer, k): stored.engram.layers[layer] for (name, k), stored in engrams.items() for layer in layers}
    spoken = {name for q in bank.questions for name in (q.engram, *q.controls)}
    if samples:
        for name in sorted(n for n in spoken if bank.paraphrases(n) > 1):
            count = bank.paraphrases(name)
            draws = sample_draws(sample_seed, name, samples, count)
            for layer in layers:
                for k in chunks:
                    texts = [raw[(paraphrase_name(name, i), layer, k)] for i in range(count)]
                    raw.update({(sample_name(name, j), layer, k): sampled_engram(texts, draws[j]) for j in range(samples)})
    for name in sorted(n for n in spoken if n not in NULL_PREFIXES and n not in bank.sources):  # expressions
        raw.update({(name, layer, k): engram_vectors(bank, name, layer, k, engrams) for layer in layers for k in chunks})
    for name in sorted(n for n in spoken if n in NULL_PREFIXES):
        for k in chunks:
            vectors = null_prefix(name, lm, k)
            raw.update({(name, layer, k): vectors for layer in layers})
    return raw


def vector_cells(name: str, key: str, layers: list[int], strengths: list[float], context: bool | None = None) -> list[Cell]:
    """A steering vector's grid for one question (sweep --vector): the vector, then its controls (a random direction
    of its norm, the vector negated), each layer x strength; k is 1 (a vector is one direction per layer)."""
    engrams = [(name, key, "relevant", None), *[(control, f"{control} of {key}", "control", kind)
                                                for control, kind in VECTOR_CONTROLS.items()]]
    return [Cell(engram, engram_key, role, kind, layer, strength, 1, context)
            for engram, engram_key, role, kind in engrams for layer in layers for strength in strengths]
