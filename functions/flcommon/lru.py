"""A least-recently-used cache bounded in bytes, for warm function workers.

Each entry is put with its size; the cache evicts the least recently used
entries until the new one fits, and never holds an entry larger than the
bound, so the bytes it holds never exceed the bound. Thread-safe: HTTP
platforms may run several requests of one worker at once.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Hashable


class ByteLRU:
    def __init__(self, max_bytes: int):
        self.max_bytes = max(0, int(max_bytes))
        self._items: "OrderedDict[Hashable, tuple[Any, int]]" = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.peak_bytes = 0      # the most ever held at once: never above max_bytes
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def get(self, key: Hashable, default: Any = None) -> Any:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return default
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key: Hashable, value: Any, nbytes: int) -> bool:
        """Keep `value` (counted as `nbytes`); False when it is larger than
        the whole bound and so is not kept."""
        nbytes = max(0, int(nbytes))
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            if nbytes > self.max_bytes:
                return False
            while self._items and self.bytes + nbytes > self.max_bytes:
                _, (_, size) = self._items.popitem(last=False)
                self.bytes -= size
                self.evictions += 1
            self._items[key] = (value, nbytes)
            self.bytes += nbytes
            self.peak_bytes = max(self.peak_bytes, self.bytes)
            return True

    def resize(self, max_bytes: int) -> None:
        """Change the bound, evicting the oldest entries beyond a smaller one."""
        with self._lock:
            self.max_bytes = max(0, int(max_bytes))
            while self._items and self.bytes > self.max_bytes:
                _, (_, size) = self._items.popitem(last=False)
                self.bytes -= size
                self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.bytes = 0

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"entries": len(self._items), "bytes": self.bytes, "max_bytes": self.max_bytes,
                    "peak_bytes": self.peak_bytes, "hits": self.hits, "misses": self.misses,
                    "evictions": self.evictions}
