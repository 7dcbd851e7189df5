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


def test_a_name_cannot_be_registered_twice_nor_unlisted():
    table: Registry = Registry("--thing", "engram_eval.core.registry", ("one",))

    class One:
        name, summary = "one", "the first."

    class Two:
        name, summary = "two", "not in the table's names."

    table.register(One)
    with pytest.raises(ValueError, match="'one' is registered twice"):
        table.register(One)
    with pytest.raises(ValueError, match="'two' is not among the table's names"):
        table.register(Two)
    assert table.names() == ("one",) and isinstance(table["one"], One) and "one" in table and list(table) == ["one"]
    assert Registry("--factory", "engram_eval.core.registry", ("one",), instances=False).register(One) is One


@pytest.mark.parametrize("kind", TABLES)
def test_the_listed_names_are_exactly_what_the_module_registers_and_checking_one_imports_nothing(kind):
    """The table lists its names so a command checks what a user typed without importing the modes (torch)."""
    import subprocess
    import sys

    table = TABLES[kind][0]
    assert tuple(table._entries) == table.names()  # imports the module: every listed name registered, in order
    probe = (f"import sys; from engram_eval.core.registry import {'NULL_PREFIXES' if kind == 'null prefix' else kind.upper() + 'S'}"
             f" as t; t.check(t.names()[0]); '~x' in t; print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.parametrize("kind", ["injection", "scoring", "null prefix"])
def test_a_modes_name_is_spelled_in_at_most_two_modules(kind):
    """Mode-specific facts are attributes of the mode, not `if injection == ...` in the sweep, generation and bench:
    a name is written in its implementing module, in its table's list of names and, for the seed's default, in the spec."""
    table, module, _ = TABLES[kind]
    names = set(table.names())
    spelling = {str(path.relative_to(REPO)) for path in (REPO / "engram_eval").rglob("*.py")
                if not (kind == "injection" and "vectors" in path.parts)  # lm-eval's actions, add and clamp, as its files spell them
                and any(isinstance(node, ast.Constant) and node.value in names for node in ast.walk(ast.parse(path.read_text())))}
    assert module in spelling and spelling <= {module, "engram_eval/core/spec.py", "engram_eval/core/registry.py"}, spelling


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
