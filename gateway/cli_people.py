"""``onecard user`` and ``onecard usage``: the lab's people, and what each of them used.

::

    onecard user add NAME [--class interactive|batch] [--admin] [--users FILE]   # prints the key once
    onecard user list [--users FILE]
    onecard usage [--since 7d] [--json] [--url http://127.0.0.1:8000]

The users file defaults to ``$ONECARD_USERS``, else ``users.yaml`` in the run folder
(``$ONECARD_RUN_DIR`` or ``.onecard``), as ``onecard serve`` reads it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def users_file(args: argparse.Namespace) -> Path:
    from gateway.users import users_path

    run_dir = Path(getattr(args, "run_dir", None) or os.environ.get("ONECARD_RUN_DIR", ".onecard"))
    return users_path(run_dir, getattr(args, "users", None))


def add_users_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--users",
        default=None,
        metavar="FILE",
        help="users file (default: $ONECARD_USERS, else users.yaml in the run folder)",
    )


def user_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="user_command", metavar="ACTION", required=True)
    add = sub.add_parser("add", help="add a user and print their new key (once)")
    add.add_argument("name")
    add.add_argument(
        "--class",
        dest="klass",
        choices=["interactive", "batch"],
        default="batch",
        help="interactive: a person waiting (short swap wait, first in the engine); batch: harnesses",
    )
    add.add_argument("--admin", action="store_true", help="may use the /admin routes")
    add_users_arg(add)
    add.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)
    lst = sub.add_parser("list", help="list the users (never their keys)")
    add_users_arg(lst)
    lst.add_argument("--run-dir", default=None, help=argparse.SUPPRESS)


def user(args: argparse.Namespace) -> int:
    from engines.pool import UserClass, UsersError, add_user, load_users

    path = users_file(args)
    try:
        if args.user_command == "add":
            key = add_user(path, args.name, klass=UserClass(args.klass), admin=args.admin)
            print(
                f"user {args.name} added to {path} (class {args.klass}{', admin' if args.admin else ''}); "
                "only its hash is stored, so this is the one time the key is shown:"
            )
            print(key)
            return 0
        users = load_users(path)
    except UsersError as e:
        for p in e.problems:
            print(f"error: {p}", file=sys.stderr)
        return 1
    if not users.users:
        print(f"{path}: no users (every route is open, or takes the ONECARD_API_KEYS keys)")
        return 0
    rows = [("name", "class", "admin", "max_in_flight", "max_queued", "models")]
    for u in users.users:
        rows.append(
            (
                u.name,
                u.klass.value,
                "yes" if u.admin else "-",
                str(u.max_in_flight or "-"),
                str(u.max_queued or "-"),
                ",".join(sorted(u.models)) if u.models is not None else "all",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return 0


def usage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", default=None, help="ISO date or time, epoch seconds, or 24h / 7d back from now")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--url", default=os.environ.get("ONECARD_URL", "http://127.0.0.1:8000"))


def usage(args: argparse.Namespace, admin_key: str | None) -> int:
    import httpx

    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    params = {"since": args.since} if args.since else {}
    try:
        r = httpx.get(
            f"{args.url.rstrip('/')}/admin/usage", params=params, headers=headers, timeout=30, trust_env=False
        )
    except httpx.HTTPError as e:
        print(f"error: cannot reach the gateway at {args.url}: {e}", file=sys.stderr)
        return 1
    if r.status_code != 200:
        try:
            message = r.json().get("error", {}).get("message", r.text)
        except ValueError:
            message = r.text
        print(f"error: {r.status_code}: {message}", file=sys.stderr)
        return 1
    rows: list[dict[str, Any]] = r.json()["usage"]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    cols = (
        "user",
        "model",
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "queue_wait_s",
        "engine_seconds",
        "swaps",
    )
    table = [cols] + [tuple(str(row.get(c, "")) for c in cols) for row in rows]
    widths = [max(len(t[i]) for t in table) for i in range(len(cols))]
    for t in table:
        print("  ".join(c.ljust(w) for c, w in zip(t, widths, strict=True)).rstrip())
    return 0
