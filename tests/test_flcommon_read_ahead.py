"""flcommon.read_ahead: items come back in order, one is read ahead and no
more, a bad item is reported with it, any other error reaches the caller,
and a caller that stops early leaves no thread behind."""
from __future__ import annotations

import threading

import pytest

from flcommon.read_ahead import read_ahead


class Tracker:
    """Counts items loaded and not yet released by the caller."""

    def __init__(self):
        self.lock = threading.Lock()
        self.held = 0
        self.most_held = 0
        self.loaded: list[int] = []

    def load(self, item: int) -> int:
        with self.lock:
            self.held += 1
            self.most_held = max(self.most_held, self.held)
            self.loaded.append(item)
        if item % 5 == 3:
            raise KeyError(f"item {item} is bad")
        return item * 10

    def release(self) -> None:
        with self.lock:
            self.held -= 1


def test_items_come_in_order_with_at_most_one_read_ahead():
    t = Tracker()
    seen = []
    for item, value, error in read_ahead(range(12), t.load, expected=(KeyError,)):
        # While the caller works on this one, the reader may have loaded the next.
        assert len(t.loaded) <= item + 2
        seen.append((item, value, str(error) if error else None))
        t.release()
    assert [s[0] for s in seen] == list(range(12))
    assert all(v == i * 10 for i, v, e in seen if i % 5 != 3)
    assert [(i, v, e) for i, v, e in seen if i % 5 == 3] == [(3, None, "'item 3 is bad'"), (8, None, "'item 8 is bad'")]
    assert t.most_held <= 2


def test_an_unexpected_error_reaches_the_caller_at_its_item():
    t = Tracker()
    got = []
    with pytest.raises(KeyError, match="item 3 is bad"):
        for item, _, _ in read_ahead(range(10), t.load):
            got.append(item)
            t.release()
    assert got == [0, 1, 2]
    assert not any(th.name == "fk-read-ahead" and th.is_alive() for th in threading.enumerate())


def test_a_caller_that_stops_early_ends_the_reader():
    t = Tracker()
    gen = read_ahead(range(1000), t.load, expected=(KeyError,))
    for item, _, _ in gen:
        if item == 2:
            break
    gen.close()
    assert not any(th.name == "fk-read-ahead" and th.is_alive() for th in threading.enumerate())
    assert len(t.loaded) <= 4  # never ran ahead through the rest
    assert list(read_ahead([], t.load)) == []


def test_a_stream_of_items_is_read_ahead_as_far_as_asked_and_its_errors_reach_the_caller():
    t = Tracker()

    def stream():
        yield from (0, 1, 2, 4, 5, 6)
        raise ConnectionError("the store went away")

    got = []
    with pytest.raises(ConnectionError, match="went away"):
        for item, value, _ in read_ahead(stream(), t.load, ahead=2):
            got.append(value)
            t.release()
    assert got == [0, 10, 20, 40, 50, 60] and t.most_held <= 3


def _watched_stream(closed: threading.Event):
    """A generator over a cursor, as the aggregator's: its cleanup sets `closed`."""
    try:
        yield from range(100)
    finally:
        closed.set()


def test_a_stream_the_caller_stops_reading_is_closed_by_the_reader():
    """Left unfinished, its cleanup (closing the cursor) runs before
    read_ahead returns, not when the collector finds it."""
    closed = threading.Event()
    items = _watched_stream(closed)
    for item, value, _ in read_ahead(items, lambda i: i):
        if item == 3:
            break
    assert closed.is_set()


def test_a_stream_whose_item_fails_unexpectedly_is_closed_too():
    closed = threading.Event()

    def load(i):
        if i == 2:
            raise RuntimeError("the store went away")
        return i
    items = _watched_stream(closed)
    with pytest.raises(RuntimeError):
        for _ in read_ahead(items, load):
            pass
    assert closed.is_set()
