"""The practical guide's decision rule (the seed's), applied to what the grid measured for one question."""

from __future__ import annotations

DECISION_STRENGTHS = (1.0, 5.0, 10.0, 15.0, 20.0)


def decision_advice(baseline_ratio: float, related_wrong: bool | None, walk: list[tuple[float, float]], layer: int | None) -> dict:
    """The practical guide's decision tree, in its order: baseline ratio > 10, don't use an engram; the wrong answer is
    topic-related, don't use one; baseline > 1, strength 1.0; otherwise search 1 -> 5 -> 10 -> 15 -> 20, stopping at a
    flip or when the ratio falls below 0.8 x the best so far. `walk` is (strength, ratio) at the question's best layer.
    -> the advice, the strength it settles on (None: no engram), what the grid measured there (its ratio), and whether
    that measurement contradicts the advice."""
    advice = _decision(baseline_ratio, related_wrong, walk, layer)
    measured = advice["measured_ratio"]
    # The grid measured the advised setting as worse than the baseline: weaker or wrong where it was right, or a
    # ratio that fell where it was wrong.
    advice["contradicted"] = advice["strength"] is not None and measured is not None and measured < baseline_ratio
    return advice


def _decision(baseline_ratio: float, related_wrong: bool | None, walk: list[tuple[float, float]], layer: int | None) -> dict:
    at = dict(walk)
    if baseline_ratio > 10:
        return _advice("confident and correct: don't use an engram", None, baseline_ratio)
    if related_wrong:
        return _advice("the wrong answer is topic-related: don't use an engram (it boosts the wrong answer too)", None, baseline_ratio)
    if baseline_ratio > 1:
        return _advice(f"correct, not confident: strength 1.0 (layer {layer})", 1.0, at.get(1.0))
    if baseline_ratio == 1:
        return _advice("tie at baseline: first-token scoring cannot decide", None, baseline_ratio)
    searched = [(s, r) for s, r in walk if s in DECISION_STRENGTHS]
    if not searched:
        return _advice("wrong: search strengths 1-20 (none of them in this grid)", None, None)
    best = 0.0
    for strength, ratio in searched:
        if ratio > 1:
            return _advice(f"wrong: flips at layer {layer}, strength {strength:g}", strength, ratio)
        if ratio < 0.8 * best:
            return _advice(f"wrong: stop at strength {strength:g} (ratio falling), no flip at layer {layer}", strength, ratio)
        best = max(best, ratio)
    strength, ratio = searched[-1]
    return _advice(f"wrong: no flip up to strength {strength:g} at layer {layer}", strength, ratio)


def _advice(text: str, strength: float | None, measured: float | None) -> dict:
    return {"advice": text, "strength": strength, "measured_ratio": measured,
            "measured_correct": None if measured is None else measured > 1}
