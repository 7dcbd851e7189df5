"""Prompts: a bank question -> the token ids the model scores (chat template applied) and its variants' ids."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..backend.model import LoadedModel
from ..bank.banks import Question
from ..core.errors import EngramEvalError
from ..core.registry import SCORINGS


@dataclass(frozen=True)
class PreparedQuestion:
    question: Question
    prompt_ids: tuple[int, ...]
    correct_ids: tuple[tuple[int, ...], ...]
    incorrect_ids: tuple[tuple[int, ...], ...]
    context: bool | None = None  # the prompt carries the question's retrieved context (None: it has none)
    unrelated_ids: tuple[tuple[int, ...], ...] = ()  # incorrect_unrelated's: scored per answer, in no side

    @property
    def answers(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """Every answer variant the question scores, in scoring order: (text, role, ids); role is correct, related
        wrong (an incorrect answer of a question marked related_wrong), unrelated wrong, or other (an incorrect
        answer whose relation to the topic the bank does not say, or says is none)."""
        q = self.question
        wrong = "related wrong" if q.related_wrong else "other"
        return ([(text, "correct", ids) for text, ids in zip(q.correct, self.correct_ids)]
                + [(text, wrong, ids) for text, ids in zip(q.incorrect, self.incorrect_ids)]
                + [(text, "unrelated wrong", ids) for text, ids in zip(q.incorrect_unrelated, self.unrelated_ids)])


def check_lengths(prepared: list[PreparedQuestion], max_positions: int | None, bank_path: Path | str,
                  extra: int = 0, why: str = "") -> None:
    """Refuse a question whose input would pass the model's positions: its prompt, its longest answer (scored after
    it) and `extra` positions (the engram's prefix; tokens to generate), named."""
    if max_positions is None:
        return
    for p in prepared:
        longest = len(p.prompt_ids) + max(len(ids) for _, _, ids in p.answers) + extra
        if longest > max_positions:
            raise EngramEvalError(f"{bank_path}: question '{p.question.id}': its prompt is {len(p.prompt_ids)} tokens; with its "
                                  f"answer{why} that is {longest} positions, more than the model's {max_positions}")


def prompt_text(question: Question, context: bool = False) -> str:
    """The question as scored: with its retrieved context, the context, a blank line, then the prompt."""
    return f"{question.context}\n\n{question.prompt}" if context and question.context else question.prompt


def prompt_token_ids(lm: LoadedModel, question: Question, bank_path: Path | str = "bank", context: bool = False) -> list[int]:
    """Default special tokens; with chat, the tokenizer's chat template (generation prompt added) first."""
    text = prompt_text(question, context)
    if question.chat:
        if not getattr(lm.tokenizer, "chat_template", None):
            raise EngramEvalError(
                f"{bank_path}: question '{question.id}': chat: true, but {lm.name}'s tokenizer has no chat template"
            )
        messages = [{"role": "user", "content": text}]
        text = lm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return lm.tokenizer(text)["input_ids"]


def context_conditions(question: Question, mode: str) -> list[bool | None]:
    """The conditions a question runs in for --context with|without|both (None: the question has no context)."""
    if question.context is None:
        return [None]
    return {"with": [True], "without": [False], "both": [False, True]}[mode]


def prepare_question(lm: LoadedModel, question: Question, scoring: str, bank_path: Path | str = "bank",
                     context: bool | None = None) -> PreparedQuestion:
    """Tokenize prompt (with or without its context) and variants; refuse variants that cannot be scored apart."""
    tokenizer = lm.tokenizer

    def encode(variants: tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
        encoded = []
        for variant in variants:
            ids = tuple(tokenizer.encode(variant, add_special_tokens=False))
            if not ids:
                raise EngramEvalError(f"{bank_path}: question '{question.id}': variant {variant!r} has no tokens")
            encoded.append(ids)
        return tuple(encoded)

    correct, incorrect, unrelated = encode(question.correct), encode(question.incorrect), encode(question.incorrect_unrelated)
    first_token_only = SCORINGS[scoring].first_token_only
    pairs = [(("correct", question.correct, correct), ("incorrect", question.incorrect, incorrect)),
             (("correct", question.correct, correct), ("incorrect_unrelated", question.incorrect_unrelated, unrelated)),
             (("incorrect", question.incorrect, incorrect), ("incorrect_unrelated", question.incorrect_unrelated, unrelated))]
    for (a_side, a_texts, a_ids), (b_side, b_texts, b_ids) in pairs:
        for a_text, a in zip(a_texts, a_ids):
            for b_text, b in zip(b_texts, b_ids):
                if (a[0] == b[0]) if first_token_only else (a == b):
                    token = tokenizer.convert_ids_to_tokens(a[0])
                    what = "first token" if first_token_only else "tokens"
                    raise EngramEvalError(
                        f"{bank_path}: question '{question.id}': {a_side} {a_text!r} and {b_side} {b_text!r} share their "
                        f"{what} ({token!r}, id {a[0]}), so {scoring} scoring cannot tell them apart"
                    )
    return PreparedQuestion(question, tuple(prompt_token_ids(lm, question, bank_path, bool(context))), correct, incorrect,
                            context, unrelated)


def variant_token_warnings(lm: LoadedModel, prepared: PreparedQuestion, bank_path: Path | str = "bank") -> list[str]:
    """A variant whose first token is only whitespace: first-token scoring would score that space, not the answer."""
    warnings = []
    for variant, _, ids in prepared.answers:
        first = lm.tokenizer.decode([ids[0]])
        if not first.strip():
            warnings.append(f"{bank_path}: question '{prepared.question.id}': variant {variant!r} starts with the "
                            f"whitespace token {first!r} (id {ids[0]}), so first-token scoring scores that, not the answer")
    return warnings


def multi_token_warning(lm: LoadedModel, prepared: list[PreparedQuestion], scoring: str, bank_path: Path | str = "bank",
                        shown: int = 3) -> str | None:
    """Under first-token scoring, the answer variants that are several tokens are scored by their first token alone
    (" endothermic" as " end"): one warning for the bank naming the first few and their scored token, suggesting
    --scoring sequence. None under a sequence scoring or when every variant is one token."""
    if not SCORINGS[scoring].first_token_only:
        return None
    split = {}
    for p in prepared:
        for variant, _, ids in p.answers:
            if len(ids) > 1:
                split.setdefault(variant, (p.question.id, lm.tokenizer.decode([ids[0]]), len(ids)))
    if not split:
        return None
    named = "; ".join(f"{variant!r} ({question}: {n} tokens) as {first!r}" for variant, (question, first, n) in list(split.items())[:shown])
    more = f" and {len(split) - shown} more" if len(split) > shown else ""
    return (f"{bank_path}: {len(split)} answer variant(s) are several tokens, and first-token scoring scores only the "
            f"first: {named}{more}; `--scoring sequence` scores whole answers")


def end_tokens(lm: LoadedModel) -> set[str]:
    """The tokenizer's special tokens as decoded text (end of turn, end of text, ...): a prompt whose most likely next
    token is one of them is not asking for an answer."""
    return set(lm.tokenizer.all_special_tokens)
