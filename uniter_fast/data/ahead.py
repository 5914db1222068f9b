"""An iterator run ahead of its consumer on a thread of its own (the region store's prefetch, the training batches).

Worth it where making an item mostly waits or releases the GIL (C++ reads, copies) while the consumer waits too
(on a GPU step): the items are then ready when asked for, in their order.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator

_END = object()  # the items are exhausted


@dataclass
class _Failure:
    exc: BaseException


class Ahead:
    """Iterates `items` on a thread ahead of the consumer: `depth` items wait in a queue, one more is being made.

    An error raised making an item reaches the consumer when it asks for that item. close() (or leaving a `with`
    block, or dropping the iterator) stops the thread before its next item.
    """

    def __init__(self, items: Iterable, depth: int, name: str):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        # The thread gets the queue and the event, not self: dropping the iterator must be able to stop it.
        self._thread = threading.Thread(target=_produce, name=name, daemon=True,
                                        args=(self._queue, self._stop, iter(items)))
        self._thread.start()

    def __iter__(self) -> "Ahead":
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if item is _END:
            self.close()
            raise StopIteration
        if isinstance(item, _Failure):
            self.close()
            raise item.exc
        return item

    def close(self) -> None:
        self._done = True
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()

    def __enter__(self) -> "Ahead":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        self._stop.set()


def _put(q: queue.Queue, stop: threading.Event, item) -> bool:
    """Waits for room unless the consumer has stopped; whether the item went in."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            continue
    return False


def _produce(q: queue.Queue, stop: threading.Event, items: Iterator) -> None:
    while not stop.is_set():
        try:
            item = next(items)
        except StopIteration:
            _put(q, stop, _END)
            return
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            _put(q, stop, _Failure(exc))
            return
        if not _put(q, stop, item):
            return
