"""The package list in pyproject.toml names every package of the gateway, so a plain install has them all."""

from __future__ import annotations

import pkgutil
import tomllib
from pathlib import Path

import engines
import gateway

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_installed() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"engines", "gateway"}
    for package in (engines, gateway):
        prefix = package.__name__ + "."
        found |= {m.name for m in pkgutil.walk_packages(package.__path__, prefix=prefix) if m.ispkg}
    assert found == listed
