"""Memory this host can give now: the kernel's MemAvailable (which counts the page cache it can drop), capped by the
cgroup's limit where the process runs in a container (cgroup v2 ``memory.max`` less ``memory.current``). Read by
the KV pools' sizing and checks, which pre-fault all of their memory: asking more gets a process OOM-killed."""
from __future__ import annotations

import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_memory_bytes() -> int:
    """Bytes of memory a new allocation can take now on this host (and within its container's limit)."""
    available = _meminfo_available()
    room = _cgroup_room()
    return available if room is None else min(available, room)


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:  # not Linux
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _cgroup_room(own_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT) -> int | None:
    """The cgroup v2 limit less what the group uses now, None without a limit (or off cgroup v2)."""
    try:
        own = own_cgroup.read_text(encoding="ascii").splitlines()
        path = next(line.split(":", 2)[2] for line in own if line.startswith("0::"))
        group = root / path.lstrip("/")
        limit = (group / "memory.max").read_text(encoding="ascii").strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((group / "memory.current").read_text(encoding="ascii").strip()))
    except (OSError, StopIteration, ValueError, IndexError):
        return None
