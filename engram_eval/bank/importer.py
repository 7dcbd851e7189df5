"""Importing datasets into banks: a table of multiple-choice or completion questions -> a bank YAML and its sources.

Files are read with polars (.jsonl, .json, .csv, .parquet); Hugging Face datasets through the `datasets` library
(a hub name, or a folder written by `Dataset.save_to_disk`). `--map FIELD=COLUMN` names the columns; multiple-choice
questions become a lettered list ending with an answer cue, scored on the letters."""

from __future__ import annotations

import re
import shutil
import string
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..core.errors import EngramEvalError
from ..core.progress import progress_bar
from ..core.files import atomic_write_text
from ..core.registry import NULL_PREFIXES
from .banks import load_bank
from .controls import IRRELEVANT_TEXT, random_words

if TYPE_CHECKING:
    import polars as pl

FORMATS = ("mc", "completion")
FIELDS = {
    "mc": {"required": ("question", "choices", "answer"), "optional": ("id", "source", "topic", "context", "related_wrong", "tags")},
    "completion": {"required": ("prompt", "correct", "incorrect"), "optional": ("id", "source", "topic", "context", "related_wrong", "tags")},
}
MC_TEMPLATE = "{question}\n{choices}\nAnswer:"
SOURCE_CONTROLS = ("irrelevant", "random")  # the null prefixes come before these


def import_controls() -> tuple[str, ...]:
    """The controls an imported bank may give each question: every null prefix, an irrelevant and a random source."""
    return (*NULL_PREFIXES.names(), *SOURCE_CONTROLS)


@dataclass(frozen=True)
class ImportSpec:
    format: str
    mapping: dict[str, list[str]]  # field -> columns (several for choices given as one column per option)
    template: str = MC_TEMPLATE
    controls: tuple[str, ...] = field(default_factory=import_controls)
    limit: int | None = None
    seed: int = 0
    source_per_topic: bool = False
    answer_base: int = 0  # an answer given as a number counts choices from this
    chat: bool = False  # the bank's prompts go through the model's chat template; letters then start the reply bare


def parse_map(text: str, format: str) -> dict[str, list[str]]:
    """'question=q,choices=a+b+c+d,answer=label' -> {field: [columns]}."""
    if format not in FORMATS:
        raise EngramEvalError(f"--format: unknown '{format}' (one of: {', '.join(FORMATS)})")
    allowed = FIELDS[format]["required"] + FIELDS[format]["optional"]
    mapping: dict[str, list[str]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        field, sep, columns = item.partition("=")
        if not sep or not columns:
            raise EngramEvalError(f"--map: malformed '{item}' (expected FIELD=COLUMN, or choices=COL1+COL2+...)")
        if field not in allowed:
            raise EngramEvalError(f"--map: unknown field '{field}' for --format {format} (fields: {', '.join(allowed)})")
        mapping[field] = columns.split("+")
    missing = [field for field in FIELDS[format]["required"] if field not in mapping]
    if missing:
        raise EngramEvalError(f"--map: give {', '.join(f'{m}=COLUMN' for m in missing)} (--format {format} needs them)")
    if "source" not in mapping:
        raise EngramEvalError("--map: give source=COLUMN: the text each question's relevant engram is built from "
                              "(an explanation or a retrieved passage)")
    return mapping


def read_table(path: Path | None, hf: str | None) -> tuple[pl.DataFrame, str]:
    """-> (the rows, how records are named in errors: 'line' for JSONL, 'row' otherwise)."""
    if hf is not None:
        return _read_hf(hf), "row"
    import polars as pl  # here, not at the top: `engram-eval --help` does not load polars

    readers = {".jsonl": pl.read_ndjson, ".json": pl.read_json, ".csv": pl.read_csv, ".parquet": pl.read_parquet}
    if path.suffix not in readers:
        raise EngramEvalError(f"{path}: unknown file type '{path.suffix}' (use .jsonl, .json, .csv or .parquet, or --hf)")
    if not path.is_file():
        raise EngramEvalError(f"{path}: file not found")
    try:
        frame = readers[path.suffix](path)
    except Exception as exc:  # polars raises a zoo of types for unreadable input
        raise EngramEvalError(f"{path}: cannot read as {path.suffix[1:]} ({' '.join(str(exc).split())[:200]})") from None
    if frame.is_empty():
        raise EngramEvalError(f"{path}: no records")
    return frame, "line" if path.suffix == ".jsonl" else "row"


def _read_hf(spec: str) -> pl.DataFrame:
    try:
        import datasets
    except ImportError:
        raise EngramEvalError("--hf: the `datasets` library is not installed (pip install datasets)") from None
    name, _, rest = spec.partition(":")
    config, _, split = rest.partition(":")
    try:
        if Path(name).is_dir():  # a folder written by save_to_disk
            data = datasets.load_from_disk(name)
            if isinstance(data, datasets.DatasetDict):
                split = split or config or "train"
                if split not in data:
                    raise EngramEvalError(f"--hf: {name} has no split '{split}' (splits: {', '.join(data)})")
                data = data[split]
        else:
            data = datasets.load_dataset(name, config or None, split=split or "train")
    except EngramEvalError:
        raise
    except Exception as exc:
        raise EngramEvalError(f"--hf: cannot load '{spec}' ({' '.join(str(exc).split())[:200]})") from None
    import polars as pl

    frame = pl.from_arrow(data.data.table)
    if frame.is_empty():
        raise EngramEvalError(f"--hf: '{spec}' has no records")
    return frame


def build_bank(frame: pl.DataFrame, spec: ImportSpec, name: str, record: str, where: str) -> tuple[dict, dict[str, str]]:
    """-> (the bank as YAML data, source texts by file name relative to the bank). Every record is checked; an error
    names the record (its line or row number, from 1)."""
    for mapped, columns in spec.mapping.items():
        for column in columns:
            if column not in frame.columns:
                raise EngramEvalError(f"{where}: --map {mapped}={'+'.join(columns)}: no column '{column}' "
                                      f"(columns: {', '.join(frame.columns)})")
    numbered = frame.with_row_index("__number", offset=1)
    if spec.limit is not None and spec.limit < numbered.height:
        numbered = numbered.sample(spec.limit, seed=spec.seed).sort("__number")
    questions, sources = [], {}
    topic_texts: dict[str, list[str]] = {}
    with progress_bar(numbered.height, "import", "record") as bar:
        for row in numbered.iter_rows(named=True):
            bar.update()
            at = f"{where}: {record} {row['__number']}"
            get = lambda field: _value(row, spec.mapping[field], at, field) if field in spec.mapping else None  # noqa: E731
            qid = str(get("id")) if get("id") is not None else f"{name}-{row['__number']}"
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", qid):
                qid = re.sub(r"[^A-Za-z0-9_.-]", "_", qid)
            question = _mc(get, spec, at) if spec.format == "mc" else _completion(get, at)
            source_text = _text(get("source"), at, "source")
            topic = get("topic")
            if spec.source_per_topic and topic is not None:
                source_name = "topic-" + re.sub(r"[^A-Za-z0-9_.-]", "_", str(topic))
                topic_texts.setdefault(source_name, [])
                if source_text not in topic_texts[source_name]:
                    topic_texts[source_name].append(source_text)
            else:
                source_name = f"q-{qid}"
                sources[source_name] = source_text
            question = {"id": qid, **question, "engram": source_name}
            if (context := get("context")) is not None:
                question["context"] = _text(context, at, "context")
            if (related := get("related_wrong")) is not None:
                question["related_wrong"] = _boolean(related, at)
            if (tags := get("tags")) is not None:
                question["tags"] = [str(t) for t in (tags if isinstance(tags, list) else [tags])]
            questions.append(question)
    for source_name, texts in topic_texts.items():
        sources[source_name] = "\n\n".join(texts)
    seen: dict[str, int] = {}
    for number, question in enumerate(questions, start=1):
        if question["id"] in seen:
            raise EngramEvalError(f"{where}: duplicate id '{question['id']}' (records {seen[question['id']]} and {number} of the import)")
        seen[question["id"]] = number
    return {"questions": questions}, sources


def _value(row: dict, columns: list[str], at: str, field: str) -> Any:
    values = [row[column] for column in columns]
    if len(values) > 1:
        return values
    value = values[0]
    if value is None and field not in ("id", "topic", "context", "related_wrong", "tags"):
        raise EngramEvalError(f"{at}: {field} ({columns[0]}) is empty")
    return value


def _text(value: Any, at: str, field: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise EngramEvalError(f"{at}: {field} must be non-empty text, got {value!r}")
    return value.strip()


def _boolean(value: Any, at: str) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).strip().lower() in ("true", "yes", "1"):
        return True
    if str(value).strip().lower() in ("false", "no", "0"):
        return False
    raise EngramEvalError(f"{at}: related_wrong must be true or false, got {value!r}")


def _mc(get, spec: ImportSpec, at: str) -> dict:
    choices = get("choices")
    choices = [str(c).strip() for c in (choices if isinstance(choices, list) else [choices]) if c is not None and str(c).strip()]
    if len(choices) < 2:
        raise EngramEvalError(f"{at}: needs at least two choices, got {len(choices)}")
    if len(choices) > 26:
        raise EngramEvalError(f"{at}: {len(choices)} choices; letters run out at 26")
    letters = string.ascii_uppercase[: len(choices)]
    answer = get("answer")
    if isinstance(answer, bool) or answer is None:
        raise EngramEvalError(f"{at}: answer {answer!r} is not an index, a letter or a choice")
    if isinstance(answer, float) and not answer.is_integer():
        raise EngramEvalError(f"{at}: answer index {answer} is not a whole number")
    if isinstance(answer, (int, float)) or str(answer).strip().isdigit():
        index = int(answer) - spec.answer_base
        if not 0 <= index < len(choices):
            raise EngramEvalError(f"{at}: answer index {answer} is out of range for {len(choices)} choices "
                                  f"(counting from {spec.answer_base})")
    elif len(str(answer).strip()) == 1 and str(answer).strip().upper() in string.ascii_uppercase:
        index = string.ascii_uppercase.index(str(answer).strip().upper())
        if index >= len(choices):
            raise EngramEvalError(f"{at}: answer letter {str(answer).strip()} has no such choice (choices {letters[0]}-{letters[-1]})")
    elif str(answer).strip() in choices:
        index = choices.index(str(answer).strip())
    else:
        raise EngramEvalError(f"{at}: answer {answer!r} is neither an index, a letter nor one of the choices")
    listed = "\n".join(f"{letter}) {choice}" for letter, choice in zip(letters, choices))
    try:
        prompt = spec.template.format(question=_text(get("question"), at, "question"), choices=listed)
    except (KeyError, IndexError, ValueError) as exc:
        raise EngramEvalError(f"--template: {exc!r} (use {{question}} and {{choices}})") from None
    space = "" if spec.chat else " "  # after the chat template's generation prompt the reply starts a line: "A", not " A"
    return {"prompt": prompt, "correct": [f"{space}{letters[index]}"],
            "incorrect": [f"{space}{letter}" for letter in letters if letter != letters[index]]}


def _completion(get, at: str) -> dict:
    def variants(field: str) -> list[str]:
        value = get(field)
        items = value if isinstance(value, list) else [value]
        texts = [str(item) for item in items if item is not None and str(item).strip()]
        if not texts:
            raise EngramEvalError(f"{at}: {field} is empty")
        return [t if t[:1].isspace() else f" {t}" for t in texts]

    return {"prompt": _text(get("prompt"), at, "prompt"), "correct": variants("correct"), "incorrect": variants("incorrect")}


class _ReadableDumper(yaml.SafeDumper):
    """Multi-line text (a lettered prompt) as a literal block, as a person would write it."""


def _text_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_ReadableDumper.add_representer(str, _text_representer)


def write_bank(data: dict, sources: dict[str, str], out: Path, name: str, description: str, spec: ImportSpec, force: bool) -> Path:
    """Write the bank YAML and a folder of source files next to it, then load it back as any bank is checked. On any
    failure nothing is left behind."""
    known = import_controls()
    for control in spec.controls:
        if control not in known:
            raise EngramEvalError(f"--controls: unknown '{control}' (one of: {', '.join(known)})")
    folder = out.parent / f"{out.stem}-sources"
    if (out.exists() or folder.exists()) and not force:
        raise EngramEvalError(f"--out: {out if out.exists() else folder} exists; use --force to replace it")
    if not out.parent.is_dir():
        raise EngramEvalError(f"--out: folder {out.parent} does not exist")
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=out.parent))
    try:
        texts = dict(sources)
        if "irrelevant" in spec.controls:
            texts["irrelevant"] = IRRELEVANT_TEXT
        if "random" in spec.controls:
            texts["random"] = random_words(120, spec.seed)
        kinds = {"irrelevant": "irrelevant", "random": "random"}
        bank = {
            "name": name,
            "description": description,
            **({"chat": True} if spec.chat else {}),
            "sources": {source: {"file": f"{folder.name}/{source}.txt", **({"kind": kinds[source]} if source in kinds else {})}
                        for source in texts},
            "defaults": {"controls": [c for c in spec.controls if c in NULL_PREFIXES or c in texts]},
            **data,
        }
        (staging / folder.name).mkdir()
        for source, text in texts.items():
            (staging / folder.name / f"{source}.txt").write_text(text.rstrip() + "\n", encoding="utf-8")
        staged = staging / out.name
        staged.write_text(yaml.dump(bank, Dumper=_ReadableDumper, sort_keys=False, allow_unicode=True, width=120), encoding="utf-8")
        load_bank(staged)  # checked like every bank
        if folder.exists():
            shutil.rmtree(folder)
        (staging / folder.name).rename(folder)
        atomic_write_text(out, staged.read_text(encoding="utf-8"))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
