"""The service: one place that knows every part and wires them together.

    table (segment)  <-  clients register, peers read
       ^
    Reporter / Watchlist (watch.py)     <-  detector thread (connector events, or
                                            pidfds in epoll: pidfd_backend.py)
       ^
    Service main loop: reconcile, service heartbeat, a failed detector's respawn,
                       signals (SIGTERM/SIGINT stop, SIGHUP reload)
    Operations (ops.py): rules, hooks, metrics; on_end callback of the Reporter

The detector, the clients and the peers never call each other: they meet in
the slot table.  The main loop owns the periodic and slow things (reconcile,
sd_notify, a failed detector); a detector thread that ended after an exit
makes its parked successor current and parks the next one itself, after the
wake (Service._detector_done).
"""

import logging as _logging
import os as _os
import queue as _queue
import signal as _signal
import socket as _socket
import sys as _sys
import threading as _threading
import time as _time
import traceback as _traceback

from . import abi as _abi
from . import procfs as _procfs
from . import native as _native
from .detector import ConnectorDetector, NativeConnectorDetector
from .errors import ConnectorUnavailable, ProcwatchError, ServiceRunning, TableBusy
from .guard import TableGuard, recover_pending_ends
from .journal import Event, emit, notify, watchdog_interval
from .segment import Table
from .stats import Stats
from .watch import Reporter

log = _logging.getLogger("procwatch")
_STOP = "stop"
_OVERFLOW = "overflow"
_RELOAD = "reload"
# The table's group when --group is not given, if it exists (scripts/install
# creates it); else the table keeps root's group and only root may use it.
DEFAULT_GROUP = "procwatch"
# s without a wake-up of the detector thread before WATCHDOG=1 stops.  Each
# backend's detector wakes at least every 0.25 s (SO_RCVTIMEO, epoll timeout)
# and stamps ``alive_at``; 2 s leaves room for a busy machine and stays below
# WatchdogSec=5 of systemd/procwatch.service.
DETECTOR_STALE = 2.0
# Slots a second the periodic whole-table checks read (the watch list's look at slots that
# changed without a generation bump, the stale-claims sweep, the guard's state check): each
# is one strided C pass, ~0.5 ms at 65536 slots, so a big table is checked every
# slots / SCAN_RATE reconcile periods instead of every one, and an idle service costs the same
# at any size (issue 16).  Registrations and exits never wait for these checks.
SCAN_RATE = 16384


class Service:
    """``procwatch serve``: create or adopt the table and watch it until stopped.

    ``config`` is a :class:`procwatch.config.Config` (None: the built-in
    defaults); ``load_config()`` returns a fresh one for SIGHUP.
    """

    heartbeat_period = 1.0          # s between service heartbeats and WATCHDOG=1
    mode = 0o660                    # of the table and its semaphore; the group decides who may use it

    def __init__(self, config=None, load_config=None):
        if config is None:
            from .config import Config
            config = Config()
        self.config = config
        self._load_config = load_config
        self.key = config.key
        self.reconcile_interval = config.reconcile_interval
        self.checker = None            # heartbeat.HeartbeatChecker: hang detection, its own thread
        self.stats = Stats()
        self.table = None
        self.connector = None
        self.pidfds = None              # the pidfd backend's epoll set (pidfd_backend.py)
        self.reporter = None
        self.detector = None
        self.death_watch = None         # deathwatch.DeathWatch: the death-word waiters
        self.backend_name = None
        self.backend_reason = None
        self._queue = _queue.SimpleQueue()     # put() is safe from signal handlers
        self._instance_sock = None
        self._generation = 0
        self._stopping = False
        self._registrations = None
        self.ops = None
        self._guard = None
        # Held while the current detector is swapped for its successor (by the ending thread
        # itself, or the main loop after a failure) and while teardown stops them.
        self._respawn_lock = _threading.Lock()

    # -- start-up ---------------------------------------------------------------
    def _claim_instance(self):
        """One service per key: an abstract socket name, freed by the kernel at exit."""
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
        try:
            s.bind(f"\0procwatch-{self.key:08x}")
        except OSError:
            s.close()
            pid = 0
            try:
                t = Table.attach(self.key, readonly=True)
                pid = t.service()[0]
                t.detach()
            except ProcwatchError:
                pass
            raise ServiceRunning(self.key, pid or "?") from None
        self._instance_sock = s

    def _gid(self):
        import grp
        group = self.config.group
        if group is None:
            try:
                return grp.getgrnam(DEFAULT_GROUP).gr_gid
            except KeyError:
                return None
        try:
            return grp.getgrnam(group).gr_gid
        except KeyError:
            raise ProcwatchError(f"group {group!r} does not exist: create it "
                                 f"(groupadd --system {group}) or pass another --group") from None

    def _open_table(self):
        slots = self.config.slots
        self.table, adopted = Table.create_or_adopt(self.key, slots, self.mode, self._gid())
        t = self.table
        pid, start = t.service()
        if pid and pid != _os.getpid() and _procfs.valid_pid(pid) and \
                _procfs.start_time(pid) == start:
            raise ServiceRunning(self.key, pid)
        if adopted and t.slot_count != slots:
            log.warning("adopted table key %#010x has %d slots; --slots %d applies only to a new table",
                        self.key, t.slot_count, slots)
        t.set_service(_os.getpid(), _procfs.start_time(_os.getpid()), int(self.heartbeat_period * 1000))
        if adopted:
            # Before the first full sync, which reads up to it (left by an older procwatch: 0).
            try:
                t.fix_used_end(wait=True)
            except TableBusy:
                pass                    # the guard's next look puts it right
        return adopted

    def _open_backend(self):
        """The connector where it works; else (auto) or on request, the pidfd backend.

        An unusable connector is found out within connector.ACK_DEADLINE:
        ECONNREFUSED outside the initial network namespace, no ack outside the
        initial PID namespace, EPERM without CAP_NET_ADMIN (before Linux 6.6).
        """
        backend = self.config.backend
        if backend not in ("auto", "connector", "pidfd"):
            raise ProcwatchError(f"backend {backend!r} is unknown: use auto, connector or pidfd")
        if backend in ("auto", "connector"):
            from .connector import DEFAULT_RCVBUF, ProcConnector
            try:
                self.connector = ProcConnector(self.config.rcvbuf or DEFAULT_RCVBUF)
                self.backend_name = "connector"
                self.backend_reason = f"{backend}, {self.connector.mode}"
                self.table.set_backend(_abi.Backend.CONNECTOR)
                return
            except ConnectorUnavailable as e:
                if backend == "connector":
                    raise
                self.backend_reason = f"auto: {e.why}"
        else:
            self.backend_reason = "--backend pidfd"
        from .pidfd_backend import PidfdSet
        self.pidfds = PidfdSet()
        self.backend_name = "pidfd"
        self.table.set_backend(_abi.Backend.PIDFD)

    def start(self):
        """Everything up to READY=1: table, backend, first reconcile, detector."""
        from .ops import Operations
        self._claim_instance()
        _raise_nofile_limit()
        self.ops = Operations(self.config, self.stats, key=self.key, table=lambda: self.table,
                              loader=self._load_config)
        self.ops.start()
        adopted = self._open_table()
        recover_pending_ends(self.table, self.stats, self.ops.on_end)
        self._open_backend()
        self._guard = TableGuard(self.table, self.stats)
        self.reporter = Reporter(self.table, self.stats, on_end=self.ops.on_end,
                                 on_overflow=lambda: self._queue.put(_OVERFLOW))
        if self.connector is not None and self.reporter.watch.hot is not None:
            self.reporter.watch.hot.set_socket(self.connector.fileno())
        found = self.reporter.reconcile(immediate=True, full=True, sweep=True)
        self.ops.apply_rules(self.reporter.watch)
        with self._respawn_lock:
            self._spawn_detector()
        self._start_death_watch()
        self._registrations = _threading.Thread(target=self._watch_registrations,
                                                name="procwatch-registrations", daemon=True)
        self._registrations.start()
        from .heartbeat import HeartbeatChecker
        hang = self.config.hang
        self.checker = HeartbeatChecker(self.table, _abi.HangAction[hang.action.upper()], int(hang.signal),
                                        hang.max_misses, policy=self.ops.hang_policy,
                                        on_event=self.ops.on_end, stats=self.stats,
                                        starved=_abi.HangAction[hang.starved.upper()], relayed=True)
        self.checker.start()
        emit(Event.STARTED, "procwatch %s table key %#010x (%d slots, %d registered, %d found dead) "
             "with the %s backend (%s), %s; %s%s", "adopted" if adopted else "created", self.key,
             self.table.slot_count, len(self.reporter.watch.entries()), found, self.backend_name,
             self.backend_reason, _native.describe(), self.death_watch.reason,
             f" ({self.death_watch.priority_text}; {self.death_watch.yield_text})"
             if self.death_watch.priority_text else "",
             KEY=f"{self.key:#010x}", BACKEND=self.backend_name, HOT_STEP="c" if _native.AVAILABLE else "python",
             DEATH_WORDS=self.death_watch.state.name.lower(), DEATH_WORD_PRIORITY=self.death_watch.priority,
             TEARDOWN_YIELD_MS=self.death_watch.yield_ms)
        wd = watchdog_interval()
        if wd is not None and wd < self.heartbeat_period:
            log.warning("WatchdogSec= is %g s but WATCHDOG=1 goes every %g s: set WatchdogSec=%g or more",
                        2 * wd, self.heartbeat_period, max(2 * self.heartbeat_period, 2 * DETECTOR_STALE))
        notify("READY=1", f"STATUS={self.status_line()}")

    def _start_death_watch(self):
        """Wait on the armed slots' death words where the kernel allows it (issue 14)."""
        from .deathwatch import DeathWatch
        self.death_watch = DeathWatch(self.reporter, self._queue.put, self.config.death_word_priority,
                                      self.config.teardown_yield_ms)
        self.table.set_death_watch(self.death_watch.state)
        if not self.death_watch.enabled:
            log.warning("%s", self.death_watch.reason)      # said once; status says it too
        else:
            if self.death_watch.priority < self.config.death_word_priority:
                log.warning("%s", self.death_watch.priority_text)
            if self.death_watch.yield_ms < self.config.teardown_yield_ms:
                log.warning("%s", self.death_watch.yield_text)
        self.death_watch.ensure()

    def _watch_registrations(self):
        """Sleep on the header's generation futex; sync the watch list when it moves.

        Clients bump and FUTEX_WAKE the generation on every registration
        change, so a new registration is watched (its pidfd opened, "registered"
        logged) at once, off the detector's hot path.  The wait has no timeout:
        the thread runs only when woken (a client, or :meth:`_teardown`
        at stop), and a client that bumps without waking is still caught by the
        periodic reconcile.  No timer hides a broken wake-up.
        """
        from . import futex
        address = self.table.generation_address
        while not self._stopping:
            seen = self.reporter.watch.generation
            if seen is None or self.table.generation == seen:
                # No timeout, native or not: an idle service sleeps (issue 16), and no timer
                # hides a broken wake-up (issue 18); _teardown() wakes this word.
                futex.wait(address, seen or 0)
            if self._stopping:
                return
            self.reporter.watch.sync()
            self.ops.apply_rules(self.reporter.watch)
            if self.death_watch is not None:
                self.death_watch.ensure()
            checker = self.checker
            if checker is not None:
                checker.poke()          # after the rules: a rule's heartbeat counts too

    def _new_detector(self, parked):
        self._generation += 1
        if self.pidfds is not None:
            from .pidfd_backend import PidfdDetector
            return PidfdDetector(self.pidfds, self.reporter, self._detector_done, self._generation, parked)
        if self.reporter.watch.hot is not None:
            return NativeConnectorDetector(self.connector, self.reporter, self._detector_done,
                                           self._generation, parked)
        return ConnectorDetector(self.connector, self.reporter, self._detector_done, self._generation, parked)

    def _detector_done(self, detector):
        """A detector thread ended (its ``done`` callback, run by that thread as its last step).

        After a registered exit the ending thread itself makes its successor, which it
        has just released, the current detector and parks the next one: the patent's
        respawn, one thread per exit, with no other thread woken for it (issue 16: the
        main loop's wake-up, its waits for the GIL and the respawn were ~170 µs of CPU
        per exit).  A failed detector goes to the main loop, which logs the error,
        reopens a lost socket and respawns.

        The released successor reads at once and may end (the next exit) before its
        predecessor has made it current; then it leaves itself to that predecessor,
        whose respawn, under the same lock, finds it finished and goes on from it.
        """
        with self._respawn_lock:
            detector.finished = True
            current = self.detector
            if detector is current:
                nxt = detector.successor
                if (detector.error is None and not detector.stop_requested and not self._stopping
                        and nxt is not None and nxt.released()):
                    self._respawn(detector)
                    return
            elif current is not None and detector is current.successor and detector.released():
                return                  # ended before its predecessor made it current: see above
        self._queue.put(detector)

    def _respawn(self, detector):
        """_detector_ended(detector), then each successor made current that had ended already
        (see _detector_done), in turn.  Hold _respawn_lock."""
        was = self.detector
        self._detector_ended(detector)
        while self.detector is not was and self.detector.finished and not self._stopping:
            was = self.detector
            self._detector_ended(was)

    def _spawn_detector(self, previous=None):
        """Make the next detector current: the one ``previous`` released, else a new one.

        Then park a successor behind it, started now, so that the thread
        start is paid here, after the wake, not between an exit and the next
        read (issue 16).
        """
        nxt = previous.successor if previous is not None else None
        if nxt is not None and nxt.released() and not nxt.stop_requested:
            self.detector = nxt
        else:
            if nxt is not None:         # never released (previous failed): let it end
                nxt.request_stop()
            self.detector = self._new_detector(parked=False)
            self.detector.start()
        if not self._stopping:
            successor = self._new_detector(parked=True)
            successor.start()
            self.detector.successor = successor

    # -- running ------------------------------------------------------------------
    def status_line(self):
        # Counted, not listed: this runs every second, and a list of 4000 watched entries
        # was ~0.1 ms of an idle service's second (issue 16).
        n = sum(map(len, self.reporter.watch.by_pid.values())) if self.reporter else 0
        line = f"watching {n} process{'es' if n != 1 else ''}, {self.stats.exits + self.stats.found_dead} exits"
        if self.stats.last_end:
            name, text, when = self.stats.last_end
            line += f", last: {name} {text} {_time.monotonic() - when:.0f} s ago"
        return line

    def request_stop(self, *_):
        self._queue.put(_STOP)

    def request_reload(self, *_):
        self._queue.put(_RELOAD)

    def reload(self):
        """SIGHUP: re-read the configuration; a bad file is refused and logged, the old stays."""
        notify("RELOADING=1", "STATUS=reloading the configuration")    # sd_notify(3)
        new = self.ops.reload(self.reporter.watch)
        if new is not None:
            self.config = new
            self.reconcile_interval = new.reconcile_interval
            if self.checker is not None:
                self.checker.refresh_policy()
                self.checker.poke()     # a rule may have given slots a heartbeat
        notify("READY=1", f"STATUS={self.status_line()}")

    def run(self):
        """Serve until SIGTERM/SIGINT.  Returns the exit status."""
        for sig in (_signal.SIGTERM, _signal.SIGINT):
            _signal.signal(sig, self.request_stop)
        _signal.signal(_signal.SIGHUP, self.request_reload)
        self.start()
        next_tick = _time.monotonic()
        next_reconcile = _time.monotonic() + self.reconcile_interval
        scan_every = max(1, -(-self.table.slot_count // SCAN_RATE))
        periods = 0
        removed = False
        try:
            while True:
                now = _time.monotonic()
                try:
                    msg = self._queue.get(timeout=max(0.0, min(next_tick, next_reconcile) - now))
                except _queue.Empty:
                    msg = None
                if msg == _STOP:
                    break
                if msg == _RELOAD:
                    self.reload()
                    # A new reconcile_interval applies at once, not after the old one ran out.
                    next_reconcile = min(next_reconcile, _time.monotonic() + self.reconcile_interval)
                elif msg == _OVERFLOW:
                    self.reporter.overflow_pending = False     # first: see Reporter.overflow()
                    self.reporter.reconcile(immediate=True, cause=_abi.Cause.FOUND_DEAD_OVERFLOW, full=True)
                elif msg is not None:
                    with self._respawn_lock:
                        self._respawn(msg)
                now = _time.monotonic()
                if now >= next_tick:
                    # used_end: with the reconcile's checks, unless the reconcile is the slower.
                    self._tick(used_end=self.reconcile_interval > self.heartbeat_period)
                    next_tick = now + self.heartbeat_period
                if now >= next_reconcile:
                    periods += 1
                    scan = periods % scan_every == 0
                    # The guard first: it moves used_end over a slot written past it, so
                    # this very reconcile reads that slot.
                    if not self._guard.check(states=scan, used_end=True):
                        removed = True
                        break
                    self.reporter.reconcile(sweep=scan)
                    next_reconcile = now + self.reconcile_interval
        finally:
            if not removed:
                self.stop()
        if removed:
            self._restart_in_place()      # does not return
        return 0

    def _restart_in_place(self):
        """The segment or its semaphore was removed under us (``ipcrm``): start over.

        Executing this same command again, in this same PID, goes through the
        one start-up path there is: it creates a new table (or adopts the
        segment and makes a new semaphore), subscribes again and reconciles.
        systemd sees the same main PID: RELOADING=1 now, READY=1 once started.
        Registrations held in a removed segment are lost to new clients; the
        processes still attached to it keep their mapping until they detach.
        """
        t = self.table
        names = sorted(w.name for w in self.reporter.watch.entries())
        if t.still_present():
            emit(Event.CORRUPT, "the semaphore of slot table key %#010x was removed (ipcrm?); "
                 "restarting in place to recreate it; registrations are kept", self.key,
                 KEY=f"{self.key:#010x}", PROBLEM="semaphore removed", level=_logging.ERROR)
        else:
            emit(Event.CORRUPT, "slot table key %#010x was removed (ipcrm?) while in use; its %d "
                 "registrations are lost%s: restarting in place to create a new table, where clients "
                 "must register again", self.key, len(names),
                 f" ({', '.join(names[:20])}{', ...' if len(names) > 20 else ''})" if names else "",
                 KEY=f"{self.key:#010x}", PROBLEM="segment removed", level=_logging.ERROR)
        notify("RELOADING=1", "STATUS=slot table removed; recreating it")
        self._teardown()                    # old mappings: nobody watches this one now
        for handler in log.handlers:
            handler.flush()
        _sys.stderr.flush()
        _os.execv(_sys.executable, _sys.orig_argv)

    def _detector_ended(self, detector):
        """The patent's respawn: a detector ended (an exit handled, or an error)."""
        if self.death_watch is not None and getattr(detector, "watch", None) is self.death_watch:
            if detector.ended_pid is None and detector.error is None:
                self.death_watch.respawn(detector)      # its shard emptied: not respawned
                return
            self.stats.record_detector_respawn()
            if detector.error is not None:
                tb = "".join(_traceback.format_exception(detector.error))
                emit(Event.RESPAWN, "death-word waiter failed; starting a new one:\n%s", tb,
                     RESPAWNS=self.stats.respawns, level=_logging.ERROR)
            else:
                emit(Event.RESPAWN, "death-word waiter ended after pid %s died; starting a new one",
                     detector.ended_pid, RESPAWNS=self.stats.respawns, level=_logging.DEBUG)
            self.death_watch.respawn(detector)
            return
        if detector is not self.detector:
            return
        self.stats.record_detector_respawn()
        if detector.error is not None:
            tb = "".join(_traceback.format_exception(detector.error))
            emit(Event.RESPAWN, "detector thread failed; starting a new one:\n%s", tb,
                 RESPAWNS=self.stats.respawns, level=_logging.ERROR)
            if isinstance(detector.error, OSError) and self.connector is not None \
                    and not self.connector.healthy():
                self._reopen_connector()
        self._spawn_detector(detector)
        if detector.error is None and log.isEnabledFor(_logging.DEBUG):
            emit(Event.RESPAWN, "detector thread ended after pid %s exited; starting a new one",
                 detector.ended_pid, RESPAWNS=self.stats.respawns, level=_logging.DEBUG)
        # Only the watched entries (their pidfds, one epoll_wait with the C extension): no
        # table scan, no stale-claims sweep here; the periodic reconcile does those (issue 16).
        self.reporter.reconcile()

    def _reopen_connector(self):
        from .connector import ProcConnector
        try:
            self.connector.close()
        except OSError:
            pass
        self.connector = ProcConnector(self.connector.rcvbuf)
        log.warning("the connector socket was lost under the detector; subscribed again on a new "
                    "one (%s) and reconciling the table", self.connector.mode)
        if self.reporter.watch.hot is not None:
            self.reporter.watch.hot.set_socket(self.connector.fileno())
        self.reporter.reconcile(immediate=True, full=True)

    def _tick(self, used_end=False):
        """Every heartbeat period: prove the service lives, check the table.

        ``used_end`` (when the reconcile, which does it otherwise, runs less
        often): keep the header's used_end over every slot in use
        (guard.check_used_end), so the passes that stop there (watch list,
        hang checker, death words) see a slot written past it, whatever the
        reconcile interval.
        """
        if used_end:
            self._guard.check_used_end()
        self.table.beat_service()
        if self.connector is not None and self.reporter.watch.hot is not None:
            self.stats.events = self.reporter.watch.hot.events     # counted by the C step
        self._notify_watchdog()

    def _notify_watchdog(self):
        """WATCHDOG=1 only while detection works: both loops must be alive.

        It is sent from this main loop, so a frozen or stuck main loop sends
        nothing; and only while the detector thread has woken up within
        DETECTOR_STALE, so a detector stuck in a call stops the pings too.
        systemd then kills and restarts the service (WatchdogSec=,
        Restart=on-failure), which re-adopts the table and reconciles.  No
        timer pings on its own.
        """
        if not _os.environ.get("NOTIFY_SOCKET"):
            return          # not a systemd unit: notify() would drop it; no STATUS line to build
        stalled = self.detector.stalled_for(_time.monotonic())
        if stalled < DETECTOR_STALE:
            notify("WATCHDOG=1", f"STATUS={self.status_line()}")
        else:
            notify(f"STATUS=detector thread {self.detector.name} silent for {stalled:.0f} s; "
                   f"no WATCHDOG=1 until it wakes")

    def stop(self):
        """A clean stop: the table stays, so clients keep their slots."""
        notify("STOPPING=1")
        had_table = self.table is not None
        self._teardown()
        if had_table:
            st = self.stats
            emit(Event.STOPPING, "procwatch stopping; table key %#010x stays for its clients "
                 "(%d exit events read, %d overflows, %d reconcile passes)", self.key, st.events,
                 st.overflows, st.reconciles,
                 KEY=f"{self.key:#010x}", EVENTS=st.events, EXITS=st.exits, FOUND_DEAD=st.found_dead,
                 OVERFLOWS=st.overflows, RECONCILES=st.reconciles)

    def _stop_detectors(self):
        """Stop the current detector and its parked successor, and wait for them."""
        with self._respawn_lock:        # _stopping is set: no respawn after this
            d = self.detector
            threads = [t for t in (d, d.successor) if t is not None]
            for t in threads:
                t.request_stop()
        for t in threads:
            if t.is_alive():
                t.join(1.0)
        if self.reporter is not None:
            self.reporter.watch.close()

    def _teardown(self):
        """Stop every thread, close every socket and descriptor, leave the table (stop and restart).

        The threads stop before the table is detached: their passes read its
        memory.  The header stops naming this service (PID 0, backend NONE),
        so clients and ``procwatch status`` see nobody watching until the next
        one starts.
        """
        self._stopping = True
        if self.ops is not None:
            self.ops.close()
        if self.table is not None:
            from . import futex
            futex.wake(self.table.generation_address)     # the registrations thread sleeps there
        if self._registrations is not None:
            self._registrations.join(1.0)
        if self.checker is not None:
            self.checker.stop()
        if self.detector is not None:
            self._stop_detectors()
        if self.death_watch is not None:
            self.death_watch.stop()
        if self.connector is not None:
            self.connector.close()
        if self.pidfds is not None:
            self.pidfds.close()
        if self.table is not None:
            self.table.clear_service(_os.getpid(), backend=True)
            self.table.detach()
            self.table = None
        if self._instance_sock is not None:
            self._instance_sock.close()
            self._instance_sock = None


def _raise_nofile_limit():
    """Soft RLIMIT_NOFILE up to the hard limit: every watched process holds a pidfd.

    A shell's usual soft limit of 1024 would run out on a full 1024-slot
    table; raising the soft limit to the hard one is what systemd expects of
    a service that needs many descriptors (the unit sets LimitNOFILE too).
    """
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
