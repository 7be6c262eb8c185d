"""Whether an AsyncLLM's engine can serve (vLLM's ``is_running``, ``errored``, ``dead_error``), read off its
Executor: its step loop runs until ``stop()``. A step that raises an Exception fails the requests it ran and the loop
goes on (the engine is not dead); the loop ends otherwise only when something gets past that handling (a
BaseException, or a cancellation raised inside a step that ``stop()`` did not ask for), and then the Executor ends
its requests and records how (``Executor.loop_death``)."""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastdecode.actors.executor import Executor


class EngineDeadError(RuntimeError):
    """vLLM's ``EngineDeadError``: the engine's step loop no longer runs (it died, or the engine was stopped), so no
    request will be served; stop this AsyncLLM and start another. ``__cause__`` is what ended the loop, where an
    exception did."""


def loop_death(task: asyncio.Task) -> tuple[str, BaseException | None]:
    """How a step loop's task ended where stop() did not end it, and the exception that did (None: none did)."""
    if task.cancelled():
        return "a cancellation raised inside a step, which stop() did not ask for", None
    cause = task.exception()
    return (f"{type(cause).__name__}: {cause}" if cause is not None else "it returned"), cause


class EngineHealth:
    """An Executor's step loop as vLLM's health surface. Holds the Executor, never the AsyncLLM (which must stay
    collectable); a stand-in Executor without a loop is never running."""

    def __init__(self, executor: "Executor") -> None:
        self._executor = executor

    @property
    def is_running(self) -> bool:
        """The step loop runs and no stop has begun."""
        return getattr(self._executor, "is_looping", False) and not self._executor.is_stopped

    @property
    def errored(self) -> bool:
        """The step loop ended without a stop: the engine takes no request it would run."""
        return getattr(self._executor, "loop_death", None) is not None

    def dead_error(self, *, is_closed: bool) -> EngineDeadError:
        """The error of an engine that does not run (``is_closed``: its AsyncLLM's stop began), saying why."""
        if self.errored:
            error = EngineDeadError(f"the engine's step loop ended without stop() ({self._executor.loop_death}): no "
                                    "request is served any more; stop this AsyncLLM and start another")
            error.__cause__ = self._executor.loop_death_cause
            return error
        if is_closed or not self.is_running:
            return EngineDeadError("the engine was stopped (stop() or shutdown())")
        return EngineDeadError("the engine runs: nothing has ended it")
