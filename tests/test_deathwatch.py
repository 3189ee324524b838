"""The service's death-word waiters when the kernel has no futex_waitv(2) (Linux < 5.16).

This kernel has it, so the service is started under tests/progs/no_futex_waitv.c:
a seccomp filter that makes the real system call fail with ENOSYS, which is
what a kernel older than 5.16 answers.  deathword.availability() then really
meets ENOSYS on its probe; nothing in procwatch is mocked or told.  Clients
still arm (they cannot know), so the slots are armed but connector-only, and
their deaths must come through the exit event, with the right status.
"""

import errno
import json
import os
import select
import signal
import subprocess
import time

import pytest

from conftest import PROGS, PY, ROOT, end_process, require_root, sched_policy, wait_ended, wait_until
from procwatch import abi
from procwatch.segment import Table

pytestmark = [require_root()]

MIB = 64        # enough for the exit event to come well after a death word; nobody waits on it here


def _armed(key, name, then, started):
    p = subprocess.Popen([PY, str(PROGS / "armed.py"), "--key", hex(key), "--name", name, "--mib", str(MIB),
                          "--then", then], stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    started.append(p)
    assert select.select([p.stdout], [], [], 30)[0], f"{name} never registered"
    line = p.stdout.readline().decode().split()
    assert line[0] == "READY", line
    return p, int(line[1])


def _status(key, *args):
    return subprocess.run([PY, "-m", "procwatch", "status", "--key", hex(key), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)


def test_without_futex_waitv_armed_slots_are_connector_only(key, service, compiled):
    wrap = compiled("no_futex_waitv")
    # The filter is real: the raw system call fails ENOSYS under it (and not here).
    probe = ("import ctypes; libc = ctypes.CDLL(None, use_errno=True); "
             "print(libc.syscall(449, 0, 0, 0, 0, 0), ctypes.get_errno())")
    out = subprocess.run([str(wrap), PY, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["-1", str(errno.ENOSYS)]

    svc = service(wrap=[str(wrap)])
    assert svc.backend() == "connector"
    # One line says it, once, and why.
    log = svc.log()
    said = [ln for ln in log.splitlines() if "death words unavailable" in ln and "event=started" not in ln]
    assert len(said) == 1 and "futex_waitv(2) failed (ENOSYS" in said[0] and "connector-only" in said[0], said
    assert svc.events("started")[-1]["death_words"] == "no_waitv"

    started = []
    try:
        killed, killed_slot = _armed(key, "nw-kill", "sleep", started)
        coded, coded_slot = _armed(key, "nw-exit", "exit", started)
        t = Table.attach(key)
        try:
            assert t.hget32(abi.H_DEATH_WATCH) == abi.DeathWatch.NO_WAITV
            # The clients armed (they cannot know) ...
            assert t.death_arm(killed_slot) == t.death_arm(coded_slot) == abi.Arm.ARMED
            snap = json.loads(_status(key, "--json").stdout)
            assert snap["service"]["death_words"] == "no_waitv"
            assert {r["name"]: r["death_word"] for r in snap["slots"]} == {"nw-kill": "armed", "nw-exit": "armed"}
            text = _status(key).stdout
            assert "death words NOT watched" in text and "every slot connector-only" in text, text
            assert text.count("connector-only (armed, not watched)") == 2, text
            # ... but nobody waits on their words: FUTEX_WAITERS is never set (the service would set it
            # within a generation change; the status calls above took longer than that).
            assert not t.death_word(killed_slot) & abi.FUTEX_WAITERS
            assert not t.death_word(coded_slot) & abi.FUTEX_WAITERS
        finally:
            t.detach()

        killed.kill()
        coded.stdin.write(b"go\n")
        coded.stdin.flush()
        for name, match in (("nw-kill", {"signal": "SIGKILL"}), ("nw-exit", {"exit_code": 3})):
            e = svc.wait_event("exit", timeout=30, name=name, **match)
            assert e["detected_by"] == "exit_event", e["message"]
            assert "after the exit event" in e["message"] and "death word: zeroed" not in e["message"], e["message"]
            assert "cannot wait on it" in e["message"] and "death word armed)" not in e["message"], e["message"]
            assert len([x for x in svc.events("exit") if x.get("name") == name]) == 1      # reported once
        s = wait_ended(key, killed_slot)
        assert (s.state, s.cause, s.exit_status, s.detected_by) == \
            (abi.State.EXITED, abi.Cause.EXITED, signal.SIGKILL, abi.Detection.EXIT_EVENT)
        assert s.teardown_us == abi.LATENCY_UNKNOWN
        s = wait_ended(key, coded_slot)
        assert (s.state, s.exit_status, s.detected_by) == (abi.State.EXITED, 3 << 8, abi.Detection.EXIT_EVENT)
        assert killed.wait(10) == -signal.SIGKILL and coded.wait(10) == 3
    finally:
        for p in started:
            end_process(p)

    # Nothing crashed: the service runs, no traceback, no waiter was ever started or respawned for words.
    assert svc.proc.poll() is None
    log = svc.log()
    assert "Traceback" not in log and "death-word waiter" not in log, log[-3000:]
    assert svc.stop() == 0


def _fifo_threads(pid):
    """TIDs of ``pid``'s threads running SCHED_FIFO now, with their priorities."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            if os.sched_getscheduler(int(tid)) == os.SCHED_FIFO:
                out[int(tid)] = os.sched_getparam(int(tid)).sched_priority
        except ProcessLookupError:
            pass
    return out


@pytest.mark.parametrize("priority", [None, "0", "3"])
def test_waiters_wait_at_the_real_time_priority_asked_for(key, service, priority):
    """Default SCHED_FIFO 1 for the sleeping waiter only; 0 keeps every thread normal."""
    pytest.importorskip("procwatch._hotstep")
    from procwatch import native
    if native.hot.realtime_probe(3) != 0:
        pytest.skip("SCHED_FIFO refused here")
    svc = service(*(("--death-word-priority", priority) if priority else ()))
    started = svc.wait_event("started")
    want = 1 if priority is None else int(priority)
    assert started["death_word_priority"] == str(want), started["message"]
    if want:
        assert f"SCHED_FIFO priority {want}" in started["message"]
        wait_until(lambda: list(_fifo_threads(svc.proc.pid).values()) == [want], 10,
                   "one waiter asleep at SCHED_FIFO", detail=lambda: _fifo_threads(svc.proc.pid))
    else:
        assert "normal priority (death_word_priority = 0)" in started["message"]
        time.sleep(0.3)
        assert _fifo_threads(svc.proc.pid) == {}


@pytest.mark.parametrize("ms", ["0", "1000"])
def test_a_dying_teardown_yields_for_the_time_asked_then_gets_its_policy_back(key, service, ms):
    """From the wake the dying process runs at SCHED_IDLE for --teardown-yield-ms, then at its own.

    Seen on the killed process itself, kept a zombie (waitid WNOWAIT) so that
    its policy stays readable; the give-back is the respawned waiter's."""
    pytest.importorskip("procwatch._hotstep")
    svc = service("--teardown-yield-ms", ms)
    started = svc.wait_event("started")
    assert started["teardown_yield_ms"] == ms, started["message"]
    procs = []
    p, slot = _armed(key, f"ty-{ms}", "sleep", procs)
    t = Table.attach(key)
    try:
        wait_until(lambda: t.death_word(slot) & abi.FUTEX_WAITERS, 10, "the service to wait on its word")
        assert sched_policy(p.pid) == os.SCHED_OTHER
        p.kill()
        os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
        svc.wait_event("exit", name=f"ty-{ms}")
        if ms == "0":
            assert sched_policy(p.pid) == os.SCHED_OTHER
            assert "keep their scheduling policy (teardown_yield_ms = 0)" in started["message"]
            return
        assert "yields its CPU to woken peers for 1000 ms" in started["message"]
        assert sched_policy(p.pid) == os.SCHED_IDLE
        wait_until(lambda: sched_policy(p.pid) == os.SCHED_OTHER, 5, "the policy given back")
    finally:
        t.detach()
        end_process(p)
