"""The ``onecard`` command line.

::

    onecard check [REGISTRY]                          # validate; exit 1 listing every problem
    onecard plan  [REGISTRY] [--budget-gib N] [--json]  # what fits on the card, and how

REGISTRY defaults to ``$ONECARD_REGISTRY``, else ``model_registry.yaml`` in the current directory.

Each subcommand is one small function plus its arguments, listed once in :data:`SUBCOMMANDS`. Heavy
modules (the registry's pydantic, later fastapi/uvicorn for ``serve``) are imported inside the
subcommand that needs them, so ``import gateway.cli`` and ``onecard --help`` stay fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engines.registry import Registry

DEFAULT_REGISTRY = "model_registry.yaml"
REGISTRY_ENV = "ONECARD_REGISTRY"


@dataclass(frozen=True)
class Subcommand:
    """One ``onecard <name>``: ``configure`` adds its arguments; ``run`` works and returns the exit code."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# --- shared helpers ----------------------------------------------------------------------------------------


def _add_registry_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "registry",
        nargs="?",
        default=None,
        metavar="REGISTRY",
        help=f"registry file (default: ${REGISTRY_ENV}, else ./{DEFAULT_REGISTRY})",
    )


def _registry_path(args: argparse.Namespace) -> str:
    return str(args.registry or os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY)


def _load(path: str) -> Registry | None:
    """The validated registry, or None after printing every problem to stderr.

    The registry also logs its warnings; the subcommands print them once themselves.
    """
    from engines.registry import RegistryError, load_registry

    logger = logging.getLogger("engines.registry")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return load_registry(path)
    except RegistryError as e:
        _print_problems(e.problems, path)
        return None
    finally:
        logger.setLevel(level)


def _print_problems(problems: list[str], path: str) -> None:
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    print(f"{len(problems)} problem{'s' if len(problems) != 1 else ''} in {path}", file=sys.stderr)


def _positive_gib(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of GiB") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the budget must be positive")
    return value


# --- onecard check -----------------------------------------------------------------------------------------


def _check_args(p: argparse.ArgumentParser) -> None:
    _add_registry_arg(p)


def _check(args: argparse.Namespace) -> int:
    from engines.planner import Verdict, check_plan, plan_registry

    path = _registry_path(args)
    registry = _load(path)
    if registry is None:
        return 1
    plan = plan_registry(registry)
    problems, warnings = check_plan(registry, plan)
    if problems:
        _print_problems(problems, path)
        return 1
    names = registry.names()
    adapters = sum(len(m.lora.adapters) for m in registry.models)
    by_verdict = {v: [m.name for m in plan.models if m.verdict is v] for v in Verdict}
    print(
        f"ok: {path}: {len(registry.models)} models, {len(names) - len(registry.models) - adapters} aliases, "
        f"{adapters} adapters"
    )
    offload = ", ".join(f"{n} {plan.model(n).offload_gib:g} GiB" for n in by_verdict[Verdict.NEEDS_OFFLOAD])
    print(
        f"plan: {len(by_verdict[Verdict.FITS])} fit in {plan.usable_gib:g} GiB usable, "
        f"{len(by_verdict[Verdict.NEEDS_OFFLOAD])} need offload{f' ({offload})' if offload else ''}; "
        f"{len(plan.co_resident_sets)} co-resident sets"
    )
    for w in (*plan.warnings, *warnings):
        print(f"warning: {w}")
    return 0


# --- onecard plan ------------------------------------------------------------------------------------------


def _plan_args(p: argparse.ArgumentParser) -> None:
    _add_registry_arg(p)
    p.add_argument(
        "--budget-gib",
        type=_positive_gib,
        default=None,
        metavar="N",
        help="plan for a card of N GiB instead of the registry's gpu.budget_gib",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")


def _plan(args: argparse.Namespace) -> int:
    from engines.planner import format_plan, plan_registry

    registry = _load(_registry_path(args))
    if registry is None:
        return 1
    plan = plan_registry(registry, budget_gib=args.budget_gib)
    if args.json:
        print(json.dumps(plan.as_dict(), indent=2))
    else:
        print(format_plan(plan))
    return 0


# --- the one place subcommands are registered ---------------------------------------------------------------

SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand("check", "validate a registry file (and that every model can fit)", _check_args, _check),
    Subcommand("plan", "show each model's VRAM footprint and which can share the card", _plan_args, _plan),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onecard", description="Share one GPU across many vLLM models behind one OpenAI endpoint."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for cmd in SUBCOMMANDS:
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.configure(p)
        p.set_defaults(run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``onecard``; returns the exit code (0 ok, 1 problems found, 2 usage error)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], int] | None = getattr(args, "run", None)
    if run is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return run(args)
    except BrokenPipeError:  # `onecard plan | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
