"""Engram arithmetic: a question's engram (or a control) may be a linear combination of source names, `pheo - anti_pheo`,
`0.5 * a + 0.5 * b`, `-pheo`. Parsed by hand (no eval): terms joined by `+` or `-`, each an optional sign, an optional
number and `*`, and a source name. A `-` inside a name (`anti-pheo`) is part of it; as an operator it stands apart or
starts a term. Per layer, a combination's raw vectors are the terms' raw vectors weighted and summed chunk by chunk,
before any scaling (engram_eval.steer.grid)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, TypeVar

V = TypeVar("V")

TOKEN = re.compile(r"\*|\+|-|[^\s*+-][^\s*+]*")
OPERATORS = ("*", "+", "-")


class MalformedExpression(ValueError):
    """Why a text is not an engram expression (the bank loader names the bank and question)."""


@dataclass(frozen=True)
class Expression:
    """Weighted source names, in the order written (a name written twice has its weights summed)."""

    terms: tuple[tuple[float, str], ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for _, name in self.terms)

    def combine(self, vectors_of: Callable[[str], V]) -> V:
        """The weighted sum of each source's vectors (anything with * and +: tensors, arrays), in term order."""
        (weight, name), *rest = self.terms
        total = weight * vectors_of(name)
        for weight, name in rest:
            total = total + weight * vectors_of(name)
        return total

    @property
    def is_plain(self) -> bool:
        """One source, weight 1: the source's own engram, no arithmetic."""
        return len(self.terms) == 1 and self.terms[0][0] == 1.0

    def __str__(self) -> str:
        """The canonical spelling, which results record: `a - b`, `0.5 * a + 0.5 * b`, `-a`."""
        parts = []
        for i, (weight, name) in enumerate(self.terms):
            size = abs(weight)
            term = name if size == 1.0 else f"{size:g} * {name}"
            if i == 0:
                parts.append(term if weight > 0 else f"-{term}")
            else:
                parts.append(f"{'+' if weight > 0 else '-'} {term}")
        return " ".join(parts)


def parse_expression(text: str) -> Expression:
    """`text` -> its Expression, or MalformedExpression saying what is wrong."""
    tokens = TOKEN.findall(text)
    if not tokens:
        raise MalformedExpression("is empty")
    weights: dict[str, float] = {}
    position = 0
    while position < len(tokens):
        sign = 1.0
        if position > 0:  # a term after the first follows an operator
            if tokens[position] not in ("+", "-"):
                raise MalformedExpression(f"expects + or - before {tokens[position]!r}")
            sign = -1.0 if tokens[position] == "-" else 1.0
            position += 1
        while position < len(tokens) and tokens[position] in ("+", "-"):
            sign *= -1.0 if tokens[position] == "-" else 1.0
            position += 1
        weight, position = _coefficient(tokens, position)
        if position >= len(tokens) or tokens[position] in OPERATORS:
            raise MalformedExpression("ends without a source name" if position >= len(tokens)
                                      else f"expects a source name before {tokens[position]!r}")
        name = tokens[position]
        weights[name] = weights.get(name, 0.0) + sign * weight
        position += 1
    terms = tuple((weight, name) for name, weight in weights.items())
    if any(weight == 0.0 for weight, _ in terms):
        zero = next(name for weight, name in terms if weight == 0.0)
        raise MalformedExpression(f"gives {zero!r} a weight of 0")
    return Expression(terms)


def _coefficient(tokens: list[str], position: int) -> tuple[float, int]:
    """A `number *` at position -> (the number, the position after the `*`); (1, position) when there is none."""
    if position + 1 < len(tokens) and tokens[position + 1] == "*":
        try:
            weight = float(tokens[position])
        except ValueError:
            raise MalformedExpression(f"multiplies by {tokens[position]!r}, not a number") from None
        if not math.isfinite(weight):
            raise MalformedExpression(f"multiplies by {tokens[position]!r}, not a finite number")
        return weight, position + 2
    return 1.0, position
