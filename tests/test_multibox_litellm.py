"""Scale-out on LiteLLM, for real: the shipped router config in a real LiteLLM proxy (its own cached venv)
in front of two ``onecard`` gateways on loopback with stand-in engines, as in docs/multi-box.md.

Box A registers the judge and a candidate that cannot share its card; box B registers the candidate. A
judge loop through the router alternates candidate and judge: each name must reach its own box only, and
neither box swaps (each engine starts once, box A's candidate never).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.real.tool_envs import LITELLM_PROXY, setup_tool
from tests.support import ServerThread, free_port, running_gateway, standin_executable, standin_model, write_registry

pytestmark = pytest.mark.timeout(900)

ROUTER = Path(__file__).resolve().parents[1] / "deploy" / "multi-box" / "litellm-router.yaml"
CANDIDATE, JUDGE = "llama-3.1-8b-fp8", "llama-3.1-70b-awq"  # the names of deploy/kubernetes/registries
MASTER_KEY = "sk-onecard-test-" + "0" * 32


@pytest.fixture
def boxes(tmp_path: Path) -> Iterator[tuple[ServerThread, ServerThread]]:
    exe = standin_executable(tmp_path)
    box_a = write_registry(
        tmp_path / "box-a.yaml",
        [standin_model(CANDIDATE, aliases=["candidate"]), standin_model(JUDGE, aliases=["judge"])],
        executable=exe,
        budget_gib=1.5,  # one of the two at a time: a request for the other is a swap
    )
    box_b = write_registry(tmp_path / "box-b.yaml", [standin_model(CANDIDATE, aliases=["candidate"])], executable=exe)
    with running_gateway(box_a, tmp_path / "run-a") as a, running_gateway(box_b, tmp_path / "run-b") as b:
        yield a, b


@pytest.fixture
def router(boxes: tuple[ServerThread, ServerThread], tmp_path: Path) -> Iterator[str]:
    python = setup_tool(LITELLM_PROXY)
    text = ROUTER.read_text()
    text = text.replace("http://gpu-box-a:8000/v1", boxes[0].url + "/v1")
    text = text.replace("http://gpu-box-b:8000/v1", boxes[1].url + "/v1")
    config = tmp_path / "router.yaml"
    config.write_text(text)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(
        ONECARD_KEY_BOX_A="none",
        ONECARD_KEY_BOX_B="none",
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_MASTER_KEY=MASTER_KEY,
    )  # recent LiteLLM proxies refuse to start without one
    log = (tmp_path / "litellm.log").open("wb")
    proc = subprocess.Popen(
        [str(python.parent / "litellm"), "--config", str(config), "--host", "127.0.0.1", "--port", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "litellm.log").read_text()[-4000:]
            try:
                if httpx.get(url + "/health/liveliness", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            raise AssertionError("LiteLLM did not start: " + (tmp_path / "litellm.log").read_text()[-4000:])
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def counts(box: ServerThread, name: str) -> dict[str, float]:
    """Per model, the samples of ``name`` summed over its other labels."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(box.url + "/metrics").text):
        for s in family.samples:
            if s.name == name:
                out[s.labels["model"]] = out.get(s.labels["model"], 0) + s.value
    return out


def test_the_router_sends_each_model_to_its_box_and_no_box_swaps(
    boxes: tuple[ServerThread, ServerThread], router: str
) -> None:
    box_a, box_b = boxes
    client = openai.OpenAI(base_url=router + "/v1", api_key=MASTER_KEY, max_retries=0, timeout=120)
    rounds = 6
    for i in range(rounds):  # the Friday judge loop: answer, then grade, one item at a time
        answer = client.chat.completions.create(
            model="candidate", messages=[{"role": "user", "content": f"item {i}"}], max_tokens=4
        )
        verdict = client.chat.completions.create(
            model="judge",
            messages=[{"role": "user", "content": f"grade: {answer.choices[0].message.content}"}],
            max_tokens=2,
        )
        assert answer.choices[0].message.content and verdict.choices[0].message.content
    # (LiteLLM answers with the name the client sent; the boxes' own counts say who served what.)
    requests_a, requests_b = counts(box_a, "onecard_requests_total"), counts(box_b, "onecard_requests_total")
    assert requests_a == {JUDGE: rounds}, requests_a
    assert requests_b == {CANDIDATE: rounds}, requests_b
    swaps_a, swaps_b = counts(box_a, "onecard_swaps_total"), counts(box_b, "onecard_swaps_total")
    assert swaps_a == {JUDGE: 1} and swaps_b == {CANDIDATE: 1}, (swaps_a, swaps_b)  # one cold start each
    assert box_a.gw.pool.owner.engines[CANDIDATE].pid is None  # box A never started its candidate
    assert yaml.safe_load(ROUTER.read_text())["router_settings"]["num_retries"] == 0
