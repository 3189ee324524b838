"""Exit storms: registered exits are never lost, even when the kernel drops events (root).

A storm is scripts/bench_lib/csrc/forker.c (the bench's generator): two
processes that vfork and reap children as fast as they can, bounded in time
and count.  Every exit of the storm is an event the service must read and
discard; registered targets (``sleep`` processes registered by PID) are
killed inside it with assorted signals.  The targets stay unreaped zombies
until their slot has been checked, so a storm that cycles through pid_max
cannot hand their PIDs to another process meanwhile.
"""

import os
import signal
import subprocess
import time

import pytest

import procwatch
from conftest import ROOT, proc_state, require_root, wait_until
from procwatch import abi
from procwatch.segment import Table

pytestmark = [require_root()]

FORKER_SRC = ROOT / "scripts" / "bench_lib" / "csrc" / "forker.c"
SIGNALS = (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
           signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM)
TARGETS = 21                # three of each signal


@pytest.fixture(scope="module")
def forker(tmp_path_factory):
    exe = tmp_path_factory.mktemp("storm") / "forker"
    subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(exe), str(FORKER_SRC)], check=True)
    return exe


class Storm:
    """The forker as a context manager; ``exits`` is its own count afterwards."""

    def __init__(self, exe, seconds, rate=0, workers=2, max_each=200000):
        self.argv = [str(exe), "-j", str(workers), "-d", str(seconds), "-n", str(max_each),
                     "-r", str(rate), "-v"]
        self.exits = None

    def __enter__(self):
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().startswith("started"), "the forker did not start"
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        for word in out.split():
            if word.startswith("exits="):
                self.exits = int(word[6:])
        return False


def _default_signals():
    for sig in SIGNALS:
        if sig != signal.SIGKILL:
            signal.signal(sig, signal.SIG_DFL)


class Targets:
    """``sleep`` children registered by PID, each to be killed with its own signal."""

    def __init__(self, key, n, prefix):
        self.procs, self.regs, self.sigs = [], [], []
        for i in range(n):
            # SIGINT back to its default: a shell ignores it in a background job (sh -c '... &'),
            # and the ignored disposition is inherited, so a SIGINT would not end the target.
            p = subprocess.Popen(["sleep", "120"], preexec_fn=_default_signals)
            self.procs.append(p)
            self.regs.append(procwatch.register_pid(f"{prefix}-{i}", pid=p.pid, key=key))
            self.sigs.append(SIGNALS[i % len(SIGNALS)])

    def kill(self, i):
        os.kill(self.procs[i].pid, self.sigs[i])

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
        for r in self.regs:
            r.unregister()


def _registered(svc, targets):
    names = {e.get("name") for e in svc.events("registered")}
    return all(r.name in names for r in targets.regs)


def _ended_slots(key, targets):
    """Slot snapshots of every target once all are ended, else None."""
    t = Table.attach(key)
    try:
        snaps = [t.read_slot(r.slot) for r in targets.regs]
    finally:
        t.detach()
    return snaps if all(s.pid == 0 and s.state != abi.State.ALIVE for s in snaps) else None


def _logged(svc, targets):
    """({name: exit event}, {name: found_dead event}) once every target has one
    (the line follows the slot's end: the word is zeroed first)."""
    def ends():
        exits = {e["name"]: e for e in svc.events("exit")}
        dead = {e["name"]: e for e in svc.events("found_dead")}
        return (exits, dead) if all(r.name in exits or r.name in dead for r in targets.regs) else None
    return wait_until(ends, 15, "every target's end in the service log", detail=lambda: svc.log()[-3000:])


def _signalled(s, sig):
    return (s.state == abi.State.EXITED and s.cause == abi.Cause.EXITED
            and os.WIFSIGNALED(s.exit_status) and os.WTERMSIG(s.exit_status) == sig)


def _kill_inside(storm, targets):
    """Kill one at a time, then the rest at once, while the storm runs."""
    half = len(targets.procs) // 2
    for i in range(half):
        targets.kill(i)
        time.sleep(0.02)            # pacing, not synchronisation: spread kills over the storm
    for i in range(half, len(targets.procs)):
        targets.kill(i)
    assert storm.proc.poll() is None, "the storm ended before the kills: the test proved nothing"


def connector_service(service, *args, **kw):
    """A service pinned to the connector: these tests are about its socket, and
    ``auto`` would fall back to pidfd, quietly, if the storm drowned the
    subscription's acknowledgement (the pidfd backend sees no storm at all)."""
    return service("--backend", "connector", *args, **kw)


def test_storm_of_unrelated_exits_loses_no_registered_exit(key, service, forker):
    svc = connector_service(service)
    assert svc.backend() == "connector"
    targets = Targets(key, TARGETS, "calm")
    try:
        wait_until(lambda: _registered(svc, targets), 15, "every target to be watched")
        with Storm(forker, seconds=10) as storm:
            time.sleep(0.3)         # let the storm reach its rate (pacing)
            _kill_inside(storm, targets)
            snaps = wait_until(lambda: _ended_slots(key, targets), 15, "every target's slot to end",
                               detail=lambda: svc.log()[-3000:])
        assert storm.exits > 1000, f"the storm made only {storm.exits} exits"
        for s, sig, reg in zip(snaps, targets.sigs, targets.regs):
            assert _signalled(s, sig), (reg.name, sig, s)
        exits, dead = _logged(svc, targets)
        assert not dead, dead
        for reg, sig in zip(targets.regs, targets.sigs):
            assert exits[reg.name]["signal"] == sig.name and exits[reg.name]["pid"] == str(reg.pid)
        assert svc.proc.poll() is None
    finally:
        targets.close()


def test_forced_overflow_still_reports_every_registered_exit(key, service, forker):
    """A 4 KiB receive buffer (the kernel makes it 8 KiB: ~15 exit events)
    cannot hold a fork storm: recv() fails with ENOBUFS.  The service must
    count and log the overflow, reconcile, and report every registered target,
    with its signal when the event got through, else as found dead through the
    overflow."""
    svc = connector_service(service, "--rcvbuf", "4096")
    assert svc.backend() == "connector"
    started = time.monotonic()
    targets = Targets(key, TARGETS, "flood")
    try:
        wait_until(lambda: _registered(svc, targets), 15, "every target to be watched")
        with Storm(forker, seconds=10) as storm:
            svc.wait_event("overflow", timeout=8)
            _kill_inside(storm, targets)
            snaps = wait_until(lambda: _ended_slots(key, targets), 15, "every target's slot to end",
                               detail=lambda: svc.log()[-3000:])
        assert svc.proc.poll() is None, "the service died in the overflow"
        exits, dead = _logged(svc, targets)
        for s, sig, reg in zip(snaps, targets.sigs, targets.regs):
            if s.state == abi.State.FOUND_DEAD:
                assert s.cause == abi.Cause.FOUND_DEAD_OVERFLOW, (reg.name, s)
                assert dead[reg.name]["cause"] == "found_dead_overflow"
            else:
                assert _signalled(s, sig), (reg.name, sig, s)
                assert exits[reg.name]["signal"] == sig.name
        assert len(exits) + len(dead) == TARGETS and not set(exits) & set(dead)
        # Half the targets die in one burst while the buffer holds ~15 events: some
        # exits are lost (about half, here), which is what reconcile must catch.
        assert dead, "no registered exit was lost in the overflow: the reconcile went untested"
        # Counted, and logged once per burst: a line needs 1 s without overflow
        # before it, so there are at most (seconds the service ran) + 1 of them.
        lines = svc.events("overflow")
        counts = [int(e["overflows"]) for e in lines]
        assert counts == sorted(counts) and counts[0] >= 1
        assert len(lines) <= time.monotonic() - started + 1, len(lines)
        # And the service still works once the storm is over (with 8 KiB, any
        # burst of exits elsewhere on the machine may overflow it again).
        after = Targets(key, 1, "after")
        try:
            wait_until(lambda: _registered(svc, after), 15, "the late target to be watched")
            after.kill(0)
            s = wait_until(lambda: _ended_slots(key, after), 15, "the late target's slot to end")[0]
            assert _signalled(s, signal.SIGKILL) or (
                s.state == abi.State.FOUND_DEAD and s.cause == abi.Cause.FOUND_DEAD_OVERFLOW), s
            assert svc.proc.poll() is None
        finally:
            after.close()
    finally:
        targets.close()


def test_zombie_registered_before_the_service_saw_it_is_found_dead_not_reused(key, service):
    """A target killed (and not yet reaped) before the service adopted its slot:
    its PID still names the same process, so the cause is found_dead, not
    pid_reused (a storm makes this race common: registration, kill, late sync)."""
    svc = service()
    svc.stop()
    p = subprocess.Popen(["sleep", "120"])
    try:
        reg = procwatch.register_pid("zombie", pid=p.pid, key=key)
        os.kill(p.pid, signal.SIGKILL)
        wait_until(lambda: proc_state(p.pid) == "Z",
                   10, "the target to be a zombie")
        svc2 = service()
        e = svc2.wait_event("found_dead", name="zombie")
        assert e["cause"] == "found_dead", e
        reg.unregister()
    finally:
        p.kill()
        p.wait(10)


def test_service_starts_inside_a_storm_with_a_tiny_buffer(key, service, forker):
    """The subscription's acknowledgement shares the socket with every exit on
    the machine: with a 4 KiB buffer a storm drowned it and the service gave up
    ("did not acknowledge").  A service restarted on a busy machine must start,
    on the connector: pinned, and checked, since a fallback to pidfd would
    also start."""
    with Storm(forker, seconds=10) as storm:
        for _ in range(3):           # a restart adopts the table
            svc = connector_service(service, "--rcvbuf", "4096", ready=False)
            svc.wait_ready()
            assert svc.backend() == "connector", svc.log()[-2000:]
            assert svc.proc.poll() is None
            svc.stop()
        assert storm.proc.poll() is None, "the storm ended before the service started: the test proved nothing"
