"""Read the next item while the caller works on the current one.

The aggregator's work per update splits into reading it from the store
(socket waits, chunk copies, CRC: mostly outside the GIL) and adding it to
the aggregate (numpy, also outside the GIL). Done one after the other, each
waits for the other; with one reader thread they overlap, and aggregation
runs at the store's speed. At most `ahead` items (one by default) are read
ahead: with one, the reader starts item i+1 when the caller takes item i, so
besides what the caller keeps, two items are held at most (the one being
worked on and the one being read). Items are iterated in the reader thread,
so `items` may itself be a stream (a cursor).
"""
from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator, TypeVar

Item = TypeVar("Item")
Value = TypeVar("Value")

_DONE = object()


def read_ahead(items: Iterable[Item], load: Callable[[Item], Value],
               expected: tuple[type[BaseException], ...] = (), ahead: int = 1
               ) -> Iterator[tuple[Item, Value | None, BaseException | None]]:
    """Yield (item, load(item), None) in order, or (item, None, error) when
    load raised one of the `expected` errors (a bad item, reported with it).
    Any other error (from load or from iterating the items) is raised in the
    caller, at that item."""
    results: queue.Queue = queue.Queue()
    may_read = threading.Semaphore(ahead)   # reads allowed beyond what the caller has taken
    stop = threading.Event()

    def reader() -> None:
        finished = False
        try:
            for item in items:
                may_read.acquire()
                if stop.is_set():
                    return
                try:
                    results.put((item, load(item), None))
                except expected as exc:
                    results.put((item, None, exc))
            finished = True
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, which raises it
            results.put((_DONE, None, exc))
            return
        finally:
            # A stream left unfinished (the caller stopped early, or an
            # unexpected error ended the reading) is closed here, in the
            # thread that iterates it, not whenever the collector finds it.
            close = getattr(items, "close", None)
            if not finished and callable(close):
                close()
        results.put((_DONE, None, None))

    thread = threading.Thread(target=reader, name="fk-read-ahead", daemon=True)
    thread.start()
    try:
        while True:
            item, value, error = results.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            may_read.release()  # the caller now holds this one: the next may be read
            yield item, value, error
            del value
    finally:
        stop.set()
        may_read.release()  # a reader waiting for room sees `stop` and ends
        thread.join()
