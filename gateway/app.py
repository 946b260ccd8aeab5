"""``create_app(settings)``: the FastAPI app. The lifespan opens the shared httpx client, the metrics
and the engine manager, and closes them in reverse order (stopping every engine).

::

    app = create_app(Settings(registry_path=Path("model_registry.yaml")))
    uvicorn.run(app, host="127.0.0.1", port=8000)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from importlib.metadata import PackageNotFoundError, version

import httpx
import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response

from engines.engine import Engine
from engines.errors import OnecardError
from engines.gpu import GpuProbe, NvmlProbe, ThermalGuard
from engines.manager import EngineManager
from engines.provenance import source_record
from engines.registry import Registry, load_registry
from engines.state import EngineState
from gateway.api import admin, openai
from gateway.auth import KeyAuth
from gateway.context import Admission, Gateway, MetricsEvents
from gateway.errors import BadRequest, error_body, error_response
from gateway.metrics import Metrics
from gateway.proxy import EngineTransport, Proxy
from gateway.settings import Settings

log = logging.getLogger(__name__)


def onecard_version() -> str:
    try:
        return version("onecard")
    except PackageNotFoundError:
        return "0.0.0"


def make_client(settings: Settings) -> httpx.AsyncClient:
    """The one shared client to the engines: explicit pool limits and timeouts, no proxies from env.

    Its transport keeps httpx's request/response API and errors but pools connections in O(1) per
    request (:class:`gateway.proxy.EngineTransport`; httpcore's own pool is quadratic in the
    connections it holds). httpx's per-request INFO log line is turned off: at hundreds of requests a
    second it costs CPU on the hot path and says nothing the gateway's own metrics do not.
    """
    logging.getLogger("httpx").setLevel(logging.WARNING)
    limits = httpx.Limits(max_connections=settings.max_connections,
                          max_keepalive_connections=settings.max_connections, keepalive_expiry=30)
    return httpx.AsyncClient(
        transport=EngineTransport(limits),
        timeout=httpx.Timeout(connect=settings.upstream_connect_timeout_s,
                              read=settings.upstream_read_timeout_s, write=60.0, pool=None),
        trust_env=False,
    )


def create_app(settings: Settings, *, registry: Registry | None = None, gpu_probe: GpuProbe | None = None) -> FastAPI:
    reg = registry or load_registry(settings.registry_path)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        probe = gpu_probe if gpu_probe is not None else NvmlProbe.open()
        client = make_client(settings)
        engines: dict[str, Engine] = {}
        metrics = Metrics(version=onecard_version(), gpu_probe=probe, pid_to_model=pid_lookup(engines))
        manager = EngineManager(
            reg,
            client=client,
            run_dir=settings.run_dir,
            executable=settings.executable,
            budget_gib=settings.budget_gib,
            events=MetricsEvents(metrics),
            gpu_probe=probe,
        )
        engines.update(manager.engines)
        for name in manager.engines:
            metrics.set_engine_state(name, EngineState.STOPPED.value)
        gw = Gateway(settings=settings, registry=reg, client=client, metrics=metrics, manager=manager,
                     proxy=Proxy(client, metrics), admission=Admission())
        app.state.gw = gw
        for spec in reg.models:
            gw.provenance[spec.name] = await asyncio.to_thread(source_record, reg, spec)
        killed = await manager.start()
        if killed:
            log.warning("cleaned up %d leftover engine process(es) of an earlier run", len(killed))
        tasks = [
            asyncio.create_task(scrape_engines(gw), name="scrape-engines"),
            asyncio.create_task(watch_gpu(gw, probe), name="watch-gpu"),
        ]
        try:
            yield
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await manager.close()
            await client.aclose()
            close = getattr(probe, "close", None)
            if close is not None:
                close()

    app = FastAPI(title="onecard", version=onecard_version(), lifespan=lifespan,
                  docs_url=None, redoc_url=None)
    app.include_router(openai.router)
    app.include_router(admin.router)
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

    app.add_middleware(KeyAuth, settings=settings)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["*"],
                           allow_headers=["*"])
    return app


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(OnecardError)
    async def onecard_error(request: Request, exc: OnecardError) -> Response:
        gw: Gateway | None = getattr(request.app.state, "gw", None)
        return error_response(exc, plan=gw.manager.plan if gw is not None else None)

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


def pid_lookup(engines: dict[str, Engine]) -> Callable[[int], str | None]:
    """Which model an engine process (by pid) belongs to, for per-process GPU memory."""

    def lookup(pid: int) -> str | None:
        for name, engine in engines.items():
            if engine.pid == pid:
                return name
        return None

    return lookup


async def scrape_engines(gw: Gateway) -> None:
    """Every few seconds, read each ready engine's ``/metrics`` and re-export it with a model label."""
    while True:
        await asyncio.sleep(gw.settings.metrics_scrape_s)
        for name, engine in list(gw.manager.engines.items()):
            if engine.state not in (EngineState.READY, EngineState.SLEEPING):
                gw.metrics.forget_engine_metrics(name)
                continue
            try:
                text = await engine.api.metrics_text()
            except httpx.HTTPError:
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
