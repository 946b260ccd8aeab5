"""deploy/prometheus and deploy/grafana against what the gateway really exports.

Every PromQL expression (alerts, dashboard) may name only series a ``Metrics`` instance exports; with
``promtool`` on PATH (Debian: ``apt-get install prometheus``) the rules are checked and unit-tested for
real, and with ``prometheus`` a real server scrapes a rendered ``Metrics``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from engines.gpu import GpuReading
from gateway.metrics import Metrics
from tests.gateway.test_metrics import VLLM_METRICS_SAMPLE
from tests.support import ROOT, FakeProbe, free_port

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "onecard-dashboard.json"
PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not on PATH (apt-get install prometheus)")

GPU = GpuReading(
    index=0,
    name="NVIDIA GeForce RTX 4090",
    temperature_c=84.0,
    memory_used_bytes=20 * 1024**3,
    memory_total_bytes=24 * 1024**3,
    power_w=410.0,
    sm_clock_mhz=2400,
    utilization_ratio=0.9,
    clock_event_reasons=frozenset({"sw_thermal_slowdown"}),
    process_memory_bytes={101: 18 * 1024**3},
)


def full_metrics() -> Metrics:
    """A Metrics with every kind of series present: all methods driven, a GPU, one engine's vllm:*."""
    m = Metrics(version="test", gpu_probe=FakeProbe([GPU]), pid_to_model={101: "llama-8b"}.get)
    m.observe_request("llama-8b", 200, 0.5)
    m.observe_error("llama-8b", "engine_failed")
    m.observe_tokens("llama-8b", 100, 50, ttft_s=0.1, decode_s=0.7)
    m.request_started("llama-8b")
    m.set_queue("llama-8b", 2)
    m.observe_queue_wait("llama-8b", 1.5)
    m.set_engine_state("llama-8b", "ready")
    m.observe_swap("llama-8b", "wake", 2.0)
    m.observe_start_failure("llama-8b")
    m.observe_restart("llama-8b")
    m.set_lease(True, 22.0)
    m.set_thermal_limit(True)
    m.set_admission_limit(8)
    m.update_engine_metrics("llama-8b", VLLM_METRICS_SAMPLE)
    return m


SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def exported_names() -> set[str]:
    """Every series name a scrape of the gateway can hold, plus ``up`` (Prometheus adds it)."""
    metrics = full_metrics()
    names = {"up"}
    for family in metrics.registry.collect():  # declared families, with or without samples yet
        if not family.name.startswith("vllm:"):  # re-exported ones: exactly what the render holds
            names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    body, _ = metrics.render()
    for family in text_string_to_metric_families(body.decode()):
        names.update(sample.name for sample in family.samples)
    return names


# -- PromQL metric names ------------------------------------------------------------------------

KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "inf", "nan", "atan2", "start", "end",
}  # fmt: skip
_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_TOKENS = re.compile(
    r"(?P<number>(?:0x[0-9a-fA-F]+|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)(?:ms|[smhdwy])*)"
    r"|(?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)(?P<call>\s*\()?"
)


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers standing alone or before ``{`` / ``[``, not
    functions, keywords, label names in ``{...}`` or ``by (...)``-style clauses, or Grafana variables.

    >>> sorted(metric_names('sum by (model) (rate(a_total{model=~"$model"}[5m])) / on (model) b'))
    ['a_total', 'b']
    """
    text = _STRINGS.sub('""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\[\]]*\]", " ", text)  # ranges and subqueries
    text = re.sub(r"\$\{[^}]*\}|\$\w+", " ", text)  # Grafana variables outside selectors
    text = _GROUPING.sub(" ", text)
    found: set[str] = set()
    for match in _TOKENS.finditer(text):
        ident = match.group("ident")
        if ident and not match.group("call") and ident.lower() not in KEYWORDS:
            found.add(ident)
    return found


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('up{job="onecard"} == 0', {"up"}),
        (
            "histogram_quantile(0.95, sum by (model, le) (rate(onecard_queue_wait_seconds_bucket[5m]))) > 30",
            {"onecard_queue_wait_seconds_bucket"},
        ),
        ("sum(rate(a_total[1m])) by (x) / ignoring(y) group_left(z) b", {"a_total", "b"}),
        ("max by (gpu) (onecard_gpu_utilization_ratio) * 100", {"onecard_gpu_utilization_ratio"}),
        ('rate(vllm:generation_tokens_total{model=~"$model"}[$__rate_interval])', {"vllm:generation_tokens_total"}),
        ("1e3 * foo offset 5m and bar unless baz or 0x1F", {"foo", "bar", "baz"}),
        ('label_replace(foo, "dst", "$1", "src", "(.*)")', {"foo"}),
        ("count without (instance) (foo) > bool 2", {"foo"}),
        ('{__name__="x"} + rate(y[5m:1m])', {"y"}),
        ("max_over_time(deriv(z[10m])[1h:5m])", {"z"}),
    ],
)
def test_metric_name_tokenizer(expr: str, expected: set[str]) -> None:
    assert metric_names(expr) == expected


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def dashboard_exprs() -> list[str]:
    exprs = [target["expr"] for panel in dashboard()["panels"] for target in panel.get("targets", [])]
    for variable in dashboard()["templating"]["list"]:
        query = variable.get("query")
        if variable["type"] == "query":
            text = query["query"] if isinstance(query, dict) else query
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", text.strip())
            exprs.append(match.group(1) if match else text)
    return exprs


def test_alerts_name_only_exported_metrics() -> None:
    exported = exported_names()
    for rule in alert_rules():
        used = metric_names(rule["expr"])
        assert used, rule["alert"]
        assert used <= exported, f"{rule['alert']}: {sorted(used - exported)} are not exported"


def test_dashboard_names_only_exported_metrics() -> None:
    exported = exported_names()
    for expr in dashboard_exprs():
        used = metric_names(expr)
        assert used, expr
        assert used <= exported, f"{expr}: {sorted(used - exported)} are not exported"


def test_the_alerts_asked_for_are_there() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert {
        "OnecardGpuHot",
        "OnecardGpuThermalThrottling",
        "OnecardEngineFailed",
        "OnecardEngineCrashLoop",
        "OnecardQueueWaitHigh",
        "OnecardGatewayDown",
    } <= set(rules)
    assert rules["OnecardGpuHot"]["expr"].endswith(">= 83")
    assert "sw_thermal_slowdown" in rules["OnecardGpuThermalThrottling"]["expr"]
    assert "hw_thermal_slowdown" in rules["OnecardGpuThermalThrottling"]["expr"]
    assert "histogram_quantile(0.95" in rules["OnecardQueueWaitHigh"]["expr"]
    assert 'job="onecard"' in rules["OnecardGatewayDown"]["expr"]
    for rule in rules.values():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_dashboard_shape_and_coverage() -> None:
    board = dashboard()
    panels = board["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    variables = {variable["name"] for variable in board["templating"]["list"]}
    assert {"datasource", "model"} <= variables
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24, panel["title"]
    used = set().union(*(metric_names(expr) for expr in dashboard_exprs()))
    assert {
        "onecard_decode_tokens_per_second",
        "onecard_decode_rate_tokens_per_second_bucket",
        "onecard_requests_total",
        "onecard_request_duration_seconds_bucket",
        "onecard_time_to_first_token_seconds_bucket",
        "onecard_swaps_total",
        "onecard_queue_depth",
        "onecard_queue_wait_seconds_bucket",
        "onecard_engine_state",
        "onecard_gpu_temperature_celsius",
        "onecard_gpu_power_watts",
        "onecard_gpu_memory_used_bytes",
        "onecard_gpu_clock_event_active",
    } <= used


def test_prometheus_config_scrapes_the_gateway_and_loads_the_alerts() -> None:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "onecard"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["localhost:8000"]


# -- promtool -----------------------------------------------------------------------------------


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *args], input=stdin, capture_output=True, text=True, timeout=60, cwd=PROMETHEUS_DIR, check=False
    )


@needs_promtool
def test_promtool_check_config_and_rules() -> None:
    for args in (("check", "config", "prometheus.yml"), ("check", "rules", "alerts.yml")):
        result = promtool(*args)
        assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_test_rules() -> None:
    result = promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_dashboard_promql_parses(tmp_path: Path) -> None:
    """promtool parses every dashboard query as a recording rule (Grafana variables filled in)."""
    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr.replace("$__rate_interval", "1m").replace("$model", ".*")}
        for i, expr in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_lints_the_onecard_series() -> None:
    """Naming lint (units, ``_total``...) of everything onecard declares; vLLM's ``vllm:`` names are
    its own and promtool flags their colons, so they are left out here."""
    body = full_metrics().render()[0].decode()
    ours = "".join(line + "\n" for line in body.splitlines() if "vllm:" not in line)
    result = promtool("check", "metrics", stdin=ours)
    assert result.returncode == 0, result.stdout + result.stderr


# -- a real Prometheus scraping a rendered Metrics ----------------------------------------------


@pytest.fixture
def metrics_server() -> Iterator[tuple[int, Metrics]]:
    metrics = full_metrics()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body, content_type = metrics.render()
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], metrics
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not on PATH (apt-get install prometheus)")
def test_real_prometheus_scrapes_every_kind_of_series(tmp_path: Path, metrics_server: tuple[int, Metrics]) -> None:
    assert PROMETHEUS is not None
    port, _ = metrics_server
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    job["scrape_interval"], job["scrape_timeout"] = "1s", "1s"
    config["rule_files"] = [str(ALERTS)]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    web = free_port()
    process = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{web}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "prometheus.log").open("w"),
    )
    try:

        def query(promql: str) -> list[dict[str, Any]]:
            response = httpx.get(f"http://127.0.0.1:{web}/api/v1/query", params={"query": promql}, timeout=5)
            response.raise_for_status()
            result: list[dict[str, Any]] = response.json()["data"]["result"]
            return result

        deadline = time.monotonic() + 30
        up: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            try:
                up = query('up{job="onecard"}')
            except httpx.HTTPError:
                up = []
            if up and up[0]["value"][1] == "1":
                break
            time.sleep(0.3)
        assert up and up[0]["value"][1] == "1", (tmp_path / "prometheus.log").read_text()[-3000:]

        def one(promql: str) -> float:
            (series,) = query(promql)
            return float(series["value"][1])

        assert one('onecard_requests_total{model="llama-8b",status="200"}') == 1
        assert one('onecard_engine_state{model="llama-8b",state="ready"}') == 1
        assert one('onecard_gpu_temperature_celsius{gpu="0"}') == 84
        assert one('onecard_gpu_clock_event_active{gpu="0",reason="sw_thermal_slowdown"}') == 1
        assert one('vllm:generation_tokens_total{model="llama-8b",model_name="smollm2-360m"}') == 11392
        assert one('vllm:time_to_first_token_seconds_bucket{model="llama-8b",le="0.25"}') == 129
        p50 = one('histogram_quantile(0.5, vllm:time_to_first_token_seconds_bucket{model="llama-8b"})')
        assert 0.1 < p50 <= 0.25
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
