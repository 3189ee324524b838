"""The service's death-word waiters (the client side and the kernel facts: deathword.py).

futex_waitv(2) waits on at most 128 words, and one of them is always the
header's generation word (clients bump it when they arm, so a new arming is
waited on at once), so each waiter thread takes PER_WAITER = 127 armed slots;
more slots, more threads.  A fired word is confirmed (deathword.confirm)
while the waiter keeps waiting on the others of its shard, polling the
unconfirmed ones every CONFIRM_POLL; one still unconfirmed after
CONFIRM_WINDOW is read as an execve(2) (the process lives on; its slot is
connector-only from then on: abi.Arm.LOST).
"""

import os as _os
import select as _select
import threading as _threading
import time as _time

from . import abi as _abi
from .deathword import (CONFIRM_POLL, CONFIRM_WINDOW, DEFAULT_PRIORITY, DEFAULT_YIELD_MS, PER_WAITER, availability,
                        cas32, confirm, end_teardown_yields, teardown_yield,
                        realtime_priority, waitv)
from .detector import DetectorThread


class DeathWatch:
    """The service's death-word waiters: one thread per PER_WAITER armed slots.

    ``ensure()`` (from the registrations thread, after every generation
    change) starts the waiters the armed slots need; a waiter whose shard
    became empty ends by itself.  ``done(waiter)`` is the service's: it is
    called when a waiter ended, and the service calls :meth:`respawn`.
    """

    def __init__(self, reporter, done, priority=DEFAULT_PRIORITY, yield_ms=DEFAULT_YIELD_MS):
        self.reporter = reporter
        self.table = reporter.table
        self.done = done
        self.state, self.reason = availability()
        self.priority, self.priority_text = (realtime_priority(priority) if self.enabled
                                             else (0, None))
        self.yield_ms, self.yield_text = (teardown_yield(yield_ms) if self.enabled else (0, None))
        self.waiters = {}              # shard -> DeathWaiter
        self.stopping = False
        self._lock = _threading.Lock()
        self._serial = 0
        self.completer = _Completer(reporter)
        self._stat_files = {}          # shard -> its waiters' held /proc stat files
        self.fired = 0                 # words seen fired
        self.execs = 0                 # fired words that were not deaths (exec)

    @property
    def enabled(self):
        return self.state == _abi.DeathWatch.WATCHING

    def shard(self, k):
        """The armed (slot, pid) of shard ``k``, or None when no waiter is needed for it."""
        armed = self.table.armed_slots()
        mine = armed[k * PER_WAITER:(k + 1) * PER_WAITER]
        if k > 0 and not mine:
            return None
        return mine

    def ensure(self):
        if not self.enabled or self.stopping:
            return
        need = max(1, -(-len(self.table.armed_slots()) // PER_WAITER))
        with self._lock:
            for k in range(need):
                w = self.waiters.get(k)
                if w is None or not w.is_alive() and w.finished:
                    self._start(k)

    def _start(self, k):
        self._serial += 1
        w = DeathWaiter(self, k, self._ended, self._serial)
        self.waiters[k] = w
        w.start()

    def _ended(self, waiter):
        waiter.finished = True
        self.done(waiter)

    def respawn(self, waiter):
        """The service's half of the respawn: start the next waiter for the same shard."""
        with self._lock:
            if self.stopping or self.waiters.get(waiter.shard) is not waiter:
                return
            if waiter.error is None and waiter.ended_pid is None:
                del self.waiters[waiter.shard]          # its shard emptied: not needed,
                files = self._stat_files.pop(waiter.shard, None)
                if files is not None:                   # nor the files its entries held
                    files.close()
                return
            self._start(waiter.shard)

    def stat_files(self, k):
        """Shard ``k``'s held /proc stat files (the C death step's), kept across its waiters;
        None once stopping (the step then reads by path)."""
        with self._lock:
            if self.stopping:
                return None
            files = self._stat_files.get(k)
            if files is None:
                files = self._stat_files[k] = self.table.death_stat_files()
            return files

    def stop(self):
        with self._lock:
            self.stopping = True
            files, self._stat_files = list(self._stat_files.values()), {}
        for w in list(self.waiters.values()):
            w.stop_requested = True
        # Moved, not only woken: every waiter sleeps on the generation too, and one between
        # its look at `stopping` and its sleep would miss a bare wake.
        self.table.nudge_generation()
        for w in list(self.waiters.values()):
            w.join(1.0)
        for f in files:
            f.close()               # never waits: a step still holding them closes them itself
        end_teardown_yields()
        self.completer.stop()


class _Completer:
    """Completes the ends the death word zeroed, once each pidfd is readable (after the teardown).

    The exit status comes from the pidfd (PIDFD_INFO_EXIT once reaped, Linux
    >= 6.15) or from /proc while the process is a zombie (pidfd_backend.exit_status);
    the exit event that comes after finds the word zeroed and reports nothing.
    One thread, started on first use, sleeps in epoll on the duplicated
    pidfds, each closed once its end is logged.
    """

    def __init__(self, reporter):
        self.reporter = reporter
        self.epoll = None
        self.pending = {}              # fd -> Watched
        self.stopping = False
        self._lock = _threading.Lock()
        self._thread = None
        self._wake = -1

    def put(self, w, fd):
        with self._lock:
            if self.epoll is None:
                self.epoll = _select.epoll()
                self._wake = _os.eventfd(0, _os.EFD_CLOEXEC | _os.EFD_NONBLOCK)
                self.epoll.register(self._wake, _select.EPOLLIN)
            self.pending[fd] = w
            self.epoll.register(fd, _select.EPOLLIN)
            if self._thread is None:
                self._thread = _threading.Thread(target=self._run, name="procwatch-death-completer",
                                                 daemon=True)
                self._thread.start()

    def _run(self):
        from .pidfd_backend import exit_status
        while not self.stopping:
            for fd, _mask in self.epoll.poll():         # no timer: stop() writes the eventfd
                if fd == self._wake:
                    return
                seen_ns = _time.monotonic_ns()
                with self._lock:
                    w = self.pending.pop(fd, None)
                    self.epoll.unregister(fd)
                try:
                    if w is not None:
                        self.reporter.finish_death(w, lambda w=w, fd=fd: exit_status(w, fd, None), seen_ns)
                finally:
                    _os.close(fd)

    def stop(self):
        self.stopping = True
        if self._thread is not None:
            _os.eventfd_write(self._wake, 1)
            self._thread.join(1.0)
        with self._lock:
            for fd in self.pending:
                _os.close(fd)
            self.pending.clear()
            if self.epoll is not None:
                self.epoll.close()
                _os.close(self._wake)


class DeathWaiter(DetectorThread):
    """One waiter: futex_waitv on the generation word and the death words of one shard.

    Ends after it reported a death (``ended_pid`` set), when its shard
    empties, or on an error; the service then starts the next one.
    """

    def __init__(self, watch, shard, done, serial):
        super().__init__(f"procwatch-deathword-{shard}.{serial}", watch.reporter, done)
        self.watch = watch
        self.shard = shard
        self.finished = False
        self.suspects = {}             # (slot, pid) -> monotonic_ns the word was seen fired
        self.left = set()              # (slot, pid) dead but reaped already: its exit event ends it

    def _loop(self):
        if self.watch.table.native_death_step:
            return self._loop_native()
        watch, table = self.watch, self.watch.table
        gen_address = table.generation_address
        for generation, mine in self._turns():
            addresses, values, keys = [gen_address], [generation], [None]
            for slot, pid in mine:
                if (slot, pid) in self.suspects or (slot, pid) in self.left:
                    continue
                value = self._set_waiters(table, slot)
                if value is None:                       # fired: confirm it
                    self.suspects[(slot, pid)] = _time.monotonic_ns()
                    watch.fired += 1
                    continue
                addresses.append(table.death_mutex_address(slot))
                values.append(value)
                keys.append((slot, pid))
            if self._settle(mine):
                return
            # Idle, it sleeps until a word or the generation moves (no timer: issue 16's idle
            # budget); stop() wakes it through the generation word.
            rc = waitv(addresses, values, CONFIRM_POLL if self.suspects else None)
            if rc > 0:                                   # a death word: its value moved
                slot, pid = keys[rc]
                if table.death_fired(slot) and (slot, pid) not in self.suspects:
                    self.suspects[(slot, pid)] = _time.monotonic_ns()
                    watch.fired += 1
                    if self._check_suspects():
                        return

    def _loop_native(self):
        """The same loop with the wait, the plain confirm, the zeroing and the wake in C.

        table.death_step() holds no GIL from the futex_waitv(2) to the peers'
        wake (and waits at the real-time priority DeathWatch got, if any); what
        it cannot decide comes back as "fired" and takes the Python path
        (_check_suspects), whose rules are the full ones.
        """
        watch, table, reporter = self.watch, self.watch.table, self.reporter
        for generation, mine in self._turns():
            if self._settle(mine):
                return
            entries, watched = [], {}
            for slot, pid in mine:
                if (slot, pid) in self.suspects or (slot, pid) in self.left:
                    continue
                w = _watched(reporter, slot, pid)
                if w is not None:
                    entries.append((slot, pid, w.start_time))
                    watched[(slot, pid)] = w
            r = table.death_step(generation, entries, CONFIRM_POLL if self.suspects else None,
                                 watch.priority, watch.yield_ms * 1000, watch.stat_files(self.shard))
            if r[0] == "dead":
                _kind, slot, pid, fired_ns, zeroed_ns, fd = r
                watch.fired += 1
                w = watched[(slot, pid)]
                w.death = (fired_ns, zeroed_ns)
                watch.completer.put(w, fd)     # the status, once the teardown is over
                self.ended_pid = pid
                return
            if r[0] == "fired":
                _kind, slot, pid, fired_ns = r
                self.suspects[(slot, pid)] = fired_ns
                watch.fired += 1
                if self._check_suspects():
                    return

    def _turns(self):
        """(generation, the shard's armed slots) for each turn, until stopped or the shard is empty."""
        watch, monotonic = self.watch, _time.monotonic
        while not self.stop_requested and not watch.stopping:
            self.alive_at = monotonic()
            generation = watch.table.generation
            mine = watch.shard(self.shard)
            if mine is None:
                return
            yield generation, mine

    def _settle(self, mine):
        """Forget suspects and reaped ones that left the shard ``mine``, then check the suspects.

        True after a death was reported (the waiter ends).
        """
        live = set(mine)
        for key in [k for k in self.suspects if k not in live]:
            del self.suspects[key]
        self.left &= live
        return bool(self.suspects) and self._check_suspects()

    @staticmethod
    def _set_waiters(table, slot):
        """Set FUTEX_WAITERS in slot's death word (CAS); its value, or None if it fired."""
        address = table.death_mutex_address(slot)
        value = table.death_word(slot)
        while True:
            if value & _abi.FUTEX_OWNER_DIED:
                return None
            if value & _abi.FUTEX_WAITERS or not value & _abi.FUTEX_TID_MASK:
                return value            # already set; or unlocked (an unregister in progress)
            found = cas32(address, value, value | _abi.FUTEX_WAITERS)
            if found == value:
                return value | _abi.FUTEX_WAITERS
            value = found

    def _check_suspects(self):
        """Confirm or drop each fired word; True after reporting a death (the waiter ends)."""
        table, reporter = self.watch.table, self.reporter
        now = _time.monotonic_ns()
        for (slot, pid), fired_ns in list(self.suspects.items()):
            w = _watched(reporter, slot, pid)
            if w is None:
                del self.suspects[(slot, pid)]
                continue
            verdict = confirm(table, w)
            if verdict == "dead":
                del self.suspects[(slot, pid)]
                fd = reporter.report_death(w, fired_ns)
                if fd is not None:
                    self.watch.completer.put(w, fd)     # the status, once the teardown is over
                    self.ended_pid = pid
                    return True
                self.left.add((slot, pid))              # not ours to end: never confirm it again
            elif verdict == "alive":
                del self.suspects[(slot, pid)]
            elif now - fired_ns > CONFIRM_WINDOW * 1e9:
                del self.suspects[(slot, pid)]
                if table.lose_arm_if_fired(slot):
                    self.watch.execs += 1
                    reporter.death_word_lost(w)
        return False


def _watched(reporter, slot, pid):
    """The Watched entry of (slot, pid), syncing the watch list once if it is not there yet."""
    for attempt in (0, 1):
        for w in reporter.watch.by_pid.get(pid, ()):
            if w.slot == slot:
                return w
        if attempt == 0:
            reporter.watch.sync(force=True)
    return None
