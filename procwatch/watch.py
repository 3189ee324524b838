"""The watch list and the reporter: what the detector threads of every backend share.

:class:`Watchlist` mirrors the table's PID words as {tgid: Watched}, brought
up to date when the header's generation moves, so a detector's lookup is one
dict get.  With the C extension it also keeps the hot step's own map (its own
pidfd copies, an epoll set of them) and looks only at the slots whose (PID,
start time) moved since the last sync (issue 16), not at every slot.
Each Watched holds a pidfd opened at registration: its readability is the
cheap "is the whole thread group gone?" check (cn_proc.h: the kernel sends an
exit event for every thread).

:class:`Reporter` ends slots in the order peers need: zero the word and
wake first (Table.clear_pid), then record the status, measure, log, and run
the hooks.  A record that finds the table's lock taken by a client goes to
the :class:`Recorder` thread, so no detector ever waits for a client.

``reconcile()`` catches what events cannot: exits while the service was
down, and events the kernel dropped (ENOBUFS).  A slot whose process is
gone, or whose PID now belongs to another process (start time changed), is
ended as "found dead" with an unknown latency.
"""

import logging as _logging
import os as _os
import queue as _queue
import threading as _threading
import time as _time

from . import abi as _abi
from . import procfs as _procfs
from . import segment as _segment
from .journal import Event, emit
from .signals import describe_status

log = _logging.getLogger("procwatch")
FOUND_DEAD_GRACE = 1.0   # s a slot must stay gone before a periodic reconcile ends it (an exit event
                         # delayed behind a respawn under load must still win: it carries the status)
FOUND_DEAD_LATEST = 10.0  # s after which it is ended even if the detector has not read its backlog
OVERFLOW_QUIET = 1.0     # s without ENOBUFS that end an overflow burst (one log line each)
STALE_CLAIM_SWEEP = 10.0  # s between sweeps for stale CLAIMING slots (periodic reconcile only)


_CAUSE_NAMES = {c: c.name.lower() for c in _abi.Cause}


class Watched:
    """One registered process the detector watches."""
    __slots__ = ("slot", "pid", "start_time", "name", "pidfd", "gone_since", "gone_ns", "reused", "death")

    def __init__(self, slot, pid, start_time, name, pidfd, reused=False):
        self.slot, self.pid, self.start_time, self.name = slot, pid, start_time, name
        self.pidfd = pidfd
        # No pidfd: gone (reaped) already.  Its own exit event was stamped before gone_ns
        # (CLOCK_MONOTONIC, the connector's clock); an event stamped after it is a later
        # process's with the same PID, and must not end this one (accepts_exit()).
        self.gone_ns = None if pidfd is not None else _time.monotonic_ns()
        self.gone_since = None if pidfd is not None else self.gone_ns / 1e9
        self.reused = reused
        self.death = None               # (fired_ns, zeroed_ns) once its death word zeroed it

    def gone(self):
        return self.pidfd is None or _procfs.pidfd_exited(self.pidfd)

    def accepts_exit(self, kernel_ts_ns):
        """Whether an exit event of this tgid, stamped ``kernel_ts_ns``, ends this process:
        its whole thread group is gone (the pidfd is readable), or, with no pidfd, the
        event was sent before the process was found gone."""
        if self.pidfd is None:
            return kernel_ts_ns <= self.gone_ns
        return _procfs.pidfd_exited(self.pidfd)


_ARM_TEXT = {
    _abi.Arm.ARMED: "death word armed",
    _abi.Arm.NONE: "connector-only: the client did not arm a death word",
    _abi.Arm.DISARMED: "death word disarmed: unregistering",
    _abi.Arm.OTHER_PID: "connector-only: registered for another process, which alone can arm",
    _abi.Arm.UNAVAILABLE: "connector-only: the client could not arm a death word",
    _abi.Arm.PRELOAD: "death word not armed yet: the preload library arms it when the program starts",
    _abi.Arm.NOT_PRELOADABLE: "connector-only: a static or setuid program takes no preload library",
    _abi.Arm.LOST: "connector-only: the death word fired but the process lives on (execve)",
}


def arm_name(arm):
    """The Arm state as a lowercase word (journal field, status --json)."""
    try:
        return _abi.Arm(arm).name.lower()
    except ValueError:
        return f"invalid({arm})"


def arm_text(arm, death_watch=_abi.DeathWatch.WATCHING):
    """What a slot's Arm state means for its detection, in a few words.

    ``death_watch`` is the header's: an armed slot of a service that cannot
    wait on death words (no futex_waitv) is connector-only all the same.
    """
    if arm == _abi.Arm.ARMED and death_watch != _abi.DeathWatch.WATCHING:
        return "connector-only: death word armed, but this service cannot wait on it (no futex_waitv)"
    return _ARM_TEXT.get(arm, f"connector-only: unknown death-word state {arm}")


class Watchlist:
    """Registered processes by PID, rebuilt from the table when its generation moves.

    ``by_pid`` maps a tgid to a tuple of :class:`Watched` (a hostile or odd
    table may hold one PID in two slots).  The detector reads it without a
    lock: a dict lookup is atomic, and a rebuild swaps the whole dict.
    """

    def __init__(self, table, reporter):
        self.table = table
        self.reporter = reporter
        self.by_pid = {}
        self.generation = None
        self.on_change = None       # callback() after a sync added or dropped a process
        self.lock = _threading.RLock()
        # With the C extension: the hot step's own map (its own pidfd copies, an epoll set of
        # them for gone()), and the last (PID, start time) seen per slot, so that a sync
        # handles only the slots that changed (issue 16).
        self.hot = table.hot_step()     # None without the C extension
        self._changes = None
        self._fdless = set()        # entries without a pidfd (gone at adoption)
        self._by_slot = {}          # slot -> Watched (C path)
        self._shared_names = {}     # name -> frozenset of its (slot, pid)s, reported as held twice
        self._by_name = {}          # name -> [Watched]: _check_names looks up the names that changed
        self._adopted = None        # entries adopted since take_adopted() (None: nobody asked yet)

    def entries(self):
        return [w for ws in self.by_pid.values() for w in ws]

    def lookup(self, slot, pid):
        """The Watched of (slot, pid), waiting for a sync in progress; None if unknown."""
        for attempt in (0, 1):
            for w in self.by_pid.get(pid, ()):
                if w.slot == slot:
                    return w
            if attempt == 0:
                with self.lock:        # a sync adds to the hot map before it publishes by_pid
                    pass
        return None

    def sync(self, force=False, scan=False):
        """Bring ``by_pid`` in line with the table's PID words.

        ``force``: look at every slot (start-up, after an overflow); else,
        with the C extension, only at the slots whose (PID, start time)
        changed since the last sync.  ``scan``: look even if the generation
        did not move (a writer that did not bump it: the periodic reconcile).
        """
        t = self.table
        if not force and not scan and t.generation == self.generation:
            return
        if self.hot is None:
            return self._sync_full()
        with self.lock:
            # The generation is read before the scan and published after the new
            # dict: the detector treats "generation unchanged" as "by_pid is
            # current", so publishing it early would let an exit slip through.
            generation = t.generation
            if force or self._changes is None:
                self._changes = t.slot_changes()
            changes = self._changes.diff(t.address)
            by_slot = self._by_slot
            if force:
                seen = {slot for slot, _pid, _start in changes}
                changes += [(slot, 0, 0) for slot in by_slot if slot not in seen]
            by_pid = dict(self.by_pid)
            fresh, dropped = [], []
            for slot, pid, start in changes:
                w = by_slot.get(slot)
                if w is not None:
                    if w.pid == pid and w.start_time == start:
                        continue
                    self._drop(by_pid, w)
                    dropped.append(w)
                if pid == 0:
                    continue
                w = self._adopt(slot, pid, start)
                if w is None:               # corrupt: cleared, or looked at again next sync
                    self._changes.forget(slot)
                    continue
                fresh.append(w)
                by_pid[pid] = by_pid.get(pid, ()) + (w,)
                by_slot[slot] = w
                self._by_name.setdefault(w.name, []).append(w)
                self._watch(w)
            self.by_pid = by_pid
            self.generation = generation
            self.hot.synced_generation = generation
            if fresh and self._adopted is not None:
                self._adopted += fresh
            if (fresh or dropped) and self.on_change:
                self.on_change()
        self._log_changes(fresh, dropped)

    def take_adopted(self):
        """The entries adopted since the last call, for a consumer that looks at each new
        registration once (Operations.apply_rules: issue 16, a walk of every watched entry
        per registration was milliseconds with thousands live).  The first call returns every
        entry and starts the record; an entry dropped since may be among them (check .pidfd
        or the slot)."""
        with self.lock:
            if self._adopted is None:
                self._adopted = []
                return self.entries()
            out, self._adopted = self._adopted, []
            return out

    def _watch(self, w):
        if w.pidfd is None:
            self._fdless.add(w)
            self.hot.add(w.slot, w.pid, -1, w.gone_ns)
        else:
            self.hot.add(w.slot, w.pid, w.pidfd)

    def _drop(self, by_pid, w):
        rest = tuple(x for x in by_pid.get(w.pid, ()) if x is not w)
        if rest:
            by_pid[w.pid] = rest
        else:
            by_pid.pop(w.pid, None)
        same = self._by_name.get(w.name)
        if same is not None and w in same:
            same.remove(w)
            if not same:
                del self._by_name[w.name]
        if self.hot is not None:
            self.hot.remove(w.slot, w.pid)
            self._fdless.discard(w)
            if self._by_slot.get(w.slot) is w:
                del self._by_slot[w.slot]
                if self._changes is not None:
                    # The diff's memory follows the watch list: whatever the slot holds
                    # next (even the same PID and start time again) is looked at again.
                    self._changes.forget(w.slot)
        _close(w)

    def gone_candidates(self):
        """The entries that may be gone: with the C extension only those whose pidfd is
        readable (one epoll_wait) or that had none; else every entry."""
        if self.hot is None:
            return self.entries()
        out = list(self._fdless)
        for slot, pid in self.hot.exited():
            for w in self.by_pid.get(pid, ()):
                if w.slot == slot:
                    out.append(w)
        return out

    def _sync_full(self):
        t = self.table
        with self.lock:
            generation = t.generation
            old = {(w.slot, w.pid): w for w in self.entries()}
            new, fresh = {}, []
            for slot, pid in enumerate(t.pid_words()):
                if pid == 0:
                    continue
                start = t.start_time(slot)
                w = old.pop((slot, pid), None)
                if w is None or w.start_time != start:
                    if w is not None:
                        _close(w)
                    w = self._adopt(slot, pid, start)
                    if w is None:
                        continue
                    fresh.append(w)
                new.setdefault(pid, []).append(w)
            for w in old.values():          # unregistered, or ended by us
                _close(w)
            self.by_pid = {pid: tuple(ws) for pid, ws in new.items()}
            by_name = {}
            for ws in new.values():
                for w in ws:
                    by_name.setdefault(w.name, []).append(w)
            self._by_name = by_name
            self.generation = generation
            if fresh and self._adopted is not None:
                self._adopted += fresh
            if (fresh or old) and self.on_change:
                self.on_change()
        self._log_changes(fresh, list(old.values()))

    def _log_changes(self, fresh, dropped):
        # Logged once published, and outside the lock: "registered" means the
        # detector sees it, and no exit waits for a log line (issue 7).
        t = self.table
        for w in fresh:
            if w.pidfd is None:
                log.debug("%s (pid %d) in slot %d is gone already: its exit event, if still unread, "
                          "or the reconcile ends it", w.name, w.pid, w.slot)
            else:
                arm = t.death_arm(w.slot)
                emit(Event.REGISTERED, "%s (pid %d) registered in slot %d (%s)", w.name, w.pid, w.slot,
                     arm_text(arm, t.death_watch()), NAME=w.name, PID=w.pid, SLOT=w.slot,
                     HEARTBEAT_MS=t.heartbeat_ms(w.slot) or None, DEATH_WORD=arm_name(arm))
        for w in dropped:
            if t.state(w.slot) == _abi.State.UNREGISTERED:
                # An end by its own hand: counted as procwatch_exits_total{cause="unregistered"}.
                self.reporter.stats.record_exit(_abi.Cause.UNREGISTERED)
                emit(Event.UNREGISTERED, "%s (pid %d) unregistered", w.name, w.pid,
                     NAME=w.name, PID=w.pid, SLOT=w.slot)
        if fresh or dropped or self._shared_names:
            self._check_names(fresh + dropped)

    def _check_names(self, changed):
        """Two live slots with one name: say so once per pair (issue 13).

        No honest registration makes it (a name has one slot), so a group
        member wrote one of them by hand.  Peers and ``procwatch wait`` refuse
        the name (NameAmbiguous); the service cannot tell which is real and
        clears neither: both are watched, and each end is reported.

        Only the names of ``changed`` entries and the names already held twice are looked
        up, in the name index sync keeps, not every watched entry (issue 16: a walk of them
        all per registration was milliseconds with thousands live).
        """
        shared = self._shared_names
        for name in {w.name for w in changed}.union(shared):
            ws = list(self._by_name.get(name, ()))
            before = shared.pop(name, None)
            if len(ws) < 2:
                continue
            ident = shared[name] = frozenset((w.slot, w.pid) for w in ws)
            if ident == before:
                continue
            held = ", ".join(f"slot {w.slot}: pid {w.pid}" for w in sorted(ws, key=lambda w: w.slot))
            if self.reporter.stats is not None:
                self.reporter.stats.record_corrupt()
            emit(Event.CORRUPT, "name %s is held by %d live slots (%s): one was written by hand, not "
                 "registered; peers and procwatch wait refuse the name until only one is left",
                 name, len(ws), held, NAME=name, SLOT=ws[0].slot, PROBLEM="name held twice",
                 level=_logging.ERROR)

    def _adopt(self, slot, pid, start):
        """A Watched for a newly seen PID word, or None if the slot is corrupt."""
        t = self.table
        # The two fields it needs, not a whole-slot snapshot (read_slot): once per registration.
        state = t.state(slot)
        raw_name = t.name_bytes(slot)
        problem = None
        if not _procfs.valid_pid(pid):
            problem = f"PID word {pid} is not a valid PID (pid_max {_procfs.pid_max()})"
        elif state not in (_abi.State.ALIVE, _abi.State.HUNG):
            problem = f"PID word {pid} with state {_segment.state_name(state)}"
        else:
            try:
                raw_name.decode("utf-8")
            except UnicodeDecodeError:
                problem = f"name {raw_name!r} is not UTF-8"
        if problem:
            self.reporter.clear_corrupt(slot, pid, problem)
            return None
        # A zombie keeps its pidfd (readable at once): its exit is then reported
        # with its status, not found dead by a later reconcile.
        pidfd = _procfs.open_verified(pid, start, exited_ok=True)
        # Reused only if another start time sits there now: an unreaped zombie
        # still shows the registered one (it died; its PID is not reused yet).
        reused = pidfd is None and _procfs.start_time(pid) not in (None, start)
        return Watched(slot, pid, start, _abi.decode_name(raw_name), pidfd, reused)

    def forget(self, w):
        """Drop ``w`` after its end was reported."""
        with self.lock:
            by_pid = dict(self.by_pid)
            self._drop(by_pid, w)
            self.by_pid = by_pid

    def close(self):
        """Close every pidfd (ours and the hot step's copies)."""
        with self.lock:
            by_pid = dict(self.by_pid)
            for w in self.entries():
                self._drop(by_pid, w)
            self.by_pid = {}


def _group_exit_status(w):
    """The wait(2) status of ``w``'s whole process while it is a zombie, else None.

    An exit event names one thread and carries that thread's code.  A thread
    that ends alone (pthread_exit() in main, SYS_exit) sends its own code,
    usually 0, and its event may be read only after the whole group died (a
    detector busy with a sync, a loaded machine): ended by that event, the
    slot said "exited with code 0" of a process that called exit(5).  A fatal
    signal always ends the whole group, so only a normal exit can carry one
    thread's code; for those the zombie's /proc/PID/stat field 52 is asked,
    which holds the group's code once the group is dead (what its parent's
    wait() gets).  Reaped already (or unreadable): the event's code stands.
    """
    status = _procfs.zombie_exit_status(w.pid, w.start_time)
    return None if isinstance(status, str) else status


def _close(w):
    if w.pidfd is not None:
        _os.close(w.pidfd)
        w.pidfd = None


class Reporter:
    """Ends slots: zero the word and wake first, then record and log."""

    def __init__(self, table, stats, on_end=None, on_overflow=None):
        self.table = table
        self.stats = stats
        self.watch = Watchlist(table, self)
        self.on_end = on_end            # callback(event, watched, fields): hooks, metrics
        self.on_overflow = on_overflow  # callback(): the service reconciles at once
        self.overflow_pending = False
        self._last_overflow = None
        self._last_sweep = -STALE_CLAIM_SWEEP
        self.recorder = Recorder(table)
        # Set by the connector's detectors: () -> CLOCK_MONOTONIC s the event socket was
        # last found empty.  None (the pidfd backend): the grace alone decides.
        self.events_drained = None

    def overflow(self):
        """recv() said ENOBUFS: count it, log once per burst, ask for a reconcile.

        A storm that outruns the socket fails recv() again and again; a burst
        is a run of overflows less than OVERFLOW_QUIET s apart, and gets one
        line.  Every overflow asks for a reconcile unless one is queued: the
        service clears ``overflow_pending`` *before* it reconciles, so an
        overflow during a reconcile (after it checked a slot) queues the next.
        """
        self.stats.record_overflow()
        now = _time.monotonic()
        last, self._last_overflow = self._last_overflow, now
        if last is None or now - last > OVERFLOW_QUIET:
            emit(Event.OVERFLOW, "the kernel dropped exit events (socket receive buffer overflow, "
                 "%d so far); reconciling the table now", self.stats.overflows,
                 OVERFLOWS=self.stats.overflows)
        if self.overflow_pending:
            return
        self.overflow_pending = True
        if self.on_overflow:
            self.on_overflow()

    def report_exit(self, w, status, kernel_ts_ns):
        """The kernel said ``w`` exited; False if somebody else already ended it.

        ``status`` is a wait(2) status, or a callable returning ``(status,
        source, note)``, called only once the word is zeroed: the pidfd
        backend has to look the status up, and peers must not wait for that.
        ``kernel_ts_ns`` None: the exit time is unknown (LATENCY_UNKNOWN).
        """
        zeroed_ns = _time.monotonic_ns()    # before the store: FUTEX_WAKE's own cost is not the slot's latency
        if not self.table.clear_pid(w.slot, w.pid, pend=True):
            self.watch.forget(w)
            return False
        self.report_ended(w, status, kernel_ts_ns, zeroed_ns)
        return True

    def report_ended(self, w, status, kernel_ts_ns, zeroed_ns, pending=None):
        """Record, log and count an exit whose PID word is already zeroed and woken.

        The hot step (C) zeroes the word itself and hands over (slot, pid,
        pending-ends index); report_exit() zeroes it in Python.  Everything
        here runs after the peers were woken.
        """
        t = self.table
        if pending is not None:
            t.adopt_pending(w.slot, w.pid, pending)
        source = note = None
        if callable(status):
            status, source, note = status()
        elif _os.WIFEXITED(status):
            group = _group_exit_status(w)
            if group is not None and group != status:
                status, source = group, "procfs"
        latency_us = (zeroed_ns - kernel_ts_ns) // 1000 if kernel_ts_ns else _abi.LATENCY_UNKNOWN
        # Killed by procwatch: HUNG, and the heartbeat checker marked the cause before its signal.
        hung = t.killed_hung(w.slot)
        cause = _abi.Cause.KILLED_HUNG if hung else _abi.Cause.EXITED
        self._record(w, _abi.State.EXITED, cause, status, latency_us)
        self.watch.forget(w)
        text, fields = describe_status(status)
        self.stats.record_exit(cause, latency_us)
        self.stats.record_end(w.name, text)
        how = "killed: hung, " if hung else ""
        # Said as what it is: the exit event comes after the address-space teardown,
        # which this figure does not include (issue 14).
        if latency_us != _abi.LATENCY_UNKNOWN:
            detected = (f"zeroed {latency_us} µs after the exit event (sent after the address-space "
                        f"teardown; {arm_text(t.death_arm(w.slot), t.death_watch())})") + (f"; {note}" if note else "")
        else:
            detected = note or "detection latency unknown"
        cause_name = _CAUSE_NAMES[cause]
        emit(Event.EXIT, "%s (pid %d) %s%s; %s", w.name, w.pid, how, text, detected,
             NAME=w.name, PID=w.pid, SLOT=w.slot, LATENCY_US=latency_us, DETECTED_BY="exit_event",
             CAUSE=cause_name, STATUS_SOURCE=source, **fields)
        t.end_logged(w.slot, w.pid)
        if self.on_end:
            self.on_end(Event.EXIT, w, dict(fields, CAUSE=cause_name, LATENCY_US=latency_us,
                                            DETECTED_BY="exit_event"))

    def report_death(self, w, fired_ns):
        """``w``'s death word fired and the death is confirmed: zero the word and wake, now.

        Returns a pidfd of the process for the caller to complete the report
        with (finish_death()) once it is readable, i.e. after the teardown:
        the exit status comes from it.  The exit event that follows finds the
        word zeroed and reports nothing (its clear fails), so the end is
        reported once.  None if the word was not zeroed here: somebody else
        already ended it, or the process was reaped before this thread ran.

        The pidfd is opened *before* the word is zeroed.  A small process
        can be torn down and reaped by its parent between the kernel's wake
        and this thread running; then no pidfd can be had and no status read,
        but its exit event (sent before the reaping) carries the status, so
        the end is left to the exit event or pidfd path: nothing is gained by
        the death word once the teardown is over.  Zeroing first lost the
        status of every such process (tests/reliability/test_soak.py).
        """
        # A pidfd of its own, never a dup of w.pidfd: the pidfd backend's epoll set
        # holds w.pidfd's file, and a dup would keep that file (and its readiness)
        # registered under a number the watch list closes and a new registration
        # reuses -- a false death.
        try:
            fd = _os.pidfd_open(w.pid)
        except OSError:
            return None                 # reaped: its exit event has the status
        if _procfs.start_time(w.pid) not in (w.start_time, None):   # None: reaped after the open: ours
            _os.close(fd)
            return None                 # the PID is another process's already
        zeroed_ns = _time.monotonic_ns()
        if not self.table.clear_pid(w.slot, w.pid, pend=True):
            _os.close(fd)
            return None
        w.death = (fired_ns, zeroed_ns)
        return fd

    def finish_death(self, w, status, seen_ns):
        """Record and log the end of ``w`` its death word zeroed, once its status is known.

        Two figures, each saying what it measures: ``latency_us`` is death
        word seen -> PID word zeroed (the service's own part), ``teardown_us``
        death word seen -> the pidfd seen readable (``seen_ns``): about the time
        every exit-event or pidfd watcher loses to the address-space teardown.
        ``status`` as for report_exit().
        """
        fired_ns, zeroed_ns = w.death
        source = note = None
        if callable(status):
            status, source, note = status()
        latency_us = max(0, zeroed_ns - fired_ns) // 1000
        teardown_us = max(0, seen_ns - fired_ns) // 1000 if seen_ns else _abi.LATENCY_UNKNOWN
        t = self.table
        hung = t.killed_hung(w.slot)
        cause = _abi.Cause.KILLED_HUNG if hung else _abi.Cause.EXITED
        self._record(w, _abi.State.EXITED, cause, status, latency_us, _abi.Detection.DEATH_WORD, teardown_us)
        self.watch.forget(w)
        text, fields = describe_status(status)
        self.stats.record_exit(cause, latency_us, teardown_us)
        self.stats.record_end(w.name, text)
        how = "killed: hung, " if hung else ""
        after = (f"{teardown_us / 1000:.1f} ms before its pidfd was readable (address-space teardown)"
                 if teardown_us != _abi.LATENCY_UNKNOWN else "teardown not measured")
        cause_name = _CAUSE_NAMES[cause]
        emit(Event.EXIT, "%s (pid %d) %s%s; death word: zeroed %d µs after it fired, %s%s", w.name, w.pid,
             how, text, latency_us, after, f"; {note}" if note else "",
             NAME=w.name, PID=w.pid, SLOT=w.slot, LATENCY_US=latency_us, TEARDOWN_US=teardown_us,
             DETECTED_BY="death_word", CAUSE=cause_name, STATUS_SOURCE=source, **fields)
        t.end_logged(w.slot, w.pid)
        if self.on_end:
            self.on_end(Event.EXIT, w, dict(fields, CAUSE=cause_name, LATENCY_US=latency_us,
                                            DETECTED_BY="death_word", TEARDOWN_US=teardown_us))

    def death_word_lost(self, w):
        """A fired death word whose process lives on (execve): say once that it is connector-only now."""
        emit(Event.REGISTERED, "%s (pid %d): its death word fired but the process lives on (execve?); "
             "connector-only from now on (re-register, or run it under 'procwatch run', to arm again)",
             w.name, w.pid, NAME=w.name, PID=w.pid, SLOT=w.slot, DEATH_WORD="lost",
             level=_logging.WARNING)

    def report_found_dead(self, w, cause=_abi.Cause.FOUND_DEAD):
        t = self.table
        if not t.clear_pid(w.slot, w.pid, pend=True):
            self.watch.forget(w)
            return False
        if w.reused:
            cause = _abi.Cause.PID_REUSED
        self._record(w, _abi.State.FOUND_DEAD, cause)
        self.watch.forget(w)
        self.stats.record_exit(cause)
        why = {_abi.Cause.PID_REUSED: "its PID now belongs to another process",
               _abi.Cause.FOUND_DEAD_OVERFLOW: "its exit event was lost in an overflow",
               }.get(cause, "it exited while no event reached procwatch")
        self.stats.record_end(w.name, "found dead")
        emit(Event.FOUND_DEAD, "%s (pid %d) found dead: %s; exit status unknown", w.name, w.pid, why,
             NAME=w.name, PID=w.pid, SLOT=w.slot, CAUSE=_abi.Cause(cause).name.lower())
        t.end_logged(w.slot, w.pid)
        if self.on_end:
            self.on_end(Event.FOUND_DEAD, w, {"CAUSE": _abi.Cause(cause).name.lower()})
        return True

    def _record(self, w, state, cause, status=_abi.EXIT_STATUS_UNKNOWN, latency_us=_abi.LATENCY_UNKNOWN,
                detected_by=_abi.Detection.EXIT_EVENT, teardown_us=_abi.LATENCY_UNKNOWN):
        """record_end() under the table's lock, never making the caller wait for a client.

        The lock is free most of the time; when a client holds it (registering,
        perhaps into this very slot), the record goes to the recorder thread.
        """
        args = (w.slot, state, cause, status, latency_us, _time.time_ns(), w.start_time,
                detected_by, teardown_us)
        if self.table.record_end(*args[:7], lock_timeout=0, detected_by=detected_by,
                                 teardown_us=teardown_us) is None:
            self.recorder.put(args)

    def clear_corrupt(self, slot, pid, problem):
        """A slot no client could have written: clear it, say so, go on."""
        t = self.table
        if t.clear_pid(slot, pid):
            t.reset(slot)
        self.stats.record_corrupt()
        emit(Event.CORRUPT, "slot %d is corrupt (%s); cleared", slot, problem,
             SLOT=slot, PROBLEM=problem, level=_logging.ERROR)

    def reconcile(self, immediate=False, cause=_abi.Cause.FOUND_DEAD, full=False, sweep=False):
        """End every watched slot whose process is gone.

        ``immediate`` (start-up, after an overflow): end them now.  Otherwise
        a slot must have been seen gone for FOUND_DEAD_GRACE first, so that an
        exit event still on its way wins and reports the real status; and, with
        the connector, the detector must have found its socket empty since the
        slot was seen gone: the exit event is sent right after the pidfd turns
        readable, so until the backlog is read it may still be there (a burst
        of exits on a loaded machine took longer than the grace to read, and
        ended slots as found dead, status unknown).  FOUND_DEAD_LATEST bounds
        the wait for a detector that never catches up.

        ``full``: sync with every slot of the table (start-up, overflow), not
        only the ones that changed.  ``sweep``: also clear stale claims (the
        periodic reconcile only, at most every STALE_CLAIM_SWEEP s).  Neither
        runs after a respawn: the peer just woken needs the CPU (issue 16).
        """
        self.stats.reconciles += 1
        self.watch.sync(force=full, scan=sweep)
        now = _time.monotonic()
        drained = self.events_drained() if self.events_drained is not None else None
        ended = 0
        candidates = self.watch.gone_candidates()
        for w in candidates:
            if not w.gone():
                w.gone_since = None
                continue
            if w.gone_since is None:
                w.gone_since = now
            waited = now - w.gone_since
            if immediate or waited >= FOUND_DEAD_LATEST or waited >= FOUND_DEAD_GRACE and (
                    drained is None or drained > w.gone_since):
                ended += self.report_found_dead(w, cause)
        if sweep and now - self._last_sweep >= STALE_CLAIM_SWEEP:
            self._last_sweep = now
            self._clear_stale_claims()
        return ended

    def _clear_stale_claims(self):
        """CLAIMING slots left by a client killed mid-registration.

        Under the lock no client is mid-claim, so a CLAIMING slot is stale.
        (ALIVE with a zero PID word is not: that is this service between
        clear_pid() and record_end().)
        """
        for i in self.table.clear_stale_claims():
            log.info("slot %d: cleared a registration its client never finished", i)


class Recorder:
    """Writes the ends whose record found the table lock taken, off the detector thread.

    A detector (or the main loop, whose respawns the detectors wait for) must
    never wait for a client's lock: under a registration storm the lock is
    busy half the time.  One thread, started on first use, writes what has
    queued up under one hold of the lock.
    """

    def __init__(self, table):
        self.table = table
        self.queue = _queue.SimpleQueue()
        self._thread = None
        self._start_lock = _threading.Lock()

    def put(self, args):
        self.queue.put(args)
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = _threading.Thread(target=self._run, name="procwatch-recorder",
                                                     daemon=True)
                    self._thread.start()

    def _run(self):
        t = self.table
        while True:
            batch = [self.queue.get()]
            while True:
                try:
                    batch.append(self.queue.get_nowait())
                except _queue.Empty:
                    break
            try:
                t.record_ends(batch)
            except ValueError:          # the table was detached: the service is stopping
                return
