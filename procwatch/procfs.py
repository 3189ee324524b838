"""Process identity from /proc and pidfds.

A PID alone does not name a process: PIDs are reused.  procwatch names a
process by (PID, start time), the start time being field 22 of
/proc/PID/stat in clock ticks since boot (proc(5)), as psutil does.  A pidfd
pins one process for good; it becomes readable when the whole thread group
has exited (pidfd_open(2)), which is the cheap "is it really gone?" check
used on the detector's hot path.

``procfs`` is a parameter everywhere so that tests can point at another
mount; liveness is never decided by anything but the real kernel.
"""

import functools as _functools
import os as _os
import select as _select

PROCFS = "/proc"


def start_time(pid, procfs=PROCFS):
    """Start time of ``pid`` (clock ticks since boot), or None if it is gone.

    Zombies still have a start time: they are not gone until reaped.
    """
    if pid <= 0:
        return None
    try:
        with open(f"{procfs}/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = data[data.rindex(b")") + 2:].split()
    return int(rest[19])          # field 22; rest[0] is field 3


def stat_state(pid, procfs=PROCFS):
    """One-letter state of ``pid`` (R, S, D, T, Z, ...), or None if gone."""
    try:
        with open(f"{procfs}/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data[data.rindex(b")") + 2:data.rindex(b")") + 3].decode()


def real_uid(pid, procfs=PROCFS):
    """Real uid of ``pid`` from /proc/PID/status, or None if gone."""
    try:
        with open(f"{procfs}/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


@_functools.lru_cache(maxsize=None)
def pid_max(procfs=PROCFS):
    """The kernel's pid_max (PIDs are always below it)."""
    try:
        with open(f"{procfs}/sys/kernel/pid_max") as f:
            return int(f.read())
    except OSError:
        return 4194304            # PID_MAX_LIMIT on 64-bit


def valid_pid(pid, procfs=PROCFS):
    """Whether ``pid`` could name a process at all (1 <= pid < pid_max)."""
    return 0 < pid < pid_max(procfs)


def pidfd_open(pid):
    """A pidfd for ``pid``, or None if no such process.  See pidfd_open(2)."""
    try:
        return _os.pidfd_open(pid)
    except ProcessLookupError:
        return None


def pidfd_exited(fd):
    """Whether the process behind pidfd ``fd`` has exited (whole thread group)."""
    p = _select.poll()
    p.register(fd, _select.POLLIN)
    return bool(p.poll(0))


def open_verified(pid, expected_start, procfs=PROCFS):
    """A pidfd for the process (pid, expected_start), or None if it is gone.

    The pidfd is opened *before* the start time is read, so the process that
    was checked is the process the pidfd holds: a PID reused between the two
    steps shows up as a start-time mismatch, never as a wrong pidfd.
    """
    fd = pidfd_open(pid)
    if fd is None:
        return None
    if start_time(pid, procfs) != expected_start or pidfd_exited(fd):
        _os.close(fd)
        return None
    return fd


def maps_has_sysv(pid, shmid, procfs=PROCFS):
    """Whether ``pid`` has SysV segment ``shmid`` attached (/proc/PID/maps).

    SysV mappings show as ``/SYSV<key in hex> (deleted)`` with the shmid in
    the inode column (proc(5)).
    """
    try:
        with open(f"{procfs}/{pid}/maps", "rb") as f:
            for line in f:
                if b"/SYSV" in line and int(line.split()[4]) == shmid:
                    return True
    except (FileNotFoundError, ProcessLookupError):
        return False
    return False
