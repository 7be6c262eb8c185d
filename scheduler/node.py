"""A KV node as the scheduler sees it: memory in pages, bytes per token, a time model.

A node is any place that holds KV-cache and attends over it: a CPU KVShard today,
a GPU "KV node" later.  Memory is counted in pages of ``page_size`` tokens; a
sequence of ``n`` tokens holds ``ceil(n / page_size)`` pages in every layer, so
here a page means one page in each of the ``num_layers`` layers:
``page_bytes = page_size * kv_bytes_per_token`` with ``kv_bytes_per_token``
summed over all layers.  One attend call covers one layer, so it reads
``kv_bytes_per_token / num_layers`` bytes per token of context.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Protocol


class AttendTimeModel(Protocol):
    """What the scheduler needs from a node's time model (``ShardPerfModel`` is one)."""

    def predict(self, kv_bytes: float) -> float: ...


class WholeStepTimeModel(Protocol):
    """Seconds of a whole decode step of ``batch`` sequences run as one call (``GpuPerfModel`` is one)."""

    def predict(self, batch: float) -> float: ...

    def observe(self, batch: int, seconds: float) -> float: ...


def _check_int(value: int, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        kind = "a positive" if minimum == 1 else "a non-negative"
        raise ValueError(f"{name} must be {kind} integer, got {value!r}")


@dataclass(frozen=True)
class NodeModel:
    """One KV node: identity, memory, layout and attend-time model.

    ``perf`` is the node's (mutable, online-updated) time model; the rest is
    fixed when the node registers.  ``whole_step``, when set, times a decode step
    of a mini-batch held wholly on this node, which the Executor runs as one call
    (the GPU KV node's CUDA graph: dense part and attention of every layer); it is
    calibrated by timing that call and learns from the measured steps.
    """

    node_id: int
    capacity_bytes: int
    kv_bytes_per_token: int  # all layers, K and V
    num_layers: int
    page_size: int  # tokens per page
    perf: AttendTimeModel
    whole_step: WholeStepTimeModel | None = None

    def __post_init__(self) -> None:
        _check_int(self.node_id, "node_id", 0)
        _check_int(self.capacity_bytes, "capacity_bytes", 0)
        _check_int(self.kv_bytes_per_token, "kv_bytes_per_token", 1)
        _check_int(self.num_layers, "num_layers", 1)
        _check_int(self.page_size, "page_size", 1)
        if not callable(getattr(self.perf, "predict", None)):
            raise ValueError("perf must have a predict(kv_bytes) method")
        if self.whole_step is not None and not all(
                callable(getattr(self.whole_step, verb, None)) for verb in ("predict", "observe")):
            raise ValueError("whole_step must have predict(batch) and observe(batch, seconds) methods")

    @property
    def page_bytes(self) -> int:
        return self.page_size * self.kv_bytes_per_token

    @property
    def num_pages(self) -> int:
        """Pages the node can hold (each spanning all layers)."""
        return self.capacity_bytes // self.page_bytes

    def pages_for(self, num_tokens: int) -> int:
        """Pages a sequence of ``num_tokens`` tokens holds: ceil(num_tokens / page_size)."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self.page_size)

    def read_bytes(self, num_tokens: float) -> float:
        """Bytes one attend call (one layer) reads for ``num_tokens`` tokens of context."""
        return num_tokens * self.kv_bytes_per_token / self.num_layers

    def predict_attend_s(self, num_tokens: float) -> float:
        """Predicted seconds of one attend call over ``num_tokens`` tokens of context (0 for none)."""
        if num_tokens <= 0:
            return 0.0
        return self.perf.predict(self.read_bytes(num_tokens))
