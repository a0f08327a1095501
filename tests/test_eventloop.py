"""The event-loop thread: lazy creation, and a stop that leaves no loop (and no selector fd) behind."""

from __future__ import annotations

import logging
import threading
import time

import pytest

from kvmlet import eventloop
from kvmlet.eventloop import EventLoopThread


def test_loop_is_created_on_first_use_and_closed_by_stop() -> None:
    events = EventLoopThread("test-lazy")
    events.start()
    assert not events.created
    done = threading.Event()
    events.call_soon(done.set)
    assert done.wait(5)
    loop = events.loop
    events.stop()
    assert loop.is_closed()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_stop_closes_a_loop_whose_thread_died() -> None:
    """A callback that ends the thread (here SystemExit out of run_forever) leaves the loop open; stop()
    closes it."""
    events = EventLoopThread("test-died")
    events.start()
    loop = events.loop

    def die() -> None:
        raise SystemExit

    events.call_soon(die)
    deadline = time.monotonic() + 5
    while events._thread is not None and events._thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not loop.is_closed()
    events.stop()
    assert loop.is_closed()


def test_stop_gives_up_on_a_stuck_callback_with_a_warning(monkeypatch: pytest.MonkeyPatch,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(eventloop, "STOP_TIMEOUT", 0.1)
    events = EventLoopThread("test-stuck")
    events.start()
    release = threading.Event()

    def stuck() -> None:
        release.wait(5)

    events.call_soon(stuck)
    with caplog.at_level(logging.WARNING, logger="kvmlet.eventloop"):
        events.stop()
    assert "did not stop" in caplog.text
    release.set()
    assert events._thread is not None
    events._thread.join(5)
    assert events.loop.is_closed()
