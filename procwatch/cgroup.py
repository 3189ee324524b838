"""A process's CPU limit, throttling and CPU pressure, from its cgroup: v1 and v2.

A process can miss its heartbeats because it never gets a CPU: its cgroup's
CPU limit throttles it, or other work takes every CPU.  The heartbeat
checker must not kill it for that by default (issue 15), so it asks this
module what the cgroup says about the time it missed its beats.

The hazard is that there are two cgroup layouts, and a machine may mount
both:

* **v2** (most distributions): one hierarchy, a cgroup2 mount (usually
  /sys/fs/cgroup), the ``0::PATH`` line of /proc/PID/cgroup.  The limit is
  ``cpu.max`` ("QUOTA PERIOD" in µs, QUOTA ``max`` for none), throttling is
  ``nr_throttled`` and ``throttled_usec`` in ``cpu.stat``, and ``cpu.pressure``
  says how long some task of the cgroup was runnable without a CPU
  (Documentation/admin-guide/cgroup-v2.rst, .../accounting/psi.rst).
* **v1**: one hierarchy per controller; the ``cpu`` controller's line of
  /proc/PID/cgroup and its own mount (/sys/fs/cgroup/cpu here).  The limit
  is ``cpu.cfs_quota_us`` (-1 for none) per ``cpu.cfs_period_us``, and
  ``cpu.stat`` counts ``nr_throttled`` and ``throttled_time`` in ns
  (Documentation/scheduler/sched-bwc.rst).  v1 has no pressure files of its
  own; a hybrid machine (v1 controllers, a cgroup2 mount without them, as
  /sys/fs/cgroup/unified on this one) still keeps the process's pressure in
  its v2 cgroup, because the kernel accounts pressure on the default
  hierarchy whatever the controllers are.

A limit set on an ancestor throttles every cgroup below it but counts in the
ancestor's ``cpu.stat`` only, so every level from the process's cgroup up to
the root that has a limit is read.

Mounts are found once, in /proc/self/mountinfo (the service's view; the
paths in /proc/PID/cgroup are relative to the service's cgroup namespace).
Everything here reads files only when called: the checker calls it when a
slot first misses and when it reaches the threshold, never per pass.
"""

import collections as _collections
import functools as _functools
import os as _os

from . import procfs as _procfs

__all__ = ("CpuLevel", "CgroupSample", "sample", "throttled_between", "describe_limit", "mounts",
           "paths", "directory")

_UNREADABLE = (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError)

CpuLevel = _collections.namedtuple("CpuLevel", "path quota_us period_us nr_throttled throttled_us")
CpuLevel.__doc__ = "One cgroup level with a CPU limit: the limit, and its throttling counters so far."

CgroupSample = _collections.namedtuple("CgroupSample", "version path levels pressure_us")
CgroupSample.__doc__ = """The cgroup side of a sample: ``version`` (1 or 2) and ``path`` of the
hierarchy holding the cpu controller (2 with path of the v2 cgroup when no
hierarchy has it), the limited ``levels`` (leaf first), and ``pressure_us``,
the ``some total`` of the process's ``cpu.pressure`` (None where absent)."""

Mounts = _collections.namedtuple("Mounts", "v1 v2")


def _unescape(field):
    """mountinfo octal escapes (\\040 for a space): proc(5)."""
    return field.encode().decode("unicode_escape") if "\\" in field else field


@_functools.lru_cache(maxsize=None)
def mounts(procfs=_procfs.PROCFS):
    """(v1 cpu mount, v2 mount): each (mount point, mount root) or None.

    The v2 mount counts for limits only if its cgroup.controllers lists
    ``cpu`` (a hybrid machine's cgroup2 mount has no cpu controller).
    """
    v1 = v2 = None
    try:
        with open(f"{procfs}/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return Mounts(None, None)
    for line in lines:
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        root, point = _unescape(fields[3]), _unescape(fields[4])
        if tail[0] == "cgroup2" and v2 is None:
            v2 = (point, root)
        elif tail[0] == "cgroup" and v1 is None and "cpu" in tail[2].split(","):
            v1 = (point, root)
    return Mounts(v1, v2)


def _v2_has_cpu(point):
    try:
        with open(f"{point}/cgroup.controllers") as f:
            return "cpu" in f.read().split()
    except OSError:
        return False


def paths(pid, procfs=_procfs.PROCFS):
    """{'cpu': v1 path, '': v2 path} from /proc/PID/cgroup (cgroups(7)), or None if gone."""
    try:
        with open(f"{procfs}/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except _UNREADABLE:
        return None
    out = {}
    for line in lines:
        hid, controllers, path = line.split(":", 2)
        if hid == "0" and not controllers:
            out[""] = path
        elif "cpu" in controllers.split(","):
            out["cpu"] = path
    return out


def directory(mount, path):
    """The directory of cgroup ``path`` under ``mount`` (mount point, mount root)."""
    point, root = mount
    if root != "/" and (path == root or path.startswith(root + "/")):
        path = path[len(root):]         # mounted from inside a cgroup namespace
    return _os.path.normpath(point + "/" + path.lstrip("/"))


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except _UNREADABLE:
        return None


def _stat(text):
    out = {}
    for line in (text or "").splitlines():
        k, _, v = line.partition(" ")
        if v.strip().lstrip("-").isdigit():
            out[k] = int(v)
    return out


def _pressure_some(d):
    """``some total=`` of cpu.pressure in ``d`` (µs), or None."""
    text = _read(f"{d}/cpu.pressure")
    if not text:
        return None
    for line in text.splitlines():
        if line.startswith("some "):
            for part in line.split():
                if part.startswith("total="):
                    return int(part[6:])
    return None


def _limit(d, version):
    """(quota µs, period µs) of cgroup dir ``d``, or None when it has no limit."""
    if version == 2:
        text = _read(f"{d}/cpu.max")
        if not text:
            return None
        parts = text.split()
        if not parts or parts[0] == "max":
            return None
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 100000
    quota = _read(f"{d}/cpu.cfs_quota_us")
    if quota is None or int(quota) < 0:
        return None
    return int(quota), int(_read(f"{d}/cpu.cfs_period_us") or 100000)


def _levels(mount, path, version):
    """Every level from ``path`` up to the mount's root that has a CPU limit."""
    top = _os.path.normpath(mount[0])
    d = directory(mount, path)
    levels = []
    while d.startswith(top):
        limit = _limit(d, version)
        if limit is not None:
            st = _stat(_read(f"{d}/cpu.stat"))
            throttled = st.get("throttled_usec") if version == 2 else st.get("throttled_time", 0) // 1000
            levels.append(CpuLevel(d[len(top):] or "/", *limit, st.get("nr_throttled", 0), throttled or 0))
        if d == top:
            break
        d = _os.path.dirname(d)
    return tuple(levels)


def sample(pid, procfs=_procfs.PROCFS):
    """A :data:`CgroupSample` of ``pid``, or None (gone, or no cgroup mounts at all)."""
    where = paths(pid, procfs)
    if where is None:
        return None
    m = mounts(procfs)
    v2_dir = directory(m.v2, where[""]) if m.v2 is not None and "" in where else None
    # The root cgroup's pressure is the whole machine's, not this process's cgroup's.
    pressure = _pressure_some(v2_dir) if v2_dir and where[""] != "/" else None
    if m.v1 is not None and "cpu" in where:
        v1_dir = directory(m.v1, where["cpu"])
        if pressure is None and where["cpu"] != "/":
            pressure = _pressure_some(v1_dir)     # kernels that give v1 pressure files
        return CgroupSample(1, where["cpu"], _levels(m.v1, where["cpu"], 1), pressure)
    if v2_dir is not None:
        levels = _levels(m.v2, where[""], 2) if _v2_has_cpu(m.v2[0]) else ()
        return CgroupSample(2, where[""], levels, pressure)
    return None


def throttled_between(before, after):
    """(level, periods, µs) of the limited level throttled most between two samples, or None.

    ``level`` is ``after``'s :data:`CpuLevel`; ``periods`` the growth of its
    nr_throttled, ``µs`` of its throttled time (which the kernel adds only
    when a throttled period ends, so it lags).
    """
    if before is None or after is None:
        return None
    old = {lv.path: lv for lv in before.levels}
    best = None
    for lv in after.levels:
        was = old.get(lv.path)
        if was is None:
            continue
        periods = lv.nr_throttled - was.nr_throttled
        if periods > 0 and (best is None or periods > best[1]):
            best = (lv, periods, max(0, lv.throttled_us - was.throttled_us))
    return best


def describe_limit(version, level):
    """``cpu.max 1000 1000000 at /x`` or ``cpu.cfs_quota_us 1000 per 1000000 µs at /x``."""
    if version == 2:
        return f"cpu.max {level.quota_us} {level.period_us} at {level.path}"
    return f"cpu.cfs_quota_us {level.quota_us} per {level.period_us} µs at {level.path}"
