"""The controller's clock as the keeper knows it. Activation listings are
asked `since` an epoch millisecond of the controller's clock; a remote
controller's clock may differ from the keeper's, so the keeper keeps a lower
bound of the difference, learnt from the Date headers of the controller's
answers (a controller on this host is told to be exact)."""
from __future__ import annotations

import email.utils
import threading
import time
from typing import Mapping

UNKNOWN_SKEW_S = 300.0     # window before any Date header told the controller's clock
SAMPLE_EVERY_S = 1.0       # Date headers have a resolution of one second


class ControllerClock:
    def __init__(self, offset_s: float | None = None):
        #: lower bound of (controller clock - keeper clock), seconds
        self.offset_lo: float | None = offset_s
        self.known = offset_s is not None
        self._next_sample = 0.0
        self._lock = threading.Lock()

    def sample(self, headers: Mapping[str, str], received: float) -> None:
        """Learn from an answer's Date header, read by the keeper at `received`."""
        if self.known:
            return
        mono = time.monotonic()
        if mono < self._next_sample:
            return
        self._next_sample = mono + SAMPLE_EVERY_S
        date = headers.get("Date")
        if not date:
            return
        try:
            server = email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            return
        # The controller's clock read at least `server` when it answered, and
        # that was no later than `received` on ours.
        bound = server - received
        with self._lock:
            if self.offset_lo is None or bound > self.offset_lo:
                self.offset_lo = bound

    def since_ms(self, oldest_submitted: float) -> int:
        """The controller's epoch milliseconds no later than the moment a
        call submitted at `oldest_submitted` (keeper clock) started there."""
        with self._lock:
            off = self.offset_lo
        if off is None:
            off = -UNKNOWN_SKEW_S
        # Same host: exact to the ms; otherwise a little slack for the
        # rounding of epoch milliseconds on both sides.
        slack = 0.001 if self.known else 0.25
        return int((oldest_submitted + off - slack) * 1000)
