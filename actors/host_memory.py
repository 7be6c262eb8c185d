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
    """The cgroup v2 limit less what the group uses now, None without a limit (or off cgroup v2). The group's
    inactive file pages (page cache the kernel drops as the group nears its limit: a model's weights just read) are
    not counted as used, as container tools count them."""
    try:
        own = own_cgroup.read_text(encoding="ascii").splitlines()
        path = next(line.split(":", 2)[2] for line in own if line.startswith("0::"))
        group = root / path.lstrip("/")
        limit = (group / "memory.max").read_text(encoding="ascii").strip()
        if limit == "max":
            return None
        used = int((group / "memory.current").read_text(encoding="ascii").strip())
        return max(0, int(limit) - used + _inactive_file_bytes(group))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def _inactive_file_bytes(group: Path) -> int:
    try:
        lines = (group / "memory.stat").read_text(encoding="ascii").splitlines()
    except OSError:
        return 0
    stat = dict(line.split(" ", 1) for line in lines if " " in line)
    return int(stat.get("inactive_file", 0))
