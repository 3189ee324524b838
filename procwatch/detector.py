"""Exit detection: the detector threads.

The patent's design: a detector thread reads exit events; when one names a
registered process it zeroes that slot's PID word (0 = "gone", seen at once
by any peer reading the word) and ends; the service then starts a new
detector thread on the same, still open, socket, so no event is lost.

The hot path is ordered so that peers learn first and bookkeeping waits:
decode -> dict lookup by tgid -> "is the whole group gone?" (a poll of the
pidfd opened at registration) -> zero the word and FUTEX_WAKE -> then
record the status, measure, log (:class:`procwatch.watch.Reporter`).  An
unrelated exit costs one decode and one dict miss.

Why a pidfd check: the kernel sends an exit event for every thread, naming
the thread (pid) and its process (tgid).  The main thread may exit first
(pthread_exit) while others run on, so neither "pid == tgid" nor "first
event of the group" means the process died.  A pidfd becomes readable only
once the whole thread group has exited, and the kernel marks that before it
sends the last thread's exit event (exit_notify() runs before
proc_exit_connector() in do_exit()).

With the C extension (procwatch._hotstep) the connector's hot step runs in
C with the GIL released, from recv to the wake (:class:`NativeConnectorDetector`);
the Python step (:class:`ConnectorDetector`) runs where it cannot load.

This module has the connector's detectors; pidfd_backend.py has the other.
"""

import errno as _errno
import threading as _threading
from _thread import allocate_lock as _allocate_lock
import time as _time

from .connector import EXIT_EVENT as _EXIT
from .connector import EXIT_OFFSET as _EXIT_OFFSET
from .connector import MIN_EXIT_LEN as _MIN_EXIT_LEN
from .connector import PROC_EVENT_EXIT as _PROC_EVENT_EXIT
from .watch import Watched as _Watched


class DetectorThread(_threading.Thread):
    """What every backend's detector thread shares with the service.

    The service starts one, and when it ends (``done(self)`` is called, with
    ``error`` set if it failed) starts the next: the patent's respawn.
    ``alive_at`` is stamped whenever it wakes, so the watchdog can tell a
    stuck detector from an idle one (``stalled_for``).  Subclasses write
    ``_loop``.

    ``parked`` (a held lock, or None): the thread is started ahead and waits
    for it before reading anything.  The service starts the next
    detector that way while the current one runs, and the current one
    releases it (``successor``) just before it returns, so a thread start
    (~0.4 ms of CPU) never sits between an exit and the next read (issue 16).
    """

    def __init__(self, name, reporter, done, parked=False):
        super().__init__(name=name, daemon=True)
        self.reporter = reporter
        self.done = done
        self.stop_requested = False
        self.alive_at = _time.monotonic()
        self.error = None
        self.ended_pid = None
        self.finished = False           # its done() ran (set by the service under its lock)
        # A bare lock, held until release(): one acquire and one release, where an Event's
        # Condition made a waiter lock and a notify loop on each side, once per exit (issue 16).
        self.parked = None
        self._released = not parked
        if parked:
            self.parked = _allocate_lock()
            self.parked.acquire()
        self.successor = None

    def release(self):
        """Let a parked thread start reading (or, with stop_requested, end)."""
        if self._released:
            return
        self._released = True
        try:
            self.parked.release()
        except RuntimeError:            # released already by another thread
            pass

    def released(self):
        return self._released

    def run(self):
        if self.parked is not None:
            self.parked.acquire()
            if self.stop_requested:
                return
            self.alive_at = _time.monotonic()
        try:
            self._loop()
        except BaseException as e:      # reported by the service, which respawns
            self.error = e
        finally:
            nxt = self.successor
            if nxt is not None and self.error is None and not self.stop_requested:
                nxt.release()           # before done(): the next reads while this one reports
            self.done(self)

    def stalled_for(self, now):
        """Seconds since this thread last showed life (0 while idle in a wait that is not stuck)."""
        return now - self.alive_at

    def request_stop(self):
        self.stop_requested = True
        self.release()

    def _loop(self):
        raise NotImplementedError


class NativeConnectorDetector(DetectorThread):
    """The connector detector with the hot step in C (procwatch._hotstep.HotStep.step).

    ``step()`` reads with the GIL released until an event ends a registered
    process, whose word it has zeroed and woken by then; this thread then
    records and logs the end (Reporter.report_ended) and returns, and the
    service respawns as with the Python detector.  While nothing arrives it
    sleeps in poll() with no timeout: an idle service wakes for nothing, and
    ``stalled_for`` reads "parked in poll" as alive.
    """

    def __init__(self, connector, reporter, done, generation, parked=False):
        super().__init__(f"procwatch-detector-{generation}", reporter, done, parked)
        self.connector = connector
        self.hot = reporter.watch.hot
        hot = self.hot
        reporter.events_drained = lambda: hot.drained_at

    def stalled_for(self, now):
        if self.hot.parked:
            return 0.0
        return now - max(self.alive_at, self.hot.alive_at)

    def request_stop(self):
        super().request_stop()
        self.hot.stop()

    def _loop(self):
        hot = self.hot
        reporter = self.reporter
        watch = reporter.watch
        stats = reporter.stats
        monotonic = _time.monotonic
        while not self.stop_requested:
            r = hot.step()
            self.alive_at = monotonic()
            stats.events = hot.events
            kind = r[0]
            if kind == "exit":
                _, tgid, status, ts, zeroed_ns, ended = r
            elif kind == "miss":            # a registration the map lacks: sync, then end it
                _, tgid, status, ts = r
                watch.sync()
                zeroed_ns = _time.monotonic_ns()    # after the sync: the latency includes it
                ended = hot.end(tgid, ts)
                if not ended:
                    continue
            elif kind == "overflow":
                reporter.overflow()
                continue
            else:                           # "stop"
                hot.clear_stop()
                continue
            for slot, pid, pending in ended:
                w = watch.lookup(slot, pid)
                if w is None:               # not adopted (a sync dropped it meanwhile)
                    w = _Watched(slot, pid, reporter.table.start_time(slot),
                                 reporter.table.read_slot(slot).name, None)
                reporter.report_ended(w, status, ts, zeroed_ns, pending)
            self.ended_pid = tgid
            return


class ConnectorDetector(DetectorThread):
    """One detector thread: reads exit events until one ends a registered process.

    Then it returns and the service starts the next one (``done`` is called
    with the thread).  Any exception ends it too, with the traceback logged by
    the service, which then respawns and reconciles.
    """

    def __init__(self, connector, reporter, done, generation, parked=False):
        super().__init__(f"procwatch-detector-{generation}", reporter, done, parked)
        self.connector = connector
        reporter.events_drained = self._drained
        self._drained_at = 0.0

    def _drained(self):
        return self._drained_at

    def _loop(self):
        recv_into = self.connector.sock.recv_into
        buf = bytearray(1024)
        watch = self.reporter.watch
        table = self.reporter.table
        stats = self.reporter.stats
        monotonic = _time.monotonic
        while not self.stop_requested:
            try:
                n = recv_into(buf)
            except BlockingIOError:             # SO_RCVTIMEO: nothing for a while
                self.alive_at = self._drained_at = monotonic()
                continue
            except OSError as e:
                if e.errno != _errno.ENOBUFS:
                    raise
                self.alive_at = monotonic()
                self.reporter.overflow()
                continue
            self.alive_at = monotonic()
            # connector.decode_exit() inlined, with its own constants: this
            # runs for every exit on the machine.
            if n < _MIN_EXIT_LEN:
                continue
            what, _cpu, ts, _pid, tgid, status = _EXIT.unpack_from(buf, _EXIT_OFFSET)
            if what != _PROC_EVENT_EXIT:
                continue
            stats.events += 1
            # The generation first, then the dict: Watchlist.sync() publishes
            # the dict before the generation, so a registration this dict lacks
            # always shows as a generation that moved (read the other way round,
            # a sync between the two reads would hide it).
            seen = watch.generation
            ws = watch.by_pid.get(tgid)
            if ws is None:
                if table.generation == seen:
                    continue
                watch.sync()                    # a registration we have not seen yet
                ws = watch.by_pid.get(tgid)
                if ws is None:
                    continue
            ended = False
            for w in ws:
                if not w.accepts_exit(ts):
                    continue                    # one thread of a live process, or a reused PID
                ended |= self.reporter.report_exit(w, status, ts)
            if ended:
                self.ended_pid = tgid
                return

