"""Shared futexes on words of the slot table: sleeping without polling.

A peer waiting for its target's PID word to turn 0 must not spin or poll:
FUTEX_WAIT sleeps in the kernel until somebody calls FUTEX_WAKE on the same
word, and the service does exactly that right after zeroing it.  The futex is
*shared* (no FUTEX_PRIVATE_FLAG) because waiter and waker are different
processes that map the same SysV segment at different addresses; the kernel
keys shared futexes by the page's backing object, not the address.

Python has no futex binding, so this calls futex(2) through ctypes; it costs
about a microsecond more than C.  See futex(2).
"""

import ctypes as _ctypes
import errno as _errno
import os as _os
import time as _time

# asm/unistd.h: __NR_futex (os.uname(), not platform: a client pays for every import)
_SYS_FUTEX = {"x86_64": 202, "aarch64": 98, "i686": 240, "armv7l": 240,
              "ppc64le": 221, "s390x": 238, "riscv64": 98}[_os.uname().machine]
FUTEX_WAIT = 0
FUTEX_WAKE = 1
INT_MAX = 0x7FFFFFFF

# The C library, for the calls Python has no binding for (futex(2) here,
# semtimedop(2) in segment.py): one handle for the package.
libc = _ctypes.CDLL(None, use_errno=True)
_syscall = libc.syscall
_syscall.restype = _ctypes.c_long


class timespec(_ctypes.Structure):
    """struct timespec (time.h), for the timeouts of futex(2) and semtimedop(2)."""
    _fields_ = [("tv_sec", _ctypes.c_long), ("tv_nsec", _ctypes.c_long)]

    @classmethod
    def of(cls, seconds):
        return cls(int(seconds), int(seconds % 1 * 1e9))


def _ctypes_wait(address, expected, timeout=None):
    """Sleep while the u32 at ``address`` equals ``expected``.

    Returns True when woken or when the word already differs, False when
    ``timeout`` seconds passed.  Spurious wake-ups are possible, as with any
    futex: callers re-read the word and loop.
    """
    deadline = None if timeout is None else _time.monotonic() + timeout
    while True:
        if deadline is None:
            ts = None
        else:
            left = deadline - _time.monotonic()
            if left <= 0:
                return False
            ts = _ctypes.byref(timespec.of(left))
        rc = _syscall(_SYS_FUTEX, _ctypes.c_void_p(address), FUTEX_WAIT,
                      _ctypes.c_uint32(expected & 0xFFFFFFFF), ts, None, 0)
        if rc == 0:
            return True
        err = _ctypes.get_errno()
        if err == _errno.EAGAIN:       # the word no longer holds ``expected``
            return True
        if err == _errno.ETIMEDOUT:
            return False
        if err == _errno.EINTR:
            continue
        raise OSError(err, _os.strerror(err))


def _ctypes_wake(address, count=INT_MAX):
    """Wake up to ``count`` waiters on the u32 at ``address``; returns how many."""
    rc = _syscall(_SYS_FUTEX, _ctypes.c_void_p(address), FUTEX_WAKE, count, None, None, 0)
    if rc < 0:
        err = _ctypes.get_errno()
        raise OSError(err, _os.strerror(err))
    return rc


# The C extension's futex calls where it loaded: no ctypes marshalling (~15 µs a wake under
# load, issue 16), the GIL released while waiting.  Same contract as the ctypes ones above.
from .native import hot as _hot  # noqa: E402

wait = _hot.wait if _hot is not None else _ctypes_wait
wake = _hot.wake if _hot is not None else _ctypes_wake
