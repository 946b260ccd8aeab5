"""The stand-in engine's configuration: fault and pacing knobs from the environment, and the
``vllm serve`` command line it honours.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import orjson

from tests.fakes.standin_model import DEFAULT_MAX_MODEL_LEN


@dataclass(frozen=True)
class Knobs:
    """Fault and pacing settings; see the table in the module docstring."""

    start_delay: float = 0.0
    fail_start: str | None = None
    oom: bool = False
    crash_after_tokens: int | None = None
    die_in_batch: int | None = None
    hang_after: float | None = None
    ignore_sigterm: bool = False
    slow_health: float = 0.0
    token_delay: float = 0.0
    first_token_delay: float = 0.0
    wake_delay: float = 0.0
    fail_wake: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Knobs:
        """Read the ``STANDIN_*`` variables; ValueError names a bad one."""

        def raw(name: str) -> str:
            return env.get(name, "").strip()

        def seconds(name: str) -> float | None:
            text = raw(name)
            if not text:
                return None
            try:
                value = float(text)
            except ValueError:
                value = -1.0
            if not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {text!r}")
            return value

        def flag(name: str) -> bool:
            return raw(name).lower() in ("1", "true", "yes", "on")

        def message(name: str, default: str) -> str | None:
            text = raw(name)
            if not text or text.lower() in ("0", "false", "no", "off"):
                return None
            return default if text.lower() in ("1", "true", "yes", "on") else text

        crash_text = raw("STANDIN_CRASH_AFTER_TOKENS")
        if crash_text and not crash_text.isdigit():
            raise ValueError(f"STANDIN_CRASH_AFTER_TOKENS must be an integer >= 0, got {crash_text!r}")
        batch_text = raw("STANDIN_DIE_IN_BATCH")
        if batch_text and not (batch_text.isdigit() and int(batch_text) >= 1):
            raise ValueError(f"STANDIN_DIE_IN_BATCH must be an integer >= 1, got {batch_text!r}")
        return cls(
            start_delay=seconds("STANDIN_START_DELAY") or 0.0,
            fail_start=message("STANDIN_FAIL_START", "Engine core initialization failed (stand-in)."),
            oom=flag("STANDIN_OOM"),
            crash_after_tokens=int(crash_text) if crash_text else None,
            die_in_batch=int(batch_text) if batch_text else None,
            hang_after=seconds("STANDIN_HANG"),
            ignore_sigterm=flag("STANDIN_IGNORE_SIGTERM"),
            slow_health=seconds("STANDIN_SLOW_HEALTH") or 0.0,
            token_delay=seconds("STANDIN_TOKEN_DELAY") or 0.0,
            first_token_delay=seconds("STANDIN_FIRST_TOKEN_DELAY") or 0.0,
            wake_delay=seconds("STANDIN_WAKE_DELAY") or 0.0,
            fail_wake=message("STANDIN_FAIL_WAKE", "Failed to wake up the engine (stand-in)."),
        )


@dataclass(frozen=True)
class LoraModule:
    """One adapter: its served name, where it lives, and the base model it belongs to."""

    name: str
    path: str
    base_model_name: str | None = None


@dataclass(frozen=True)
class ServeArgs:
    """The ``vllm serve`` arguments the stand-in honours, plus the ones it ignored."""

    model: str
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_names: tuple[str, ...] = ()
    max_model_len: int = DEFAULT_MAX_MODEL_LEN
    enable_lora: bool = False
    lora_modules: tuple[LoraModule, ...] = ()
    max_lora_rank: int = 16
    enable_sleep_mode: bool = False
    enable_log_requests: bool = False
    max_log_len: int | None = None
    ignored: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        return self.served_model_names or (self.model,)


def _human_int(text: str) -> int:
    if text.strip().lower() in ("auto", "-1"):
        return DEFAULT_MAX_MODEL_LEN
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMgG]?)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a token count: {text!r}")
    number, suffix = match.groups()
    power = "kmg".find(suffix.lower()) + 1 if suffix else 0
    return int(float(number) * (1024 if suffix.isupper() else 1000) ** power)


def _lora_module(text: str) -> LoraModule:
    if text.lstrip().startswith("{"):
        try:
            spec = orjson.loads(text)
            return LoraModule(str(spec["name"]), str(spec["path"]), spec.get("base_model_name"))
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise argparse.ArgumentTypeError(f"bad --lora-modules JSON {text!r}: {exc}") from exc
    name, sep, path = text.partition("=")
    if not (sep and name and path):
        raise argparse.ArgumentTypeError(f"--lora-modules wants name=path, got {text!r}")
    return LoraModule(name, path)


def parse_args(argv: Sequence[str]) -> ServeArgs:
    """Parse a ``vllm serve`` command line (after the program name); unknown flags are kept aside."""
    parser = argparse.ArgumentParser(prog="standin_engine", allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", allow_abbrev=False, help="serve a fake model like `vllm serve`")
    serve.add_argument("model_tag", nargs="?", default=None)
    serve.add_argument("--model", default=None)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", nargs="+", default=None)
    serve.add_argument("--max-model-len", type=_human_int, default=DEFAULT_MAX_MODEL_LEN)
    serve.add_argument("--enable-lora", action=argparse.BooleanOptionalAction, default=False)
    serve.add_argument("--lora-modules", nargs="+", type=_lora_module, default=[])
    serve.add_argument("--max-lora-rank", type=int, default=16)
    serve.add_argument("--enable-sleep-mode", action=argparse.BooleanOptionalAction, default=False)
    serve.add_argument("--enable-log-requests", action=argparse.BooleanOptionalAction, default=False)
    serve.add_argument("--max-log-len", type=int, default=None)
    ns, unknown = parser.parse_known_args(list(argv))
    model = ns.model_tag or ns.model
    if not model:
        parser.error("serve needs a model (positional MODEL or --model)")
    return ServeArgs(
        model=model,
        host=ns.host,
        port=ns.port,
        served_model_names=tuple(ns.served_model_name or ()),
        max_model_len=ns.max_model_len,
        enable_lora=ns.enable_lora,
        lora_modules=tuple(ns.lora_modules),
        max_lora_rank=ns.max_lora_rank,
        enable_sleep_mode=ns.enable_sleep_mode,
        enable_log_requests=ns.enable_log_requests,
        max_log_len=ns.max_log_len,
        ignored=tuple(unknown),
    )
