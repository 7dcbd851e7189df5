"""Answers in generated text: does the text say the correct answer, the incorrect one, which first?

A variant matches when the text contains it (its leading space stripped), case-insensitively, on word boundaries:
" CT" does not match "contraindicated", " alpha" does not match "alphabet", " B1" matches "B1.". A question's
`answer_patterns` (regular expressions, also case-insensitive) replace its variants for a side."""

from __future__ import annotations

import re
from dataclasses import dataclass

from .banks import Question

VERDICTS = ("correct", "incorrect", "both", "neither")


def variant_pattern(variant: str) -> str:
    return rf"(?<!\w){re.escape(variant.strip())}(?!\w)"


@dataclass(frozen=True)
class AnswerMatcher:
    correct: tuple[re.Pattern, ...]
    incorrect: tuple[re.Pattern, ...]

    @classmethod
    def for_question(cls, question: Question) -> AnswerMatcher:
        custom = question.answer_patterns or {}

        def side(name: str, variants: tuple[str, ...]) -> tuple[re.Pattern, ...]:
            patterns = custom.get(name) or tuple(variant_pattern(v) for v in variants)
            return tuple(re.compile(pattern, re.IGNORECASE) for pattern in patterns)

        return cls(side("correct", question.correct), side("incorrect", question.incorrect))

    def judge(self, text: str) -> dict:
        """-> says_correct, says_incorrect, first_answer (correct | incorrect | none, by earliest match), verdict."""
        first = {}
        for name, patterns in (("correct", self.correct), ("incorrect", self.incorrect)):
            starts = [m.start() for p in patterns if (m := p.search(text))]
            first[name] = min(starts) if starts else None
        says_correct, says_incorrect = first["correct"] is not None, first["incorrect"] is not None
        if says_correct and says_incorrect:
            first_answer = "correct" if first["correct"] <= first["incorrect"] else "incorrect"
        else:
            first_answer = "correct" if says_correct else "incorrect" if says_incorrect else "none"
        verdict = "both" if says_correct and says_incorrect else first_answer if first_answer != "none" else "neither"
        return {"says_correct": says_correct, "says_incorrect": says_incorrect, "first_answer": first_answer, "verdict": verdict}
