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

This module has the connector's detector; pidfd_backend.py has the other.
"""

import errno as _errno
import threading as _threading
import time as _time

from . import procfs as _procfs
from .connector import EXIT_EVENT as _EXIT
from .connector import EXIT_OFFSET as _EXIT_OFFSET
from .connector import MIN_EXIT_LEN as _MIN_EXIT_LEN
from .connector import PROC_EVENT_EXIT as _PROC_EVENT_EXIT


class DetectorThread(_threading.Thread):
    """What every backend's detector thread shares with the service.

    The service starts one, and when it ends (``done(self)`` is called, with
    ``error`` set if it failed) starts the next: the patent's respawn.
    ``alive_at`` is stamped at least every quarter second, so the watchdog
    can tell a stuck detector from an idle one.  Subclasses write ``_loop``.
    """

    def __init__(self, name, reporter, done):
        super().__init__(name=name, daemon=True)
        self.reporter = reporter
        self.done = done
        self.stop_requested = False
        self.alive_at = _time.monotonic()
        self.error = None
        self.ended_pid = None

    def run(self):
        try:
            self._loop()
        except BaseException as e:      # reported by the service, which respawns
            self.error = e
        finally:
            self.done(self)

    def _loop(self):
        raise NotImplementedError


class ConnectorDetector(DetectorThread):
    """One detector thread: reads exit events until one ends a registered process.

    Then it returns and the service starts the next one (``done`` is called
    with the thread).  Any exception ends it too, with the traceback logged by
    the service, which then respawns and reconciles.
    """

    def __init__(self, connector, reporter, done, generation):
        super().__init__(f"procwatch-detector-{generation}", reporter, done)
        self.connector = connector

    def _loop(self):
        recv_into = self.connector.sock.recv_into
        buf = bytearray(1024)
        watch = self.reporter.watch
        table = self.reporter.table
        stats = self.reporter.stats
        pidfd_exited = _procfs.pidfd_exited
        monotonic = _time.monotonic
        while not self.stop_requested:
            try:
                n = recv_into(buf)
            except BlockingIOError:             # SO_RCVTIMEO: nothing for a while
                self.alive_at = monotonic()
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
                if w.pidfd is not None and not pidfd_exited(w.pidfd):
                    continue                    # one thread of a live process
                ended |= self.reporter.report_exit(w, status, ts)
            if ended:
                self.ended_pid = tgid
                return

