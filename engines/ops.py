"""The slow work the engine owner starts and keeps, one operation at a time per model.

A stop or a sleep of a model runs as a task after any earlier one of the same model; the owner loop
never awaits it, and is woken (``kick``) when it ends::

    ops = ModelOps(kick=owner.kick)
    task = ops.run("judge", engine.stop())
    forward(task, future)       # the future of the command that asked for it gets the outcome
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from engines.aio import logged, settle

log = logging.getLogger(__name__)


class ModelOps:
    def __init__(self, *, kick: Callable[[], None]) -> None:
        self.kick = kick
        self.running: dict[str, asyncio.Task[Any]] = {}

    def run(self, model: str, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        before = self.running.get(model)

        async def in_turn() -> None:
            if before is not None:
                await settle(before, f"an earlier operation on {model}", logger=log)
            await work

        task = asyncio.create_task(in_turn(), name=f"op-{model}")
        self.running[model] = task

        def done(t: asyncio.Task[None]) -> None:
            if self.running.get(model) is t:
                del self.running[model]
            if not t.cancelled() and (exc := t.exception()) is not None:
                logged(exc, f"an operation on {model}", logger=log)
            self.kick()

        task.add_done_callback(done)
        return task


def forward(task: asyncio.Future[Any], fut: asyncio.Future[Any]) -> None:
    """When ``task`` ends, ``fut`` gets its result, its exception, or its cancellation."""

    def copy(t: asyncio.Future[Any]) -> None:
        if fut.done():
            return
        if t.cancelled():
            fut.cancel()
        elif (exc := t.exception()) is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(t.result())

    task.add_done_callback(copy)
