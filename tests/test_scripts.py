"""The scripts beside the package (docs/findings.py, the bank's source generators) import only names that exist:
they run outside the test suite, so a moved module would otherwise break them silently."""

import ast
import importlib

import pytest
from conftest import REPO

SCRIPTS = sorted([*REPO.glob("docs/*.py"), *REPO.glob("questions/sources/*.py"), *REPO.glob("benchmarks/*.py")])


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_engram_eval_import_of_a_script_resolves(script):
    imports = [node for node in ast.walk(ast.parse(script.read_text())) if isinstance(node, ast.ImportFrom)
               and node.module and node.module.split(".")[0] == "engram_eval"]
    for node in imports:
        module = importlib.import_module(node.module)
        missing = [alias.name for alias in node.names if not hasattr(module, alias.name)]
        assert not missing, f"{script.name}: {node.module} has no {missing}"
    assert SCRIPTS
