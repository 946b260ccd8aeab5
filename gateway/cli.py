"""The ``onecard`` command line.

::

    onecard check [REGISTRY]                          # validate; exit 1 listing every problem
    onecard plan  [REGISTRY] [--budget-gib N] [--json]  # what fits on the card, how, and the vLLM flags
    onecard serve [--registry R] [--host 127.0.0.1] [--port 8000]
    onecard demo  [--port 8000]                       # tiny CPU models, set up on first run
    onecard ps    [--url http://127.0.0.1:8000]       # the engines of a running gateway
    onecard lease [--gib N] [--wait] -- COMMAND...    # borrow the card for a training run
    onecard lease release ID
    onecard user add NAME [--class interactive|batch] [--admin] [--users FILE]   # prints the key once
    onecard user list [--users FILE]
    onecard usage [--since 7d] [--json]               # per user and model: requests, tokens, waits
    onecard setup-cpu-engine                          # vLLM for the CPU, in its own venv (cached)
    onecard demo-models DIR                           # build the tiny models offline

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
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway import cli_people

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
    from engines.pool import Verdict, check_plan, plan_registry

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
    from engines.pool import detect_budget_gib, format_plan, format_quantization, plan_registry, plan_report
    from engines.registry import Platform

    registry = _load(_registry_path(args))
    if registry is None:
        return 1
    plan = plan_registry(registry, budget_gib=args.budget_gib)
    if args.json:
        card_total = detect_budget_gib() if plan.platform is Platform.CUDA else None
        print(json.dumps(plan_report(registry, plan, card_total_gib=card_total), indent=2))
    else:
        print(format_plan(plan))
        print()
        print(format_quantization(registry, plan))
    return 0


# --- onecard serve / demo / ps -------------------------------------------------------------------------------


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--registry", default=None, help=f"registry file (default: ${REGISTRY_ENV}, else ./{DEFAULT_REGISTRY})"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument(
        "--run-dir", default=None, help="state, logs and engine temp folders (default $ONECARD_RUN_DIR or .onecard)"
    )
    p.add_argument("--budget-gib", type=_positive_gib, default=None, help="override the registry's GPU budget")
    p.add_argument("--vllm", default=None, metavar="EXECUTABLE", help="override the registry's vllm.executable")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--cors-origin", action="append", default=[], help="allow this browser origin (repeatable)")
    cli_people.add_users_arg(p)


def _serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gateway.serve import serve
    from gateway.settings import Settings

    path = args.registry or os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY
    if _load(path) is None or not _users_ok(args):
        return 1
    settings = Settings.from_env(
        Path(path),
        host=args.host,
        port=args.port,
        run_dir=Path(args.run_dir) if args.run_dir else None,
        budget_gib=args.budget_gib,
        executable=args.vllm,
        cors_origins=tuple(args.cors_origin),
        users_path=Path(args.users) if args.users else None,
    )
    serve(settings, log_level=args.log_level)
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--run-dir", default=None)
    cli_people.add_users_arg(p)


def _demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from gateway.serve import demo

    if not _users_ok(args):
        return 1
    demo(host=args.host, port=args.port, run_dir=Path(args.run_dir) if args.run_dir else None,
         users=Path(args.users) if args.users else None)
    return 0


def _users_ok(args: argparse.Namespace) -> bool:
    """Whether the users file the gateway will read can be used; prints every problem if not."""
    from engines.pool import UsersError, load_users

    path = cli_people.users_file(args)
    try:
        load_users(path)
    except UsersError as e:
        _print_problems(e.problems, str(path))
        return False
    return True


def _ps_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=os.environ.get("ONECARD_URL", "http://127.0.0.1:8000"))


def _ps(args: argparse.Namespace) -> int:
    import httpx

    from gateway.serve import ps

    try:
        print(ps(args.url, admin_key=_first_admin_key()))
    except httpx.HTTPError as e:
        print(f"error: cannot read {args.url}/admin/engines: {e}", file=sys.stderr)
        return 1
    return 0


def _first_admin_key() -> str | None:
    from gateway.settings import read_keys

    keys = sorted(read_keys(os.environ.get("ONECARD_ADMIN_KEYS")))
    return keys[0] if keys else None


def _setup_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--home", default=None, help="where to build it (default $ONECARD_HOME or ~/.cache/onecard)")
    p.add_argument("--force", action="store_true", help="rebuild even if it is ready")


def _setup(args: argparse.Namespace) -> int:
    from pathlib import Path

    from engines.pool import setup_cpu_engine

    exe = setup_cpu_engine(Path(args.home) if args.home else None, force=args.force)
    print(exe)
    return 0


def _demo_models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", help="folder to build the tiny models in")


def _demo_models(args: argparse.Namespace) -> int:
    from pathlib import Path

    from engines.pool import build_demo_models

    models = build_demo_models(Path(args.dir))
    print(f"base: {models.base}\nother: {models.other}\nlora: {models.lora}")
    return 0


# --- onecard lease ---------------------------------------------------------------------------------------------


def _lease_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gib", type=_positive_gib, default=None, help="GiB to borrow (default: the whole card)")
    p.add_argument("--wait", action="store_true", help="wait for another lease to end instead of failing")
    p.add_argument("--label", default=None, help="shown in `onecard ps` (default: the command)")
    p.add_argument("--url", default=os.environ.get("ONECARD_URL", "http://127.0.0.1:8000"))
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND... to run while the lease is held, "
                   "or `release ID`")


def _lease(args: argparse.Namespace) -> int:
    import signal
    import subprocess

    import httpx

    key = _first_admin_key()
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = args.url.rstrip("/")
    cmd = list(args.command)
    if cmd[:1] == ["release"] and len(cmd) == 2:
        r = httpx.delete(f"{url}/admin/leases/{cmd[1]}", headers=headers, timeout=30, trust_env=False)
        print(r.json().get("error", {}).get("message") if r.status_code != 200 else f"lease {cmd[1]} released")
        return 0 if r.status_code == 200 else 1
    if cmd[:1] == ["--"]:
        cmd = cmd[1:]
    if not cmd:
        print("error: give the command to run: onecard lease [--gib N] -- COMMAND...", file=sys.stderr)
        return 2
    body = {"gib": args.gib, "pid": os.getpid(), "label": args.label or " ".join(cmd)[:200], "wait": args.wait}
    try:
        r = httpx.post(f"{url}/admin/leases", json=body, headers=headers, timeout=None if args.wait else 600,
                       trust_env=False)
    except httpx.HTTPError as e:
        print(f"error: cannot reach the gateway at {url}: {e}", file=sys.stderr)
        return 1
    if r.status_code != 201:
        print(f"error: lease refused: {r.json().get('error', {}).get('message', r.text)}", file=sys.stderr)
        return 1
    lease = r.json()
    print(f"onecard: lease {lease['id']} granted: {lease['gib']:g} GiB"
          + (f" (evicted {', '.join(lease['evicted'])})" if lease["evicted"] else ""), file=sys.stderr)
    env = {**os.environ, "ONECARD_LEASE_ID": lease["id"], "ONECARD_LEASE_GIB": str(lease["gib"])}
    proc = subprocess.Popen(cmd, env=env)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, _f: proc.send_signal(s))
    done = threading.Event()
    beats = threading.Thread(target=_heartbeats, args=(url, headers, lease, done), name="lease-heartbeat",
                             daemon=True)
    beats.start()
    try:
        rc = proc.wait()
    finally:
        done.set()
        try:
            httpx.delete(f"{url}/admin/leases/{lease['id']}", headers=headers, timeout=30, trust_env=False)
        except httpx.HTTPError:
            print("warning: could not release the lease; it ends when the gateway sees this process gone",
                  file=sys.stderr)
    print(f"onecard: lease {lease['id']} released", file=sys.stderr)
    return rc


def _heartbeats(url: str, headers: dict[str, str], lease: dict[str, Any], done: threading.Event) -> None:
    """Tell the gateway the lease's holder is still there, three times per TTL, until ``done``."""
    import httpx

    every = max(0.2, float(lease.get("ttl_s") or 60) / 3)
    warned = False
    while not done.wait(every):
        try:
            r = httpx.post(f"{url}/admin/leases/{lease['id']}/heartbeat", headers=headers, timeout=every,
                           trust_env=False)
        except httpx.HTTPError as e:
            if not warned:
                warned = True
                print(f"warning: cannot reach the gateway for the lease heartbeat ({e}); retrying", file=sys.stderr)
            continue
        if r.status_code == 409:
            print(f"warning: lease {lease['id']} has ended: {r.json().get('error', {}).get('message', r.text)}",
                  file=sys.stderr)
            return
        warned = False


# --- the one place subcommands are registered ---------------------------------------------------------------

SUBCOMMANDS: tuple[Subcommand, ...] = (
    Subcommand("check", "validate a registry file (and that every model can fit)", _check_args, _check),
    Subcommand("plan", "show each model's VRAM footprint and which can share the card", _plan_args, _plan),
    Subcommand("serve", "run the gateway", _serve_args, _serve),
    Subcommand("demo", "run the gateway with tiny CPU models (built on first run)", _demo_args, _demo),
    Subcommand("ps", "show the engines of a running gateway", _ps_args, _ps),
    Subcommand("lease", "borrow GPU memory from a running gateway while a command runs", _lease_args, _lease),
    Subcommand("user", "add or list the people who use the gateway", cli_people.user_args, cli_people.user),
    Subcommand("usage", "per user and model: requests, tokens, queue wait, engine-seconds, swaps",
               cli_people.usage_args, lambda args: cli_people.usage(args, _first_admin_key())),
    Subcommand("setup-cpu-engine", "build vLLM for the CPU in its own virtual environment", _setup_args, _setup),
    Subcommand("demo-models", "build the tiny demo models offline", _demo_models_args, _demo_models),
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
