"""Warnings a peer can repeat at will (junk messages, refused handshakes), logged at most once per interval."""
from __future__ import annotations

import logging
import time

FLOOD_LOG_INTERVAL_S = 10.0  # a flood leaves a line this often, with the count held back


class ThrottledWarning:
    """Warnings to ``log`` at most once per ``interval_s`` each (by format string); those held back in between are
    counted in the next line of theirs."""

    def __init__(self, log: logging.Logger, interval_s: float = FLOOD_LOG_INTERVAL_S) -> None:
        self.log = log
        self.interval_s = interval_s
        self._next_s: dict[str, float] = {}
        self._num_held: dict[str, int] = {}

    def __call__(self, msg: str, *args) -> None:
        now = time.monotonic()
        if now < self._next_s.get(msg, float("-inf")):
            self._num_held[msg] = self._num_held.get(msg, 0) + 1
            return
        held = self._num_held.pop(msg, 0)
        self.log.warning(msg + (" (and %d more since the last such line)" if held else ""), *args,
                         *((held,) if held else ()))
        self._next_s[msg] = now + self.interval_s
