"""Option values as typed -> what the library takes, or one line naming the option and what it expects."""

from __future__ import annotations

import re
from typing import Callable

from ..core.errors import EngramEvalError
from ..core.spec import check_chunk_list, check_strengths, valid_layers


def parse_numbers(text: str, cast: Callable[[str], float], option: str, expected: str) -> list:
    """A comma-separated option value -> its numbers, or one line naming the option and what it expects."""
    try:
        return [cast(part) for part in text.split(",")]
    except ValueError:
        raise EngramEvalError(f"{option}: malformed '{text}' (expected {expected})") from None


def parse_chunks(text: str) -> list[int]:
    return check_chunk_list(parse_numbers(text, int, "--chunks", "whole numbers like '16' or '8,16,32,64,128'"))


def parse_strengths(text: str, option: str = "--strengths") -> list[float]:
    return sorted(set(check_strengths(parse_numbers(text, float, option, "numbers like '0.5,1,2,5,10,20'"), option)))


def parse_layers(text: str, num_layers: int, option: str = "--layers") -> list[int]:
    """'all', '4,8,12', '10-20' or a mix -> sorted layer indices; layer L is hidden_states[L], 0..num_layers."""
    valid = valid_layers(num_layers)
    if text.strip() == "all":
        return list(range(num_layers + 1))
    layers: set[int] = set()
    for part in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not match:
            raise EngramEvalError(f"{option}: malformed '{text}' (expected 'all', '4,8,12' or '10-20'); {valid}")
        low = int(match[1])
        high = int(match[2]) if match[2] is not None else low
        if low > high:
            raise EngramEvalError(f"{option}: range '{part.strip()}' runs backwards; {valid}")
        if high > num_layers:
            raise EngramEvalError(f"{option}: layer {high} is out of range; {valid}")
        layers.update(range(low, high + 1))
    return sorted(layers)
