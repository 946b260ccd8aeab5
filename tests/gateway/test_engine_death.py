"""An engine whose EngineCore dies under a batch: every client in flight hears the root cause (502), the
gateway logs it, and a batch that kills the engine again and again is reported as a crash loop.

The stand-in engine's ``STANDIN_DIE_IN_BATCH`` dies the way vLLM 0.32's CPU build does under a batch of
prompt-logprob requests on a LoRA-enabled engine: a traceback ending in a RuntimeError, then hundreds of
lines of per-request tracebacks, a 500 "EngineCore encountered an issue" to every request in flight, and
an exit with code 0 (``tests/engines/fixtures/lora-prompt-logprobs-crash.log`` is the real thing).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from engines.state import EngineState
from tests.support import running_gateway, standin_executable, standin_model, write_registry

pytestmark = pytest.mark.timeout(120)

BATCH = 4
CAUSE = f"RuntimeError: einsum(): subscript b has size {BATCH} for operand 1"


def loglikelihood_batch(url: str, model: str, n: int = BATCH) -> list[httpx.Response]:
    """``n`` concurrent lm-eval-style loglikelihood requests (token ids, echo, logprobs, one token)."""

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as c:
            return list(
                await asyncio.gather(
                    *(
                        c.post(
                            url + "/v1/completions",
                            json={
                                "model": model,
                                "prompt": [1, 2, 3 + i],
                                "echo": True,
                                "logprobs": 1,
                                "max_tokens": 1,
                                "temperature": 0,
                            },
                        )
                        for i in range(n)
                    )
                )
            )

    return asyncio.run(run())


def registry(tmp_path: Path) -> Path:
    env = {"STANDIN_DIE_IN_BATCH": str(BATCH), "STANDIN_FIRST_TOKEN_DELAY": "0.3"}
    return write_registry(
        tmp_path / "reg.yaml",
        [standin_model("m", env=env), standin_model("other")],
        executable=standin_executable(tmp_path),
        budget_gib=2.5,
    )


def error_of(r: httpx.Response) -> dict[str, Any]:
    error: dict[str, Any] = r.json()["error"]
    return error


def test_every_client_in_a_killing_batch_gets_a_502_naming_the_root_cause(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR)
    with running_gateway(registry(tmp_path), tmp_path / "run") as server:
        url = server.url
        for model in ("m", "other"):
            assert httpx.post(f"{url}/admin/engines/{model}/load", timeout=60).status_code == 200
        assert [r.status_code for r in loglikelihood_batch(url, "m", BATCH - 1)] == [200] * (BATCH - 1)

        answers = loglikelihood_batch(url, "m")
        for r in answers:
            assert r.status_code == 502, r.text
            err = error_of(r)
            assert err["code"] == "engine_failed" and err["type"] == "engine_error", err
            assert err["message"].startswith("model m: its EngineCore died while serving this request; cause: "), err
            assert CAUSE in err["message"], err
            assert "See stack trace" not in err["message"], err
        # The gateway's log says the same, once for the request path and once for the exit.
        logged = [rec.getMessage() for rec in caplog.records if CAUSE in rec.getMessage()]
        assert any("its EngineCore died" in m for m in logged), logged
        assert any("the engine exited (code 0) while serving; cause: " + CAUSE in m for m in logged), logged
        assert sum("its EngineCore died" in m for m in logged) == 1  # once per death, not once per request
        # Nothing else was lost: the other model serves, and m comes back after its backoff.
        assert [r.status_code for r in loglikelihood_batch(url, "other")] == [200] * BATCH
        engine = server.gw.pool.owner.engines["m"]
        assert engine.state is EngineState.FAILED
        deadline = time.monotonic() + 30
        while (
            r := httpx.post(url + "/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2}, timeout=60)
        ).status_code == 503:
            assert time.monotonic() < deadline, r.text
            assert CAUSE in error_of(r)["message"], r.text  # the backoff refusal names the cause too
            time.sleep(float(r.headers["retry-after"]))
        assert r.status_code == 200, r.text


def test_a_batch_that_kills_the_engine_every_time_is_a_crash_loop(tmp_path: Path) -> None:
    with running_gateway(registry(tmp_path), tmp_path / "run") as server:
        url = server.url
        engine = server.gw.pool.owner.engines["m"]
        deaths = 0
        deadline = time.monotonic() + 60
        while deaths < 3:  # the client retries the same batch, as lm-eval does
            assert time.monotonic() < deadline
            answers = loglikelihood_batch(url, "m")
            codes = {r.status_code for r in answers}
            if codes == {503}:  # refused during the backoff
                assert deaths > 0 and error_of(answers[0])["code"] == "engine_crash_loop"
                time.sleep(float(answers[0].headers["retry-after"]))
                continue
            assert codes == {502}, [r.text for r in answers]
            assert all(CAUSE in error_of(r)["message"] for r in answers)
            deaths += 1
            while engine.state is not EngineState.FAILED:
                time.sleep(0.05)

        # Held failed, with the count and the cause, instead of restarting in front of the same batch.
        r = loglikelihood_batch(url, "m", 1)[0]
        assert r.status_code == 503, r.text
        err = error_of(r)
        assert err["code"] == "engine_crash_loop", err
        assert "model m failed 3 times in" in err["message"] and "it died while serving each time" in err["message"]
        assert "a crash loop" in err["message"] and CAUSE in err["message"], err
        assert int(r.headers["retry-after"]) > 250  # the hold: RestartPolicy.loop_window_s (300 s)
        row = next(e for e in httpx.get(url + "/admin/engines", timeout=10).json()["engines"] if e["model"] == "m")
        assert row["state"] == "failed" and "failed 3 times" in row["last_error"] and CAUSE in row["last_error"]
        assert engine.pid is not None and engine.process is not None and engine.process.returncode is not None
