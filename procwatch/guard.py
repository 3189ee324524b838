"""The service's defences against a table that was damaged, forged or removed.

The slot table is a SysV segment that every member of its group (and root)
may write, so anything in it can be garbage, a torn write or a lie.  The
detector already refuses slots it cannot believe when it first sees their
PID word (``Watchlist._adopt``: a PID out of range, a state out of range, a
name that is not UTF-8 -> Event.CORRUPT, cleared), and it only ever ends a
slot when the kernel or a pidfd says that (PID, start time) is gone.  This
module covers the rest:

* the header: its layout fields and the service's own fields are known to
  the service.  A writer that changes them makes clients refuse the table and
  ``procwatch status`` say "not running"; the service puts them back and
  says so (:class:`TableGuard`);
* slots with an out-of-range state, which no watch list looks at when their
  PID word is 0, or after it adopted them;
* the segment or its semaphore removed under the service (``ipcrm``):
  :meth:`TableGuard.check` returns False and the service starts over in
  place (``Service._restart_in_place``);
* ends a previous service zeroed but may not have logged, because it was
  SIGKILLed in between (:func:`recover_pending_ends`);
* the table's semaphore wedged at 0: taken without SEM_UNDO (``s.undo =
  False; s.acquire()``) by a member that then exited, so no later
  registration could get it.  Held past LOCK_WEDGED_AFTER by a process
  that is gone (or by nobody), it is put back and logged once
  (:meth:`TableGuard._check_lock`);

What a hostile group member can and cannot make the service do is written
down in docs/RELIABILITY.md ("threat model").
"""

import logging as _logging
import time as _time

from . import abi as _abi
from . import procfs as _procfs
from .journal import Event, emit
from .signals import describe_status

log = _logging.getLogger("procwatch")
# s the semaphore must stay taken, unchanged, before the service looks at its
# holder: an honest client holds it for microseconds; a registration waits 5 s.
LOCK_WEDGED_AFTER = 1.0
# Slots of the EMPTY tail (past used_end) each check_used_end() reads: at one call a period,
# a slot written by hand far past used_end is seen within (slots - used_end) / TAIL_CHUNK
# periods (16 s at 65536 slots, at once up to 4096), for ~0.06 ms of CPU a second.
TAIL_CHUNK = 4096
_PID_STATES = (_abi.State.ALIVE, _abi.State.HUNG)      # the only states a set PID word may have


class TableGuard:
    """Checks the service's table each reconcile period; puts back what it owns.

    Build it once the service has written its header fields: what the
    header holds then is the truth.
    """

    def __init__(self, table, stats=None):
        self.table = table
        self.stats = stats
        self.header = table.header_snapshot()
        junk = table.own_exits()
        if junk is not None:
            self._corrupt("table header's exits counter was %d, more than this segment could have "
                          "seen; restarted from the %d ended slots", junk, table.header()["exits"],
                          PROBLEM="header: exits counter")
        self._held = None               # (lock_holder() tuple, monotonic time first seen)
        self._tail_at = 0               # check_used_end(): where its next look at the tail starts
        self._held_reported = None      # the live hold already warned about

    def present(self):
        """Whether the segment and semaphore at the key are still ours (not ``ipcrm``-ed)."""
        return self.table.still_present() and self.table.semaphore_present()

    def check(self, states=True, used_end=False):
        """One pass over the table.  False when the segment or its semaphore is gone.

        ``states``: also check every slot's state word (a big table's
        service does that every few periods: see service.SCAN_RATE);
        ``used_end``: the header's used_end (check_used_end).
        """
        if not self.present():
            return False
        self._check_header()
        if used_end:
            self.check_used_end()
        if states:
            self._check_states()
        self._check_lock()               # three semctl(2) calls: every pass
        return True

    def _corrupt(self, message, *args, **fields):
        _corrupt(self.stats, message, *args, **fields)

    def _check_header(self):
        changed = self.table.restore_header(self.header)
        if self.table.restore_exits():
            changed.append("exits counter")
        if changed:
            self._corrupt("table header was overwritten (%s); put back", ", ".join(changed),
                          PROBLEM="header: " + ", ".join(changed))

    def check_used_end(self):
        """Keep the header's used_end over every slot in use (segment.Table.scan_end).

        Passes stop at the first EMPTY slot at or after it, so a slot written
        past it (by hand, or past a slot this service freed) is seen only once
        it says so: by the hang checker at its next look, by the watch list at
        its next look at the slots (as any write without a generation bump).
        A value past the used slots only makes every registration read more;
        it is lowered too.  Each call reads a few words near used_end and the
        next TAIL_CHUNK slots of the EMPTY tail, round and round, so a big
        table costs the same each time (the whole tail of 65536 slots: ~1 ms).
        """
        t = self.table
        end = t.scan_end()
        start = self._tail_at if end <= self._tail_at < t.slot_count else end
        stop = min(t.slot_count, start + TAIL_CHUNK)
        self._tail_at = stop
        if not t.used_end_looks_wrong() and t.first_used(start, stop) < 0:
            return
        fixed = t.fix_used_end()
        if fixed is not None:
            log.info("slot table's used_end said %d, the slots in use end at %d; put right", *fixed)

    def _check_lock(self, now=None):
        """The semaphore taken and unchanged for LOCK_WEDGED_AFTER: who holds it?

        A holder that used SEM_UNDO cannot wedge it (the kernel gives it back
        at exit), so value 0 with its last PID gone (or a zombie, or 0: no
        one) is a lock nobody will release: put it back, log once.  A live
        holder is its own business (docs/RELIABILITY.md, threat model): one
        warning per hold.  The holder's start time must precede its last
        semop, else its PID was reused and the real holder is gone.
        """
        seen = self.table.lock_holder()
        now = _time.monotonic() if now is None else now
        if seen is None or seen[0] != 0:
            self._held = None
            return
        if self._held is None or self._held[0] != seen:
            self._held = (seen, now)
            return
        if now - self._held[1] < LOCK_WEDGED_AFTER:
            return
        _, pid, otime = seen
        started = _procfs.start_wall_time(pid) if pid else None
        if pid and _procfs.process_exists(pid) and (started is None or started <= otime + 1):
            if self._held_reported != seen:
                self._held_reported = seen
                log.warning("the lock of slot table key %#010x has been held for %.0f s by PID %d, "
                            "which still runs; registrations wait for it (5 s, then fail)",
                            self.table.key, now - self._held[1], pid)
            return
        if not self.table.unwedge_lock(seen):
            return
        self._held = None
        who = f"PID {pid}, which has exited" if pid else "no process"
        self._corrupt("the lock of slot table key %#010x was held by %s without SEM_UNDO, so nobody "
                      "could register; put back", self.table.key, who,
                      PID=pid or None, PROBLEM="lock wedged")

    def _check_states(self):
        """Slots whose state word cannot be true (Table.repair_states says which and fixes them).

        A PID the watch list adopted was checked then (PID, start time,
        name); a new one is checked at the next sync.  Either way only the
        state word is wrong, so it is set back to ALIVE.
        """
        for i, pid, state in self.table.repair_states() or ():   # None: a client holds the lock
            what = _state_name(state)
            if pid:
                self._corrupt("slot %d (pid %d) is corrupt (state %s with a PID); set back to alive",
                              i, pid, what, SLOT=i, PID=pid, PROBLEM=f"state {what} with a PID")
            else:
                self._corrupt("slot %d is corrupt (state %s out of range, no PID); cleared",
                              i, what, SLOT=i, PROBLEM=f"state {what} out of range")


def _state_name(state):
    try:
        return _abi.State(state).name.lower()
    except ValueError:
        return str(state)


def recover_pending_ends(table, stats=None, on_end=None):
    """Report the ends a previous service instance left pending (start-up, before anything else).

    The service notes (slot, PID) in the header before it zeroes a PID word
    and drops the note once the end is logged (Table.clear_pid, end_logged).
    A note still there at start-up means the previous instance died in
    between.  If the slot's end was not recorded yet, it was surely not
    logged: report it found dead.  If it was recorded, it may have been
    logged already: report it again from the slot, marked POSSIBLE_REPEAT=1
    so that readers can drop a duplicate (same NAME and PID).  ``on_end``
    (the hooks) is called for each, as the Reporter would have: it runs
    after the note is dropped, so a pending note means it never ran.
    Returns how many ends it reported.
    """
    import types
    reported = 0
    for slot, pid in table.take_pending_ends():
        if not (0 <= slot < table.slot_count and _procfs.valid_pid(pid)):
            _corrupt(stats, "pending end (slot %d, pid %d) names no slot or no valid PID; dropped",
                     slot, pid, PROBLEM="pending end out of range")
            continue
        word = table.pid(slot)
        if word == pid:
            continue                            # never zeroed: the reconcile decides
        s = table.read_slot(slot)
        fields = dict(PID=pid, SLOT=slot)
        event, more, cause = Event.FOUND_DEAD, {}, "found_dead"
        if word == 0 and s.state in _PID_STATES:
            table.record_end(slot, _abi.State.FOUND_DEAD, _abi.Cause.FOUND_DEAD)
            emit(Event.FOUND_DEAD, "%s (pid %d) found dead: the previous procwatch saw it end but was "
                 "stopped before recording how; exit status unknown", s.name, pid,
                 NAME=s.name, CAUSE="found_dead", **fields)
        elif word == 0 and s.state in (_abi.State.EXITED, _abi.State.FOUND_DEAD):
            cause = s.cause_name
            if s.state == _abi.State.EXITED:
                event, (text, more) = Event.EXIT, describe_status(s.exit_status)
                emit(Event.EXIT, "%s (pid %d) %s; reported again after a restart (the previous "
                     "procwatch may have logged it)", s.name, pid, text,
                     NAME=s.name, CAUSE=cause, POSSIBLE_REPEAT=1, **fields, **more)
            else:
                emit(Event.FOUND_DEAD, "%s (pid %d) found dead; reported again after a restart (the "
                     "previous procwatch may have logged it)", s.name, pid,
                     NAME=s.name, CAUSE=cause, POSSIBLE_REPEAT=1, **fields)
        else:
            emit(Event.FOUND_DEAD, "pid %d (slot %d) ended; the slot was registered again before "
                 "procwatch restarted, so its name is lost (the previous procwatch may have "
                 "logged it)", pid, slot, POSSIBLE_REPEAT=1, CAUSE="found_dead", **fields)
        if on_end is not None and word == 0:
            on_end(event, types.SimpleNamespace(name=s.name, pid=pid, slot=slot), dict(more, CAUSE=cause))
        if stats is not None:
            kernel = (_abi.Cause.EXITED, _abi.Cause.KILLED_HUNG)
            stats.record_exit(_abi.Cause(s.cause) if word == 0 and s.state == _abi.State.EXITED
                              and s.cause in kernel else _abi.Cause.FOUND_DEAD)
        reported += 1
    return reported


def _corrupt(stats, message, *args, **fields):
    if stats is not None:
        stats.record_corrupt()
    emit(Event.CORRUPT, message, *args, level=_logging.ERROR, **fields)
