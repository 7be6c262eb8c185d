"""GPU dense-step profiles: built-in analytical ones per GPU type, or a measured sweep.

Analytical: one dense pass of ``b`` sequences (all layers and the LM head, no
attention) takes

    T(b) = max(dense_weight_bytes / (hbm_bytes_per_s * hbm_efficiency),
               2 * dense_params * b / (peak_flops * flops_efficiency))
           + num_layers * launch_overhead_s

i.e. it reads the weights once (memory-bound for small b) or is compute-bound
for large b, plus the kernel launches of every layer.

Measured: the Executor times dense passes over a sweep of batch sizes at start-up
(``ExecutorConfig.profile_batches``); ``fdctl bench offline --write-gpu-profile FILE``
writes its sweep (batch 1, batch / 2 and batch) as JSON (``GpuProfile.to_json_dict``),
the device's name and memory where it runs on a CUDA GPU::

    {
      "format": "fastdecode.gpu-profile",
      "version": 1,
      "device_name": "NVIDIA H100 80GB HBM3",
      "memory_bytes": 85520809984,
      "model": "meta-llama/Meta-Llama-3-8B",
      "dtype": "bfloat16",
      "num_layers": 32,
      "dense_step_s": {"1": 0.0061, "16": 0.0062, "64": 0.0066, "256": 0.0101}
    }

``dense_step_s`` maps a batch size (a JSON object key, so a string of digits)
to the seconds of one dense pass of that many sequences.  ``memory_bytes``,
``device_name``, ``model``, ``dtype`` and ``num_layers`` are informative and
may be absent (without ``memory_bytes`` the GPU memory is not checked). A file
written by hand in this shape serves as well.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fastdecode.scheduler.model_shape import ModelShape
from fastdecode.scheduler.perf_model import GpuPerfModel

PROFILE_FORMAT = "fastdecode.gpu-profile"
PROFILE_VERSION = 1
_MIB = 1 << 20


@dataclass(frozen=True)
class GpuSpec:
    """An analytical GPU: peak rates, how much of them a dense step achieves, memory, launch cost."""

    name: str
    hbm_bytes_per_s: float
    peak_flops: float  # dense bf16
    memory_bytes: int
    hbm_efficiency: float = 0.85
    flops_efficiency: float = 0.6
    launch_overhead_s: float = 20e-6  # per layer and dense pass

    def __post_init__(self) -> None:
        for name in ("hbm_bytes_per_s", "peak_flops", "memory_bytes"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0")
        for name in ("hbm_efficiency", "flops_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1]")
        if not self.launch_overhead_s >= 0:
            raise ValueError("launch_overhead_s must be >= 0")

    def dense_step_s(self, shape: ModelShape, batch: float) -> float:
        """Seconds of one dense pass of ``batch`` sequences (0 for none)."""
        if batch <= 0:
            return 0.0
        memory_s = shape.dense_weight_bytes / (self.hbm_bytes_per_s * self.hbm_efficiency)
        compute_s = 2.0 * shape.dense_params * batch / (self.peak_flops * self.flops_efficiency)
        return max(memory_s, compute_s) + shape.num_layers * self.launch_overhead_s

    def sweep(self, shape: ModelShape, batches: tuple[int, ...] = tuple(2**i for i in range(14))) -> GpuProfile:
        """The profile a start-up sweep would measure if the GPU behaved exactly like this spec."""
        return GpuProfile(
            dense_step_s=tuple((b, self.dense_step_s(shape, b)) for b in batches),
            device_name=f"{self.name} (analytical)",
            memory_bytes=self.memory_bytes,
            num_layers=shape.num_layers,
        )


# Memory sizes are what the devices report (nvidia-smi MiB), not the marketing figures.
GPU_SPECS: Mapping[str, GpuSpec] = {
    "h100": GpuSpec("h100", hbm_bytes_per_s=3.35e12, peak_flops=989e12, memory_bytes=81559 * _MIB),
    "h200": GpuSpec("h200", hbm_bytes_per_s=4.8e12, peak_flops=989e12, memory_bytes=143771 * _MIB),
    "a10": GpuSpec("a10", hbm_bytes_per_s=600e9, peak_flops=125e12, memory_bytes=23028 * _MIB),
}


@dataclass(frozen=True)
class GpuProfile:
    """A measured (or synthesised) sweep of dense step times: (batch, seconds), ascending batches."""

    dense_step_s: tuple[tuple[int, float], ...]
    device_name: str = ""
    memory_bytes: int | None = None
    model: str = ""
    dtype: str = ""
    num_layers: int | None = None

    def __post_init__(self) -> None:
        self.perf_model()  # validates the samples (two or more distinct positive batch sizes, positive times)
        memory = self.memory_bytes
        if memory is not None and (isinstance(memory, bool) or not isinstance(memory, int) or memory <= 0):
            raise ValueError(f"memory_bytes must be a positive integer, got {self.memory_bytes!r}")

    def perf_model(self, *, update_rate: float = 0.1) -> GpuPerfModel:
        return GpuPerfModel(self.dense_step_s, update_rate=update_rate)

    def to_json_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"format": PROFILE_FORMAT, "version": PROFILE_VERSION}
        if self.device_name:
            data["device_name"] = self.device_name
        if self.memory_bytes is not None:
            data["memory_bytes"] = self.memory_bytes
        if self.model:
            data["model"] = self.model
        if self.dtype:
            data["dtype"] = self.dtype
        if self.num_layers is not None:
            data["num_layers"] = self.num_layers
        data["dense_step_s"] = {str(b): s for b, s in sorted(self.dense_step_s)}
        return data

    @classmethod
    def from_json_dict(cls, data: Any) -> GpuProfile:
        """Parse the JSON document described in the module docstring; ValueError saying what is wrong."""
        if not isinstance(data, Mapping):
            raise ValueError("a GPU profile must be a JSON object")
        if data.get("format") != PROFILE_FORMAT:
            raise ValueError(f"not a GPU profile: 'format' must be {PROFILE_FORMAT!r}, got {data.get('format')!r}")
        if data.get("version") != PROFILE_VERSION:
            raise ValueError(f"unsupported GPU profile version {data.get('version')!r} (expected {PROFILE_VERSION})")
        raw = data.get("dense_step_s")
        if not isinstance(raw, Mapping) or not raw:
            raise ValueError("'dense_step_s' must be a non-empty object of batch size -> seconds")
        samples = []
        for key, seconds in raw.items():
            if not isinstance(key, str) or not key.isdigit() or int(key) < 1:
                raise ValueError(f"dense_step_s key {key!r} is not a positive batch size")
            if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds <= 0:
                raise ValueError(f"dense_step_s[{key}] must be a positive number of seconds, got {seconds!r}")
            samples.append((int(key), float(seconds)))
        num_layers = data.get("num_layers")
        if num_layers is not None and (isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1):
            raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
        return cls(
            dense_step_s=tuple(sorted(samples)),
            device_name=str(data.get("device_name", "")),
            memory_bytes=data.get("memory_bytes"),
            model=str(data.get("model", "")),
            dtype=str(data.get("dtype", "")),
            num_layers=num_layers,
        )
