"""The death word: a big process's death known before its address space is torn down.

The hazard.  do_exit() tears the address space down in exit_mm() (about
50 ms per GiB touched) *before* exit_notify() makes a pidfd readable and
before proc_exit_connector() sends the exit event, so both of the service's
backends learn of a 4 GiB process's death half a second late.  One kernel
notification comes earlier: at the start of exit_mm(), exit_robust_list()
(kernel/futex/core.c) walks the dying thread's robust futex list and, for
each robust mutex it still holds, sets FUTEX_OWNER_DIED in the mutex's word
and, if FUTEX_WAITERS is set, wakes one waiter -- also in another process,
since the futex is shared.

What this module does about it:

* Client side (:class:`Sentinel`).  A registered process locks its slot's
  process-shared robust mutex (the slot's death mutex) from a dedicated thread
  through libc, so that glibc puts it on that thread's robust list, and holds
  it for as long as it is registered.  Unregistering marks the slot DISARMED
  first and unlocks after: an unregister is never a death.
* Service side (:class:`DeathWatch`, :class:`DeathWaiter`).  Waiter threads
  sleep in futex_waitv(2) (Linux >= 5.16) on up to 127 armed death words each
  plus the header's generation word (so new armings are picked up at once);
  FUTEX_WAITERS is set with a compare-and-swap (a plain read-modify-write
  could overwrite the kernel's OWNER_DIED).  When a word fires, the waiter
  confirms that the whole process is exiting -- execve(2) also walks the
  robust list (exec_mm_release(), and de_thread() kills the sentinel) while
  the process lives on -- then the Reporter zeroes the PID word and wakes
  the peers, and the waiter ends; the service starts the next one (the
  patent's respawn).  The exit status still comes from the exit event or the
  pidfd, which completes the report (detector.Reporter.report_exit).

Where this cannot work -- no futex_waitv (Linux < 5.16), no atomics (neither
procwatch._deathword nor libatomic), a slot registered for another process,
a static or setuid program under ``procwatch run`` -- the slot stays
"connector-only": today's path, said once in the log and shown by status.
"""

import ctypes as _ctypes
import errno as _errno
import functools as _functools
import logging as _logging
import os as _os
import signal as _signal
import threading as _threading
import time as _time

from . import abi as _abi
from . import procfs as _procfs

log = _logging.getLogger("procwatch")

WAITV_MAX = 128                    # include/uapi/linux/futex.h: FUTEX_WAITV_MAX
PER_WAITER = WAITV_MAX - 1         # death words per waiter thread (one place is the generation word)
CONFIRM_WINDOW = 0.2               # s a fired word may stay unconfirmed before it is read as an exec
CONFIRM_POLL = 0.0002              # s between two checks of a fired, unconfirmed word
DEFAULT_PRIORITY = 1               # SCHED_FIFO priority of a waiter from its wait to its wake (0: none)
DEFAULT_YIELD_MS = 0               # ms a confirmed death's teardown runs at SCHED_IDLE (0: never)

# -- atomics and futex_waitv --------------------------------------------------------------------

try:
    from . import _deathword as _native
except ImportError:                # not built (optional=True in setup.py): ctypes and libatomic
    _native = None

_libc = _ctypes.CDLL(None, use_errno=True)
SYS_FUTEX_WAITV = 449              # asm-generic/unistd.h and x86_64: the same number everywhere
FUTEX2_SIZE_U32 = 0x02


class _futex_waitv(_ctypes.Structure):
    _fields_ = [("val", _ctypes.c_uint64), ("uaddr", _ctypes.c_uint64),
                ("flags", _ctypes.c_uint32), ("reserved", _ctypes.c_uint32)]


class _timespec(_ctypes.Structure):
    _fields_ = [("tv_sec", _ctypes.c_long), ("tv_nsec", _ctypes.c_long)]


@_functools.lru_cache(maxsize=None)
def _libatomic():
    """libatomic's generic __atomic_compare_exchange_4, or None."""
    for name in ("libatomic.so.1", "libatomic.so"):
        try:
            lib = _ctypes.CDLL(name)
        except OSError:
            continue
        f = lib.__atomic_compare_exchange_4
        f.restype = _ctypes.c_bool
        f.argtypes = [_ctypes.c_void_p, _ctypes.c_void_p, _ctypes.c_uint32, _ctypes.c_int, _ctypes.c_int]
        return f
    return None


def cas32(address, expected, new):
    """Atomic compare-and-swap of the u32 at ``address``; returns the value found."""
    if _native is not None:
        return _native.cas32(address, expected, new)
    exp = _ctypes.c_uint32(expected)
    _libatomic()(address, _ctypes.byref(exp), new, 5, 5)     # __ATOMIC_SEQ_CST
    return exp.value


def _ctypes_waitv(addresses, values, timeout):
    n = len(addresses)
    arr = (_futex_waitv * n)()
    for k, (a, v) in enumerate(zip(addresses, values)):
        arr[k].uaddr, arr[k].val, arr[k].flags = a, v, FUTEX2_SIZE_U32
    ts = None
    if timeout is not None:
        now = _time.clock_gettime(_time.CLOCK_MONOTONIC) + timeout   # absolute, like the kernel's
        ts = _ctypes.byref(_timespec(int(now), int(now % 1 * 1e9)))
    rc = _libc.syscall(_ctypes.c_long(SYS_FUTEX_WAITV), arr, _ctypes.c_uint(n), _ctypes.c_uint(0),
                       ts, _ctypes.c_int(_time.CLOCK_MONOTONIC))
    if rc >= 0:
        return rc
    err = _ctypes.get_errno()
    if err == _errno.EAGAIN:
        return -1
    if err == _errno.ETIMEDOUT:
        return -2
    if err == _errno.EINTR:
        return -3
    raise OSError(err, _os.strerror(err))


def waitv(addresses, values, timeout=None):
    """futex_waitv(2) on shared u32 words: index woken, -1 a word differed, -2 timeout, -3 EINTR."""
    if _native is not None:
        return _native.waitv(addresses, values, timeout)
    return _ctypes_waitv(addresses, values, timeout)


@_functools.lru_cache(maxsize=None)
def availability():
    """(abi.DeathWatch, text) for this host, decided once (psutil's cached-probe idea)."""
    if _native is None and _libatomic() is None:
        return (_abi.DeathWatch.NO_ATOMICS,
                "death words unavailable: procwatch._deathword was not built and libatomic is "
                "missing; connector-only (install gcc and reinstall procwatch, or libatomic1)")
    word = _ctypes.c_uint32(1)
    try:
        rc = waitv([_ctypes.addressof(word)], [0], 0.0)         # differs: EAGAIN at once
    except OSError as e:
        if e.errno in (_errno.ENOSYS, _errno.EPERM):
            return (_abi.DeathWatch.NO_WAITV,
                    f"death words unavailable: futex_waitv(2) failed ({_errno.errorcode.get(e.errno)}: "
                    f"Linux >= 5.16 needed, or a seccomp filter blocks it); connector-only")
        raise
    if rc != -1:
        return _abi.DeathWatch.NO_WAITV, f"death words unavailable: futex_waitv(2) returned {rc}"
    how = "procwatch._deathword" if _native is not None else "ctypes and libatomic"
    return _abi.DeathWatch.WATCHING, f"waiting on death words with futex_waitv(2) ({how})"


def realtime_priority(priority):
    """(priority granted, one line) for the death-word waiters: SCHED_FIFO ``priority`` if allowed.

    Why real-time.  The kernel wakes a waiter from inside the dying process,
    which goes on to tear its address space down in kernel mode (~50 ms per
    GiB) on the CPU it woke the waiter from.  A normal waiter queued there
    waits to be let on -- measured on a 2-vCPU VM, 1 GiB targets killed at
    random: p99 2-4 ms from the kill to the waiter running, against 0.2 ms
    for a SCHED_FIFO 1 waiter, which the scheduler moves to an idle CPU at
    once.  Only the C death step runs real-time (wait, confirm, zero, wake:
    tens of µs a death); it is back at SCHED_OTHER before the bookkeeping,
    which must never hold a CPU the woken peer needs.  The Python fallback
    stays at normal priority: a real-time thread waiting for the GIL would
    only hand the delay to another thread.
    """
    from .native import hot
    if priority <= 0:
        return 0, "death-word waiters at normal priority (death_word_priority = 0)"
    if hot is None:
        return 0, "death-word waiters at normal priority (real-time waits need procwatch._hotstep)"
    err = hot.realtime_probe(priority)
    if err == 0:
        return priority, f"death-word waiters at SCHED_FIFO priority {priority}"
    return 0, (f"death-word waiters at normal priority: SCHED_FIFO {priority} refused "
               f"({_errno.errorcode.get(err, err)}); a dying process's teardown can delay them by "
               f"milliseconds (give the service CAP_SYS_NICE or LimitRTPRIO={priority}, and "
               f"RestrictRealtime=no under systemd; with RT group scheduling on cgroup v1, a "
               f"cpu.rt_runtime_us budget for its cgroup; or set death_word_priority = 0)")


def teardown_yield(ms):
    """(milliseconds granted, one line) for the dying teardown's yield (_hotstep.c, "The dead yield").

    Why.  Once the death step has woken the peers, the dying process goes on
    tearing its memory down in kernel mode, and a normal-priority peer the
    scheduler queued on its CPU waits behind it until the tick ends its slice
    (2-5 ms, a kill in thirty, on a 2-vCPU VM at HZ 250).  At SCHED_IDLE the
    teardown is preempted by any woken task at its next cond_resched().  For
    ``ms`` only: after that the threads get back the policy they had, so a
    busy machine never starves the freeing of the memory.  Giving it back can
    need CAP_SYS_NICE (a real-time or negative-nice policy, or leaving
    SCHED_IDLE without RLIMIT_NICE): without it there is no yield at all.
    """
    from .native import hot
    if ms <= 0:
        return 0, "dying processes keep their scheduling policy (teardown_yield_ms = 0)"
    if hot is None:
        return 0, "dying processes keep their scheduling policy (the teardown yield needs procwatch._hotstep)"
    if not _procfs.has_capability(_procfs.CAP_SYS_NICE):
        return 0, ("dying processes keep their scheduling policy: giving it back after the teardown "
                   "yield needs CAP_SYS_NICE (run the service as root or add the capability; or set "
                   "teardown_yield_ms = 0)")
    return ms, f"a dying process's teardown yields its CPU to woken peers for {ms} ms"


def end_teardown_yields():
    """Give the dying threads the death steps left at SCHED_IDLE their policy back now (a stop)."""
    from .native import hot
    if hot is not None:
        hot.restore_yielded()


# -- client side: the sentinel thread ------------------------------------------------------------

PTHREAD_PROCESS_SHARED = 1         # <pthread.h>
PTHREAD_MUTEX_ROBUST = 1
_ATTR_SIZE = 16                    # >= sizeof(pthread_mutexattr_t) (4 on glibc)


@_functools.lru_cache(maxsize=None)
def _pthread():
    """libc's robust-mutex functions, or None (a libc without them cannot arm)."""
    try:
        fns = {n: getattr(_libc, n) for n in (
            "pthread_mutexattr_init", "pthread_mutexattr_setpshared", "pthread_mutexattr_setrobust",
            "pthread_mutexattr_destroy", "pthread_mutex_init", "pthread_mutex_lock",
            "pthread_mutex_unlock")}
    except AttributeError:
        return None
    for f in fns.values():
        f.restype = _ctypes.c_int
    return fns


class Sentinel:
    """The thread that holds a registered process's death mutex.

    A real pthread (a Python thread is one), and the lock goes through
    libc's pthread_mutex_lock(), so glibc puts the mutex on *this thread's*
    robust list: the kernel then marks the word when the process dies, but
    not when another thread exits (a main thread's pthread_exit() is not a
    death).  The thread blocks every signal, so signals still go to the
    program's own threads.  Not inherited by fork(2): a child has only the
    forking thread, and its robust list does not hold this mutex.
    """

    def __init__(self, table, slot, pid):
        self.table, self.slot, self.pid = table, slot, pid
        self.address = table.death_mutex_address(slot)
        self.state = _abi.Arm.NONE
        self._ready = _threading.Event()
        self._release = _threading.Event()
        self._thread = None

    def arm(self, timeout=5.0):
        """Initialise the mutex, start the thread, wait until it holds the lock; the Arm state.

        Called by register_pid() under the table lock, before the PID word is
        published: a peer or the service never sees the slot half armed.
        """
        p = _pthread()
        if p is None:
            self.state = _abi.Arm.UNAVAILABLE
            self.table.set_arm(self.slot, self.state)
            return self.state
        attr = _ctypes.create_string_buffer(_ATTR_SIZE)
        mutex = _ctypes.c_void_p(self.address)
        ok = (p["pthread_mutexattr_init"](attr) == 0
              and p["pthread_mutexattr_setpshared"](attr, PTHREAD_PROCESS_SHARED) == 0
              and p["pthread_mutexattr_setrobust"](attr, PTHREAD_MUTEX_ROBUST) == 0
              and p["pthread_mutex_init"](mutex, attr) == 0)
        p["pthread_mutexattr_destroy"](attr)
        if not ok:
            self.state = _abi.Arm.UNAVAILABLE
            self.table.set_arm(self.slot, self.state)
            return self.state
        self._thread = _threading.Thread(target=self._hold, name="procwatch-sentinel", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout):
            self.state = _abi.Arm.UNAVAILABLE
            self.table.set_arm(self.slot, self.state)
        return self.state

    def _hold(self):
        _signal.pthread_sigmask(_signal.SIG_BLOCK, _signal.valid_signals())
        p = _pthread()
        mutex = _ctypes.c_void_p(self.address)
        if p["pthread_mutex_lock"](mutex) != 0:
            self.state = _abi.Arm.UNAVAILABLE
            self.table.set_arm(self.slot, self.state)
            self._ready.set()
            return
        self.table.arm(self.slot, _threading.get_native_id())
        self.state = _abi.Arm.ARMED
        self._ready.set()
        self._release.wait()
        p["pthread_mutex_unlock"](mutex)

    def release(self, timeout=1.0):
        """Unlock (the caller marked the slot DISARMED, or it is no longer ours) and end the thread."""
        self._release.set()
        if self._thread is not None and self._thread is not _threading.current_thread():
            self._thread.join(timeout)


# -- service side: confirming a death --------------------------------------------------------------

def confirm(table, w):
    """A fired death word of Watched ``w``: 'dead', 'alive' (not a death) or None (undecided yet).

    'dead' only when the process is gone (its pidfd is readable, or /proc
    says so) or every thread of it is exiting (procfs.group_exiting): a
    false death is worse than a late one.  'alive' when the slot no longer
    holds ``w.pid``, was disarmed (an unregister) or re-armed (a new image
    armed it again).  None: some thread is not exiting (an execve(2) in
    progress, or the others have not reached do_exit() yet), or /proc hides
    the process: ask again.
    """
    if table.pid(w.slot) != w.pid or not table.death_fired(w.slot):
        return "alive"
    if w.pidfd is not None and _procfs.pidfd_exited(w.pidfd):
        return "dead"
    return "dead" if _procfs.group_exiting(w.pid, w.start_time) else None
