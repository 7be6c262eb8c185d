"""ctypes binding of the native attention library (``_fdnative.so``, built by the install).

This is the only module that talks to the library. It declares every C signature, checks each
array's dtype, shape, contiguity and alignment before a call, and turns a non-zero status into
:class:`NativeError`. Calls go through ``ctypes.CDLL``, so the GIL is released while they run.

Sizes: ``bytes_per_token`` is the pool memory of ONE token at ONE layer (its K and V for all KV heads);
a sequence of T tokens on every layer takes ``pages(T) * page_size * bytes_per_token * num_layers``.
"""
from __future__ import annotations

import ctypes
import enum
import os
import threading
from pathlib import Path

import ml_dtypes
import numpy as np

from fastdecode.native import ISA_NAMES

ABI_VERSION = 5
ISA_ENV_VAR = "FASTDECODE_NATIVE_ISA"
PREFETCH_FAR_ENV_VAR = "FASTDECODE_NATIVE_PREFETCH_FAR"
DEFAULT_CHUNK_TOKENS = 512
# what the kernels take (native/csrc/kernel_api.h, pool.cpp): query heads per KV head, and the head dim
MAX_GROUP = 16
MAX_HEAD_DIM = 256
HEAD_DIM_MULTIPLE = 16

_DTYPE_CODES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, np.dtype(ml_dtypes.bfloat16): 2}
_KV_DTYPES = {"float32": 0, "float16": 1, "bfloat16": 2}


class Status(enum.IntEnum):
    """The C ABI's non-zero status codes (fdnative.h)."""

    INVALID_ARGUMENT = 1
    OUT_OF_MEMORY = 2
    ALREADY_EXISTS = 3
    NOT_FOUND = 4
    POOL_FULL = 5
    INTERNAL_ERROR = 6


STATUS_FULL = Status.POOL_FULL


class NativeError(RuntimeError):
    """A non-zero status from the native library; ``status`` holds the code."""

    def __init__(self, status: int, message: str):
        try:
            name = Status(status).name.lower().replace("_", " ")
        except ValueError:  # a code this binding does not know (a newer library)
            name = "status"
        super().__init__(f"{message} [{name} {status}]")
        self.status = status


class _PoolConfig(ctypes.Structure):
    _fields_ = [("num_layers", ctypes.c_int32), ("num_kv_heads", ctypes.c_int32), ("head_dim", ctypes.c_int32),
                ("kv_dtype", ctypes.c_int32), ("page_size", ctypes.c_int32), ("chunk_pages", ctypes.c_int32),
                ("capacity_bytes", ctypes.c_int64), ("num_threads", ctypes.c_int32), ("num_cpus", ctypes.c_int32),
                ("cpu_list", ctypes.POINTER(ctypes.c_int32)), ("isa", ctypes.c_int32), ("prefetch_far", ctypes.c_int32)]


class _PoolInfo(ctypes.Structure):
    _fields_ = [("num_total_pages", ctypes.c_int64), ("num_free_pages", ctypes.c_int64),
                ("page_bytes", ctypes.c_int64), ("num_sequences", ctypes.c_int64), ("isa", ctypes.c_int32),
                ("num_threads", ctypes.c_int32), ("prefetch_far", ctypes.c_int32)]


def _load() -> ctypes.CDLL:
    path = Path(__file__).with_name("_fdnative.so")
    if not path.exists():
        raise ImportError(f"{path} is missing: the native library is built by the install; "
                          "run `pip install -e .` (needs g++ with OpenMP)")
    lib = ctypes.CDLL(str(path))
    i32, i64, vp, f64p = ctypes.c_int32, ctypes.c_int64, ctypes.c_void_p, ctypes.POINTER(ctypes.c_double)
    i32p, i64p = ctypes.POINTER(ctypes.c_int32), ctypes.POINTER(ctypes.c_int64)
    signatures = {
        "fd_abi_version": (i32, []),
        "fd_last_error": (ctypes.c_char_p, []),
        "fd_isa_name": (ctypes.c_char_p, [i32]),
        "fd_isa_supported": (i32, [i32]),
        "fd_isa_best": (i32, []),
        "fd_bf16_dot_cost": (ctypes.c_double, []),
        "fd_prefetch_far_default": (i32, []),
        "fd_pool_create": (i32, [ctypes.POINTER(_PoolConfig), ctypes.POINTER(vp)]),
        "fd_pool_destroy": (i32, [vp]),
        "fd_pool_get_info": (i32, [vp, ctypes.POINTER(_PoolInfo)]),
        "fd_pool_can_allocate_tokens": (i32, [vp, i64, i32p]),
        "fd_seq_allocate": (i32, [vp, i64]),
        "fd_seq_free": (i32, [vp, i64]),
        "fd_seq_len": (i32, [vp, i64, i32, i64p]),
        "fd_append": (i32, [vp, i64, i32, i64, vp, vp, i32]),
        "fd_read": (i32, [vp, i64, i32, i64, vp, vp]),
        "fd_attend": (i32, [vp, i32, i64, vp, i32, vp, i32, vp, vp, i32, vp, i32, vp]),
        "fd_buffer_create": (i32, [i64, i32, i32p, i32, ctypes.POINTER(vp)]),
        "fd_buffer_destroy": (i32, [vp, i64]),
        "fd_read_bandwidth": (i32, [vp, i64, i32, i32p, i32, i32, i32, f64p]),
        "fd_pool_read_bandwidth": (i32, [vp, i32, f64p]),
    }
    for name, (restype, argtypes) in signatures.items():
        func = getattr(lib, name)
        func.restype, func.argtypes = restype, argtypes
    if lib.fd_abi_version() != ABI_VERSION:
        raise ImportError(f"{path} has ABI version {lib.fd_abi_version()}, this binding expects {ABI_VERSION}: "
                          "reinstall (`pip install -e .`) to rebuild it")
    return lib


_LIB = _load()


def _check(status: int) -> None:
    if status != 0:
        raise NativeError(status, _LIB.fd_last_error().decode(errors="replace"))


def available_isas() -> list[str]:
    """The ISA paths both this build and this CPU support, e.g. ``["generic", "avx2", "avx512", "avx512_bf16"]``
    (``"amx"`` too where the CPU has AMX and the OS grants its tile state)."""
    return [name for code, name in enumerate(ISA_NAMES) if _LIB.fd_isa_supported(code)]


def default_isa() -> str:
    """The path a pool takes when none is forced: the most preferred available one, except ``avx512_bf16``
    on a CPU whose bf16 dot product costs more than two FMAs (see :func:`bf16_dot_cost`)."""
    return ISA_NAMES[_LIB.fd_isa_best()]


def bf16_dot_cost() -> float:
    """Time of one zmm ``vdpbf16ps`` over one zmm FMA at full throughput on this CPU, measured once per
    process; 0.0 where the ``avx512_bf16`` path is not available."""
    return float(_LIB.fd_bf16_dot_cost())


def prefetch_far_default() -> bool:
    """Whether pools fetch a second block ahead into L2 unless told otherwise: on Intel CPUs, whose cores'
    line-fill buffers bound a one-level prefetch (docs/benchmarks.md, issue 3, "Session 6")."""
    return bool(_LIB.fd_prefetch_far_default())


def _prefetch_far_code(prefetch_far: bool | None) -> int:
    """``prefetch_far`` or, when None, the FASTDECODE_NATIVE_PREFETCH_FAR environment variable (0 or 1); -1 means
    the CPU's default."""
    if prefetch_far is not None:
        return int(bool(prefetch_far))
    value = os.environ.get(PREFETCH_FAR_ENV_VAR) or None
    if value is None:
        return -1
    if value not in ("0", "1"):
        raise ValueError(f"{PREFETCH_FAR_ENV_VAR} must be 0 or 1, got {value!r}")
    return int(value)


def _isa_code(isa: str | None) -> int:
    """``isa`` or, when None, the FASTDECODE_NATIVE_ISA environment variable; -1 means the best."""
    name = isa if isa is not None else os.environ.get(ISA_ENV_VAR) or None
    if name is None:
        return -1
    if name not in ISA_NAMES:
        raise ValueError(f"unknown ISA {name!r}; choose from {ISA_NAMES}")
    if not _LIB.fd_isa_supported(ISA_NAMES.index(name)):
        raise ValueError(f"ISA {name!r} is not available here (available: {available_isas()})")
    return ISA_NAMES.index(name)


def _team(num_threads: int | None, cpu_list: list[int] | None) -> tuple[int, ctypes.Array | None, int]:
    cpus = [int(c) for c in cpu_list] if cpu_list else []
    if num_threads is None:
        num_threads = len(cpus) if cpus else len(os.sched_getaffinity(0))
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    return num_threads, ((ctypes.c_int32 * len(cpus))(*cpus) if cpus else None), len(cpus)


def _dtype_code(name: str, arr: np.ndarray) -> int:
    code = _DTYPE_CODES.get(arr.dtype)
    if code is None:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {arr.dtype}")
    return code


def _int32(name: str, value: int) -> int:
    """``value`` for a C int32 argument or field; ValueError where ctypes would silently wrap it (2**32 is 0)."""
    value = int(value)
    if not -(1 << 31) <= value < 1 << 31:
        raise ValueError(f"{name} ({value}) does not fit in a 32-bit int")
    return value


def _checked(name: str, arr: object, shape: tuple[int, ...], *, is_output: bool = False) -> np.ndarray:
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(arr).__name__}")
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    if not (arr.flags.c_contiguous and arr.flags.aligned):
        raise ValueError(f"{name} must be C-contiguous and aligned")
    if is_output and not arr.flags.writeable:
        raise ValueError(f"{name} must be writeable")
    return arr


class KVPool:
    """A paged KV-cache for ``num_layers`` layers in host memory, with fused append+attend."""

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, kv_dtype: str, capacity_bytes: int,
                 page_size: int = 32, num_threads: int | None = None, cpu_list: list[int] | None = None,
                 isa: str | None = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, prefetch_far: bool | None = None):
        if kv_dtype not in _KV_DTYPES:
            raise ValueError(f"kv_dtype must be one of {sorted(_KV_DTYPES)}, got {kv_dtype!r}")
        if page_size <= 0 or chunk_tokens <= 0 or chunk_tokens % page_size:
            raise ValueError(f"chunk_tokens ({chunk_tokens}) must be a positive multiple of page_size ({page_size})")
        num_threads, cpus, num_cpus = _team(num_threads, cpu_list)
        num_layers, num_kv_heads, head_dim, page_size = (_int32(name, value) for name, value in (
            ("num_layers", num_layers), ("num_kv_heads", num_kv_heads), ("head_dim", head_dim),
            ("page_size", page_size)))
        config = _PoolConfig(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                             kv_dtype=_KV_DTYPES[kv_dtype], page_size=page_size,
                             chunk_pages=_int32("chunk_tokens / page_size", chunk_tokens // page_size),
                             capacity_bytes=int(capacity_bytes), num_threads=num_threads, num_cpus=num_cpus,
                             cpu_list=cpus, isa=_isa_code(isa), prefetch_far=_prefetch_far_code(prefetch_far))
        self._lock = threading.Lock()
        self._handle = ctypes.c_void_p()
        _check(_LIB.fd_pool_create(ctypes.byref(config), ctypes.byref(self._handle)))
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.kv_dtype, self.page_size, self.chunk_tokens = kv_dtype, page_size, chunk_tokens
        info = self._info()
        self.num_threads, self.isa, self.prefetch_far = info.num_threads, ISA_NAMES[info.isa], bool(info.prefetch_far)
        self._page_bytes, self.num_total_pages = info.page_bytes, info.num_total_pages

    # ---- life cycle ----
    def close(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is None:
            return
        with lock:
            if self._handle:
                _LIB.fd_pool_destroy(self._handle)
                self._handle = ctypes.c_void_p()

    def __enter__(self) -> KVPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def _live_handle(self) -> ctypes.c_void_p:
        if not self._handle:
            raise NativeError(1, "the KV pool is closed")
        return self._handle

    def _info(self) -> _PoolInfo:
        info = _PoolInfo()
        with self._lock:
            _check(_LIB.fd_pool_get_info(self._live_handle(), ctypes.byref(info)))
        return info

    def measure_read_gbps(self, *, num_runs: int = 1) -> float:
        """Best of ``num_runs`` reads of the pool's whole memory (used and free pages) by its threads, in GB/s:
        what the memory the pool landed in delivers (the read-probe kernel of ``ReadBuffer.measure_gbps``)."""
        if num_runs < 1:
            raise ValueError(f"num_runs must be at least 1, got {num_runs}")
        gbps = ctypes.c_double()
        with self._lock:
            _check(_LIB.fd_pool_read_bandwidth(self._live_handle(), int(num_runs), ctypes.byref(gbps)))
        return gbps.value

    # ---- sizes ----
    @property
    def bytes_per_token(self) -> int:
        """Bytes of one token at one layer: K and V for all KV heads."""
        return self._page_bytes // self.page_size

    @property
    def capacity_bytes(self) -> int:
        return self.num_total_pages * self._page_bytes

    @property
    def num_free_pages(self) -> int:
        return self._info().num_free_pages

    @property
    def used_bytes(self) -> int:
        return (self.num_total_pages - self.num_free_pages) * self._page_bytes

    @property
    def num_sequences(self) -> int:
        return self._info().num_sequences

    def can_allocate_tokens(self, num_tokens_per_layer: int) -> bool:
        """True when a new sequence of this many tokens on every layer fits in the free pages."""
        ok = ctypes.c_int32()
        with self._lock:
            _check(_LIB.fd_pool_can_allocate_tokens(self._live_handle(), int(num_tokens_per_layer), ctypes.byref(ok)))
        return bool(ok.value)

    # ---- sequences ----
    def allocate(self, seq_id: int) -> None:
        with self._lock:
            _check(_LIB.fd_seq_allocate(self._live_handle(), int(seq_id)))

    def free(self, seq_id: int) -> None:
        with self._lock:
            _check(_LIB.fd_seq_free(self._live_handle(), int(seq_id)))

    def seq_len(self, seq_id: int, layer: int) -> int:
        out = ctypes.c_int64()
        with self._lock:
            _check(_LIB.fd_seq_len(self._live_handle(), int(seq_id), _int32("layer", layer), ctypes.byref(out)))
        return out.value

    def append(self, seq_id: int, layer: int | None, k: np.ndarray, v: np.ndarray) -> None:
        """Appends T tokens: k, v [T, Hkv, D] at ``layer``, or [L, T, Hkv, D] on all layers when layer is None.
        All-or-nothing: a full pool raises NativeError and changes nothing."""
        lead = 2 if layer is None else 1
        if layer is not None and not 0 <= layer < self.num_layers:  # the library reads -1 as every layer
            raise ValueError(f"layer {layer} is outside [0, {self.num_layers}) (None: every layer)")
        if not isinstance(k, np.ndarray) or k.ndim != lead + 2:
            raise ValueError(f"k must be a {lead + 2}-d numpy array")
        shape = ((self.num_layers,) if layer is None else ()) + (k.shape[lead - 1], self.num_kv_heads, self.head_dim)
        k, v = _checked("k", k, shape), _checked("v", v, shape)
        if k.dtype != v.dtype:
            raise ValueError(f"k and v must share a dtype, got {k.dtype} and {v.dtype}")
        code = _dtype_code("k", k)
        with self._lock:
            _check(_LIB.fd_append(self._live_handle(), int(seq_id), -1 if layer is None else int(layer),
                                  shape[-3], k.ctypes.data, v.ctypes.data, code))

    def read(self, seq_id: int, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Copies of the cache at one layer, dequantised to float32 [T, Hkv, D]."""
        with self._lock:
            handle, length, layer = self._live_handle(), ctypes.c_int64(), _int32("layer", layer)
            _check(_LIB.fd_seq_len(handle, int(seq_id), layer, ctypes.byref(length)))
            k = np.empty((length.value, self.num_kv_heads, self.head_dim), np.float32)
            v = np.empty_like(k)
            _check(_LIB.fd_read(handle, int(seq_id), layer, length.value, k.ctypes.data, v.ctypes.data))
        return k, v

    def attend(self, layer: int, seq_ids: np.ndarray, q: np.ndarray, k: np.ndarray, v: np.ndarray, *,
               out: np.ndarray | None = None, lse: np.ndarray | None = None) -> np.ndarray:
        """One fused native call: append k, v [B, Hkv, D] to each sequence at ``layer``, then attend
        q [B, Hq, D] over its whole cache. Returns o [B, Hq, D] in q's dtype (or fills ``out``); fills
        ``lse`` (float32 [B, Hq], natural log of the softmax denominator of q.k/sqrt(D)) when given.
        A full pool raises NativeError and appends nothing for any sequence."""
        ids = np.ascontiguousarray(seq_ids, dtype=np.int64)
        if ids.ndim != 1:
            raise ValueError(f"seq_ids must be 1-d, got shape {ids.shape}")
        batch = ids.shape[0]
        if not isinstance(q, np.ndarray) or q.ndim != 3:
            raise ValueError("q must be a 3-d numpy array [B, Hq, D]")
        num_q_heads = q.shape[1]
        q = _checked("q", q, (batch, num_q_heads, self.head_dim))
        kv_shape = (batch, self.num_kv_heads, self.head_dim)
        k, v = _checked("k", k, kv_shape), _checked("v", v, kv_shape)
        if k.dtype != v.dtype:
            raise ValueError(f"k and v must share a dtype, got {k.dtype} and {v.dtype}")
        if out is None:
            out = np.empty(q.shape, q.dtype)
        out = _checked("out", out, q.shape, is_output=True)
        lse_ptr = None
        if lse is not None:
            lse = _checked("lse", lse, (batch, num_q_heads), is_output=True)
            if lse.dtype != np.float32:
                raise ValueError(f"lse must be float32, got {lse.dtype}")
            lse_ptr = lse.ctypes.data
        codes = (_dtype_code("q", q), _dtype_code("k", k), _dtype_code("out", out))
        with self._lock:
            _check(_LIB.fd_attend(self._live_handle(), _int32("layer", layer), batch, ids.ctypes.data, num_q_heads,
                                  q.ctypes.data, codes[0], k.ctypes.data, v.ctypes.data, codes[1],
                                  out.ctypes.data, codes[2], lse_ptr))
        return out


class ReadBuffer:
    """A float32 buffer for measuring read bandwidth: huge-page mapped, first touched by the threads."""

    def __init__(self, num_bytes: int, *, num_threads: int | None = None, cpu_list: list[int] | None = None):
        self.num_threads, self._cpus, self._num_cpus = _team(num_threads, cpu_list)
        self.num_bytes = int(num_bytes) // 4096 * 4096
        self._lock = threading.Lock()  # close() waits for a measurement under way (it unmaps what that reads)
        self._ptr = ctypes.c_void_p()
        _check(_LIB.fd_buffer_create(self.num_bytes, self.num_threads, self._cpus, self._num_cpus,
                                     ctypes.byref(self._ptr)))
        raw = (ctypes.c_float * (self.num_bytes // 4)).from_address(self._ptr.value)
        self.array = np.frombuffer(raw, dtype=np.float32)   # a view: valid until close()

    def measure_gbps(self, *, num_runs: int = 5, isa: str | None = None) -> float:
        """Best of ``num_runs`` vectorised all-thread reads of the whole buffer, in GB/s (1e9 B/s)."""
        gbps = ctypes.c_double()
        with self._lock:
            if not self._ptr:
                raise NativeError(1, "the read buffer is closed")
            _check(_LIB.fd_read_bandwidth(self._ptr, self.num_bytes, self.num_threads, self._cpus, self._num_cpus,
                                          _isa_code(isa), _int32("num_runs", num_runs), ctypes.byref(gbps)))
        return gbps.value

    def close(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is None:
            return
        with lock:
            if self._ptr:
                self.array = None
                _LIB.fd_buffer_destroy(self._ptr, self.num_bytes)
                self._ptr = ctypes.c_void_p()

    def __enter__(self) -> ReadBuffer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def read_bandwidth_gbps(num_bytes: int = 1 << 30, *, num_threads: int | None = None,
                        cpu_list: list[int] | None = None, isa: str | None = None, num_runs: int = 5) -> float:
    """The host's read bandwidth (GB/s) over a buffer of ``num_bytes`` (make it many times the LLC)."""
    with ReadBuffer(num_bytes, num_threads=num_threads, cpu_list=cpu_list) as buf:
        return buf.measure_gbps(num_runs=num_runs, isa=isa)
