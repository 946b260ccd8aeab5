"""Injected faults of the stand-in engine, printed as vLLM prints them: an EngineCore that dies
mid-request or in a batch, a start that fails (out of memory, an error), a process that hangs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import Final, NoReturn

from tests.fakes.standin_asgi import vllm_log


def crash_engine_core(reason: str) -> NoReturn:
    vllm_log("ERROR", "core.py:1021", "EngineCore encountered a fatal error.", sys.stderr)
    vllm_log("ERROR", "core.py:1021", reason, sys.stderr)
    vllm_log("ERROR", "async_llm.py:480", "AsyncLLM output_handler failed.", sys.stderr)
    vllm_log("ERROR", "async_llm.py:480", "vllm.v1.engine.exceptions.EngineDeadError: EngineCore encountered "
             "an issue. See stack trace (above) for the root cause.", sys.stderr)
    sys.stdout.flush()
    os._exit(1)


#: vLLM's ``EngineDeadError`` message (``vllm/v1/engine/exceptions.py``), served as a 500 by
#: ``vllm/entrypoints/serve/exception_handling/handlers/vllm_error.py`` ``engine_error_handler``.
ENGINE_DEAD_MESSAGE: Final = "EngineCore encountered an issue. See stack trace (above) for the root cause."
#: The root cause the EngineCore prints under ``STANDIN_DIE_IN_BATCH`` (the real CPU LoRA crash's shape).
BATCH_DEATH_CAUSE: Final = ("RuntimeError: einsum(): subscript b has size {n} for operand 1 which does not "
                            "broadcast with previously seen size {tokens} (stand-in)")


def kill_core_in_batch(running: int, tokens: int) -> None:
    """Print what vLLM prints when its EngineCore dies in a step, then exit 0 a second later."""
    stamp = time.strftime("%m-%d %H:%M:%S")
    core, api = f"(EngineCore pid={os.getpid()}) ERROR {stamp} [core.py:1512] ", f"(APIServer pid={os.getpid()}) "
    lines = [f"{core}EngineCore encountered a fatal error.",
             f"{core}Traceback (most recent call last):",
             f'{core}  File "vllm/lora/ops/torch_ops/lora_ops.py", line 78, in bgmv_shrink',
             f'{core}    outputs = torch.einsum("bi, boi -> bo", inputs, selected_loras)',
             core + BATCH_DEATH_CAUSE.format(n=running, tokens=tokens),
             f"{api}ERROR {stamp} [async_llm.py:906] AsyncLLM output_handler failed.",
             f"{api}ERROR {stamp} [async_llm.py:906] vllm.v1.engine.exceptions.EngineDeadError: {ENGINE_DEAD_MESSAGE}"]
    for request in range(running):  # vLLM logs a traceback per failed request: the cause scrolls far up
        lines.append(f"{api}ERROR {stamp} [vllm_error.py:54] Engine Exception caught. Request id: cmpl-{request}")
        lines += [f'{api}ERROR {stamp} [vllm_error.py:54]   File "fastapi/routing.py", line {n}, in app'
                  for n in range(250 // max(1, running))]
    lines.append("  warnings.warn('resource_tracker: There appear to be %d '")
    sys.stderr.write("\n".join(lines) + "\n")
    sys.stderr.flush()
    asyncio.get_running_loop().call_later(1.0, os._exit, 0)


OOM_TEXT: Final = (
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 1.96 GiB. GPU 0 has a total capacity of "
    "23.55 GiB of which 1.06 GiB is free. Including non-PyTorch memory, this process has 22.48 GiB memory in "
    "use. Of the allocated memory 21.95 GiB is allocated by PyTorch, and 84.50 MiB is reserved by PyTorch "
    "but unallocated. If reserved but unallocated memory is large try setting "
    "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.  See documentation for Memory "
    "Management  (https://pytorch.org/docs/stable/notes/cuda.html#environment-variables)"
)


def refuse_start(*lines: str) -> int:
    where = "core.py:708"
    vllm_log("ERROR", where, "EngineCore failed to start.", sys.stderr)
    for line in lines:
        vllm_log("ERROR", where, line, sys.stderr)
    sys.stderr.write("RuntimeError: Engine core initialization failed. See root cause above. "
                     "Failed core proc(s): {}\n")
    sys.stderr.flush()
    return 1


def hang_forever() -> NoReturn:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    vllm_log("WARNING", "standin_engine", "STANDIN_HANG: blocking for ever; only SIGKILL stops this process",
             sys.stderr)
    while True:
        time.sleep(3600)
