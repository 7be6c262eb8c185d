"""Whether an AsyncLLM's engine can serve (vLLM's ``is_running``, ``errored``, ``dead_error``): its Executor's step
loop runs until ``stop()``. A step that raises an Exception fails the requests it ran and the loop goes on (the
engine is not dead); the loop ends otherwise only when something gets past that handling (a BaseException, or a
cancellation raised inside a step that ``stop()`` did not ask for), and then no request is run any more."""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastdecode.actors.executor import Executor

log = logging.getLogger("fastdecode.api")


class EngineDeadError(RuntimeError):
    """vLLM's ``EngineDeadError``: the engine's step loop no longer runs (it died, or the engine was stopped), so no
    request will be served; stop this AsyncLLM and start another. ``__cause__`` is what ended the loop, where an
    exception did."""


class EngineHealth:
    """Watches an Executor's step loop (its task, from ``Executor.start``): whether it runs, and how it ended where
    it ended without ``Executor.stop()``. Holds the Executor, never the AsyncLLM (which must stay collectable)."""

    def __init__(self, executor: "Executor") -> None:
        self._executor = executor
        # the loop's task (None: never started, or a stand-in Executor with no loop); Executor.stop() drops its own
        # reference to it, this one still tells how the loop ended
        self._task: asyncio.Task | None = getattr(executor, "_task", None)
        self.death: str | None = None  # how the loop ended without stop(); None while it runs or after a stop
        self.cause: BaseException | None = None  # the exception that ended it, where one did
        if self._task is not None:
            self._task.add_done_callback(self._on_loop_end)

    @property
    def is_running(self) -> bool:
        """The step loop runs and no stop has begun."""
        return self._task is not None and not self._task.done() and not self._executor.is_stopped

    @property
    def errored(self) -> bool:
        """The step loop ended without a stop: the engine takes no request it would run."""
        return self.death is not None or (self._task is not None and self._task.done()
                                          and not self._executor.is_stopped)

    def dead_error(self, *, is_closed: bool) -> EngineDeadError:
        """The error of an engine that does not run (``is_closed``: its AsyncLLM's stop began), saying why."""
        if self.errored:
            error = EngineDeadError(f"the engine's step loop ended without stop() ({self.death or 'ending now'}): no "
                                    "request is served any more; stop this AsyncLLM and start another")
            error.__cause__ = self.cause
            return error
        if is_closed or not self.is_running:
            return EngineDeadError("the engine was stopped (stop() or shutdown())")
        return EngineDeadError("the engine runs: nothing has ended it")

    def _on_loop_end(self, task: asyncio.Task) -> None:
        """Tell how the loop ended, where it was not stopped: an exception always (stop() cancels it), a
        cancellation where no stop had begun."""
        if task.cancelled():
            if self._executor.is_stopped:
                return
            self.death = "a cancellation raised inside a step, which stop() did not ask for"
        else:
            self.cause = task.exception()
            self.death = f"{type(self.cause).__name__}: {self.cause}" if self.cause is not None else "it returned"
        log.error("the engine's step loop ended without stop(): %s; its running requests get no more tokens",
                  self.death, exc_info=self.cause)
