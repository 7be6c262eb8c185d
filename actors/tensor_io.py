"""Torch tensors to numpy arrays and back without copies where the memory allows.

numpy has no bfloat16; ``ml_dtypes.bfloat16`` is the numpy dtype the transport and
the native library use for it. Only CPU tensors convert; device copies are the
caller's business (the Executor stages them through pinned buffers), except ``upload``.
"""
from __future__ import annotations

import warnings

import ml_dtypes
import numpy as np
import torch

_TORCH_TO_NUMPY = {
    torch.float32: np.dtype(np.float32),
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: np.dtype(ml_dtypes.bfloat16),
}
_NUMPY_TO_TORCH = {v: k for k, v in _TORCH_TO_NUMPY.items()}

KV_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a contiguous CPU tensor (bfloat16 as ml_dtypes.bfloat16)."""
    if t.device.type != "cpu":
        raise ValueError(f"to_numpy needs a CPU tensor, got one on {t.device}")
    if t.dtype not in _TORCH_TO_NUMPY:
        raise ValueError(f"unsupported dtype {t.dtype}")
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def from_numpy(a: np.ndarray) -> torch.Tensor:
    """A torch view of a numpy array (read-only arrays are viewed all the same:
    callers must not write into the result)."""
    dtype = np.dtype(a.dtype)
    if dtype not in _NUMPY_TO_TORCH:
        raise ValueError(f"unsupported dtype {dtype}")
    if dtype == np.dtype(ml_dtypes.bfloat16):
        a = a.view(np.int16)
    if a.flags.writeable:
        t = torch.from_numpy(a)
    else:
        # Received frames are read-only; torch warns about that, and the caller
        # only ever reads the result (it is copied into the Executor's buffers).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == np.dtype(ml_dtypes.bfloat16) else t


def upload(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` on ``device`` without waiting for the device's queue: a pinned, asynchronous copy on CUDA
    (one from pageable memory would wait for the work queued so far, a step launched ahead included)."""
    if device.type != "cuda":
        return host.to(device)
    return (host if host.is_pinned() else host.pin_memory()).to(device, non_blocking=True)
