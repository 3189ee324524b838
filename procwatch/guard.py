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

What a hostile group member can and cannot make the service do is written
down in docs/RELIABILITY.md ("threat model").
"""

import logging as _logging

from . import abi as _abi
from . import procfs as _procfs
from .journal import Event, emit

log = _logging.getLogger("procwatch")
_MAX_STATE = max(_abi.State)
_PID_STATES = (_abi.State.ALIVE, _abi.State.HUNG)      # the only states a set PID word may have
# Header words the service writes once at start and never again while it
# runs: (offset, size in bytes, name for messages).  (The backend and the
# heartbeat period may legitimately change at run time; they are not here.)
_SERVICE_WORDS = (
    (_abi.H_SERVICE_PID, 4, "service PID"),
    (_abi.H_SERVICE_START_TIME, 8, "service start time"),
)


class TableGuard:
    """Checks the service's table each reconcile period; puts back what it owns.

    Build it once the service has written its header fields: what the
    header holds then is the truth.
    """

    def __init__(self, table, stats=None):
        self.table = table
        self.stats = stats
        self.static = bytes(table.buf[:_abi.HEADER_STATIC.size])
        self.words = [(off, size, name, self._get(off, size)) for off, size, name in _SERVICE_WORDS]

    def _get(self, off, size):
        return self.table.hget32(off) if size == 4 else self.table.hget64(off)

    def _set(self, off, size, value):
        if size == 4:
            self.table.hset32(off, value)
        else:
            self.table.hset64(off, value)

    def present(self):
        """Whether the segment and semaphore at the key are still ours (not ``ipcrm``-ed)."""
        return self.table.still_present() and self.table.semaphore_present()

    def check(self):
        """One pass over the table.  False when the segment or its semaphore is gone."""
        if not self.present():
            return False
        self._check_header()
        self._check_states()
        return True

    def _corrupt(self, message, *args, **fields):
        _corrupt(self.stats, message, *args, **fields)

    def _check_header(self):
        t = self.table
        changed = []
        if bytes(t.buf[:len(self.static)]) != self.static:
            t.buf[:len(self.static)] = self.static          # no PID word lives here
            changed.append("layout fields (magic .. slot count)")
        for off, size, name, value in self.words:
            if self._get(off, size) != value:
                self._set(off, size, value)
                changed.append(name)
        if changed:
            self._corrupt("table header was overwritten (%s); put back", ", ".join(changed),
                          PROBLEM="header: " + ", ".join(changed))

    def _check_states(self):
        """Slots whose state word cannot be true.

        Every honest writer keeps "PID word set => state ALIVE or HUNG" at
        all times (clients and the service zero the PID word before they
        change the state), so a slot breaking it, or a state out of range
        with no PID, was written by somebody else.  The state is read before
        the PID word, in the order the service's own ending writes them.
        """
        t = self.table
        step = _abi.SLOT_SIZE // 4
        first = _abi.HEADER_SIZE // 4
        end = first + t.slot_count * step
        pids = t.u32[first:end:step].tolist()
        states = t.u32[first + 1:end:step].tolist()
        bad = [i for i, (pid, state) in enumerate(zip(pids, states))
               if (state not in _PID_STATES if pid else state > _MAX_STATE)]
        if not bad:
            return
        if not t.try_lock():          # a client is registering: look again next period
            return
        try:
            for i in bad:
                with t.service_lock:  # against clear_pid(): see above
                    state = t.get32(i, _abi.S_STATE)
                    pid = t.u32[t.pid_index(i)]
                    if pid == 0 and state > _MAX_STATE:
                        t.clear_slot_body(i)
                        t.set32(i, _abi.S_STATE, _abi.State.EMPTY)
                    elif pid != 0 and state not in _PID_STATES:
                        # A PID the watch list adopted was checked then (PID,
                        # start time, name); a new one is checked at the next
                        # sync.  Either way only the state word is wrong.
                        t.set32(i, _abi.S_STATE, _abi.State.ALIVE)
                    else:
                        continue
                what = _state_name(state)
                if pid:
                    self._corrupt("slot %d (pid %d) is corrupt (state %s with a PID); set back to alive",
                                  i, pid, what, SLOT=i, PID=pid, PROBLEM=f"state {what} with a PID")
                else:
                    self._corrupt("slot %d is corrupt (state %s out of range, no PID); cleared",
                                  i, what, SLOT=i, PROBLEM=f"state {what} out of range")
        finally:
            t.unlock()


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
    from .detector import describe_status
    reported = 0
    for slot, pid in table.take_pending_ends():
        if not (0 <= slot < table.slot_count and _procfs.valid_pid(pid)):
            _corrupt(stats, "pending end (slot %d, pid %d) names no slot or no valid PID; dropped",
                     slot, pid, PROBLEM="pending end out of range")
            continue
        word = table.u32[table.pid_index(slot)]
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
