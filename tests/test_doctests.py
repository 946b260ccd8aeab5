"""Every ``>>>`` example in the docstrings of ``engines`` and ``gateway`` runs and gives what it shows.

Illustrations that cannot run here (they await, reach the network, a GPU or files outside the
repository) are written as ``::`` literal blocks without prompts, so doctest does not collect them.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import importlib.util
import pkgutil
from pathlib import Path
from types import ModuleType

import pytest

import engines
import gateway

#: Scripts run by another interpreter (the CPU vLLM venv's, which has torch), not importable here:
#: their docstrings are parsed instead, and must hold no examples.
NOT_IMPORTABLE = {"engines.tiny_models"}

OPTIONS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _module_names(*packages: ModuleType) -> list[str]:
    names: list[str] = []
    for package in packages:
        names.append(package.__name__)
        names += [m.name for m in pkgutil.walk_packages(package.__path__, prefix=package.__name__ + ".")]
    return sorted(names)


def _examples_in_source(path: Path) -> int:
    parser = doctest.DocTestParser()
    count = 0
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            count += len(parser.get_examples(doc)) if doc else 0
    return count


@pytest.mark.parametrize("name", _module_names(engines, gateway))
def test_docstring_examples_run(name: str) -> None:
    if name in NOT_IMPORTABLE:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None
        assert _examples_in_source(Path(spec.origin)) == 0, f"{name} cannot be imported here to run its examples"
        return
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=OPTIONS)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples in {name} failed"


def test_examples_are_found() -> None:
    """The doctest run above really collects examples (a module known to hold some)."""
    import engines.registry

    assert doctest.testmod(engines.registry, optionflags=OPTIONS).attempted >= 3
