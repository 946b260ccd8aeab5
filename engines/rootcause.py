"""Why did an engine fail? Pick the root-cause line out of a vLLM log tail.

vLLM wraps the real error in generic ones: a crash in the EngineCore process prints its traceback (the
``RuntimeError`` that says what went wrong), then the API server fails every request with
``EngineDeadError: EngineCore encountered an issue. See stack trace (above) for the root cause.`` and
shuts down, printing shutdown noise after it. A failed start ends with ``RuntimeError: Engine core
initialization failed. See root cause above.``. The client cannot see the stack trace, so the gateway
hands on the line that names the cause::

    >>> root_cause([
    ...     "(EngineCore_DP0 pid=7) ERROR 12-02 13:40:01 [core.py:1021] EngineCore encountered a fatal error.",
    ...     "(EngineCore_DP0 pid=7) Traceback (most recent call last):",
    ...     '(EngineCore_DP0 pid=7)   File "vllm/lora/ops/torch_ops/lora_ops.py", line 47, in bgmv_shrink',
    ...     "(EngineCore_DP0 pid=7) RuntimeError: einsum(): subscript b has size 2 for operand 1",
    ...     "(APIServer pid=6) vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered an issue. "
    ...     "See stack trace (above) for the root cause.",
    ...     "(APIServer pid=6) INFO:     Shutting down",
    ... ])
    'RuntimeError: einsum(): subscript b has size 2 for operand 1'

:func:`engine_dead` tells an HTTP answer of a dead EngineCore from an ordinary error. Pure functions, no
I/O; the fixtures in ``tests/engines/fixtures/`` are real vLLM log tails.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

__all__ = ["MAX_CAUSE_CHARS", "engine_dead", "may_be_cause", "root_cause"]

MAX_CAUSE_CHARS = 1000
"""A cause longer than this is cut (with an ellipsis): it goes into a JSON error message and a log line."""

#: What vLLM's API server answers once its EngineCore is gone (``EngineDeadError``, from
#: ``vllm/v1/engine/exceptions.py``; served as a 500 by ``vllm/entrypoints/openai/api_server.py``).
_DEAD_MARKERS = (b"EngineCore encountered an issue", b"EngineDeadError", b"Engine loop is not running")

#: ``(EngineCore_DP0 pid=7) `` / ``(APIServer pid=6) ``: the process tag vLLM puts before each line of
#: its children's output (``vllm/utils/system_utils.py``, ``decorate_logs``); then the logging prefix
#: ``ERROR 12-02 13:40:01 [core.py:1021] `` (``vllm/logger.py``, ``_FORMAT``).
_PROC_TAG = re.compile(r"^\([^)]*\)\s*")
_LOG_PREFIX = re.compile(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s+\d\d-\d\d\s+[\d:.]+\s+\[[^\]]*\]\s*")
_UVICORN_PREFIX = re.compile(r"^(INFO|WARNING|ERROR|CRITICAL):\s+")

#: ``RuntimeError: ...``, ``torch.OutOfMemoryError: ...``, ``pydantic_core._pydantic_core.ValidationError: ...``
_EXCEPTION = re.compile(
    r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Exit|Interrupt|Failure|Fault)(?::\s*(?P<msg>.*))?$"
)
#: argparse's last word on a bad command line: ``vllm serve: error: unrecognized arguments: --bogus``.
_ARGPARSE = re.compile(r"^[\w.\- ]+: error: .+")

#: Exception lines that wrap the cause instead of naming it.
_WRAPPERS = (
    "engine core initialization failed",
    "see root cause above",
    "see stack trace (above)",
    "encountered an issue",
    "enginedeaderror",
    "engine loop is not running",
    "systemexit",
    "keyboardinterrupt",
    "cancellederror",
    "apiserver process",
    "output_handler failed",
    "encountered a fatal error",
)
#: Lines that look like errors but are noise printed on the way down.
_NOISE = ("warnings.warn(", "resource_tracker", "userwarning", "futurewarning", "deprecationwarning")
_CODE = ('file "', "traceback (most recent", "^", "~", "during handling of", "the above exception")
_ERRORISH = ("error", "out of memory", "illegal instruction", "segmentation fault", "killed", "cannot", "failed")
#: An exception whose own line says little; its message continues on the next lines.
_CONTINUES = re.compile(r"(^$|:$|^\d+ validation errors? for )")


def _clean(line: str) -> str:
    line = _PROC_TAG.sub("", line.rstrip())
    line = _LOG_PREFIX.sub("", line)
    return _UVICORN_PREFIX.sub("", line).strip()


def _is_code(line: str) -> bool:
    return line.lower().startswith(_CODE)


def _with_continuation(lines: list[str], i: int) -> str:
    """The exception line at ``i``, plus the next two lines when its own text is only a heading."""
    line = lines[i]
    match = _EXCEPTION.match(line)
    if match is None or not _CONTINUES.search(match.group("msg") or ""):
        return line
    more = [ln for ln in lines[i + 1 : i + 3] if ln and not _is_code(ln) and not _EXCEPTION.match(ln)]
    return " ".join([line, *more]) if more else line


def _shorten(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_CAUSE_CHARS else text[: MAX_CAUSE_CHARS - 3] + "..."


def root_cause(tail: Iterable[str]) -> str:
    """The line of a vLLM log tail that names why the engine failed; ``""`` for an empty tail.

    In order of preference, the last: exception line that is not a wrapper (``RuntimeError: ...``); argparse
    error (``vllm serve: error: ...``); ERROR-level or error-sounding line that is not a wrapper or noise;
    wrapper; then simply the last line. Process tags and logging prefixes are removed, and an exception
    whose line is only a heading (``1 validation error for ModelConfig``) keeps the lines that follow.
    """
    raw = [line for line in tail if line.strip()]
    errors = {i for i, line in enumerate(raw) if " ERROR " in f" {_PROC_TAG.sub('', line)}"}
    lines = [_clean(line) for line in raw]

    def telling(line: str) -> bool:
        low = line.lower()
        return not any(w in low for w in _WRAPPERS) and not any(n in low for n in _NOISE)

    def exception(i: int) -> bool:
        return bool(_EXCEPTION.match(lines[i])) and telling(lines[i])

    def argparse_error(i: int) -> bool:
        return bool(_ARGPARSE.match(lines[i])) and telling(lines[i])

    def error_line(i: int) -> bool:
        low = lines[i].lower()
        return (i in errors or any(k in low for k in _ERRORISH)) and telling(lines[i]) and not _is_code(lines[i])

    def wrapper(i: int) -> bool:
        return bool(_EXCEPTION.match(lines[i])) or i in errors

    picks: tuple[Callable[[int], bool], ...] = (exception, argparse_error, error_line, wrapper)
    for pick in picks:
        for i in range(len(lines) - 1, -1, -1):
            if lines[i] and pick(i):
                return _shorten(_with_continuation(lines, i))
    return _shorten(lines[-1]) if lines else ""


_HINTS = ("Error", "Exception", "error:", "Exit", "Interrupt", "Failure", "Fault")


def may_be_cause(line: str) -> bool:
    """Whether a log line could be picked as a root cause (cheap; for keeping such lines as they stream by,
    because a crash can be followed by hundreds of lines of per-request tracebacks and shutdown noise).

    >>> may_be_cause("(EngineCore pid=7) ERROR 12-02 13:44:16 [core.py:1512] RuntimeError: einsum(): bad")
    True
    >>> may_be_cause("(APIServer pid=6) INFO 12-02 13:44:16 [loggers.py:259] Engine 000: Avg throughput")
    False
    """
    if not any(h in line for h in _HINTS):
        return False
    clean = _clean(line)
    return bool(_EXCEPTION.match(clean) or _ARGPARSE.match(clean))


def engine_dead(status: int, body: bytes) -> bool:
    """Whether an engine's HTTP answer says that its EngineCore is dead (a 5xx naming ``EngineDeadError``).

    >>> engine_dead(500, b'{"error": {"message": "EngineCore encountered an issue. See stack trace (above)..."}}')
    True
    >>> engine_dead(400, b'{"error": {"message": "max_tokens must be at least 1"}}')
    False
    """
    return status >= 500 and any(marker in body for marker in _DEAD_MARKERS)
