"""The one table of engine transitions: every swap names the state it expects, so a lost race fails."""

from __future__ import annotations

import asyncio

import pytest

from engines.state import TRANSITIONS, EngineState, InvalidTransition, StateMachine, is_valid_transition


def test_a_stale_compare_and_swap_raises_and_changes_nothing() -> None:
    sm = StateMachine("tiny")
    sm.swap(EngineState.STOPPED, EngineState.STARTING)
    sm.swap(EngineState.STARTING, EngineState.READY)
    with pytest.raises(InvalidTransition, match="cannot go starting -> ready; it is ready") as caught:
        sm.swap(EngineState.STARTING, EngineState.READY)  # a second caller that saw `starting` earlier
    assert caught.value.current is EngineState.READY and sm.state is EngineState.READY


def test_an_illegal_transition_raises_even_from_the_right_state() -> None:
    sm = StateMachine("tiny")
    with pytest.raises(InvalidTransition):
        sm.swap(EngineState.STOPPED, EngineState.READY)
    assert sm.state is EngineState.STOPPED


def test_draining_is_a_state_between_ready_and_sleep_or_stop() -> None:
    assert not is_valid_transition(EngineState.READY, EngineState.SLEEPING)  # sleep drains first
    assert TRANSITIONS[EngineState.DRAINING] == {EngineState.READY, EngineState.SLEEPING, EngineState.STOPPING,
                                                 EngineState.FAILED}
    assert is_valid_transition(EngineState.STARTING, EngineState.STOPPING)  # a stop during a start


async def test_waiters_wake_on_the_next_transition_not_on_a_poll() -> None:
    sm = StateMachine("tiny")
    waiting = asyncio.ensure_future(sm.changed(10.0))
    await asyncio.sleep(0)
    assert not waiting.done()
    sm.swap(EngineState.STOPPED, EngineState.STARTING)
    assert await asyncio.wait_for(waiting, 1.0) is True
    assert await sm.changed(0.01) is False  # nothing happened since


def test_a_failing_listener_is_logged_and_the_transition_stands(caplog: pytest.LogCaptureFixture) -> None:
    def broken(name: str, old: EngineState, new: EngineState) -> None:
        raise ValueError("a metrics bug")

    seen: list[EngineState] = []
    sm = StateMachine("tiny", [broken, lambda name, old, new: seen.append(new)])
    sm.swap(EngineState.STOPPED, EngineState.STARTING)
    assert sm.state is EngineState.STARTING and seen == [EngineState.STARTING]  # the next listener still ran
    assert "a listener of stopped -> starting failed" in caplog.text and "a metrics bug" in caplog.text
