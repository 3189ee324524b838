"""The client side: register a process, beat, and watch a peer.

Everything here is a plain read or one aligned store on the mapped table:
no syscall per ``Peer.pid`` read or per ``beat()``, no lock outside slot
allocation, and nothing from pyroute2 or systemd is imported, so a client
pays only for sysv_ipc.

A client never depends on the service.  With no table at the key,
:func:`register_pid` logs one warning and returns None, and the program goes
on as if procwatch did not exist.  A table it may not use (not in the table's
group, a damaged header, a lock held for seconds) is the same to the program,
but is logged as an error that says what to fix.
"""

import logging as _logging
import os as _os
import time as _time

from . import abi as _abi
from . import futex as _futex
from . import native as _native
from . import procfs as _procfs
from .signals import hang_signal_value
from .errors import (AccessDenied, NameAmbiguous, NameInUse, NameNotFound, SegmentCorrupt, SegmentMissing,
                     SegmentPermissionError, TableBusy, TableFull)
from .segment import Table as _Table

log = _logging.getLogger("procwatch.client")
_ENDED = (_abi.State.EXITED, _abi.State.FOUND_DEAD, _abi.State.UNREGISTERED)


def _name_bytes(name, pid):
    if name is None:
        try:
            with open(f"/proc/{pid}/comm", "rb") as f:
                comm = f.read().strip()
        except OSError:                 # no /proc, or the process is gone
            comm = b"pid"
        name = f"{comm.decode('utf-8', 'replace')}-{pid}"
    elif isinstance(name, (bytes, bytearray)):
        try:
            name = bytes(name).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"name {_abi.shown_name(bytes(name))} is not valid UTF-8 "
                             f"({e.reason} at byte {e.start})") from None
    return _abi.encode_name(name)


def _slot_live(table, i, state):
    """Whether slot ``i`` names a live process (its PID and start time match)."""
    pid = table.pid(i)
    return (state in _abi.LIVE_STATES and pid != 0 and _procfs.valid_pid(pid)
            and _procfs.start_time(pid) == table.start_time(i))


def _choose_slot(table, raw, pid, start):
    """(slot, adopt) for name ``raw`` registered by (``pid``, ``start``) (hold table.lock()).

    Same name first: ``adopt`` when its slot already holds this very process
    (same PID and start time: ``procwatch run`` registered it before exec,
    or it registers twice), NameInUse when another live process holds it,
    else that slot is reused.  Then the first EMPTY slot, then the ended or
    stale slot that ended longest ago.  /proc is read only for the same-name
    slot and, when the table has no empty slot, for the candidates to reuse.
    """
    same, first_empty = table.find_name(raw)
    if same >= 0:
        state = table.state(same)
        if state in (_abi.State.ALIVE, _abi.State.HUNG) and \
                table.pid(same) == pid and table.start_time(same) == start:
            return same, True
        # A CLAIMING slot under our lock is a stale claim: its client died
        # mid-registration and SEM_UNDO released the lock.
        if state != _abi.State.CLAIMING and _slot_live(table, same, state):
            raise NameInUse(raw.decode("utf-8", "backslashreplace"), table.pid(same))
        return same, False
    if first_empty >= 0:
        return first_empty, False
    # A full table (rare): every slot is a candidate to reuse.
    others = list(enumerate(table.state_words()))
    # Reported ends first, oldest first; then stale claims (never published).
    # A live-state slot whose process is gone comes last: its death is not
    # reported yet, and taking its slot would lose that report.
    ended = [((0, table.exit_time_ns(i)) if state in _ENDED
              else (0, 0) if state == _abi.State.CLAIMING else (1, 0), i)
             for i, state in others if state == _abi.State.CLAIMING or not _slot_live(table, i, state)]
    if ended:
        return min(ended)[1], False
    raise TableFull(table.key, table.slot_count)


class Registration:
    """A process's slot in the table.  Also a context manager that unregisters."""

    def __init__(self, table, slot, pid, start_time, name, sentinel=None):
        self.table = table
        self.slot = slot
        self.pid = pid
        self.start_time = start_time
        self.name = name
        self._u64, self._seq_index = table.beat_word(slot)
        self._registered = True
        self._sentinel = sentinel

    @property
    def death_word(self):
        """The slot's death-word state: 'armed', or why it is connector-only (abi.Arm, lowercase)."""
        try:
            return _abi.Arm(self.table.death_arm(self.slot)).name.lower()
        except ValueError:
            return "invalid"

    def beat(self):
        """Count progress: one aligned 8-byte store, no syscall, no lock."""
        self._u64[self._seq_index] += 1

    def set_heartbeat(self, seconds):
        """Expect a beat at least every ``seconds`` (0 turns hang detection off)."""
        self.table.set_heartbeat(self.slot, _heartbeat_ms(seconds))
        # The service's hang checker sleeps on the generation while no slot asks for beats.
        with self.table.lock():
            self.table.bump_generation()

    def set_hang_action(self, action=None, signal=None):
        """What the service does when this process hangs: 'kill' or 'log', and the signal.

        None keeps the service's default (``--hang-action``, ``--hang-signal``).
        """
        a, s = hang_action_value(action), hang_signal_value(signal)
        self.table.set_hang_action(self.slot, a, s)

    @property
    def registered(self):
        return self._registered and self.table.pid(self.slot) == self.pid

    def unregister(self):
        """Leave the table cleanly; peers see the PID word turn 0.  Idempotent."""
        if not self._registered:
            return
        self._registered = False
        t = self.table
        if self.pid != _os.getpid() and self._sentinel is not None:
            t.detach()                # a fork(2)ed child: the registration is its parent's
            return
        try:
            with t.lock():
                t.release(self.slot, self.pid)      # marks the death word DISARMED first
        except SegmentMissing:
            pass                      # the table went away: nothing left to clean
        except _UNUSABLE as e:        # lock held for seconds, or taken from us: never the client's problem
            log.error("procwatch: cannot unregister %s (%s); the service reports it ended "
                      "when the process exits", self.name, e)
        finally:
            if self._sentinel is not None:
                self._sentinel.release()            # unlocked after the mark: never a death
            t.detach()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.unregister()

    def __repr__(self):
        return (f"<procwatch.Registration name={self.name!r} pid={self.pid} slot={self.slot} "
                f"key={self.table.key:#010x}>")


def hang_action_value(action):
    """HangAction for ``action``: None (service default), 'kill', 'log', or a HangAction."""
    if action is None:
        return _abi.HangAction.DEFAULT
    if isinstance(action, str):
        try:
            return _abi.HangAction[action.upper()]
        except KeyError:
            pass
    elif isinstance(action, int) and not isinstance(action, bool):
        try:
            return _abi.HangAction(action)
        except ValueError:
            pass
    raise ValueError(f"hang action {action!r} is not 'kill' or 'log' (or None for the service's default)")


def _heartbeat_ms(seconds):
    if seconds is None or seconds < 0:
        raise ValueError(f"heartbeat must be >= 0 seconds, not {seconds!r}")
    ms = round(seconds * 1000)
    if seconds and ms == 0 or ms > 0xFFFFFFFF:
        raise ValueError(f"heartbeat {seconds!r} s is out of range (1 ms .. 49 days)")
    return ms


def register_pid(name=None, *, pid=None, key=None, heartbeat=None, hang_action=None, hang_signal=None,
                 arm=True):
    """Claim a slot for ``pid`` (default: this process) under ``name``.

    Returns a :class:`Registration`, or None when no table exists (no
    service): one warning is logged and the caller goes on working.  A table
    this process may not use also returns None, with one error line saying
    what to fix (:class:`SegmentPermissionError`: join the table's group;
    :class:`SegmentCorrupt`; :class:`TableBusy`): procwatch must never be the
    reason a program stops.

    ``pid`` may name another process only if this one could signal it
    (kill(2)'s rule: the same user, or root), since the service may signal a
    registered process that hangs; else :class:`AccessDenied`.

    A name held by another live process raises :class:`NameInUse`; a name
    whose process is gone reuses its slot.  A name already registered for
    this very process (same PID and start time) is *adopted*: the slot is
    kept as it is, never cleared (peers see no end), and only the settings
    given here change.  That is how a program started by ``procwatch run
    --name NAME --heartbeat S`` beats the slot ``run`` registered for it.
    ``heartbeat`` > 0 asks the service to
    declare the process hung when it does not call ``beat()`` for that many
    seconds, ``--max-misses`` (3) checks in a row; 0 turns that off, None
    (the default) means 0 for a new slot and "unchanged" for an adopted one.
    ``hang_action`` ('kill' or 'log') and ``hang_signal`` (a name or number,
    e.g. 'SIGABRT' for a core dump) override the service's defaults for this
    process; None keeps them (or, adopting, the slot's).  The kill needs the target to have the table attached (so
    ``pid=`` another process works only if that process attached it too).

    The death word (issue 14): registering this process also starts a
    sentinel thread that holds the slot's robust mutex, so the service learns
    of the death when the kernel starts the exit, before the address space
    is torn down.  A slot registered for another process cannot be armed
    (only its own threads can hold the mutex): it stays connector-only, and
    ``procwatch status`` says so.  ``arm=False`` (or an abi.Arm saying why)
    leaves it connector-only on purpose (``procwatch run`` arms in the new
    image instead).  An armed process that calls execve(2) fires its death
    word; unregister first, or peers polling ``Peer.alive`` see it dead until
    the service has told the exec from a death (deathword.CONFIRM_WINDOW).
    """
    pid = _os.getpid() if pid is None else pid
    if not isinstance(pid, int) or not _procfs.valid_pid(pid):
        raise ValueError(f"PID {pid!r} is not a valid process ID (1..{_procfs.pid_max() - 1})")
    if pid != _os.getpid():
        _check_may_signal(pid)
    raw = _name_bytes(name, pid)
    hb_ms = None if heartbeat is None else _heartbeat_ms(heartbeat)
    action = hang_action_value(hang_action)
    sig = hang_signal_value(hang_signal)
    try:
        table = _Table.attach(key)
    except _UNUSABLE as e:
        return _without_procwatch(e)
    try:
        with table.lock():
            start = _procfs.start_time(pid)
            if start is None:
                raise ValueError(f"no process with PID {pid}")
            i, adopt = _choose_slot(table, raw, pid, start)
            if adopt:
                # Only what this call gives changes; the PID word is never touched.
                table.adopt(i, heartbeat_ms=hb_ms, hang_action=action if hang_action is not None else None,
                            hang_signal=sig if hang_signal is not None else None)
                table.bump_generation()
                return Registration(table, i, pid, start, raw.decode("utf-8"))
            table.claim(i)
            sentinel = None
            if pid != _os.getpid():
                table.set_arm(i, _abi.Arm.OTHER_PID)
            elif arm is not True:
                table.set_arm(i, arm or _abi.Arm.NONE)
            else:                               # armed before it is published (deathword.Sentinel)
                from .deathword import Sentinel
                sentinel = Sentinel(table, i, pid)
                if sentinel.arm() != _abi.Arm.ARMED:
                    log.warning("procwatch: could not arm the death word of %r; its death is seen only "
                                "after the address-space teardown (connector-only)", raw.decode("utf-8"))
            table.publish(i, pid, start, raw, heartbeat_ms=hb_ms or 0, hang_action=action,
                          hang_signal=sig, owner_uid=_os.getuid())
    except _UNUSABLE as e:
        table.detach()
        return _without_procwatch(e)
    except BaseException:
        table.detach()
        raise
    return Registration(table, i, pid, start, raw.decode("utf-8"), sentinel)


_UNUSABLE = (SegmentMissing, SegmentPermissionError, SegmentCorrupt, TableBusy)


def _without_procwatch(err):
    """Log why the table cannot be used (one line) and return None."""
    if isinstance(err, SegmentMissing):
        log.warning("procwatch is not running (%s); continuing without it", err)
    else:
        log.error("procwatch: %s; continuing without it", err)
    return None


def _check_may_signal(pid):
    """Raise unless this process may signal ``pid`` (kill(2) with signal 0 decides)."""
    try:
        _os.kill(pid, 0)
    except ProcessLookupError:
        raise ValueError(f"no process with PID {pid}") from None
    except PermissionError:
        raise AccessDenied(pid, _procfs.real_uid(pid)) from None


def _find_slot(table, raw):
    """Slot index carrying name ``raw``: the live one, else the latest ended one.

    Two live slots (a set PID word, alive or hung) with one name raise
    :class:`NameAmbiguous`: no honest registration makes that, and a guess
    could follow a forged slot (issue 13).
    """
    best = best_time = live = None
    states = table.state_words()
    for i, state in enumerate(states):
        if state == _abi.State.EMPTY:
            continue
        if table.name_bytes(i) != raw:
            continue
        if state in _abi.LIVE_STATES:
            pid = table.pid(i)
            if live is not None and pid and live[1]:
                holders = [live, (i, pid)] + [
                    (j, table.pid(j)) for j in range(i + 1, table.slot_count)
                    if table.pid(j) and states[j] in _abi.LIVE_STATES and table.name_bytes(j) == raw]
                raise NameAmbiguous(raw.decode("utf-8", "backslashreplace"), table.key, holders)
            if live is None or (pid and not live[1]):
                live = (i, pid)
            continue
        t = table.registered_ns(i)
        if best is None or t > best_time:
            best, best_time = i, t
    return live[0] if live is not None else best


# Peer.pid/alive inline abi.death_word_dead() with these two numbers (and so does _hotstep.c).
assert _abi.Arm.ARMED == 1 and _abi.FUTEX_OWNER_DIED == 0x40000000


class _PyPeerWord:
    """What procwatch._hotstep.PeerWord does, in Python (where the extension did not load).

    Both also read the death word (abi.death_word_dead, inlined as in
    _hotstep.c's word_pid()): a peer that polls sees a death the moment the
    kernel marks the word, before the service wakes.
    """
    __slots__ = ("__dict__", "__weakref__", "_known")

    def _bind(self, address):
        _, self._arm_index, self._word_index = self.table.death_word_view(self.slot)

    @property
    def pid(self):
        """The target's PID, or 0 when it is gone (or was never started)."""
        u32 = self._u32
        pid = u32[self._index]
        if u32[self._arm_index] == 1 and u32[self._word_index] & 0x40000000:   # ARMED, OWNER_DIED
            return 0
        if pid == self._known or pid == 0:
            return pid
        return self._follow(pid)

    @property
    def alive(self):
        """Whether the target lives: ``pid != 0`` and its death word has not fired."""
        u32 = self._u32
        pid = u32[self._index]
        if u32[self._arm_index] == 1 and u32[self._word_index] & 0x40000000:   # ARMED, OWNER_DIED
            return False
        if pid == self._known or pid == 0:
            return pid != 0
        return self._follow(pid) != 0


class Peer(_native.hot.PeerWord if _native.hot else _PyPeerWord):
    """Another registered process, seen through its slot's PID word.

    ``pid`` and ``alive`` read the mapped word directly (in C, one atomic
    load: ~20 ns; a change the peer did not expect goes to ``_follow``);
    ``wait_exit`` sleeps on it as a futex, woken by the service when it
    zeroes the word.  The table is attached read-only.  A name held by two
    live slots (a forged one) raises :class:`NameAmbiguous`, here or when
    the peer follows its name to another slot.
    """

    def __init__(self, name, *, key=None):
        self._raw = _name_bytes(name, 0)
        self.name = self._raw.decode("utf-8")
        self.table = _Table.attach(key, readonly=True)
        try:
            slot = _find_slot(self.table, self._raw)
        except NameAmbiguous:
            self.table.detach()
            raise
        if slot is None:
            self.table.detach()
            raise NameNotFound(self.name, self.table.key)
        self.slot = slot
        self._u32, self._index = self.table.pid_word(slot)
        self._known = self._u32[self._index]
        self._bind(self.table.pid_address(slot))

    def _follow(self, pid):
        """The word changed: make sure the slot still carries our name."""
        if self._carries_name(self.slot):
            self._known = pid
            return pid
        slot = _find_slot(self.table, self._raw)     # the slot was given to another name
        if slot is None:
            return 0
        self.slot, (self._u32, self._index) = slot, self.table.pid_word(slot)
        self._bind(self.table.pid_address(slot))
        self._known = self._u32[self._index]
        return self._known

    def _carries_name(self, slot):
        return self.table.name_bytes(slot) == self._raw

    def wait_exit(self, timeout=None):
        """Block until the process the name holds now is gone; False if ``timeout`` s pass first.

        "Gone", as in procwatch.h's procwatch_peer_wait(): the PID seen when
        the call began leaves the slot, i.e. the word turns 0, holds another
        PID, or the slot no longer carries the name.  A successor registering
        the same name meanwhile does not extend the wait.  True at once when
        the name has no live process.  Sleeps in FUTEX_WAIT on the word; no
        polling.
        """
        deadline = None if timeout is None else _time.monotonic() + timeout
        # The PID word, not the death word: the wait ends when the service has zeroed the
        # word (and is about to record the end), so a supervisor that re-registers the
        # name at once never takes the slot before the old end is reported.
        first = self._u32[self._index]
        if first != self._known and first != 0:
            first = self._follow(first)  # follows the name to its current slot
        if first == 0:
            return True
        slot, index = self.slot, self._index
        address = self.table.pid_address(slot)
        while True:
            pid = self._u32[index]
            if pid != first or not self._carries_name(slot):
                return True
            left = None if deadline is None else deadline - _time.monotonic()
            if left is not None and left <= 0:
                return False
            _futex.wait(address, pid, left)

    def slot_info(self):
        """A snapshot of the slot (state, exit status, ...)."""
        return self.table.read_slot(self.slot)

    def close(self):
        self._bind(0)                   # the C reads stop before the mapping goes
        self.table.detach()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<procwatch.Peer name={self.name!r} pid={self.pid} slot={self.slot}>"


def monitor_alive(key=None):
    """Whether a live procwatch service is watching the table at ``key``.

    True when the header names a service PID whose start time matches and
    that is not stopped.  A client works the same either way, so a table it
    may not read or cannot trust is False too (logged), never an exception.
    """
    try:
        table = _Table.attach(key, readonly=True)
    except SegmentMissing:
        return False
    except _UNUSABLE as e:
        log.error("procwatch: %s; cannot tell whether a service watches it", e)
        return False
    try:
        pid, start = table.service()
        if not pid or not _procfs.valid_pid(pid):
            return False
        if _procfs.start_time(pid) != start:
            return False
        return _procfs.stat_state(pid) not in (None, "T", "t", "Z", "X")
    finally:
        table.detach()
