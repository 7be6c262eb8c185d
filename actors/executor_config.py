"""The Executor's configuration and the errors ``Executor.submit`` raises to refuse a request."""
from __future__ import annotations

from dataclasses import dataclass, field

from fastdecode.actors.request import RequestError
from fastdecode.scheduler import SchedulerConfig


@dataclass(frozen=True)
class ExecutorConfig:
    max_model_len: int | None = None  # None: the model's context length
    max_queue: int = 4096
    is_pipelined: bool = True
    # a gpu-only step that ran as one graph replay launches the next step with its sampled tokens on
    # the device, before the host has read them (hides the host's time between steps)
    is_launching_ahead: bool = True
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # batch sizes of the start-up dense-step sweep (the scheduler's GPU model); () skips it
    profile_batches: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if any(b < 1 for b in self.profile_batches) or len(set(self.profile_batches)) == 1:
            raise ValueError("profile_batches must be two or more distinct positive batch sizes")
        if self.max_queue < 0:
            raise ValueError("max_queue must be non-negative")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be at least 2")

    @property
    def max_num_seqs(self) -> int:
        return self.scheduler.max_num_seqs

    def max_len_for(self, context: int) -> int:
        """The longest sequence admitted for a model of ``context`` positions."""
        return min(self.max_model_len or context, context)


class QueueFullError(RequestError):
    """More requests waiting than ``max_queue`` allows."""


class UnavailableError(RequestError):
    """The Executor takes no request now: it is draining, or no KV node is alive (retry later)."""
