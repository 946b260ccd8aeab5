"""Reading a registry file: YAML (refusing a key given twice), then the schema, then the checks.

:func:`load_registry` reads a file; :func:`parse_registry` validates what YAML gave::

    >>> entry = {"name": "tiny", "source": "org/tiny", "max_model_len": 4096, "params_b": 1.0}
    >>> parse_registry({"models": [entry]}, path=Path("model_registry.yaml")).model("tiny").max_model_len
    4096
    >>> try:
    ...     parse_registry({"models": [{**entry, "quantisation": "fp8"}]}, path=Path("model_registry.yaml"))
    ... except RegistryError as e:
    ...     print(e)
    model_registry.yaml: model 'tiny': unknown key 'quantisation'; did you mean 'quantization'?
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from engines.registry.checkpoint import read_local_architectures, read_local_quant_methods
from engines.registry.checks import check_semantics
from engines.registry.schema import Registry, RegistryFile
from engines.registry.wording import RegistryError, explain_all

#: The registry's warnings are logged under the package's name (``onecard`` commands quiet it while loading).
log = logging.getLogger("engines.registry")


def load_registry(path: str | Path) -> Registry:
    """Read and validate a registry file; raise :class:`RegistryError` listing every problem."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise RegistryError([f"{p}: cannot read the registry ({e.strerror}); pass an existing file"]) from e
    return parse_registry(_load_yaml(p, text), path=p)


def _load_yaml(path: Path, text: str) -> Any:
    """Parse YAML, refusing a key given twice in one mapping (plain YAML silently keeps the last)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        duplicates = _duplicate_keys(path, node)
        if duplicates:
            raise RegistryError(duplicates)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise RegistryError(
            [f"{path}: not valid YAML{at}: {problem}; fix the syntax (indent with spaces, 'key: value')"]
        ) from e
    finally:
        loader.dispose()


def _duplicate_keys(path: Path, root: yaml.Node) -> list[str]:
    problems: list[str] = []

    def check(node: yaml.MappingNode, scope: str, prefix: str) -> None:
        seen: dict[str, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                continue
            key, line = str(key_node.value), key_node.start_mark.line + 1
            if key in seen:
                problems.append(
                    f"{path}: {scope}: field '{prefix}{key}' is given twice (lines {seen[key]} and {line}); "
                    "keep one (YAML would silently use the last)"
                )
            seen.setdefault(key, line)

    def walk(node: yaml.Node, scope: str, prefix: str) -> None:
        if isinstance(node, yaml.SequenceNode):
            for item in node.value:
                walk(item, scope, prefix)
        elif isinstance(node, yaml.MappingNode):
            check(node, scope, prefix)
            for key_node, value_node in node.value:
                walk(value_node, scope, f"{prefix}{key_node.value}.")

    if not isinstance(root, yaml.MappingNode):
        return problems
    check(root, "top level", "")
    for key_node, value_node in root.value:
        if key_node.value == "models" and isinstance(value_node, yaml.SequenceNode):
            for i, item in enumerate(value_node.value):
                walk(item, _node_model_scope(item, i), "")
        else:
            walk(value_node, "top level", f"{key_node.value}.")
    return problems


def _node_model_scope(node: yaml.Node, index: int) -> str:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if getattr(k, "value", None) == "name" and isinstance(v, yaml.ScalarNode) and v.value:
                return f"model {v.value!r}"
    return f"model #{index + 1}"


def parse_registry(data: Any, *, path: Path) -> Registry:
    """Validate what YAML gave for the file at ``path``; raise :class:`RegistryError` listing every problem."""
    if not isinstance(data, Mapping):
        got = "nothing" if data is None else f"a {type(data).__name__}"
        raise RegistryError(
            [f"{path}: top level: the file holds {got}, not a mapping; "
             "write 'gpu:', 'vllm:' and a 'models:' list, as in the shipped model_registry.yaml"]
        )
    try:
        raw = RegistryFile.model_validate(data)
    except ValidationError as e:
        raise RegistryError(explain_all(path, data, e.errors())) from e
    local_architectures = read_local_architectures(path, raw.models)
    problems, warnings = check_semantics(path, raw, local_architectures)
    if problems:
        raise RegistryError(problems)
    for w in warnings:
        log.warning(w)
    return Registry(
        path=path.resolve(),
        gpu=raw.gpu,
        vllm=raw.vllm,
        scheduler=raw.scheduler,
        models=raw.models,
        warnings=tuple(warnings),
        local_architectures=local_architectures,
        local_quant_methods=read_local_quant_methods(path, raw.models),
    )
