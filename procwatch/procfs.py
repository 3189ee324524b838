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

import collections as _collections
import errno as _errno
import fcntl as _fcntl
import functools as _functools
import logging as _logging
import os as _os
import select as _select
import struct as _struct
import time as _time

PROCFS = "/proc"
log = _logging.getLogger("procwatch")
# /proc/PID may hide a live process: a hidepid=1 mount answers EACCES, a
# hidepid=2 ("invisible") mount ENOENT, to a reader without CAP_SYS_PTRACE or
# the mount's gid= (proc(5)).  "Unreadable" is therefore never read as "gone":
# every reader here returns None, and callers that act on a process (kill it,
# end its slot) treat None as "cannot verify: do nothing".
_UNREADABLE = (FileNotFoundError, ProcessLookupError, PermissionError)


def start_time(pid, procfs=PROCFS):
    """Start time of ``pid`` (clock ticks since boot), or None if gone or hidden.

    Zombies still have a start time: they are not gone until reaped.  None
    also when /proc hides the process (hidepid=): see open_verified().
    """
    if pid <= 0:
        return None
    # os.open/os.read, not open(): no buffered file object around one read of a few hundred
    # bytes (this runs at every registration; issue 16).  The line is 52 numbers and a comm
    # of at most 16 bytes: 4096 holds it.
    try:
        fd = _os.open(f"{procfs}/{pid}/stat", _os.O_RDONLY | _os.O_CLOEXEC)
    except _UNREADABLE:
        return None
    try:
        data = _os.read(fd, 4096)
    except _UNREADABLE:
        return None
    finally:
        _os.close(fd)
    # comm (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = data[data.rindex(b")") + 2:].split()
    return int(rest[19])          # field 22; rest[0] is field 3


def stat_state(pid, procfs=PROCFS):
    """One-letter state of ``pid`` (R, S, D, T, Z, ...), or None if gone."""
    try:
        with open(f"{procfs}/{pid}/stat", "rb") as f:
            data = f.read()
    except _UNREADABLE:
        return None
    return data[data.rindex(b")") + 2:data.rindex(b")") + 3].decode()


def process_exists(pid, procfs=PROCFS):
    """Whether ``pid`` is a process that has not exited (a zombie has; hidden counts as alive).

    For "is the holder of the table's lock still there": a zombie cannot give
    a lock back, and a /proc entry we may not read is not proof of death.
    """
    if not 0 < pid < pid_max(procfs):
        return False
    try:
        with open(f"{procfs}/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return data[data.rindex(b")") + 2:data.rindex(b")") + 3] not in (b"Z", b"X")


def start_wall_time(pid, procfs=PROCFS):
    """When ``pid`` started, in Unix seconds (boot time + start ticks), or None if gone."""
    ticks = start_time(pid, procfs)
    if ticks is None:
        return None
    return _boot_time(procfs) + ticks / _os.sysconf("SC_CLK_TCK")


@_functools.lru_cache(maxsize=None)
def _boot_time(procfs=PROCFS):
    with open(f"{procfs}/stat") as f:
        for line in f:
            if line.startswith("btime "):
                return int(line.split()[1])
    return 0


PF_EXITING = 0x00000004      # include/linux/sched.h: set by exit_signals() at the top of do_exit()


def group_exiting(pid, expected_start, procfs=PROCFS):
    """Whether the process (``pid``, ``expected_start``) is dying as a whole.

    True when every thread is exiting: PF_EXITING in field 9 of
    /proc/PID/task/TID/stat, or a zombie, or already gone, or SIGKILL pending
    on it (field 31 of that stat, the thread's ``SigPnd``: a fatal signal and exit_group() queue SIGKILL on every
    other thread, complete_signal()/zap_other_threads(), and a thread not yet
    scheduled has not reached do_exit()); or when the process dumps core
    (``CoreDumping: 1``: the other threads are killed first); or when the PID
    now names another process.  False when a thread is none of these: the
    one that calls execve(2) (de_thread() kills the others with SIGKILL, never
    itself), so an exec is never taken for a death.  None when /proc hides
    it (hidepid=): unreadable is never read as gone.
    """
    for _ in range(LISTING_TRIES):
        verdict = _task_listing(pid, expected_start, procfs)
        if verdict != _SHORT:
            return verdict
    return None                         # threads kept leaving: ask again


LISTING_TRIES = 3
_SHORT = "short"


def _task_listing(pid, expected_start, procfs):
    """One listing for group_exiting(): its verdict, or _SHORT when every thread read was
    exiting but one listed was gone when read.  Such a listing can stop short: the kernel's
    proc_task_readdir() ends at a thread released while it was listed (next_tid() checks
    pid_alive()), and during an execve(2) from a third thread the others are released one
    after another while the exec'ing thread, the one not exiting, may be among those not shown.
    """
    base = f"{procfs}/{pid}/task"
    try:
        tids = _os.listdir(base)
    except (FileNotFoundError, ProcessLookupError):
        try:                            # gone, or hidden by hidepid=2 (ENOENT too): ask the kernel
            _os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        return None
    except PermissionError:
        return None
    vanished = False
    for tid in tids:
        try:
            with open(f"{base}/{tid}/stat", "rb") as f:
                data = f.read()
        except (FileNotFoundError, ProcessLookupError):
            vanished = True             # that thread is gone already (ESRCH: while being read)
            continue
        except PermissionError:
            return None
        rest = data[data.rindex(b")") + 2:].split()
        if tid == str(pid) and int(rest[19]) != expected_start:
            return True                 # the PID was reused: ours is gone
        if rest[0] in (b"Z", b"X") or int(rest[6]) & PF_EXITING:
            continue
        if int(rest[28]) & _SIGKILL_BIT:
            continue                    # field 31: the thread's own pending signals (its SigPnd)
        core = _status_field(f"{procfs}/{pid}/status", b"CoreDumping:")
        return None if core is None else core.strip() == b"1"
    return _SHORT if vanished else True


_SIGKILL_BIT = 1 << (9 - 1)     # signal 9 in a /proc sigset mask


def _status_field(path, name):
    """The value of line ``name`` of a /proc status file (bytes), or None if it is gone."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except PermissionError:
        return b"0"
    at = data.find(b"\n" + name)
    if at < 0:
        return b"0"
    return data[at + 1 + len(name):data.index(b"\n", at + 1)].strip()


def real_uid(pid, procfs=PROCFS):
    """Real uid of ``pid`` from /proc/PID/status, or None if gone."""
    try:
        with open(f"{procfs}/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[1])
    except _UNREADABLE:
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
    """A pidfd for ``pid``, or None if no process has that PID.  See pidfd_open(2).

    A PID word may hold a thread's ID (a reused number, a forged slot): the
    kernel answers ENOENT for a thread that is not a thread-group leader
    (seen on Linux 6.18; EINVAL on older kernels), and no process has that
    PID, so that is None too.  The service crashed on it (tests/reliability).
    """
    try:
        return _os.pidfd_open(pid)
    except (ProcessLookupError, FileNotFoundError):
        return None


def pidfd_exited(fd):
    """Whether the process behind pidfd ``fd`` has exited (whole thread group).

    Only POLLIN counts: a descriptor closed under us (a watch-list sync on
    another thread) polls as POLLNVAL, and must never read as "exited".
    """
    p = _select.poll()
    p.register(fd, _select.POLLIN)
    return any(ev & _select.POLLIN for _, ev in p.poll(0))


def open_verified(pid, expected_start, procfs=PROCFS, exited_ok=False):
    """A pidfd for the process (pid, expected_start), or None if it is gone.

    The pidfd is opened *before* the start time is read, so the process that
    was checked is the process the pidfd holds: a PID reused between the two
    steps shows up as a start-time mismatch, never as a wrong pidfd.

    ``exited_ok``: also return the pidfd of a process that has exited but is
    not reaped yet (a zombie keeps its PID and start time), so that its exit
    is reported with its status, not found dead later.
    """
    fd = pidfd_open(pid)
    if fd is None:
        return None
    start = start_time(pid, procfs)
    if start is None and not pidfd_exited(fd):
        # The pidfd proves the process exists; /proc hides it from us
        # (hidepid=).  Its start time cannot be checked, so the PID word is
        # trusted: the worst case is that a PID reused while the service was
        # down is watched in place of the dead client and its end reported
        # late, never that a live process is reported dead.  Killing needs a
        # verified start time (start_time() is None here), so none happens.
        _warn_hidden(pid, procfs)
        return fd
    if start != expected_start or (not exited_ok and pidfd_exited(fd)):
        _os.close(fd)
        return None
    return fd


_hidden_warned = set()


def _warn_hidden(pid, procfs):
    if pid in _hidden_warned:
        return
    if len(_hidden_warned) > 4096:        # bounded: a long-lived service sees many PIDs
        _hidden_warned.clear()
    _hidden_warned.add(pid)
    log.warning("cannot read %s/%d/stat although PID %d lives (a hidepid= mount?): watching it "
                "by pidfd without checking its start time; give the service CAP_SYS_PTRACE "
                "or the mount's gid= to restore the check", procfs, pid, pid)


def maps_has_sysv(pid, shmid, procfs=PROCFS):
    """How ``pid`` has SysV segment ``shmid`` attached: None (not), "r" or "rw" (/proc/PID/maps).

    SysV mappings show as ``/SYSV<key in hex> (deleted)`` with the shmid in
    the inode column and the attach mode in the permissions column
    (``rw-s``, or ``r--s`` for shmat(SHM_RDONLY)) (proc(5)).  Several
    attachments: "rw" if any of them is writable.
    """
    found = None
    try:
        with open(f"{procfs}/{pid}/maps", "rb") as f:
            for line in f:
                if b"/SYSV" in line:
                    cols = line.split()
                    if int(cols[4]) == shmid:
                        if cols[1][1:2] == b"w":
                            return "rw"
                        found = "r"
    except (FileNotFoundError, ProcessLookupError):
        return None
    return found


# -- scheduler statistics: what a process did while it did not beat (issue 15) -------

SchedSample = _collections.namedtuple("SchedSample", "mono_ns states cpu_ns wait_ns")
SchedSample.__doc__ = """What the kernel says about one process at one moment.

``states`` maps each thread id to its one-letter state (proc(5) field 3);
``cpu_ns`` and ``wait_ns`` are the sums over the threads of the first two
fields of /proc/PID/task/TID/schedstat: time on a CPU, and time runnable on a
run queue waiting for one (Documentation/scheduler/sched-stats.rst).
"""


def sched_sample(pid, procfs=PROCFS):
    """A :data:`SchedSample` of ``pid``'s threads, or None if it is gone or hidden.

    Costs one directory listing and two small reads per thread, so the
    heartbeat checker takes one only when a slot misses (issue 15), never
    per pass.  Threads that exit between two samples take their times with
    them: a difference can come out negative, and callers clamp it.

    XXX: the wait a thread is in right now is not in ``wait_ns`` yet: the
    kernel adds a run-queue wait when the thread gets a CPU (sched_info_arrive),
    so a thread throttled by its cgroup for a whole window shows no wait in it.
    The cgroup's throttling counters and pressure cover that (cgroup.py).
    """
    task_dir = f"{procfs}/{pid}/task"
    mono = _time.monotonic_ns()
    try:
        tids = _os.listdir(task_dir)
    except _UNREADABLE:
        return None
    states, cpu, wait = {}, 0, 0
    for tid in tids:
        try:
            with open(f"{task_dir}/{tid}/stat", "rb") as f:
                data = f.read()
            with open(f"{task_dir}/{tid}/schedstat", "rb") as f:
                sched = f.read().split()
        except _UNREADABLE:
            continue                    # this thread exited meanwhile
        states[int(tid)] = data[data.rindex(b")") + 2:data.rindex(b")") + 3].decode()
        cpu += int(sched[0])
        wait += int(sched[1])
    if not states:
        return None
    return SchedSample(mono, states, cpu, wait)


def wchan(pid, tid=None, procfs=PROCFS):
    """The kernel function ``pid`` (thread ``tid``) sleeps in, or None (running, unknown).

    /proc/PID/wchan reads "0" for a running task and may read "0" for any
    task when the kernel hides symbols (proc(5)).
    """
    path = f"{procfs}/{pid}/wchan" if tid is None else f"{procfs}/{pid}/task/{tid}/wchan"
    try:
        with open(path) as f:
            text = f.read().strip()
    except _UNREADABLE:
        return None
    return text if text and text != "0" else None


# -- how a process ended: its exit status after the fact ---------------------------------

# include/uapi/linux/pidfd.h: PIDFD_GET_INFO = _IOWR(PIDFS_IOCTL_MAGIC 0xFF, 11,
# struct pidfd_info) (kernel >= 6.13), with the 64-byte first version of the
# struct: mask, cgroupid, pid, tgid, ppid, ruid, rgid, euid, egid, suid, sgid,
# fsuid, fsgid, exit_code.  PIDFD_INFO_EXIT (kernel >= 6.15).
PIDFD_GET_INFO = 0xC040FF0B
PIDFD_INFO_EXIT = 1 << 3
_PIDFD_INFO = _struct.Struct("=QQ11Ii")
assert _PIDFD_INFO.size == 64
CAP_SYS_PTRACE = 19           # include/uapi/linux/capability.h
CAP_SYS_NICE = 23

_pidfd_info_missing = False   # set once the kernel answers ENOTTY (< 6.13)


def pidfd_exit_status(fd):
    """The wait(2) status kept with a *reaped* process's pidfd, or None.

    None while the process is still a zombie, and on kernels < 6.15.
    """
    global _pidfd_info_missing
    if _pidfd_info_missing:
        return None
    buf = bytearray(_PIDFD_INFO.size)
    _struct.pack_into("=Q", buf, 0, PIDFD_INFO_EXIT)
    try:
        _fcntl.ioctl(fd, PIDFD_GET_INFO, buf)
    except OSError as e:
        if e.errno in (_errno.ENOTTY, _errno.EINVAL):      # kernel < 6.13
            _pidfd_info_missing = True
            return None
        if e.errno == _errno.ESRCH:     # reaped, no exit info kept (< 6.15), or another PID namespace
            return None
        raise
    fields = _PIDFD_INFO.unpack(buf)
    return fields[-1] if fields[0] & PIDFD_INFO_EXIT else None


@_functools.lru_cache(maxsize=None)
def has_capability(cap):
    """Whether this process has capability ``cap`` (a CAP_* number) in its effective set."""
    with open("/proc/self/status", "rb") as f:
        for line in f:
            if line.startswith(b"CapEff:"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def _same_credentials(pid, procfs):
    """Whether every uid and gid of ``pid`` is our fsuid/fsgid (ptrace's own-user rule)."""
    uids = gids = None
    try:
        with open(f"{procfs}/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"Uid:"):
                    uids = [int(x) for x in line.split()[1:4]]
                elif line.startswith(b"Gid:"):
                    gids = [int(x) for x in line.split()[1:4]]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return (uids is not None and gids is not None and set(uids) == {_os.geteuid()}
            and set(gids) == {_os.getegid()})


def zombie_exit_status(pid, start, procfs=PROCFS):
    """Field 52 of /proc/PID/stat of the zombie (pid, start), or why not (a str)."""
    try:
        with open(f"{procfs}/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return "reaped"
    rest = data[data.rindex(b")") + 2:].split()
    # rest[0] is field 3 (state), rest[19] field 22 (start time), rest[49] field 52.
    if int(rest[19]) != start:
        return "reaped"                 # and the PID is already someone else's
    if len(rest) < 50:
        return "no exit_code in /proc/PID/stat (kernel < 3.5)"
    if rest[0] not in (b"Z", b"X"):
        return f"state {rest[0].decode()} is not a zombie"
    # XXX: CAP_SYS_PTRACE is checked in our own user namespace; the kernel
    # checks it in the target's.  Equal for a service and clients in one
    # namespace, which is the only set-up that can share PIDs anyway.
    if not (has_capability(CAP_SYS_PTRACE) or _same_credentials(pid, procfs)):
        return "another user's process (its exit_code reads as 0 without CAP_SYS_PTRACE)"
    return int(rest[49])
