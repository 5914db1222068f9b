"""Ahead (uniter_fast/data/ahead.py): an iterator run ahead on a thread, its end, errors and stopping."""
from __future__ import annotations

import threading
import time

import pytest

from uniter_fast.data.ahead import Ahead


def _within(seconds: float, fn):
    """fn() on a thread of its own, failing the test if it has not returned in `seconds` (a consumer left
    waiting forever) instead of hanging the run; returns what fn returned or raised."""
    result: dict = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as exc:  # handed back to the test
            result["error"] = exc

    waiter = threading.Thread(target=run, daemon=True)
    waiter.start()
    waiter.join(seconds)
    assert not waiter.is_alive(), f"still waiting after {seconds} s"
    if "error" in result:
        raise result["error"]
    return result["value"]


def _counting(n: int, drawn: list, fail_at: int | None = None, exc: BaseException | None = None):
    for i in range(n):
        if i == fail_at:
            raise exc
        drawn.append(i)
        yield i


def test_items_arrive_in_order_and_the_end_stays_the_end():
    ahead = Ahead(_counting(5, []), 2, "test ahead")
    assert _within(5, lambda: list(ahead)) == [0, 1, 2, 3, 4]
    assert _within(5, lambda: next(ahead, "end")) == "end"  # again, at once: nothing left to wait for
    assert not ahead._thread.is_alive()


def test_the_thread_never_keeps_the_interpreter_alive():
    ahead = Ahead(_counting(3, []), 1, "test ahead")
    assert ahead._thread.daemon and ahead._thread.name == "test ahead"
    ahead.close()


@pytest.mark.parametrize("exc", [ValueError("record 7 is damaged"), KeyboardInterrupt()])
def test_an_error_reaches_the_consumer_at_its_item_whatever_its_kind(exc):
    ahead = Ahead(_counting(5, [], fail_at=2, exc=exc), 2, "test ahead")
    assert [next(ahead), next(ahead)] == [0, 1]
    with pytest.raises(type(exc)):
        _within(5, lambda: next(ahead))
    assert _within(5, lambda: next(ahead, "end")) == "end"


def test_close_stops_the_thread_before_it_draws_more_items():
    drawn: list = []
    ahead = Ahead(_counting(1000, drawn), 2, "test ahead")
    assert next(ahead) == 0
    ahead.close()
    assert not ahead._thread.is_alive()
    seen = len(drawn)
    assert seen <= 4  # the one consumed, two queued, one waiting for room
    time.sleep(0.2)
    assert len(drawn) == seen and not any(t.name == "test ahead" for t in threading.enumerate())
