"""kill -> an observer sees the exit: the harness and the baseline observers.

The harness (this process) starts a target, hands it to the observer,
takes t0 = CLOCK_MONOTONIC right before kill(SIGKILL), and the observer,
a separate process, takes t1 on the same clock when it knows.  The target
stays an unreaped zombie until the observer has reported (or the kill timed
out), so its PID cannot be reused under a storm while it is watched.

Observers speak one line protocol (see ``csrc/observer.c``)::

    harness -> observer   watch <pid>                 (watching observers only)
    observer -> harness   ok <pid> | exit <pid> <t1_ns> [<kernel_ts_ns>]

Baselines:
    cn          the bare proc-connector listener in C (csrc/cnlisten.c), with a
                forced receive buffer: the floor for any connector-based tool
    cn-default  the same with the kernel's default receive buffer
    cn-py       the same loop in Python (pycnlisten.py): the floor of a Python service
    pidfd       pidfd_open(2) + poll(2) on the target
    procpoll    /proc/PID/stat read every 100 ms
    relay       the minimal relay in C (csrc/cnrelay.c: listen, zero a shared
                word, FUTEX_WAKE) and a C peer asleep on the word
                (csrc/pwwait.c): the floor of procwatch's design, two
                wake-ups where a bare listener has one

procwatch's own observers (``pwsuite``: a C futex waiter and a Python
``Peer.wait_exit``) implement the same ``Observer`` interface and reuse
``measure()``; ``prepare()`` registers the target and ``collected()`` reads
its slot afterwards.
"""

import os as _os
import random as _random
import signal as _signal
import time as _time

from . import procs as _procs


class Observer:
    """One way of learning that a process died.  Subclasses fill in the I/O.

    ``inflight``: how many killed-but-unseen targets the harness allows; 1
    measures one kill at a time, more suits slow pollers.  ``gap_s``: mean
    random pause between kills when pipelined (pacing, not synchronisation).
    """
    key = "?"
    label = "?"
    inflight = 1
    gap_s = 0.0
    timeout_s = 2.0
    has_kernel_ts = False

    def start(self):
        raise NotImplementedError

    def prepare(self, pid):
        """Called with a fresh target before it is watched (procwatch: register it)."""

    def watch(self, pid):
        """Make sure the observer watches ``pid`` before the harness kills it."""

    def collected(self, pid, seen):
        """After the kill of ``pid``: ``seen`` True if reported, False if lost."""

    def next_event(self, timeout):
        """(pid, t1_ns, kernel_ts_ns or None), or None after ``timeout`` s."""
        raise NotImplementedError

    def stop(self):
        """End the observer; return its stats dict."""
        return {}


class _LineObserver(Observer):
    def __init__(self):
        self.proc = None
        self._queued = []

    def _parse(self, line):
        parts = line.split()
        if parts and parts[0] == "exit":
            return self._event(parts)
        return None

    def _event(self, parts):
        raise NotImplementedError

    def next_event(self, timeout):
        if self._queued:
            return self._queued.pop(0)
        end = _time.monotonic() + timeout
        while True:
            line = self.proc.readline(max(0.0, end - _time.monotonic()))
            if line is None:
                return None
            ev = self._parse(line)
            if ev is not None:
                return ev


class ConnectorObserver(_LineObserver):
    """csrc/cnlisten.c: reports exits of this process's children."""
    has_kernel_ts = True

    def __init__(self, exe, rcvbuf=0, key="cn", label=None, legacy=False):
        super().__init__()
        self.argv0 = [exe] if isinstance(exe, str) else list(exe)
        self.rcvbuf = rcvbuf
        self.legacy = legacy
        self.key = key
        self.label = label or ("bare connector listener (C" + (f", rcvbuf {rcvbuf >> 20} MiB)" if rcvbuf else ")"))
        self.info = {}

    def start(self):
        argv = [*self.argv0, "--parent", str(_os.getpid()), "--duration", "600"]
        if self.rcvbuf:
            argv += ["--rcvbuf", str(self.rcvbuf)]
        if self.legacy:
            argv.append("--legacy")
        self.proc = _procs.LineProc(argv, name="cnlisten", stdin=False)
        ready = self.proc.expect("ready", timeout=5.0)
        kv = _procs.parse_kv(ready)
        self.info = {"subscription": ready.split()[1], "rcvbuf": kv.get("rcvbuf"),
                     "cpu_us_at_ready": kv.get("cpu_us", 0)}

    def _event(self, parts):
        # exit <tgid> <pid> <t1_ns> <kernel_ts_ns> <exit_code>
        return int(parts[1]), int(parts[3]), int(parts[4])

    def stop(self):
        return {**self.info, **self.proc.stop(how="term")}


class WatchObserver(_LineObserver):
    """csrc/observer.c in mode ``pidfd`` or ``procpoll``."""

    def __init__(self, exe, mode, interval_ms=100):
        super().__init__()
        self.argv = [exe, mode] + ([str(interval_ms)] if mode == "procpoll" else [])
        self.key = mode
        if mode == "pidfd":
            self.label = "pidfd_open + poll (C)"
        else:
            self.label = f"/proc poller, {interval_ms} ms (C)"
            self.inflight = 64
            self.gap_s = interval_ms / 1000 / 20      # ~20 kills per poll period
            self.timeout_s = 2.0 + 2 * interval_ms / 1000

    def start(self):
        self.proc = _procs.LineProc(self.argv, name=f"observer-{self.key}")

    def _event(self, parts):
        return int(parts[1]), int(parts[2]), None

    def watch(self, pid):
        self.proc.send(f"watch {pid}")
        end = _time.monotonic() + 5.0
        while True:
            line = self.proc.readline(max(0.0, end - _time.monotonic()))
            if line is None:
                raise _procs.HelperDied(f"{self.proc.name} did not acknowledge watch {pid}")
            if line == f"ok {pid}":
                return
            if line == f"gone {pid}":
                raise _procs.HelperDied(f"{self.proc.name}: target {pid} gone before the kill")
            ev = self._parse(line)
            if ev is not None:
                self._queued.append(ev)

    def stop(self):
        return self.proc.stop(how="eof")


def blocked_in_futex(pid):
    """Whether the (single-threaded) process ``pid`` sleeps in futex(2) right now."""
    nr = {"x86_64": "202", "aarch64": "98"}.get(_os.uname().machine)
    try:
        with open(f"/proc/{pid}/syscall") as f:
            return f.read().split()[0] == nr
    except (OSError, IndexError):
        return False


def wait_asleep(pid, timeout=1.0):
    """Wait until ``pid`` sleeps in FUTEX_WAIT, as a waiting peer does; False on timeout."""
    end = _time.monotonic() + timeout
    while not blocked_in_futex(pid):
        if _time.monotonic() > end:
            return False
        _time.sleep(0.00005)
    return True


class RelayObserver(_LineObserver):
    """csrc/cnrelay.c zeroes a word of a private SysV segment; csrc/pwwait.c sleeps on it."""

    def __init__(self, relay_exe, waiter_exe, key, rcvbuf=0, python_waiter=False):
        super().__init__()
        self.relay_exe, self.waiter_exe, self.shm_key, self.rcvbuf = relay_exe, waiter_exe, key, rcvbuf
        self.key = "relay-py" if python_waiter else "relay"
        self.label = ("minimal relay (C: listen, zero the word, wake) + "
                      + ("Python futex waiter (pywait.py)" if python_waiter else "C futex waiter"))
        self.not_asleep = 0

    def start(self):
        import sysv_ipc
        self.shm = sysv_ipc.SharedMemory(self.shm_key, sysv_ipc.IPC_CREX, mode=0o600, size=4096,
                                         init_character=b"\0")
        self.word = memoryview(self.shm).cast("I")
        argv = [self.relay_exe, "--key", hex(self.shm_key)] + (["--rcvbuf", str(self.rcvbuf)] if self.rcvbuf else [])
        self.relay = _procs.LineProc(argv, name="cnrelay", stdin=False)
        kv = _procs.parse_kv(self.relay.expect("ready", timeout=5.0))
        self.info = {"cpu_us_at_ready": kv.get("cpu_us", 0)}
        waiter = self.waiter_exe if isinstance(self.waiter_exe, list) else [self.waiter_exe]
        self.proc = _procs.LineProc([*waiter, hex(self.shm_key)], name=f"waiter-{self.key}")
        self.proc.expect("ready", timeout=5.0)

    def prepare(self, pid):
        self.word[0] = pid

    def watch(self, pid):
        self.proc.send(f"watch {pid} 0")
        line = self.proc.readline(5.0)
        if line != f"ok {pid}":
            raise _procs.HelperDied(f"pwwait: '{line}' for watch {pid}")
        if not wait_asleep(self.proc.pid):
            self.not_asleep += 1

    def _event(self, parts):
        return int(parts[1]), int(parts[2]), None

    def stop(self):
        stats = self.relay.stop(how="term")
        self.proc.stop(how="eof")
        self.word.release()
        self.shm.detach()
        self.shm.remove()
        return {**self.info, **stats, "not_asleep": self.not_asleep}


def measure(observer, target_exe, kills, deadline, seed=7, delay=None):
    """Kill ``kills`` targets (fewer if ``deadline``, a monotonic time, passes)
    and return {'samples': [(pid, t0, t1, kernel_ts)], 'lost': [pid], 'attempted': n}.

    ``delay`` (lo, hi) in s: once the observer watches, wait a random time in
    that range before the kill, so that kills fall at random moments of the
    observer's life, not right after a registration settled.

    A kill is lost when the observer has not reported it ``observer.timeout_s``
    after t0.  Every target is reaped here, after its report or its timeout.
    """
    rng = _random.Random(seed)
    pending = {}            # pid -> t0, oldest first (dicts keep insertion order)
    samples, lost = [], []

    def settle(pid):
        _procs.reap(pid, timeout=2.0)

    def collect(block):
        timeout = 0.0
        if block and pending:
            oldest_t0 = next(iter(pending.values()))
            timeout = max(0.0, oldest_t0 / 1e9 + observer.timeout_s - _time.monotonic())
        ev = observer.next_event(timeout)
        while ev is not None:
            pid, t1, kts = ev
            t0 = pending.pop(pid, None)
            if t0 is not None:
                samples.append((pid, t0, t1, kts))
                observer.collected(pid, True)
                settle(pid)
            ev = observer.next_event(0.0)
        now = _time.monotonic_ns()
        for pid, t0 in list(pending.items()):
            if now - t0 > observer.timeout_s * 1e9:
                del pending[pid]
                lost.append(pid)
                observer.collected(pid, False)
                settle(pid)

    attempted = 0
    while attempted < kills and _time.monotonic() < deadline:
        pid = _procs.spawn_target(target_exe)
        observer.prepare(pid)
        observer.watch(pid)
        if delay:
            _time.sleep(rng.uniform(*delay))
        t0 = _time.monotonic_ns()
        _os.kill(pid, _signal.SIGKILL)
        pending[pid] = t0
        attempted += 1
        collect(block=False)
        while len(pending) >= observer.inflight:
            collect(block=True)
        if observer.gap_s:
            _time.sleep(rng.uniform(0, 2 * observer.gap_s))
    drain_end = _time.monotonic() + observer.timeout_s + 1.0
    while pending and _time.monotonic() < drain_end:
        collect(block=True)
    for pid in list(pending):
        lost.append(pid)
        observer.collected(pid, False)
        settle(pid)
    return {"samples": samples, "lost": lost, "attempted": attempted}
