"""The gateway sees the engines through one door: it imports ``engines.pool``, ``engines.errors`` and
``engines.registry``, and never reaches past the pool to the owner inside it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOOR = {"engines.pool", "engines.errors", "engines.registry"}
GATEWAY = sorted((ROOT / "gateway").rglob("*.py"))


def engine_imports(path: Path) -> list[tuple[int, str]]:
    """Every ``engines`` module a file imports (top level or inside functions), with its line."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "engines"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "engines":
            if node.module == "engines":
                found += [(node.lineno, f"engines.{a.name}") for a in node.names]
            else:
                found.append((node.lineno, node.module))
    return found


def test_the_gateway_has_modules_to_check() -> None:
    assert len(GATEWAY) > 20 and any(p.name == "proxy.py" for p in GATEWAY)


@pytest.mark.parametrize("path", GATEWAY, ids=lambda p: str(p.relative_to(ROOT)))
def test_gateway_imports_only_the_door(path: Path) -> None:
    leaks = [f"{path.relative_to(ROOT)}:{line}: imports {module}" for line, module in engine_imports(path)
             if module not in DOOR]
    assert leaks == []


@pytest.mark.parametrize("path", GATEWAY, ids=lambda p: str(p.relative_to(ROOT)))
def test_gateway_never_reaches_past_the_pool(path: Path) -> None:
    tree = ast.parse(path.read_text())
    reached = [f"{path.relative_to(ROOT)}:{n.lineno}: pool.{n.attr}" for n in ast.walk(tree)
               if isinstance(n, ast.Attribute) and n.attr.startswith(("owner", "_")) and _is_pool(n.value)]
    assert reached == []


def _is_pool(node: ast.expr) -> bool:
    return (isinstance(node, ast.Name) and node.id == "pool") or (
        isinstance(node, ast.Attribute) and node.attr == "pool")


def test_the_check_catches_a_leak(tmp_path: Path) -> None:
    leaky = tmp_path / "leaky.py"
    leaky.write_text("from engines.engine import Engine\nimport engines.manager\n"
                     "def f() -> None:\n    from engines import state\n")
    assert [m for _, m in engine_imports(leaky)] == ["engines.engine", "engines.manager", "engines.state"]
    reach = ast.parse("gw.pool.owner.engines\npool._admission\nother.owner")
    hits = [n for n in ast.walk(reach) if isinstance(n, ast.Attribute) and n.attr.startswith(("owner", "_"))
            and _is_pool(n.value)]
    assert sorted(n.attr for n in hits) == ["_admission", "owner"]
