"""Runs the dense part of the model off the event loop, and moves activations to and from the host.

One dedicated thread does all the model's torch work, in order: a decode step runs there from end to end
(actors/decode_step.py), and so do prefills and sampling. This is the only place that touches CUDA
streams: device tensors bound for CPU shards are copied into pinned host memory on a separate copy
stream, whose event the compute thread waits on (looking at other work meanwhile, ``while_waiting``).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from typing import Callable, TypeVar

import torch

from fastdecode.actors import tensor_io

T = TypeVar("T")

WAIT_POLL_S = 50e-6  # how often host_copies' caller looks at other work while the GPU finishes


class DenseRunner:
    def __init__(self, device: torch.device, *, is_synchronous: bool = False) -> None:
        """``is_synchronous``: wait for the GPU after each call, so host-side busy time
        equals GPU busy time (for step traces; costs a little speed)."""
        self.device = device
        self.is_synchronous = is_synchronous
        self.is_cuda = device.type == "cuda"
        self._compute = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fd-dense")
        self._copy_stream = torch.cuda.Stream(device) if self.is_cuda else None

    async def run(self, fn: Callable[..., T], *args) -> T:
        """Run ``fn(*args)`` on the compute thread under ``torch.inference_mode``."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._compute, self._call, fn, args)

    def _call(self, fn, args):
        with torch.inference_mode():
            result = fn(*args)
        if self.is_cuda and self.is_synchronous:
            torch.cuda.current_stream(self.device).synchronize()
        return result

    async def to_host(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Host copies of device tensors (the tensors themselves on a CPU device), made on the compute thread."""
        if not self.is_cuda:
            return tensors
        return await self.run(self.host_copies, *tensors)

    def host_copies(self, *tensors: torch.Tensor, out: tuple[torch.Tensor, ...] | None = None,
                    while_waiting: Callable[[], None] | None = None) -> tuple[torch.Tensor, ...]:
        """On the compute thread: pinned host copies of device tensors, once they are there
        (the tensors themselves on a CPU device). ``out``: pinned buffers to copy into (their first
        rows). ``while_waiting`` is called every ``WAIT_POLL_S`` until the copies are done."""
        if not self.is_cuda:
            return tensors
        hosts, done = self.start_host_copies(tensors, out)
        if while_waiting is not None:
            while not done.query():
                while_waiting()
                time.sleep(WAIT_POLL_S)
        done.synchronize()
        return hosts

    def upload(self, host: torch.Tensor) -> torch.Tensor:
        """On the compute thread: a device copy of a host tensor, ordered before later dense work."""
        return tensor_io.upload(host, self.device) if self.is_cuda else host

    def start_host_copies(self, tensors, out=None) -> tuple[tuple[torch.Tensor, ...], torch.cuda.Event]:
        """On the compute thread (CUDA): start pinned host copies of ``tensors`` on the copy stream, after
        the work queued so far; the copies, and the event that marks them done. Work queued after this
        call does not delay them."""
        ready = torch.cuda.Event()
        ready.record()  # on the compute thread's current stream, after the producing kernels
        hosts = []
        with torch.cuda.stream(self._copy_stream):
            self._copy_stream.wait_event(ready)
            for i, t in enumerate(tensors):
                if out is not None:
                    host = out[i][:t.shape[0]]
                else:
                    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t, non_blocking=True)
                t.record_stream(self._copy_stream)
                hosts.append(host)
            done = torch.cuda.Event()
            done.record(self._copy_stream)
        return tuple(hosts), done

    def close(self) -> None:
        self._compute.shutdown(wait=True)

    async def close_off_loop(self) -> None:
        """``close()`` on a thread of its own, awaited without blocking the loop (a step still on the compute
        thread may wait for shards this loop serves). Not through the loop's default executor: at interpreter
        exit, or once ``loop.shutdown_default_executor()`` ran, that takes no new work."""
        closed: concurrent.futures.Future = concurrent.futures.Future()
        threading.Thread(target=self._close_into, args=(closed,), name="fd-dense-close", daemon=True).start()
        await asyncio.wrap_future(closed)

    def _close_into(self, closed: concurrent.futures.Future) -> None:
        is_awaited = closed.set_running_or_notify_cancel()  # False once the awaiting task was cancelled
        try:
            self.close()
        except BaseException as exc:
            if not is_awaited:
                raise
            closed.set_exception(exc)
        else:
            if is_awaited:
                closed.set_result(None)
