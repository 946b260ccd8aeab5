"""The root-cause picker over real vLLM 0.32 log tails (``tests/engines/fixtures/``, see its README)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engines.process import CAUSE_LINES, TAIL_LINES
from engines.rootcause import MAX_CAUSE_CHARS, engine_dead, may_be_cause, root_cause

FIXTURES = Path(__file__).parent / "fixtures"

#: fixture -> the line the client and the gateway's log must be told
EXPECTED = {
    "lora-prompt-logprobs-crash.log": "RuntimeError: einsum(): subscript b has size 7 for operand 1 which does not "
    "broadcast with previously seen size 18",
    "bad-flag.log": "vllm: error: unrecognized arguments: --max-model-lenght 512",
    "missing-model-folder.log": "huggingface_hub.errors.HFValidationError: Repo id must be in the form 'repo_name' "
    "or 'namespace/repo_name': '/root/.cache/onecard/demo-models/tiny-llama-c'. Use `repo_type` argument if needed.",
    "kv-cache-too-small-at-start.log": "ValueError: No available memory for the cache blocks. Try increasing "
    "`gpu_memory_utilization` when initializing the engine (this flag also controls CPU memory reservation on the "
    "CPU backend, despite its name). See https://docs.vllm.ai/en/latest/configuration/conserving_memory/ for more "
    "details.",
    "cuda-oom-at-start.log": "ValueError: Free memory on device cuda:0 (9.12/23.55 GiB) on startup is less than "
    "desired GPU memory utilization (0.92, 21.67 GiB). Decrease GPU memory utilization or reduce GPU memory used by "
    "other processes.",
}


def lines(name: str) -> list[str]:
    return (FIXTURES / name).read_text().splitlines()


def as_the_engine_keeps_them(log: list[str], n: int = 30) -> list[str]:
    """What ``EngineProcess.failure_lines`` holds after draining ``log``: the candidate lines (at most
    CAUSE_LINES), then the last ``n`` of its TAIL_LINES tail."""
    causes = [line for line in log if may_be_cause(line)][-CAUSE_LINES:]
    return causes + log[-min(n, TAIL_LINES) :]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_whole_log_names_the_root_cause(name: str) -> None:
    assert root_cause(lines(name)) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_the_lines_an_engine_keeps_name_the_root_cause(name: str) -> None:
    assert root_cause(as_the_engine_keeps_them(lines(name))) == EXPECTED[name]


def test_the_crash_cause_is_far_above_the_tail() -> None:
    """Why the engine keeps candidate lines apart: after the crash, the API server prints a traceback per
    failed request and shutdown noise, far more than the in-memory tail holds."""
    log = lines("lora-prompt-logprobs-crash.log")
    cause_at = max(i for i, line in enumerate(log) if "RuntimeError: einsum()" in line)
    assert len(log) - cause_at > TAIL_LINES
    last = root_cause(log[-TAIL_LINES:])
    assert "einsum" not in last  # the tail alone would tell the client about a wrapper or shutdown noise
    assert any(
        line.endswith("EngineCore encountered an issue. See stack trace (above) for the root cause.") for line in log
    )


def test_wrappers_and_noise_are_passed_over() -> None:
    tail = [
        "(APIServer pid=6) ERROR 12-02 13:44:16 [async_llm.py:906] AsyncLLM output_handler failed.",
        "(APIServer pid=6) ERROR 12-02 13:44:16 [async_llm.py:906] vllm.v1.engine.exceptions.EngineDeadError: "
        "EngineCore encountered an issue. See stack trace (above) for the root cause.",
        "RuntimeError: Engine core initialization failed. See root cause above. Failed core proc(s): {}",
        "  warnings.warn('resource_tracker: There appear to be %d '",
    ]
    assert (
        root_cause([*tail[:1], "(EngineCore pid=7) ERROR 12-02 13:44:16 [core.py:1] KeyError: 'lm_head'", *tail])
        == "KeyError: 'lm_head'"
    )
    # With nothing better, the wrapper itself rather than the shutdown noise.
    assert "EngineCore encountered an issue" in root_cause(tail[:2] + tail[3:])


def test_an_exception_heading_keeps_its_message() -> None:
    tail = [
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig",
        "  Value error, Invalid repository ID or local directory specified: '/models/x' [type=value_error]",
        "    For further information visit https://errors.pydantic.dev/2.12/v/value_error",
    ]
    cause = root_cause(tail)
    assert cause.startswith("pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig Value")
    assert "Invalid repository ID or local directory specified: '/models/x'" in cause


def test_no_error_at_all_gives_the_last_line_and_long_lines_are_cut() -> None:
    assert root_cause([]) == ""
    assert root_cause(["INFO starting", "INFO still starting"]) == "INFO still starting"
    long = root_cause(["RuntimeError: " + "x" * 5000])
    assert len(long) == MAX_CAUSE_CHARS and long.endswith("...")


def test_engine_dead_answers() -> None:
    body = (
        b'{"error":{"message":"EngineCore encountered an issue. See stack trace (above) for the root cause.",'
        b'"type":"InternalServerError","param":null,"code":500}}'
    )  # what the real engine answered
    assert engine_dead(500, body)
    assert not engine_dead(200, body)
    assert not engine_dead(500, b'{"error":{"message":"something else","code":500}}')
