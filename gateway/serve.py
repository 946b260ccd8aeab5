"""Running the gateway: ``serve`` (any registry), ``demo`` (tiny CPU models, built on first run), ``ps``.

::

    serve(Settings(registry_path=Path("model_registry.yaml"), port=8000))
    demo(port=8000)     # sets up the CPU engine and tiny models on first run, then serves them
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import uvicorn
import yaml
from starlette.types import ASGIApp

from gateway.auth import is_loopback_host
from gateway.http_guard import ClientLimits, guarded_protocol
from gateway.settings import Settings

log = logging.getLogger(__name__)

#: No two tiny models can be resident together under this budget (each plans at about 1 GiB on the CPU).
DEMO_BUDGET_GIB = 1.5


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def server_config(app: ASGIApp, settings: Settings, *, log_level: str = "info") -> uvicorn.Config:
    """How the gateway is served: uvloop, uvicorn's httptools protocol with the client limits of
    :mod:`gateway.http_guard` (head size, count and deadline, body progress, stalled readers)."""
    limits = ClientLimits(max_head_bytes=settings.max_head_bytes, max_headers=settings.max_headers,
                          timeout_s=settings.client_timeout_s)
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        timeout_graceful_shutdown=30,
        access_log=False,
        loop="uvloop",
        http=guarded_protocol(limits),
    )


def exposure_warning(settings: Settings, *, users_named: bool = False) -> str | None:
    """What to warn about when the gateway is reachable from other machines with no keys (a users file
    that names anyone gives keys)."""
    if settings.auth_enabled or users_named or is_loopback_host(settings.host):
        return None
    return (f"serving on {settings.host} with no keys: anyone who can reach port {settings.port} can use every "
            "model (admin routes stay limited to this machine); set ONECARD_API_KEYS and ONECARD_ADMIN_KEYS, "
            "or bind 127.0.0.1 behind a proxy that authenticates")


def serve(settings: Settings, *, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests get a grace period, then every engine stops."""
    from gateway.app import create_app

    configure_logging(log_level.upper())
    from engines.pool import load_users
    from gateway.users import users_path

    named = load_users(users_path(settings.run_dir, settings.users_path)).named
    warning = exposure_warning(settings, users_named=named)
    if warning:
        log.warning("%s", warning)
    app = create_app(settings)
    uvicorn.Server(server_config(app, settings, log_level=log_level)).run()


#: The demo's registry names: what each is for (the README and docs/recipes.md say the same).
DEMO_CANDIDATE = "tiny-llama"  # alias candidate: answers, evals (loglikelihood batches included)
DEMO_JUDGE = "tiny-llama-b"  # alias judge: grades, evals
DEMO_LORA_BASE = "tiny-llama-lora"  # the same weights as tiny-llama, with LoRA enabled: serves tiny-lora
DEMO_ADAPTER = "tiny-lora"

#: vLLM 0.32's CPU LoRA path cannot run a batch of several sequences that ask for prompt logprobs:
#: ``vllm/lora/punica_wrapper/punica_cpu.py`` ``add_lora_logits`` calls ``bgmv_shrink``
#: (``vllm/lora/ops/torch_ops/lora_ops.py``), whose ``einsum("bi, boi -> bo")`` gets one row per prompt
#: token but one LoRA per sequence, and the EngineCore dies ("subscript b has size 2 for operand 1 which
#: does not broadcast with previously seen size 12"). One sequence per step makes the LoRA broadcast over
#: that sequence's tokens, which is what it should apply to, so the LoRA engine runs them one at a time.
DEMO_LORA_EXTRA_ARGS = ("--max-num-seqs", "1")


def demo_registry(path: Path, *, models_dir: Path, executable: Path, adapters_dir: Path | None = None) -> Path:
    """A registry of the tiny CPU models: two bases that cannot share the budget (``candidate``, ``judge``),
    and ``tiny-llama-lora``, the candidate's weights with LoRA enabled, serving the adapter ``tiny-lora``.

    LoRA lives on an engine of its own so that the candidate and the judge take any batch an eval sends.
    New adapter folders dropped into ``adapters_dir`` (default: next to the registry) are served by their
    folder name within seconds, on ``tiny-llama-lora``.
    """
    adapters_dir = adapters_dir or path.parent / "adapters"
    adapters_dir.mkdir(parents=True, exist_ok=True)

    def tiny(name: str, folder: str, **more: Any) -> dict[str, Any]:
        return {"name": name, **more, "source": str(models_dir / folder), "dtype": "float32", "max_model_len": 512,
                "start_timeout_s": 180}

    data: dict[str, Any] = {
        "gpu": {"budget_gib": DEMO_BUDGET_GIB, "headroom_gib": 0.0, "platform": "cpu"},
        "vllm": {"executable": str(executable)},
        "scheduler": {"max_wait_s": 30, "max_queue": 256, "keepalive_s": 10},
        "models": [
            tiny(DEMO_CANDIDATE, "tiny-llama", aliases=["candidate"]),
            tiny(DEMO_JUDGE, "tiny-llama-b", aliases=["judge"]),
            {
                **tiny(DEMO_LORA_BASE, "tiny-llama"),
                "extra_args": list(DEMO_LORA_EXTRA_ARGS),
                "lora": {
                    "enabled": True,
                    "max_rank": 8,
                    "max_loras": 2,
                    "adapters": {DEMO_ADAPTER: {"path": str(models_dir / "tiny-lora"), "rank": 8}},
                    "watch_dirs": [str(adapters_dir)],
                },
            },
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# The demo registry: tiny random-weight models built locally for a machine without a GPU.\n"
        "# candidate and judge take any batch (evals included); tiny-llama-lora serves the LoRA adapters.\n"
        + yaml.safe_dump(data, sort_keys=False)
    )
    return path


def prepare_demo(home: Path | None = None, *, run_dir: Path) -> Path:
    """Set up the CPU vLLM environment and the tiny models (cached), write the demo registry."""
    from engines.pool import build_demo_models, default_home, setup_cpu_engine

    home = home or default_home()
    executable = setup_cpu_engine(home)
    models = build_demo_models(home / "demo-models")
    return demo_registry(run_dir / "demo_registry.yaml", models_dir=models.base.parent, executable=executable)


def demo(*, host: str = "127.0.0.1", port: int = 8000, run_dir: Path | None = None,
         users: Path | None = None) -> None:
    run_dir = run_dir or Path(os.environ.get("ONECARD_RUN_DIR", ".onecard"))
    print("onecard demo: preparing the CPU engine and tiny models (only the first run takes minutes)...", flush=True)
    registry = prepare_demo(run_dir=run_dir)
    url = f"http://{host}:{port}"
    print(
        f"\nonecard demo: serving {registry} at {url}/v1\n"
        f"  models:  curl {url}/v1/models\n"
        f"  try:     curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        '             -d \'{"model": "candidate", "messages": [{"role": "user", "content": "Hello"}],'
        ' "max_tokens": 16}\'\n'
        f"  names:   candidate ({DEMO_CANDIDATE}) and judge ({DEMO_JUDGE}): chat, judging, evals;\n"
        f"           {DEMO_ADAPTER}: a LoRA adapter, served by {DEMO_LORA_BASE}\n"
        "  (the first request to a model starts its engine: about 20-40 s on a CPU)\n",
        flush=True,
    )
    serve(Settings.from_env(registry, host=host, port=port, run_dir=run_dir, users_path=users))


def ps(url: str, *, admin_key: str | None = None) -> str:
    """The engines table of a running gateway."""
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    r = httpx.get(f"{url.rstrip('/')}/admin/engines", headers=headers, timeout=10, trust_env=False)
    r.raise_for_status()
    data = r.json()
    cols = ("model", "state", "pid", "port", "uptime_s", "in_flight", "queued", "footprint_gib", "adapters")
    rows = [cols] + [
        tuple(
            "-" if row.get(c) in (None, [], "") else (",".join(row[c]) if isinstance(row[c], list) else str(row[c]))
            for c in cols
        )
        for row in data["engines"]
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    for lease in data.get("leases", []):
        lines.append(
            f"lease {lease.get('id')}: {lease.get('gib')} GiB held by pid {lease.get('pid')} ({lease.get('state')})"
        )
    if data.get("reserved_gib"):
        lines.append(f"reserved by leases: {data['reserved_gib']} GiB")
    return "\n".join(lines)
