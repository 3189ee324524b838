"""Hang detection: one checker thread for the whole table, and a kill that cannot hit the wrong process.

A process can stop working without exiting (a deadlock, a livelock, SIGSTOP).
A client that asks for hang detection sets its slot's interval
(``heartbeat_ms``) and bumps its slot's 64-bit sequence (``beat()``) as it
makes progress.  This thread checks every such slot once per its own
interval: the sequence unchanged since the previous check is one miss;
changed, the misses go back to 0 and ``last_beat_ns`` is set.  At
``max_misses`` misses in a row the slot becomes HUNG (its PID word is left
alone: the process still exists), one line says so with the time since the
last beat the checker saw, and the slot's action follows:

* ``log``: nothing more.  A beat later brings the slot back to ALIVE.
* ``kill`` (the default): the hang signal (SIGKILL by default; SIGABRT for a
  core dump) is sent through a pidfd, and the slot's cause field is set to
  KILLED_HUNG first, so that the exit the detector reports next reads
  "killed: hung".  Signals other than SIGKILL stay pending on a stopped
  process, so a stopped target also gets SIGCONT.

Before it acts, the checker asks the kernel why (verdict.py, issue 15): it
takes a sample of the process when the slot first misses and judges it at
the threshold, so the hang line says *stopped*, *starved*, *stuck*, *busy*
or *blocked*.  A *starved* process (runnable, but given no CPU) is not
killed unless ``[hang] starved = "kill"``: the slot is HUNG, and the checker
judges it again every ``max_misses`` further misses; a beat recovers it,
and a new verdict (busy, blocked, ...) gets the action after all.

The hazard is killing the wrong process: the slot table is writable by every
member of the table's group, and PIDs are reused.  So the service refuses,
with one line and the slot left HUNG, to signal:

* PID 1, or the service itself;
* a process whose start time is not the slot's (the PID was reused);
* a process that does not have this very segment attached (/proc/PID/maps
  shows SysV mappings as ``/SYSV<key in hex> (deleted)`` with the shmid in
  the inode column; checked on Linux 6.18): a hang is a missing beat, and
  only a process with the table attached can beat, so anything else was
  never a client.  A maps file the service may not read (an LSM, a service
  without CAP_SYS_PTRACE over the target) is a refusal too;
* a process whose real uid is not the slot's ``owner_uid``, unless that
  owner is root (a root supervisor registering a child that dropped its
  privileges).  The owner may thus kill only what it could kill itself.
  ``owner_uid`` is written by the registering client, so this stops honest
  mistakes, not a hostile group member, who can write any uid: membership of
  the table's group is the trust boundary, and the worst such a member can
  do is have processes that attached the table killed.

The pidfd is opened first and the checks come after, so the process checked
is the process signalled: a PID reused in between shows up as a start-time
mismatch, and pidfd_send_signal(2) never reaches a newcomer.

Cost: a pass reads the interval, PID and registration-time words of every
slot with strided memoryview copies (no per-slot ``read_slot()``) and
compares them with the previous pass's lists in C; only when they differ
(a registration came or went) does a Python loop look at every slot.  When
some slot is due, the sequence and state words are copied the same way and
only tracked slots are visited.  /proc and the cgroup files are read only
for a slot that misses: once at its first miss, once at the threshold
(verdict.py; measured at load 11 on 2 vCPUs: ~0.14 ms for a
single-threaded process, ~2.6 ms for 32 threads, mostly file reads, which
let go of the GIL).  Measured on 2 vCPUs, 1024 slots: ~20 µs for
a pass with nothing due, ~0.2-0.35 ms when all 1024 are due at once, so the
GIL the pass holds delays the detector thread by at most that.  The thread
sleeps until the next slot is due, but wakes at most every GRANULARITY
seconds (a slot may be checked that much late, never early) and at least
every DISCOVERY_PERIOD to see new registrations.

The service's configuration (issue 8) comes in through three optional
seams: ``policy(name)`` gives a :data:`HangPolicy` (action, signal,
max_misses, and the action for a starved verdict) for a registered name
(its first matching rule over ``[hang]``) when the slot does not set its
own; ``on_event(Event.HUNG, who, fields)`` runs the rule's ``on_hung``
hook (HookRunner.submit: it never blocks); ``stats`` counts hangs and kills
by verdict, and the duration of each pass that checked something.
"""

import collections as _collections
import logging as _logging
import os as _os
import signal as _signal
import threading as _threading
import time as _time

from . import abi as _abi
from . import procfs as _procfs
from . import verdict as _verdict
from .config import DEFAULT_MAX_MISSES
from .journal import Event, emit
from .signals import HANG_SIGNAL_HINT, signal_name
from .signals import ends_process as _ends_process

log = _logging.getLogger("procwatch")

GRANULARITY = 0.01       # s: passes never come closer than this
DISCOVERY_PERIOD = 0.1   # s: longest sleep, so a new registration is seen soon
IDLE_DISCOVERY = 5.0     # s: longest sleep while no slot asks for beats.  Clients bump the
                         # generation on registration and set_heartbeat(), which wakes the
                         # checker at once (in the service, through poke() from its registrations
                         # thread); this bound covers writers that do not (issue 16).

_ALIVE = int(_abi.State.ALIVE)
_HUNG = int(_abi.State.HUNG)
_STARVED = _abi.Verdict.STARVED
_JUDGE = object()       # in a pass's act list: sample the first miss, or judge a starved slot again
_GONE = ("gone", "")

# Who hung, for on_event: the fields the Reporter's on_end callback reads.
Hung = _collections.namedtuple("Hung", "name pid slot")
# The policy for one name: action, signal and max_misses, and what a starved verdict gets.
HangPolicy = _collections.namedtuple("HangPolicy", "action signal max_misses starved")


class _Track:
    """What the checker remembers of one slot between passes."""
    __slots__ = ("i", "pid", "reg", "ms", "interval", "seq", "due", "misses", "handled", "max_misses",
                 "sample", "verdict", "recheck")

    def __init__(self, i, pid, reg, ms, seq, now, misses, max_misses):
        self.i, self.pid, self.reg, self.ms, self.seq, self.misses = i, pid, reg, ms, seq, misses
        self.max_misses = max_misses
        self.interval = max(ms / 1000, GRANULARITY)
        self.due = now + self.interval
        self.handled = False            # this hang was declared (and acted on)
        self.sample = None              # verdict.Sample taken at the first miss
        self.verdict = None             # verdict.Judgement of the declared hang
        self.recheck = 0                # misses at which a starved verdict is judged again


class HeartbeatChecker(_threading.Thread):
    """The checker thread.  ``check()`` is one pass (also usable without the thread)."""

    def __init__(self, table, action=_abi.HangAction.KILL, signal=_signal.SIGKILL,
                 max_misses=DEFAULT_MAX_MISSES, procfs=_procfs.PROCFS, policy=None,
                 on_event=None, stats=None, starved=_abi.HangAction.LOG, relayed=False):
        super().__init__(name="procwatch-heartbeat", daemon=True)
        if action not in (_abi.HangAction.KILL, _abi.HangAction.LOG):
            raise ValueError(f"hang action {action!r} is not kill or log")
        if not _ends_process(signal):
            raise ValueError(f"hang signal {signal!r} does not end a process: {HANG_SIGNAL_HINT}")
        if not 1 <= max_misses <= 1000:
            raise ValueError(f"--max-misses {max_misses} is out of range 1..1000")
        self.table = table
        self.action = _abi.HangAction(action)
        self.signal = int(signal)
        self.max_misses = max_misses
        self.starved = _abi.HangAction(starved)     # what a starved verdict gets: LOG or KILL
        self.procfs = procfs
        self.policy = policy            # name -> HangPolicy
        self.on_event = on_event        # (Event.HUNG, Hung, fields): the on_hung hook
        self.stats = stats
        self._repolicy = False
        self.errors = 0
        self._tracks = {}               # slot index -> _Track, slots with an interval and a PID
        self._seen = (None, None, None)  # interval, PID and registration-time words of the last pass
        self._next_due = 0.0
        self._fingerprint = None        # of the columns _seen holds, while nothing is tracked
        self._stop_event = _threading.Event()
        self._self_pid = _os.getpid()
        # relayed: idle, it sleeps until poke() (the service's registrations thread, after each
        # sync), not on the generation word itself; see run().
        self.relayed = relayed
        self._poke = _threading.Event()

    # -- the thread ------------------------------------------------------------
    def run(self):
        from . import futex
        generation = self.table.generation_address
        while not self._stop_event.is_set():
            seen = self.table.generation        # before the pass: a change after it wakes us
            if self.relayed:
                self._poke.clear()              # likewise: a poke after this wakes us
            try:
                wait = self.check()
                if not self._tracks:
                    # Relayed (the service): every registration change wakes its registrations
                    # thread anyway, which pokes this one only when a slot asks for beats, so a
                    # registration without a heartbeat wakes one thread, not two (issue 16).
                    if self.relayed:
                        self._poke.wait(IDLE_DISCOVERY)
                    else:
                        futex.wait(generation, seen, IDLE_DISCOVERY)
                    continue
            except Exception:
                # A bug, not a kernel condition: say so loudly, keep hang detection going.
                self.errors += 1
                if self.errors == 1 or self.errors % 60 == 0:
                    log.exception("heartbeat checker pass failed (%d so far); checking again in 1 s",
                                  self.errors)
                wait = 1.0
            self._stop_event.wait(wait)

    def poke(self):
        """After a registration change or a rule's heartbeat (relayed): wake the idle checker if
        some registered slot asks for beats.  Set even while it tracks slots (it looks every
        DISCOVERY_PERIOD then): a pass under way may end with none tracked and go idle."""
        if self.table.any_heartbeat() is not False:
            self._poke.set()

    def stop(self, timeout=1.0):
        """Stop and join (before the table is detached: the pass reads its memory)."""
        self._stop_event.set()
        self._poke.set()
        from . import futex
        deadline = _time.monotonic() + timeout
        while self.is_alive() and _time.monotonic() < deadline:
            futex.wake(self.table.generation_address)     # it may sleep there
            self.join(0.05)

    def refresh_policy(self):
        """The policy changed (SIGHUP): re-read every tracked slot's max_misses next pass."""
        self._repolicy = True

    def _policy(self, name):
        if self.policy is None:
            return HangPolicy(self.action, self.signal, self.max_misses, self.starved)
        return self.policy(name)

    # -- one pass ----------------------------------------------------------------
    def check(self):
        """Check every slot that is due; returns the seconds until the next pass is needed."""
        started = _time.perf_counter()
        if self._repolicy:
            self._repolicy = False
            self._seen = (None, None, None)     # every slot re-tracked with the new policy
            self._fingerprint = None
        t = self.table
        if not self._tracks:
            # Nothing tracked: one C pass says whether any registered slot asks for beats,
            # another whether any interval, PID or registration time moved since the last
            # pass; only then are the columns copied and compared (issue 16).
            if t.any_heartbeat() is False:
                self._seen = (None, None, None)
                self._fingerprint = None
                return DISCOVERY_PERIOD
            fp = t.hang_fingerprint()
            if fp is not None and fp == self._fingerprint:
                return DISCOVERY_PERIOD
            self._fingerprint = fp
        else:
            self._fingerprint = None
        column = t.column
        seen = (column("heartbeat_ms"), column("pid"), column("registered_ns"))
        mono = _time.monotonic()
        if seen != self._seen:          # compared in C: a registration came, went or changed
            self._retrack(seen, mono)
        elif mono < self._next_due:
            return max(GRANULARITY, self._next_due - mono)
        seqs = column("heartbeat_seq")
        states = column("state")
        now_ns = _time.time_ns()
        beats, misses, act = [], [], []
        next_due = mono + DISCOVERY_PERIOD
        for tr in self._tracks.values():
            due = tr.due
            if due <= mono:
                due = tr.due = mono + tr.interval
                i = tr.i
                state = states[i]
                if state != _ALIVE and state != _HUNG:
                    pass
                elif seqs[i] != tr.seq:                     # progress: the common case
                    tr.seq = seqs[i]
                    beats.append(tr)
                    if tr.misses or tr.handled or state == _HUNG:
                        act.append((tr, state))
                else:                                       # a miss
                    tr.misses += 1
                    misses.append(tr)
                    if tr.misses >= tr.max_misses and not tr.handled:
                        act.append((tr, None))
                    elif (tr.misses == 1 and tr.max_misses > 1) or (tr.recheck and tr.misses >= tr.recheck):
                        act.append((tr, _JUDGE))            # a verdict's window starts or ends
            if due < next_due:
                next_due = due
        if beats or misses:
            # Stored only where the slot still holds the PID (else re-registered:
            # the next pass re-tracks it), then acted on, likewise.
            stale = self.table.note_checks(beats, misses, now_ns)
            for tr, state in act:
                if stale and tr in stale:
                    continue
                if state is _JUDGE:
                    self._judge_window(tr, now_ns)
                elif state is not None:
                    self._progress(tr, state)
                else:
                    # Declared only if the state could be set HUNG: a state word
                    # changed since ``states`` was read (a torn or hostile write)
                    # refuses it, and the next check tries again.
                    tr.handled = self._hung(tr, now_ns)
        self._next_due = next_due
        if self.stats is not None:
            self.stats.record_check(_time.perf_counter() - started)
        return max(GRANULARITY, next_due - _time.monotonic())

    def _retrack(self, seen, mono):
        """Start tracking new registrations, forget ended ones (a Python loop: rare)."""
        ms_words, pids, regs = seen
        old_ms, old_pids, old_regs = self._seen
        tracks = self._tracks
        seqs = None
        for i, (ms, pid, reg) in enumerate(zip(*seen)):
            if old_ms is not None and ms == old_ms[i] and pid == old_pids[i] and reg == old_regs[i]:
                continue
            tr = tracks.pop(i, None)
            if tr is not None and ms == 0 and pid == tr.pid and reg == tr.reg:
                self._turned_off(tr)
            if not ms or not pid:
                continue
            max_misses = self.max_misses if self.policy is None else \
                self.policy(self.table.read_slot(i).name).max_misses
            if tr is not None and pid == tr.pid and reg == tr.reg:
                misses = tr.misses                      # set_heartbeat(): same client, new interval
            else:
                misses = min(self.table.misses(i), max_misses)
            if seqs is None:
                seqs = self.table.column("heartbeat_seq")
            tracks[i] = new = _Track(i, pid, reg, ms, seqs[i], mono, misses, max_misses)
            if tr is not None and pid == tr.pid and reg == tr.reg:
                new.handled, new.sample = tr.handled, tr.sample
                new.verdict, new.recheck = tr.verdict, tr.recheck
        self._seen = seen

    def _progress(self, tr, state):
        """Progress after misses: misses back to 0, and out of HUNG."""
        if tr.misses:
            tr.misses = 0
            self.table.set_misses(tr.i, 0)
        if state == _HUNG:
            self._recovered(tr, "beats again")
        tr.handled = False
        tr.sample = tr.verdict = None
        tr.recheck = 0

    def _turned_off(self, tr):
        """set_heartbeat(0) while HUNG: nothing watches the hang any more."""
        t = self.table
        if t.state(tr.i) == _HUNG:
            t.set_misses(tr.i, 0)
            self._recovered(tr, "turned hang detection off")

    # -- state changes -------------------------------------------------------------
    def _recovered(self, tr, how):
        t, i = self.table, tr.i
        if not t.set_state_if(i, tr.pid, (_HUNG,), _ALIVE):
            return
        t.unmark_kill(i, tr.pid)          # it outlived the signal
        s = t.read_slot(i)
        was = s.verdict_name
        t.set_verdict(i, tr.pid, _abi.Verdict.NONE)
        emit(Event.RECOVERED, "%s (pid %d) %s; no longer hung%s", s.name, tr.pid, how,
             f" ({was} before)" if was else "",
             NAME=s.name, PID=tr.pid, SLOT=i, HEARTBEAT_MS=tr.ms, VERDICT=was)

    def _resolve(self, s):
        """(action, signal number) for slot ``s``: its own, else its rule's, else the service's."""
        try:
            action = _abi.HangAction(s.heartbeat_action)
        except ValueError:
            action = _abi.HangAction.DEFAULT
        sig = s.heartbeat_signal
        policy = self._policy(s.name)
        if action == _abi.HangAction.DEFAULT:
            action = policy.action
        if not _ends_process(sig):                   # 0 (default), or nothing a client could write
            sig = policy.signal
        return action, sig

    def _resolve_all(self, s):
        """:meth:`_resolve`, and what a starved verdict gets: only the configuration says that."""
        return (*self._resolve(s), self._policy(s.name).starved)

    def _judge_window(self, tr, now_ns):
        """A first miss opens the verdict's window (a sample); a starved slot's recheck closes one."""
        if tr.misses == 1:
            tr.sample = _verdict.sample(tr.pid, self.procfs)
        else:
            self._recheck(tr, now_ns)

    def _recheck(self, tr, now_ns):
        """A starved slot, max_misses further misses on: still starved, or something a kill cures?"""
        j = _verdict.judge(tr.pid, tr.sample, self.procfs)
        if j.verdict == _STARVED:
            tr.sample = _verdict.sample(tr.pid, self.procfs)
            tr.recheck = tr.misses + max(1, tr.max_misses - 1)
            log.debug("%s (pid %d) still starved after %d missed checks: %s",
                      self.table.read_slot(tr.i).name, tr.pid, tr.misses, j.text)
            return
        self._hung(tr, now_ns, j)

    def _hung(self, tr, now_ns, judgement=None):
        """Declare slot ``tr`` hung and act; False if its state refused it (not ALIVE or HUNG now)."""
        t, i = self.table, tr.i
        j = judgement or _verdict.judge(tr.pid, tr.sample, self.procfs)
        if not t.set_verdict(i, tr.pid, j.verdict) or not t.set_state_if(i, tr.pid, (_ALIVE, _HUNG), _HUNG):
            return False
        tr.verdict, tr.recheck = j, 0
        s = t.read_slot(i)
        action, sig, starved = self._resolve_all(s)
        deferred = action == _abi.HangAction.KILL and j.verdict == _STARVED and starved != _abi.HangAction.KILL
        if deferred:
            action = _abi.HangAction.LOG        # a kill gives it no CPU: log, and keep judging it
            tr.sample = _verdict.sample(tr.pid, self.procfs)
            tr.recheck = tr.misses + max(1, tr.max_misses - 1)
        # The kill is decided before the line is written, so that the line,
        # the hook and the metrics say what is really done (issue 13: a
        # refused kill was logged as "sending SIGKILL ... action=kill").
        fd = refused = None
        if action == _abi.HangAction.KILL:
            fd, refused = self._prepare_kill(s, tr.pid)
            if fd is None and refused is None:
                return True                              # gone meanwhile: the detector reports its exit
        since_ms = (now_ns - s.last_beat_ns) // 1_000_000 if 0 < s.last_beat_ns <= now_ns else None
        since = f"{since_ms / 1000:.1f} s" if since_ms is not None else "ever"
        if refused is not None:
            then, done = f"it will not be signalled: {refused[1]}; the slot stays hung", "refused"
        elif fd is not None:
            then, done = f"sending {signal_name(sig)}", "kill"
            if j.verdict == _abi.Verdict.STUCK:
                then += ", which may not take effect until it returns"
        elif deferred:
            then, done = 'not killed ([hang] starved = "log"); still watching it', "log"
        else:
            then, done = "action: log only", "log"
        try:
            emit(Event.HUNG, "%s (pid %d) is hung: no heartbeat seen for %s (%d checks of %g s missed); %s; %s",
                 s.name, tr.pid, since, tr.misses, tr.ms / 1000, j.text, then,
                 NAME=s.name, PID=tr.pid, SLOT=i, HEARTBEAT_MS=tr.ms, MISSES=tr.misses,
                 SINCE_BEAT_MS=since_ms, ACTION=done, REFUSED=refused[0] if refused else None,
                 level=_logging.ERROR if refused else None, **j.fields)
            if self.stats is not None:
                self.stats.record_hung(j.name)
            if self.on_event is not None:
                self.on_event(Event.HUNG, Hung(s.name, tr.pid, i),
                              {"ACTION": done, "SIGNAL": signal_name(sig) if fd is not None else None,
                               "VERDICT": j.name})
            if fd is not None:
                self._send(s, tr.pid, fd, sig, tr)
        finally:
            if fd is not None:
                _os.close(fd)
        return True

    def _prepare_kill(self, s, pid):
        """(pidfd, None) to signal ``pid`` through, (None, (code, reason)) if it must not be
        signalled, or (None, None) if it is gone."""
        if not _procfs.valid_pid(pid):               # a slot no client wrote; the detector clears it
            return None, ("invalid", f"{pid} is not a valid PID")
        if pid == 1:
            return None, ("init", "PID 1 is init")
        if pid == self._self_pid:
            return None, ("self", "it is this procwatch service")
        try:
            fd = _procfs.pidfd_open(pid)             # first: the process checked is the one signalled
        except OSError as e:                         # EMFILE, ENOSYS (kernel < 5.3), ...
            return None, ("pidfd", f"pidfd_open() failed ({e.strerror})")
        if fd is None:
            return None, None
        why = self._kill_refusal(s, pid)
        if _procfs.pidfd_exited(fd) or why is _GONE:
            _os.close(fd)
            return None, None                        # exited meanwhile: nothing to refuse
        if why is not None:
            _os.close(fd)
            return None, why
        return fd, None

    def _kill_refusal(self, s, pid):
        """(code, reason) why ``pid`` must not be signalled, _GONE, or None (go ahead).

        Called with a pidfd open on ``pid``: the start-time check ties that
        pidfd to the slot's process.
        """
        start = _procfs.start_time(pid, self.procfs)
        if start is None:
            return _GONE
        if start != s.start_time:
            return ("pid_reused", f"its start time {start} is not the slot's {s.start_time}: "
                                  f"PID {pid} now names another process")
        try:
            attached = _procfs.maps_has_sysv(pid, self.table.shmid, self.procfs)
        except PermissionError:
            return ("maps_unreadable", f"/proc/{pid}/maps is not readable, so it cannot be shown "
                                       f"to have the table attached")
        if not attached:
            return ("not_attached", f"it does not have the slot table (shmid {self.table.shmid}) "
                                    f"attached, so it is not the client that registered")
        if attached != "rw":
            # Issue 13: readers (procwatch wait, status, Peer) attach read-only;
            # a client that beats writes its slot, so it has it writable.
            return ("read_only", f"it has the slot table (shmid {self.table.shmid}) attached "
                                 f"read-only, as readers such as 'procwatch wait' do; a client "
                                 f"that beats has it writable")
        uid = _procfs.real_uid(pid, self.procfs)
        if uid is not None and s.owner_uid != 0 and uid != s.owner_uid:
            return ("uid", f"its real uid {uid} is not the slot owner's uid {s.owner_uid}")
        return None

    def _send(self, s, pid, fd, sig, tr):
        t, i = self.table, s.index
        if not t.mark_kill(i, pid):     # before the signal: the exit may come at once
            return                      # ended or recovered meanwhile
        try:
            _signal.pidfd_send_signal(fd, sig)
        except OSError as e:
            t.unmark_kill(i, pid)
            if isinstance(e, PermissionError):      # a service without CAP_KILL, another user's process
                self._refuse(s, pid, "eperm", f"pidfd_send_signal() was refused ({e.strerror})")
            elif not isinstance(e, ProcessLookupError):
                raise
            return
        # Only SIGKILL acts on a stopped process; any other signal waits for SIGCONT.
        if sig != _signal.SIGKILL and _procfs.stat_state(pid, self.procfs) == "T":
            try:
                _signal.pidfd_send_signal(fd, _signal.SIGCONT)
            except ProcessLookupError:
                pass
        verdict = tr.verdict.name if tr.verdict is not None else None
        if self.stats is not None:
            self.stats.record_killed(verdict)
        emit(Event.KILLED, "%s (pid %d) sent %s: hung (%s) for %d checks", s.name, pid, signal_name(sig),
             verdict, tr.misses, NAME=s.name, PID=pid, SLOT=i, SIGNAL=signal_name(sig), SIGNAL_NUMBER=sig,
             MISSES=tr.misses, VERDICT=verdict)

    def _refuse(self, s, pid, code, why):
        emit(Event.HUNG, "%s (pid %d) is hung but will not be signalled: %s; the slot stays hung",
             s.name, pid, why, NAME=s.name, PID=pid, SLOT=s.index, REFUSED=code, level=_logging.ERROR)
