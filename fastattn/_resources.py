"""The CPUs and memory this process may use.

A container's limits are not in ``os.cpu_count()`` or /proc/meminfo: the CPUs
it may run on are its affinity mask, its CPU time is capped by its cgroup's
quota (threads beyond it are throttled), and its memory by its cgroup's limit
(an allocation beyond it is OOM-killed, not refused).  Both cgroup versions are
read: v2 (``cpu.max``, ``memory.max``) and v1 (``cpu.cfs_quota_us``,
``memory.limit_in_bytes``), in the process's own cgroup and every ancestor up
to the hierarchy's mount point, since each level's limit applies.

Files are read under ``ROOT`` (tests point it at a fake tree); every reader
returns None, "no limit", when a file is missing or unreadable.
"""

from __future__ import annotations

import math
import os
from typing import Any, Dict, List, Optional, Tuple

ROOT = "/"

# cgroup v1 writes "no limit" as a number near 2**63
_UNLIMITED = 2 ** 62


def _read(root: str, path: str) -> Optional[str]:
    try:
        with open(os.path.join(root, path.lstrip("/"))) as f:
            return f.read()
    except (OSError, UnicodeDecodeError, ValueError):  # ValueError: a NUL in the path
        return None


def _int(text: Optional[str]) -> Optional[int]:
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def _cgroup_dirs(controller: str, root: str) -> Tuple[int, List[str]]:
    """(cgroup version, directories of this process's cgroup for ``controller``,
    its own first, then each ancestor up to the mount point); (0, []) if none."""
    v1_path = v2_path = None
    for line in (_read(root, "/proc/self/cgroup") or "").splitlines():
        parts = line.split(":", 2)  # "id:controllers:path"; v2: "0::path"
        if len(parts) != 3:
            continue
        if controller in parts[1].split(","):
            v1_path = parts[2]
        elif parts[0] == "0" and parts[1] == "":
            v2_path = parts[2]
    mounts = {}  # version -> (root of the hierarchy the mount shows, mount point)
    for line in (_read(root, "/proc/self/mountinfo") or "").splitlines():
        # "id parent dev root mount-point options [optional fields] - fstype source super-options"
        head, sep, tail = line.partition(" - ")
        fields, tail = head.split(), tail.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        if tail[0] == "cgroup" and controller in tail[2].split(","):
            mounts.setdefault(1, (fields[3], fields[4]))
        elif tail[0] == "cgroup2":
            mounts.setdefault(2, (fields[3], fields[4]))
    mounts.setdefault(2, ("/", "/sys/fs/cgroup"))  # the usual place, without mountinfo
    if v1_path is not None and 1 in mounts:
        version, path = 1, v1_path
    elif v2_path is not None:
        version, path = 2, v2_path
    else:
        return 0, []
    mount_root, mount_point = mounts[version]
    mount_root = mount_root.rstrip("/")
    # the path is relative to the hierarchy's root; the mount may show only a
    # subtree of it (a container sees its own cgroup as the mount's top)
    rel = path[len(mount_root):] if path == mount_root or path.startswith(mount_root + "/") else ""
    parts = [p for p in rel.split("/") if p]
    if ".." in parts:  # a cgroup outside the mounted subtree: only the mount's top is seen
        parts = []
    dirs = [os.path.join(mount_point, *parts[:i]) for i in range(len(parts), -1, -1)]
    return version, [os.path.join(root, d.lstrip("/")) for d in dirs]


def cpu_quota(root: Optional[str] = None) -> Optional[float]:
    """The cgroup CPU quota in CPUs (quota / period, the tightest level), or None."""
    root = ROOT if root is None else root
    version, dirs = _cgroup_dirs("cpu", root)
    quotas = []
    for d in dirs:
        if version == 2:
            fields = (_read(d, "cpu.max") or "").split()  # "max 100000" or "50000 100000"
            quota, period = (_int(fields[0]), _int(fields[1])) if len(fields) == 2 else (None, None)
        else:
            quota, period = _int(_read(d, "cpu.cfs_quota_us")), _int(_read(d, "cpu.cfs_period_us"))
        if quota is not None and quota > 0 and period and period > 0:  # v1: -1, no quota
            quotas.append(quota / period)
    return min(quotas) if quotas else None


def affinity_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def usable_cpus(root: Optional[str] = None) -> int:
    """Threads worth running: the affinity mask's CPUs, capped by the cgroup
    quota rounded up (1.5 CPUs of quota keep two threads busy), at least 1."""
    quota = cpu_quota(root)
    n = affinity_cpus()
    return max(1, min(n, math.ceil(quota)) if quota is not None else n)


def cgroup_memory(root: Optional[str] = None) -> Optional[Tuple[int, int]]:
    """(limit, bytes left under it) of the tightest cgroup memory limit, or None.

    What is left counts the inactive page cache as free: the kernel reclaims it
    before it fails an allocation, so a container that has read big files is
    not taken for full.
    """
    root = ROOT if root is None else root
    version, dirs = _cgroup_dirs("memory", root)
    names = {2: ("memory.max", "memory.current", "inactive_file"),
             1: ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}
    limit_file, usage_file, cache_key = names.get(version, names[2])
    best = None
    for d in dirs:
        limit, usage = _int(_read(d, limit_file)), _int(_read(d, usage_file))
        # "max" (or v1's huge number): no limit; a negative one is not a limit either
        if limit is None or limit < 0 or limit >= _UNLIMITED or usage is None:
            continue
        cache = 0
        for line in (_read(d, "memory.stat") or "").splitlines():
            key, _, value = line.partition(" ")
            if key == cache_key:
                cache = _int(value) or 0
        left = max(0, limit - max(0, usage - cache))
        if best is None or left < best[1]:
            best = (limit, left)
    return best


def meminfo_available(root: Optional[str] = None) -> Optional[int]:
    """MemAvailable of /proc/meminfo in bytes, or None (not Linux)."""
    root = ROOT if root is None else root
    for line in (_read(root, "/proc/meminfo") or "").splitlines():
        if line.startswith("MemAvailable:"):  # "MemAvailable:   23621460 kB"
            kib = _int(line[len("MemAvailable:"):].replace("kB", ""))
            return kib * 1024 if kib is not None else None
    return None


def available_memory(root: Optional[str] = None) -> Optional[int]:
    """Bytes this process could still allocate: the smaller of MemAvailable and
    what its cgroup limit leaves, or None when neither is known."""
    cgroup = cgroup_memory(root)
    known = [b for b in (meminfo_available(root), cgroup and cgroup[1]) if b is not None]
    return min(known) if known else None


def limits(root: Optional[str] = None) -> Dict[str, Any]:
    """What fastattn found: CPUs (affinity, quota, usable) and memory (cgroup
    limit, available), None where there is no limit or nothing to read."""
    cgroup = cgroup_memory(root)
    return {
        "affinity_cpus": affinity_cpus(),
        "cpu_quota": cpu_quota(root),
        "usable_cpus": usable_cpus(root),
        "memory_limit": cgroup[0] if cgroup else None,
        "available_memory": available_memory(root),
    }
