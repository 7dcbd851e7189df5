"""The registries: each table is the CLI's choices, its --help and the classes that implement it, one to one; a mode's
name is written where it is implemented (and, for the seed's defaults, in the spec), nowhere else."""

import ast
import inspect
from pathlib import Path

import click
import pytest

from engram_eval.cli import cli
from engram_eval.core.errors import EngramEvalError
from engram_eval.core.registry import INJECTIONS, NULL_PREFIXES, POOLINGS, SCORINGS, Registry

REPO = Path(__file__).resolve().parents[1]

# table -> (the module that implements its entries, the options (command, parameter) that offer them; the first one's
# --help describes each entry)
TABLES = {
    "injection": (INJECTIONS, "engram_eval/steer/injection.py", [("sweep", "injection"), ("bench", "injection")]),
    "pooling": (POOLINGS, "engram_eval/engram/pooling.py", [("sweep", "pooling"), ("build", "pooling"), ("compare", "pooling")]),
    "scoring": (SCORINGS, "engram_eval/steer/scoring.py", [("sweep", "scoring")]),
    "null prefix": (NULL_PREFIXES, "engram_eval/engram/nulls.py", []),
}


def option(command: str, name: str) -> click.Option:
    return next(p for p in cli.commands[command].params if p.name == name)


def entry_class(table: Registry, name: str) -> type:
    entry = table[name]
    return entry if isinstance(entry, type) else type(entry)


@pytest.mark.parametrize("kind", TABLES)
def test_each_table_is_the_cli_choices_the_help_and_the_implementing_classes(kind):
    table, module, options = TABLES[kind]
    names = table.names()
    assert names and len(set(names)) == len(names)
    for name in names:
        cls = entry_class(table, name)
        assert cls.name == name and cls.summary
        assert str(Path(inspect.getfile(cls)).relative_to(REPO)) == module  # registered where it is implemented
    for command, parameter in options:
        assert tuple(option(command, parameter).type.choices) == names, (command, parameter)
    if options:
        described = option(*options[0]).help
        assert all(f"{name}: {entry_class(table, name).summary}" in described for name in names)


@pytest.mark.parametrize("kind", TABLES)
def test_an_unknown_name_is_one_line_naming_the_option_and_the_known_names(kind):
    table = TABLES[kind][0]
    with pytest.raises(EngramEvalError) as error:
        table["nonesuch"]
    assert str(error.value) == f"{table.option}: unknown 'nonesuch' (one of: {', '.join(table.names())})"


def test_a_name_cannot_be_registered_twice():
    table: Registry = Registry("--thing", "engram_eval.core.registry")

    class One:
        name, summary = "one", "the first."

    table.register(One)
    with pytest.raises(ValueError, match="'one' is registered twice"):
        table.register(One)
    assert table.names() == ("one",) and isinstance(table["one"], One) and "one" in table and list(table) == ["one"]
    assert Registry("--factory", "engram_eval.core.registry", instances=False).register(One) is One


@pytest.mark.parametrize("kind", ["injection", "scoring", "null prefix"])
def test_a_modes_name_is_spelled_in_at_most_two_modules(kind):
    """Mode-specific facts are attributes of the mode, not `if injection == ...` in the sweep, generation and bench:
    a name is written in its implementing module and, for the seed's default, in the spec."""
    table, module, _ = TABLES[kind]
    names = set(table.names())
    spelling = {str(path.relative_to(REPO)) for path in (REPO / "engram_eval").rglob("*.py")
                if any(isinstance(node, ast.Constant) and node.value in names for node in ast.walk(ast.parse(path.read_text())))}
    assert module in spelling and spelling <= {module, "engram_eval/core/spec.py"}, spelling


def test_the_spec_validates_names_against_the_tables():
    from engram_eval.core.spec import Extraction, Method

    for name in SCORINGS.names():
        assert Method(scoring=name).check().scoring == name
    for name in POOLINGS.names():
        assert Extraction(pooling=name).check([4]).pooling == name
    with pytest.raises(EngramEvalError, match=r"^--scoring: unknown 'best'"):
        Method(scoring="best").check()
    with pytest.raises(EngramEvalError, match=r"^--pooling: unknown 'max'"):
        Extraction(pooling="max").check([4])
