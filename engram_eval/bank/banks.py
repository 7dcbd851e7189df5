"""Question banks: YAML -> validated, immutable Bank (sources, trap questions, negative controls)."""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..core.errors import EngramEvalError
from ..core.files import read_text
from ..core.registry import NULL_PREFIXES
from .expressions import Expression, MalformedExpression, parse_expression

SOURCE_KINDS = ("relevant", "irrelevant", "random", "anti", "other")
EXPRESSION_KIND = "expression"  # control_kind of a control that combines sources (`a - b`; engram_eval.bank.expressions)
# Controls without any source text (engram_eval.steer.injection builds their vectors): valid wherever a control name is.
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")  # ids, source and bank names: file-name safe, never hidden or '..'
_NAME_RULE = "may use only letters, digits, '_', '.', '-', and may not start with '.'"


def paraphrase_name(name: str, paraphrase: int) -> str:
    """How a source's paraphrase is named beside the source where engrams are held by name (paraphrase 0 is the
    source itself)."""
    return name if paraphrase == 0 else f"{name}#p{paraphrase}"


def sample_name(name: str, sample: int) -> str:
    """How an engram sampled from a source's paraphrases (`sweep --sample`) is named where engrams are held by name."""
    return f"{name}#s{sample}"


@dataclass(frozen=True)
class Source:
    name: str
    text: str
    kind: str = "relevant"
    paraphrases: tuple[str, ...] = ()  # `files: [a, b, c]`: the texts after the first, the same facts in other words

    @property
    def texts(self) -> tuple[str, ...]:
        """Paraphrase 0 (the source's text) and the others, in the bank's order."""
        return (self.text, *self.paraphrases)


@dataclass(frozen=True)
class Question:
    id: str
    prompt: str
    correct: tuple[str, ...]
    incorrect: tuple[str, ...]
    engram: str
    controls: tuple[str, ...]
    related_wrong: bool | None
    tags: tuple[str, ...]
    chat: bool
    context: str | None = None  # a retrieved passage: scored prompts are context + "\n\n" + prompt (docs/bank.md)
    answer_patterns: dict[str, tuple[str, ...]] | None = None  # regexes that find each side in generated text
    # wrong answers of the same type but unrelated to the source and the topic: the semantic sink's comparison
    incorrect_unrelated: tuple[str, ...] = ()
    relatedness: dict[str, float] | None = None  # answer -> a measured relatedness to the relevant source (recorded)


@dataclass(frozen=True)
class Bank:
    name: str
    description: str
    path: Path
    sources: dict[str, Source]
    questions: tuple[Question, ...]

    @property
    def sha256(self) -> str:
        """Hash of the bank's content (texts included), independent of file layout. Fields a question leaves unset
        (None or empty) are left out, so a field added to the format later does not change the hash of older banks."""
        content = {
            "name": self.name,
            "sources": {n: [s.kind, s.text, *([list(s.paraphrases)] if s.paraphrases else [])]
                        for n, s in sorted(self.sources.items())},
            "questions": [{k: v for k, v in q.__dict__.items() if v is not None and v != ()} for q in self.questions],
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def kind_of(self, control: str) -> str:
        """A control's kind: its source's, or `expression` for a combination of sources (not for null prefixes)."""
        return self.sources[control].kind if control in self.sources else EXPRESSION_KIND

    def expression(self, name: str) -> Expression:
        """A question's engram or control (not a null prefix) as weighted sources: a source name is itself, weight 1."""
        return Expression(((1.0, name),)) if name in self.sources else parse_expression(name)

    def source_names(self, names: tuple[str, ...] | list[str]) -> list[str]:
        """The sources these engrams and controls are made of (null prefixes have none), each once, in order."""
        return list(dict.fromkeys(source for name in names if name not in NULL_PREFIXES
                                  for source in self.expression(name).names))

    def paraphrases(self, name: str) -> int:
        """How many texts an engram has: a source's paraphrases (1 when it has one text); an expression or a null
        prefix has 1 (an expression combines its sources' first texts)."""
        return len(self.sources[name].texts) if name in self.sources else 1

    def lint(self) -> list[str]:
        """Mistakes that load fine but make the numbers silently meaningless, one line each (file and question named)."""
        warnings = []
        if not any(q.controls for q in self.questions):
            warnings.append(f"{self.path}: no question has a control engram, so no number can tell a relevant engram "
                            "from any engram at all (add `defaults: controls: [...]`)")
        for q in self.questions:
            if q.chat:  # the chat template decides what precedes the answer
                continue
            where = f"{self.path}: question '{q.id}'"
            spaced = [v for v in q.correct + q.incorrect if v[:1].isspace()]
            glued = [v for v in q.correct + q.incorrect if not v[:1].isspace()]
            if q.prompt[-1:].isspace() and spaced:
                warnings.append(f"{where}: the prompt ends in whitespace and variant {spaced[0]!r} starts with a space, "
                                "so the scored text has both; drop one")
            elif q.prompt[-1:].isalnum() and glued:
                warnings.append(f"{where}: variant {glued[0]!r} has no leading space after a prompt that ends in a word, "
                                "so it is scored glued to that word")
        return warnings

    def select(self, ids: list[str]) -> Bank:
        known = {q.id for q in self.questions}
        for qid in ids:
            if qid not in known:
                raise EngramEvalError(f"--questions: no question '{qid}' in {self.path} (known: {', '.join(sorted(known))})")
        chosen = tuple(q for q in self.questions if q.id in set(ids))
        return Bank(self.name, self.description, self.path, self.sources, chosen)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (lines {seen[key]} and {line})", key_node.start_mark
                )
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> Any:
    text = read_text(path, "bank file")
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: no arbitrary objects
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = exc.problem or exc.context or "invalid YAML"
        raise EngramEvalError(f"{where}: YAML error: {problem}") from None
    except yaml.YAMLError as exc:
        raise EngramEvalError(f"{path}: YAML error: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise EngramEvalError(f"{path}: YAML error: nested too deeply to read (lists or mappings inside each other "
                              "thousands of levels down)") from None


class _Fields:
    """Typed access to one mapping of the bank, with errors that name the file, the place and the field."""

    def __init__(self, path: Path, where: str, data: Any, allowed: set[str]):
        self.path, self.where = path, where
        if not isinstance(data, dict):
            self.fail(None, f"must be a mapping, got {_type_name(data)}")
        unknown = sorted(str(k) for k in data if k not in allowed)
        if unknown:
            self.fail(unknown[0], f"unknown field (allowed: {', '.join(sorted(allowed))})")
        self.data = data

    def fail(self, field: str | None, message: str) -> None:
        place = f"{self.path}: {self.where}" + (f": field {field!r}" if field else "")
        raise EngramEvalError(f"{place}: {message}")

    def get(self, field: str, kind: type | tuple[type, ...], default: Any = ..., required: bool = False) -> Any:
        if field not in self.data or self.data[field] is None:
            if required or default is ...:
                self.fail(field, "missing required field")
            return default
        value = self.data[field]
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            self.fail(field, f"must be {names}, got {_type_name(value)}")
        return value

    def text(self, field: str, default: Any = ...) -> str:
        value = self.get(field, str, default)
        if value is not default and not value.strip():
            self.fail(field, "must not be empty")
        return value

    def strings(self, field: str, default: Any = ..., non_empty: bool = True) -> tuple[str, ...]:
        value = self.get(field, list, default)
        if value is default:
            return tuple(value) if isinstance(value, (list, tuple)) else value
        for item in value:
            if not isinstance(item, str):
                self.fail(field, f"every item must be a string, got {_type_name(item)} {item!r}")
        if non_empty and not value:
            self.fail(field, "must list at least one item")
        return tuple(value)


def _engram_name(fields: _Fields, field: str, text: str, sources: dict[str, Source]) -> str:
    """A source name as written, or an expression over source names in its canonical spelling; one line naming the
    bank, the question and the field when it is neither."""
    if text in sources:
        return text
    try:
        expression = parse_expression(text)
    except MalformedExpression as why:
        fields.fail(field, f"{text!r} is not a source name nor an expression over them: it {why}")
    for name in expression.names:
        if name not in sources:
            hint = " (put spaces around an operator: 'a - b')" if "-" in name and not name.startswith("-") else ""
            fields.fail(field, f"unknown source {name!r}{'' if name == text else f' in {text!r}'} "
                               f"(known: {', '.join(sorted(sources))}){hint}")
    return str(expression)


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", type(None): "nothing"}.get(
        type(value), type(value).__name__
    )


def _read_bank_file(fields: _Fields, field: str, relative: str, allow_outside_paths: bool) -> str:
    """A text file named by the bank, relative to its folder and confined to it unless allowed; non-empty UTF-8."""
    bank_dir = fields.path.parent.resolve()
    file = (bank_dir / relative).resolve()
    if not allow_outside_paths and not file.is_relative_to(bank_dir):
        fields.fail(field, f"{relative} lies outside the bank's folder {bank_dir} (pass --allow-outside-paths to allow it)")
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        fields.fail(field, f"{file} not found")
    except UnicodeDecodeError:
        fields.fail(field, f"{file} is not UTF-8 text")
    except OSError as exc:
        fields.fail(field, f"cannot read {file} ({exc.strerror})")
    if not text.strip():
        fields.fail(field, f"{file} is empty")
    return text


def _relatedness(fields: _Fields, answers: tuple[str, ...]) -> dict[str, float] | None:
    """`relatedness: {answer: number}`: a measure of each answer's relatedness to the relevant source, as the bank's
    generator measured it (recorded, not used in any score); every key one of the question's answers."""
    raw = fields.get("relatedness", dict, None)
    if raw is None:
        return None
    measured = {}
    for answer, value in raw.items():
        if answer not in answers:
            fields.fail("relatedness", f"{answer!r} is not one of the question's answers")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            fields.fail("relatedness", f"{answer!r}: {value!r} is not a finite number")
        measured[str(answer)] = float(value)
    return measured


def _answer_patterns(fields: _Fields) -> dict[str, tuple[str, ...]] | None:
    raw = fields.get("answer_patterns", dict, None)
    if raw is None:
        return None
    patterns = _Fields(fields.path, f"{fields.where}: answer_patterns", raw, {"correct", "incorrect"})
    compiled = {side: patterns.strings(side, (), non_empty=False) for side in ("correct", "incorrect")}
    for side, regexes in compiled.items():
        for regex in regexes:
            try:
                re.compile(regex)
            except re.error as exc:
                patterns.fail(side, f"invalid regular expression {regex!r} ({exc})")
    return compiled


def _load_source(path: Path, name: str, data: Any, allow_outside_paths: bool) -> Source:
    fields = _Fields(path, f"source {name!r}", data, {"file", "files", "text", "kind"})
    if not _NAME.fullmatch(name):
        fields.fail(None, f"name {_NAME_RULE}")
    kind = fields.get("kind", str, "relevant")
    if kind not in SOURCE_KINDS:
        fields.fail("kind", f"unknown kind {kind!r} (one of: {', '.join(SOURCE_KINDS)})")
    if sum(field in fields.data for field in ("file", "files", "text")) != 1:
        fields.fail(None, "give exactly one of 'file', 'files' or 'text'")
    if "text" in fields.data:
        return Source(name, fields.text("text"), kind)
    if "file" in fields.data:
        return Source(name, _read_bank_file(fields, "file", fields.text("file"), allow_outside_paths), kind)
    files = fields.strings("files")
    if len(set(files)) < len(files):
        fields.fail("files", f"{next(f for f in files if files.count(f) > 1)} is listed twice")
    texts = [_read_bank_file(fields, "files", file, allow_outside_paths) for file in files]
    return Source(name, texts[0], kind, tuple(texts[1:]))


def _context(fields: _Fields, allow_outside_paths: bool) -> str | None:
    if "context" in fields.data and "context_file" in fields.data:
        fields.fail(None, "give at most one of 'context' or 'context_file'")
    if "context_file" in fields.data:
        return _read_bank_file(fields, "context_file", fields.text("context_file"), allow_outside_paths).strip()
    return fields.text("context", None)


def load_bank(path: str | Path, allow_outside_paths: bool = False) -> Bank:
    """Read and validate a bank; every error names the file, the question or source, and the field."""
    path = Path(path)
    top = _Fields(path, "top level", _read_yaml(path), {"name", "description", "chat", "sources", "defaults", "questions"})
    bank_name = top.text("name", re.sub(r"[^A-Za-z0-9_.-]", "_", path.stem).lstrip(".") or "bank")
    if not _NAME.fullmatch(bank_name):
        top.fail("name", _NAME_RULE + " (it names the default --out folder)")
    chat_default = top.get("chat", bool, False)
    raw_sources = top.get("sources", dict, required=True)
    sources = {str(name): _load_source(path, str(name), data, allow_outside_paths) for name, data in raw_sources.items()}
    defaults = _Fields(path, "defaults", top.get("defaults", dict, {}), {"controls"})
    default_controls = defaults.strings("controls", (), non_empty=False)
    raw_questions = top.get("questions", list, required=True)
    if not raw_questions:
        top.fail("questions", "must list at least one question")
    questions: list[Question] = []
    first_seen: dict[str, int] = {}
    allowed = {"id", "prompt", "correct", "incorrect", "engram", "controls", "related_wrong", "tags", "chat", "context",
               "context_file", "answer_patterns", "incorrect_unrelated", "relatedness"}
    for number, data in enumerate(raw_questions, start=1):
        qid = data.get("id") if isinstance(data, dict) else None
        fields = _Fields(path, f"question {qid!r}" if isinstance(qid, str) else f"question #{number}", data, allowed)
        qid = fields.text("id")
        if not _NAME.fullmatch(qid):
            fields.fail("id", _NAME_RULE)
        if qid in first_seen:
            fields.fail("id", f"duplicate id (questions #{first_seen[qid]} and #{number})")
        first_seen[qid] = number
        engram = fields.text("engram")
        controls = fields.strings("controls", default_controls, non_empty=False)
        if engram.startswith("~"):
            fields.fail("engram", f"{engram!r} is a null prefix: it can be a control, not the question's relevant engram")
        for name in controls:
            if name.startswith("~") and name not in NULL_PREFIXES:
                fields.fail("controls", f"unknown null prefix {name!r} (one of: {', '.join(NULL_PREFIXES)})")
        engram = _engram_name(fields, "engram", engram, sources)
        controls = [c if c.startswith("~") else _engram_name(fields, "controls", c, sources) for c in controls]
        if engram in controls:
            fields.fail("controls", f"'{engram}' is the question's own engram")
        correct, incorrect = fields.strings("correct"), fields.strings("incorrect")
        unrelated = fields.strings("incorrect_unrelated", (), non_empty=False)
        for field, variants in (("correct", correct), ("incorrect", incorrect), ("incorrect_unrelated", unrelated)):
            for variant in variants:
                if not variant.strip():
                    fields.fail(field, f"variant {variant!r} is only whitespace")
        for variant in unrelated:
            if variant.strip() in {v.strip() for v in correct + incorrect}:
                fields.fail("incorrect_unrelated", f"{variant!r} is also among the question's correct or incorrect answers")
        questions.append(
            Question(
                id=qid,
                prompt=fields.text("prompt"),
                correct=correct,
                incorrect=incorrect,
                engram=engram,
                controls=tuple(controls),
                related_wrong=fields.get("related_wrong", bool, None),
                tags=fields.strings("tags", (), non_empty=False),
                chat=fields.get("chat", bool, chat_default),
                context=_context(fields, allow_outside_paths),
                answer_patterns=_answer_patterns(fields),
                incorrect_unrelated=unrelated,
                relatedness=_relatedness(fields, correct + incorrect + unrelated),
            )
        )
    return Bank(
        name=bank_name,
        description=top.get("description", str, ""),
        path=path,
        sources=sources,
        questions=tuple(questions),
    )
