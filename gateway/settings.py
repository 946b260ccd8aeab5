"""Gateway settings: one frozen object built by the CLI (or a test) and handed to ``create_app``.

::

    settings = Settings(registry_path=Path("model_registry.yaml"), run_dir=Path(".onecard"))
    app = create_app(settings)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def read_keys(value: str | None) -> frozenset[str]:
    """Keys from a comma-separated string, or from a file when the value is ``@path`` (one key a line)."""
    if not value:
        return frozenset()
    if value.startswith("@"):
        text = Path(value[1:]).expanduser().read_text()
        items = [line.strip() for line in text.splitlines()]
    else:
        items = [k.strip() for k in value.split(",")]
    return frozenset(k for k in items if k and not k.startswith("#"))


@dataclass(frozen=True)
class Settings:
    registry_path: Path
    run_dir: Path = field(default_factory=lambda: Path(os.environ.get("ONECARD_RUN_DIR", ".onecard")))
    host: str = "127.0.0.1"
    port: int = 8000
    executable: str | None = None  # overrides the registry's vllm.executable
    budget_gib: float | None = None  # overrides the registry's gpu.budget_gib
    api_keys: frozenset[str] = frozenset()
    admin_keys: frozenset[str] = frozenset()
    #: The users file (default: ``$ONECARD_USERS``, else ``users.yaml`` in ``run_dir``).
    users_path: Path | None = None
    metrics_public: bool = True
    cors_origins: tuple[str, ...] = ()
    max_body_bytes: int = 32 * 1024 * 1024
    max_admin_body_bytes: int = 64 * 1024
    #: Bodies up to this size are parsed on the event loop (orjson: at most a few ms); larger ones in a
    #: worker process, so that no client's body can stall the others' streams.
    inline_parse_bytes: int = 256 * 1024
    max_head_bytes: int = 64 * 1024
    max_headers: int = 100
    #: How long a client may take to send its request head, pause while sending a body, or leave a
    #: response unread, before its connection is closed (see gateway.http_guard).
    client_timeout_s: float = 30.0
    upstream_connect_timeout_s: float = 10.0
    upstream_read_timeout_s: float = 900.0
    max_connections: int = 2048
    metrics_scrape_s: float = 5.0
    thermal_limit_c: float = 83.0
    thermal_concurrency: int = 8

    @classmethod
    def from_env(cls, registry_path: Path, **overrides: object) -> Settings:
        """Keys from ``ONECARD_API_KEYS`` / ``ONECARD_ADMIN_KEYS`` (comma list or ``@file``), the client
        timeout from ``ONECARD_CLIENT_TIMEOUT_S``."""
        base: dict[str, object] = {
            "api_keys": read_keys(os.environ.get("ONECARD_API_KEYS")),
            "admin_keys": read_keys(os.environ.get("ONECARD_ADMIN_KEYS")),
        }
        if os.environ.get("ONECARD_USERS"):
            base["users_path"] = Path(os.environ["ONECARD_USERS"]).expanduser()
        timeout = os.environ.get("ONECARD_CLIENT_TIMEOUT_S")
        if timeout:
            try:
                seconds = float(timeout)
            except ValueError:
                seconds = float("nan")
            if not seconds > 0:
                raise ValueError(f"ONECARD_CLIENT_TIMEOUT_S={timeout!r}: set it to a number of seconds above 0")
            base["client_timeout_s"] = seconds
        base.update({k: v for k, v in overrides.items() if v is not None})
        return cls(registry_path=registry_path, **base)  # type: ignore[arg-type]

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys or self.admin_keys)
