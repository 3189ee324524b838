"""The pidfd backend: exit detection where the proc connector is unavailable.

The proc connector needs CAP_NET_ADMIN before Linux 6.6, answers only in the initial network
namespace (ECONNREFUSED elsewhere) and ignores requesters outside the initial
PID namespace, so most containers and unprivileged users cannot use it.  The
service then watches each registered process through the pidfd the Watchlist
already holds (opened, and checked against the slot's start time, when the
registration was adopted): a pidfd becomes readable once its *whole* thread
group has exited (pidfd_open(2), kernel >= 5.3), so a leader that calls
pthread_exit() early is not taken for dead.  One epoll set of those pidfds
replaces the socket, with the same semantics:

* A detector thread sleeps in epoll_wait().  On readiness it zeroes the slot's
  PID word and FUTEX_WAKEs the peers first (Reporter.report_exit), then looks
  up the status, records, logs, and ends; the service starts the next thread
  on the same epoll set.  Readiness is level-triggered, so nothing is lost
  between two threads.
* New registrations reach the set at once, with no timer: the service's
  registrations thread sleeps on the header's generation futex (clients bump
  and wake it) and syncs the Watchlist, whose ``on_change`` calls
  :meth:`PidfdSet.kick`: a write to an eventfd that is itself in the epoll
  set.  The detector wakes and adds the new pidfds before it sleeps again.
* Reconcile is the service's own, unchanged.

**The exit status.**  A pidfd tells *that* a process exited, not how, and
waitid(P_PIDFD) works only for its parent.  Right after the word is zeroed
the status is looked up in this order:

1. ``PIDFD_GET_INFO`` with ``PIDFD_INFO_EXIT`` (kernel >= 6.15): the kernel
   keeps the status with the pid once the process has been *reaped*
   (pidfs_exit(), called from release_task()); not yet while it is a zombie.
2. ``/proc/PID/stat`` field 52, ``exit_code`` (Linux >= 3.5): readable while
   the zombie waits for its parent, if field 22 (start time) is still the
   registered one and we may ptrace-read the process: otherwise the kernel
   prints 0 there (fs/proc/array.c, do_task_stat()), which would read as
   "exited with code 0", so an unprivileged service trusts it only for
   processes of its own uid and gid.
3. Step 1 again: the parent may have reaped the zombie in between.

Otherwise the status is unknown (-1): before 6.15, a parent that reaps at
once wins the race.  The EXIT log line says which source gave the status
(field ``STATUS_SOURCE``: ``pidfd``, ``procfs`` or ``unknown``).

**Latency.**  The connector stamps each event with the kernel's clock; a
pidfd carries no time, and the epoll wake-up is not the exit, so the slot
records LATENCY_UNKNOWN rather than a number that would leave out the part
that matters.  Measure kill -> zeroed word from outside (scripts/bench).
"""

import errno as _errno
import functools as _functools
import os as _os
import select as _select
import time as _time

from . import procfs as _procfs
from .detector import DetectorThread
from .errors import ProcwatchError

@_functools.lru_cache(maxsize=None)
def can_use_pidfd():
    """Whether pidfd_open(2) works here: None if so, else why not (cached).

    EPERM or ENOSYS from pidfd_open on ourselves means a kernel < 5.3 or a
    seccomp filter that blocks it (psutil's can_use_pidfd_open() reads it the
    same way).
    """
    try:
        fd = _os.pidfd_open(_os.getpid())
    except OSError as e:
        if e.errno in (_errno.ENOSYS, _errno.EPERM):
            return (f"pidfd_open() failed with {_errno.errorcode[e.errno]} "
                    f"(kernel < 5.3, or blocked by seccomp)")
        raise
    _os.close(fd)
    return None


_SEEN = "seen through its pidfd (latency unknown)"


def exit_status(w, pidfd, seen=_SEEN):
    """``(status, source, note)`` of the exited process behind Watched ``w``.

    ``pidfd`` is the detector's own duplicate of ``w.pidfd``: the Watchlist
    closes ``w.pidfd`` as soon as a sync sees the zeroed word, which may be
    before this runs.  See the module docstring for the order.  ``seen``
    opens the note: how the end was seen (None: the caller says it, as the
    death word's completion does).
    """
    lead = f"{seen}; " if seen else ""
    status = _procfs.pidfd_exit_status(pidfd)
    if status is None:
        zombie = _procfs.zombie_exit_status(w.pid, w.start_time)
        if not isinstance(zombie, str):
            return zombie, "procfs", f"{lead}exit status read from /proc/PID/stat (zombie)"
        status = _procfs.pidfd_exit_status(pidfd)
    if status is not None:
        return status, "pidfd", f"{lead}exit status from PIDFD_INFO_EXIT"
    if zombie == "reaped":
        zombie = "reaped by its parent before procwatch read it, and the kernel keeps no status (< 6.15)"
    return -1, "unknown", f"{lead}exit status unknown: {zombie}"


class PidfdSet:
    """The long-lived part of the backend: the epoll set, its members, the wake fd.

    Like the connector's socket, it outlives the detector threads.  Members
    change only in the detector thread (:meth:`resync`); other threads only
    :meth:`kick`.
    """

    def __init__(self):
        why = can_use_pidfd()
        if why:
            raise ProcwatchError(f"pidfd backend unavailable: {why}: run on Linux >= 5.3 "
                                 f"without a seccomp filter on pidfd_open, or use --backend connector")
        self.epoll = _select.epoll()
        self.wake_fd = _os.eventfd(0, _os.EFD_CLOEXEC | _os.EFD_NONBLOCK)
        self.epoll.register(self.wake_fd, _select.EPOLLIN)
        self.members = {}           # pidfd -> Watched
        self.dirty = True           # a kick was drained and not acted on yet

    def attach(self, watch):
        """Have ``watch`` kick us whenever a sync adds or drops a process.

        The first time, kick at once: the start-up reconcile synced before.
        """
        if watch.on_change != self.kick:
            watch.on_change = self.kick
            self.kick()

    def kick(self):
        """Wake the detector so that it resyncs the epoll set (any thread)."""
        _os.eventfd_write(self.wake_fd, 1)

    def drain(self):
        """Consume the kicks; :meth:`resync` must follow (``dirty`` says so)."""
        self.dirty = True
        try:
            _os.eventfd_read(self.wake_fd)
        except BlockingIOError:
            pass

    def resync(self, watch):
        """Make the epoll set hold exactly the open pidfds of ``watch``.

        Under the Watchlist's lock, so that no pidfd is closed (and its number
        reused) between being listed and being added.  A closed pidfd has
        already left the epoll set by itself (nothing else holds its file).
        """
        with watch.lock:
            self.dirty = False
            want = {w.pidfd: w for w in watch.entries() if w.pidfd is not None}
            for fd, w in list(self.members.items()):
                if want.get(fd) is not w:
                    del self.members[fd]
                    try:
                        self.epoll.unregister(fd)
                    except OSError as e:    # closed: left the set; or a reused number not in it
                        if e.errno not in (_errno.ENOENT, _errno.EBADF):
                            raise
            for fd, w in want.items():
                if fd not in self.members:
                    try:
                        self.epoll.register(fd, _select.EPOLLIN)
                    except FileExistsError:     # left in the set by a detector that failed
                        self.epoll.modify(fd, _select.EPOLLIN)
                    self.members[fd] = w

    def close(self):
        if self.epoll.closed:
            return
        self.epoll.close()
        _os.close(self.wake_fd)
        self.members.clear()


class PidfdDetector(DetectorThread):
    """One detector thread over a :class:`PidfdSet`; ends after reporting an exit.

    Same contract as ConnectorDetector: ``done(self)`` is called when it ends,
    with ``error`` set if it failed, and the service starts the next one.
    """

    POLL_TIMEOUT = 0.25         # s: how often it notices a stop request, and proves it lives

    def __init__(self, pidfds, reporter, done, generation, parked=False):
        super().__init__(f"procwatch-pidfd-{generation}", reporter, done, parked)
        self.pidfds = pidfds
        pidfds.attach(reporter.watch)

    def _loop(self):
        pidfds = self.pidfds
        poll = pidfds.epoll.poll
        wake_fd = pidfds.wake_fd
        members = pidfds.members
        watch = self.reporter.watch
        lock = watch.lock
        report_exit = self.reporter.report_exit
        stats = self.reporter.stats
        monotonic = _time.monotonic
        if pidfds.dirty:                # the last detector failed between drain and resync
            pidfds.resync(watch)
        while not self.stop_requested:
            events = poll(self.POLL_TIMEOUT)
            self.alive_at = monotonic()
            ended = False
            stale = False
            for fd, _mask in events:
                if fd == wake_fd:
                    pidfds.drain()
                    continue
                w = members.get(fd)
                with lock:                  # the Watchlist closes pidfds under it
                    own = _os.dup(fd) if w is not None and w.pidfd == fd else None
                if own is None:
                    stale = True            # closed by a sync or a reconcile meanwhile
                    continue
                members.pop(fd)
                stats.events += 1           # one exit seen (this thread alone writes it)
                try:
                    # Zeroes the word and wakes the peers first; the status
                    # lookup comes after, inside report_exit().
                    if report_exit(w, lambda w=w, own=own: exit_status(w, own), None):
                        ended = True
                        self.ended_pid = w.pid
                finally:
                    _os.close(own)
            if stale or pidfds.dirty:   # before returning: a drained kick is not repeated
                pidfds.resync(watch)
            if ended:
                return
