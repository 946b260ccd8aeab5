"""``create_app(settings)``: the FastAPI app. The lifespan opens the shared httpx client (control plane),
the shared engine client (data path), the metrics and the engine manager, and closes them in reverse
order (stopping every engine first).

::

    app = create_app(Settings(registry_path=Path("model_registry.yaml")))
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from importlib.metadata import PackageNotFoundError, version

import httpx
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from engines.errors import OnecardError
from engines.pool import (
    EnginePool,
    EngineState,
    GpuProbe,
    NvmlProbe,
    ThermalGuard,
    card_total_gib,
    source_record,
    vllm_version_of,
)
from engines.registry import Registry, load_registry
from gateway import console
from gateway.api import admin, openai, vllm_routes
from gateway.api.relay_asgi import GatewayApp, RelayRoutes
from gateway.auth import KeyAuth
from gateway.bodies import AdminBodyLimit, BodyParser
from gateway.context import Admission, Gateway, MetricsEvents
from gateway.engine_http import EngineClient
from gateway.errors import BadRequest, error_body, error_response
from gateway.metrics import Metrics
from gateway.proxy import Proxy
from gateway.settings import Settings
from gateway.usage import Usage
from gateway.users import People, share_limits, users_path

log = logging.getLogger(__name__)

#: How long the start waits for the vLLM version (a Python entry point answers in well under a second;
#: a wrapper run with ``--version`` may take longer, and fills the version in when it answers).
VERSION_WAIT_S = 10.0


def onecard_version() -> str:
    try:
        return version("onecard")
    except PackageNotFoundError:
        return "0.0.0"


#: How long an idle connection to an engine is kept: under the engines' own keep-alive (5 s in uvicorn,
#: which vLLM serves on), so the gateway never sends a request on a connection the engine is closing.
ENGINE_KEEPALIVE_S = 4.0


def make_client(settings: Settings) -> httpx.AsyncClient:
    """The control plane's client to the engines (health, readiness probe, sleep/wake, LoRA, metrics
    scrape; each call sets its own timeout): httpx's default pool, no proxies from the environment.

    httpx's per-request INFO log line is turned off: it says nothing the gateway's own logs and
    metrics do not, and the metrics scrape would repeat it every few seconds per engine.
    """
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=settings.upstream_connect_timeout_s),
                             trust_env=False)


def make_session(settings: Settings) -> EngineClient:
    """The data path's one shared client: client requests relayed to the engines (:class:`Proxy`).

    :mod:`gateway.engine_http`, not aiohttp's or httpx's client, because it costs a third of aiohttp's
    CPU per relayed request (benchmarks/README.md, gateway_overhead).

    - Limits: at most ``settings.max_connections`` connections in use, over all engines (a request
      waits for a free one, without limit); idle ones are kept :data:`ENGINE_KEEPALIVE_S` seconds.
    - Timeouts: ``upstream_connect_timeout_s`` to open a connection; ``upstream_read_timeout_s`` for
      each read (the response head, then every piece of the body); no limit on a whole request, so
      a stream lasts as long as the engine generates. Either timeout is a 502 "did not answer in time".
    - Faithful relay: no proxies from the environment, no cookies, no decompression, and no headers of
      its own beyond Host, Content-Type, Content-Length and Accept.
    """
    return EngineClient(limit=settings.max_connections, connect_timeout=settings.upstream_connect_timeout_s,
                        read_timeout=settings.upstream_read_timeout_s, keepalive_s=ENGINE_KEEPALIVE_S)


def create_app(settings: Settings, *, registry: Registry | None = None, gpu_probe: GpuProbe | None = None) -> FastAPI:
    reg = registry or load_registry(settings.registry_path)
    people = People(users_path(settings.run_dir, settings.users_path), api_keys=settings.api_keys,
                    admin_keys=settings.admin_keys)  # UsersError: a users file that cannot be used

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Everything opened here is closed in reverse order on shutdown, or if the start fails half-way:
        # the watchers, then the engines (whose in-flight requests still use the session), the
        # session, the client, the GPU probe.
        async with contextlib.AsyncExitStack() as stack:
            probe = gpu_probe if gpu_probe is not None else NvmlProbe.open()
            close_probe = getattr(probe, "close", None)
            if close_probe is not None:
                stack.callback(close_probe)
            client = await stack.enter_async_context(make_client(settings))
            session = await stack.enter_async_context(make_session(settings))
            pools: list[EnginePool] = []  # the pool, once made: the metrics name GPU processes by it
            metrics = Metrics(version=onecard_version(), gpu_probe=probe,
                              pid_to_model=lambda pid: pools[0].model_of_pid(pid) if pools else None)
            usage = Usage(settings.run_dir / "usage.sqlite3", registry=metrics.registry, users=people.label_names)
            stack.push_async_callback(usage.close)  # after the engines stop: their last requests are counted
            pool = EnginePool(
                reg,
                client=client,
                run_dir=settings.run_dir,
                executable=settings.executable,
                budget_gib=settings.budget_gib,
                events=MetricsEvents(metrics, usage),
                gpu_probe=probe,
                card_total_gib=await asyncio.to_thread(card_total_gib, probe),  # vLLM's shares are of this
            )
            stack.push_async_callback(pool.close)
            pool.set_share_limits(*share_limits(people.users))
            people.on_change.append(lambda users: pool.set_share_limits(*share_limits(users)))
            pools.append(pool)
            for name in (m.name for m in reg.models):
                metrics.set_engine_state(name, EngineState.STOPPED.value)
            bodies = BodyParser(settings.inline_parse_bytes)
            stack.callback(bodies.close)
            gw = Gateway(settings=settings, registry=reg, client=client, session=session, metrics=metrics,
                         pool=pool, proxy=Proxy(session, metrics), admission=Admission(), bodies=bodies,
                         people=people, usage=usage)
            app.state.gw = gw
            version = asyncio.create_task(read_vllm_version(gw), name="vllm-version")
            stack.push_async_callback(cancel_all, [version])
            for spec in reg.models:
                gw.provenance[spec.name] = await asyncio.to_thread(source_record, reg, spec)
            killed = await pool.start()
            if killed:
                log.warning("cleaned up %d leftover engine process(es) of an earlier run", len(killed))
            tasks = [
                asyncio.create_task(scrape_engines(gw), name="scrape-engines"),
                asyncio.create_task(watch_gpu(gw, probe), name="watch-gpu"),
                asyncio.create_task(usage.run(), name="usage-writer"),
            ]
            stack.push_async_callback(cancel_all, tasks)
            await asyncio.wait({version}, timeout=VERSION_WAIT_S)
            yield

    # FastAPI's own OpenTelemetry would look its providers up on every request: the gateway exports
    # Prometheus metrics instead.
    app = GatewayApp(title="onecard", version=onecard_version(), lifespan=lifespan,
                  telemetry={"tracing": False, "metrics": False, "logs": False},
                  docs_url=None, redoc_url=None)
    app.include_router(openai.router)
    app.include_router(vllm_routes.router)
    app.include_router(admin.router)
    app.include_router(console.router)
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json")

    @app.get("/version")
    async def version_route() -> Response:
        return Response(orjson.dumps({"version": onecard_version(), "name": "onecard"}),
                        media_type="application/json")

    @app.get("/metrics")
    async def metrics_route(request: Request) -> Response:
        gw: Gateway = request.app.state.gw
        body, content_type = await asyncio.to_thread(gw.metrics.render)
        return Response(body, media_type=content_type)

    if settings.cors_origins:  # the relay's answers need CORS headers: it goes through the middleware
        app.add_middleware(RelayRoutes)  # innermost: the key check and the body limits apply to it
    else:  # served before the middleware, with the same key check
        app.relay_gate = KeyAuth(app, settings=settings, people=people)
    app.add_middleware(AdminBodyLimit, limit=settings.max_admin_body_bytes)
    app.add_middleware(KeyAuth, settings=settings, people=people)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])
    return app


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OnecardError)
    async def onecard_error(request: Request, exc: OnecardError) -> Response:
        gw: Gateway | None = getattr(request.app.state, "gw", None)
        return error_response(exc, plan=gw.pool.plan if gw is not None else None)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x not in ("body", "query", "path"))
        return error_response(BadRequest(f"invalid {loc or 'request'}: {first.get('msg', 'bad value')}",
                                         param=loc or None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return Response(error_body(str(exc.detail), type_="invalid_request_error", code=code),
                        status_code=exc.status_code, media_type="application/json")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s", request.url.path)
        return error_response(exc)


async def read_vllm_version(gw: Gateway) -> None:
    """Read the vLLM version once from the engines' executable, off the event loop, for every model card."""
    executable = gw.pool.executable
    found = await asyncio.to_thread(vllm_version_of, executable, env=dict(gw.registry.vllm.env))
    if found is None:
        log.warning("could not tell the vLLM version of %s; models show it once their engine reports it", executable)
    gw.set_vllm_version(found)


async def cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def scrape_engines(gw: Gateway) -> None:
    """Every few seconds, read each ready engine's ``/metrics`` and re-export it with a model label."""
    while True:
        await asyncio.sleep(gw.settings.metrics_scrape_s)
        for name in [m.name for m in gw.registry.models]:
            text = await gw.pool.metrics_text(name)
            if text is None:
                if gw.pool.state(name) not in (EngineState.READY, EngineState.DRAINING, EngineState.SLEEPING):
                    gw.metrics.forget_engine_metrics(name)
                continue
            try:
                await asyncio.to_thread(gw.metrics.update_engine_metrics, name, text)
            except ValueError as e:
                log.warning("engine %s: unreadable /metrics: %s", name, e)


async def watch_gpu(gw: Gateway, probe: GpuProbe) -> None:
    """Thermal guard: above the limit, lower admitted concurrency; restore it once cool."""
    guard = ThermalGuard(limit_c=gw.settings.thermal_limit_c)
    while True:
        readings = await asyncio.to_thread(probe.read)
        if not readings:
            return  # no GPU: nothing to watch
        hot = guard.update(readings)
        limit = gw.settings.thermal_concurrency if hot else None
        if limit != gw.admission.limit:
            await gw.admission.set_limit(limit)
            gw.metrics.set_thermal_limit(hot)
            gw.metrics.set_admission_limit(limit or 0)
        await asyncio.sleep(2.0)
