"""The most telling line of an engine's log tail, for error messages::

    last_error_line(("INFO ... loading", "ValueError: bad --max-model-len", "RuntimeError: ... See root cause above"))
    # 'ValueError: bad --max-model-len'
"""

from __future__ import annotations

import re
from collections.abc import Callable

#: Lines that wrap the real cause ("See root cause above") and so say little on their own.
_GENERIC = (
    "root cause",
    "see stack trace",
    "engine core initialization failed",
    "traceback (most recent",
    "systemexit",
)
_ERRORISH = ("error", "exception", "out of memory", "illegal", "refused", "invalid", "unrecognized")
_PREFIX = re.compile(r"^(\([^)]*\)\s+)?((ERROR|WARNING|INFO|CRITICAL)\s+\S+\s+\S+\s+\[[^\]]*\]\s*)?")
_EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b:?")
_CODE = ("raise ", "file \"", "^", "return ", "~")


def last_error_line(tail: tuple[str, ...]) -> str:
    """The most telling line of a log tail: vLLM's own exception line, not a wrapper or a code line."""
    lines = [_PREFIX.sub("", line).strip() for line in tail]
    lines = [line for line in lines if line and not line.lower().startswith(_CODE)]

    def telling(line: str) -> bool:
        return not any(g in line.lower() for g in _GENERIC)

    def errorish(line: str) -> bool:
        return any(k in line.lower() for k in _ERRORISH)

    picks: tuple[Callable[[str], bool], ...] = (
        lambda ln: bool(_EXCEPTION.match(ln)) and telling(ln),
        lambda ln: errorish(ln) and telling(ln),
        errorish,
    )
    for pick in picks:
        found = [line for line in lines if pick(line)]
        if found:
            return found[-1]
    return lines[-1] if lines else ""
