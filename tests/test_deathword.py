"""The death word (issue 14): real armed processes that really die, a real service.

The targets touch MIB of memory, so that their address-space teardown (about
50 ms per GiB here, more under load) puts the exit event well after the
death word: an end reported "from the death word" is then one the death word
zeroed, not one the exit event happened to win.  Memory stays <= 512 MiB
per target, one target at a time.
"""

import os
import select
import signal
import subprocess
import sys
import time

import pytest

import procwatch
from conftest import PROGS, PY, ROOT, end_process, read_slot, require_root, wait_ended, wait_until
from procwatch import abi, deathword
from procwatch.segment import Table

pytestmark = [require_root(),
              pytest.mark.skipif(deathword.availability()[0] != abi.DeathWatch.WATCHING,
                                 reason="no futex_waitv (Linux < 5.16) or no atomics here")]

MIB = 512


@pytest.fixture(params=["c", "python"])
def step(request):
    """service() keywords for each death step: C (procwatch._hotstep) and the Python fallback."""
    if request.param == "c":
        pytest.importorskip("procwatch._hotstep")
        return {}
    return {"env": dict(os.environ, PROCWATCH_NO_NATIVE="1")}


@pytest.fixture
def armed(key):
    """Factory: start tests/progs/armed.py; returns (Popen, slot, pid, sentinel tid)."""
    started = []

    def spawn(name, then="sleep", mib=MIB):
        p = subprocess.Popen([PY, str(PROGS / "armed.py"), "--key", hex(key), "--name", name,
                              "--mib", str(mib), "--then", then],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
        started.append(p)
        line = _line(p)
        assert line.startswith("READY"), line
        _, slot, pid, tid = line.split()
        return p, int(slot), int(pid), int(tid)
    yield spawn
    for p in started:
        end_process(p)


def _line(p, timeout=30.0):
    r, _, _ = select.select([p.stdout], [], [], timeout)
    assert r, "no output from the target"
    return p.stdout.readline().decode().strip()


def _tell(p):
    p.stdin.write(b"go\n")
    p.stdin.flush()


def _death_word(key, slot):
    t = Table.attach(key)
    try:
        return t.death_arm(slot), t.death_word(slot)
    finally:
        t.detach()


def _watched(svc, key, slot):
    """Wait until the service has set FUTEX_WAITERS in the slot's death word (it waits on it)."""
    wait_until(lambda: _death_word(key, slot)[1] & abi.FUTEX_WAITERS, 10,
               "the service to wait on the death word", detail=lambda: svc.log()[-2000:])


def _exit_event(svc, name, **match):
    e = svc.wait_event("exit", timeout=30, name=name, **match)
    assert len([x for x in svc.events("exit") if x.get("name") == name]) == 1    # reported once
    return e


@pytest.mark.parametrize("how,match,status", [
    ("kill", {"signal": "SIGKILL"}, signal.SIGKILL),
    ("exit", {"exit_code": 3}, 3 << 8),
    ("segv", {"signal": "SIGSEGV"}, signal.SIGSEGV),
])
def test_an_armed_death_is_reported_from_the_death_word(key, service, step, armed, how, match, status):
    svc = service(**step)
    p, slot, pid, tid = armed(f"dw-{how}", then="sleep" if how == "kill" else how)
    arm, word = _death_word(key, slot)
    assert arm == abi.Arm.ARMED and word & abi.FUTEX_TID_MASK == tid
    _watched(svc, key, slot)
    if how == "kill":
        p.kill()
    else:
        _tell(p)
    e = _exit_event(svc, f"dw-{how}", **match)
    assert e["detected_by"] == "death_word", e["message"]
    assert int(e["teardown_us"]) > int(e["latency_us"]) and "death word: zeroed" in e["message"]
    s = wait_ended(key, slot)
    assert (s.state, s.cause, s.exit_status) == (abi.State.EXITED, abi.Cause.EXITED, status)
    assert s.detected_by == abi.Detection.DEATH_WORD and s.teardown_us == int(e["teardown_us"])
    assert p.wait(10) == (-status if how != "exit" else 3)


def test_a_peer_reads_the_death_word_before_anyone_zeroes_it(key, armed):
    """No service at all: only the kernel's mark tells the peer."""
    import procwatch
    table, _ = Table.create_or_adopt(key, 8)
    try:
        p, slot, pid, _tid = armed("dw-peer", mib=0)
        peer = procwatch.Peer("dw-peer", key=key)
        assert peer.alive and peer.pid == pid
        p.kill()
        p.wait(10)
        assert table.u32[table.pid_index(slot)] == pid          # nobody zeroed the PID word
        assert not peer.alive and peer.pid == 0
        # wait_exit() waits for the service's zeroing (so that a supervisor re-registering at
        # once never takes the slot before the end is recorded): with no service, it times out.
        assert not peer.wait_exit(0)
        peer.close()
    finally:
        table.detach()


def test_the_c_peer_reads_the_death_word(key, compiled, tmp_path):
    """procwatch_peer_pid() (procwatch_peer_current) reads the death word too; no service."""
    from procwatch import cheader
    exe = compiled("cclient", "-std=c99", "-I", cheader.include_dir())
    pwtest = tmp_path / "pwtest"
    subprocess.run(["gcc", "-O2", "-I", cheader.include_dir(), str(ROOT / "tests" / "c" / "pwtest.c"),
                    "-o", str(pwtest)], check=True)
    table, _ = Table.create_or_adopt(key, 8)

    def peer_pid():
        return int(subprocess.run([str(pwtest), "peer", "dw-cpeer", hex(key)], capture_output=True,
                                  text=True).stdout)
    try:
        p = subprocess.Popen([str(exe), "dw-cpeer", hex(key)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert _line(p).startswith("READY 0 ")
            assert table.death_arm(0) == abi.Arm.ARMED                       # the C client armed
            assert peer_pid() == p.pid
            p.kill()
            p.wait(10)
            assert table.u32[table.pid_index(0)] == p.pid                      # not zeroed ...
            assert peer_pid() == 0                                              # ... but dead
        finally:
            end_process(p)
    finally:
        table.detach()


def test_a_main_thread_that_exits_is_not_a_death(key, service, step, compiled):
    from procwatch import cheader
    exe = compiled("armed_leader_exits", "-I", cheader.include_dir())
    svc = service(**step)
    p = subprocess.Popen([str(exe), "dw-leader", hex(key)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        pid = int(_line(p).split()[1])
        wait_until(lambda: _task_state(pid, pid) == "Z", 10, "the main thread to exit")
        _watched(svc, key, 0)
        arm, word = _death_word(key, 0)
        assert arm == abi.Arm.ARMED and not word & abi.FUTEX_OWNER_DIED     # the sentinel still holds it
        # A connector-only witness killed now: once its end is reported, the leader's exit
        # event (sent before) has been read too, and must have ended nothing.
        witness = subprocess.Popen(["sleep", "60"])
        try:
            procwatch.register_pid("dw-witness", pid=witness.pid, key=key)
            svc.wait_event("registered", name="dw-witness")
            witness.kill()
            witness.wait()
            svc.wait_event("exit", name="dw-witness")
        finally:
            end_process(witness)
        assert read_slot(key, 0).pid == pid, svc.log()[-2000:]
        p.stdin.close()                                                       # the worker exits(5)
        e = _exit_event(svc, "dw-leader", exit_code=5)
        assert p.wait(10) == 5 and e["name"] == "dw-leader"
    finally:
        end_process(p)


def _task_state(pid, tid):
    try:
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def test_an_exec_is_not_a_death(key, service, step, armed):
    svc = service(**step)
    p, slot, pid, _tid = armed("dw-exec", then="exec", mib=0)
    _watched(svc, key, slot)
    _tell(p)
    # The word fires at the exec; the service sees the process live on and makes it connector-only.
    wait_until(lambda: _death_word(key, slot)[0] == abi.Arm.LOST, 10, "the slot to be marked LOST",
               detail=lambda: svc.log()[-2000:])
    s = read_slot(key, slot)
    assert s.pid == pid and s.state == abi.State.ALIVE and open(f"/proc/{pid}/comm").read() == "sleep\n"
    assert not [e for e in svc.events("exit") if e.get("name") == "dw-exec"]
    os.kill(pid, signal.SIGKILL)
    e = _exit_event(svc, "dw-exec", signal="SIGKILL")
    assert e["detected_by"] == "exit_event"


def test_a_forked_child_does_not_inherit_the_arming(key, service, armed):
    svc = service()
    p, slot, pid, tid = armed("dw-fork", then="fork", mib=0)
    _watched(svc, key, slot)
    _tell(p)
    child, status = map(int, _line(p).split()[1:])
    assert child != pid and status == 0
    # The child's exit did not touch the mutex (not on its robust list), nor its unregister the slot.
    arm, word = _death_word(key, slot)
    assert arm == abi.Arm.ARMED and word & abi.FUTEX_TID_MASK == tid and not word & abi.FUTEX_OWNER_DIED
    assert read_slot(key, slot).pid == pid
    p.kill()
    assert _exit_event(svc, "dw-fork", signal="SIGKILL")["detected_by"] in ("death_word", "exit_event")


def test_an_unregister_is_not_a_death(key, service, step, armed):
    svc = service(**step)
    p, slot, pid, _tid = armed("dw-unreg", then="unregister", mib=0)
    _watched(svc, key, slot)
    # The death-word waiter and the watch list each wake on the registration's generation
    # bump: wait for both, or a quick unregister may come before the watch list ever saw
    # the process (then neither line is logged: nothing was watched, nothing ended).
    svc.wait_event("registered", name="dw-unreg")
    _tell(p)
    assert _line(p) == "UNREGISTERED"
    svc.wait_event("unregistered", name="dw-unreg")
    arm, word = _death_word(key, slot)
    assert arm == abi.Arm.DISARMED and not word & abi.FUTEX_OWNER_DIED
    s = read_slot(key, slot)
    assert (s.pid, s.state, s.cause) == (0, abi.State.UNREGISTERED, abi.Cause.UNREGISTERED)
    p.kill()
    p.wait(10)
    assert not [e for e in svc.events("exit") if e.get("name") == "dw-unreg"]


def test_a_restarted_service_waits_on_live_armed_slots(key, service, armed):
    first = service()
    p, slot, pid, _tid = armed("dw-restart")
    _watched(first, key, slot)
    first.stop(signal.SIGKILL)
    second = service()
    wait_until(lambda: any(e.get("name") == "dw-restart" for e in second.events("registered")), 10,
               "the restarted service to adopt the slot")
    p.kill()
    e = _exit_event(second, "dw-restart", signal="SIGKILL")
    assert e["detected_by"] == "death_word", e["message"]


def test_a_junk_death_word_never_signals_or_crashes(key, service):
    """A slot of a live process whose death word says OWNER_DIED: not a death, never a kill."""
    svc = service()
    import procwatch
    victim = subprocess.Popen(["sleep", "1000"])
    try:
        reg = procwatch.register_pid("dw-junk", pid=victim.pid, key=key)
        assert reg.death_word == "other_pid"                 # another process's slot cannot be armed
        t = reg.table
        off = abi.slot_offset(reg.slot)
        t.u32[(off + abi.S_DEATH_MUTEX) // 4] = abi.FUTEX_OWNER_DIED | 0x1234
        t.u32[(off + abi.S_DEATH_ARM) // 4] = abi.Arm.ARMED
        with t.lock():
            t.bump_generation()
        wait_until(lambda: t.death_arm(reg.slot) == abi.Arm.LOST, 10, "the junk word to be dropped",
                   detail=lambda: svc.log()[-2000:])
        assert victim.poll() is None and t.u32[t.pid_index(reg.slot)] == victim.pid
        # Junk that does not say OWNER_DIED, and an unknown arm value: waited on, or ignored.
        t.u32[(off + abi.S_DEATH_MUTEX) // 4] = 0x2345
        t.u32[(off + abi.S_DEATH_ARM) // 4] = abi.Arm.ARMED
        with t.lock():
            t.bump_generation()
        wait_until(lambda: t.death_word(reg.slot) & abi.FUTEX_WAITERS, 10, "the service to wait on it")
        t.u32[(off + abi.S_DEATH_ARM) // 4] = 99
        with t.lock():
            t.bump_generation()
        victim.kill()
        e = _exit_event(svc, "dw-junk", signal="SIGKILL")
        assert e["detected_by"] == "exit_event"
        assert svc.proc.poll() is None and not svc.events("respawn") or all(
            "failed" not in x["message"] for x in svc.events("respawn"))
    finally:
        end_process(victim)


def test_status_says_which_slots_are_connector_only(key, service, armed):
    import json
    import procwatch
    service()
    victim = subprocess.Popen(["sleep", "1000"])
    try:
        procwatch.register_pid("dw-other", pid=victim.pid, key=key)
        armed("dw-self", mib=0)
        out = subprocess.run([PY, "-m", "procwatch", "status", "--key", hex(key), "--json"],
                             capture_output=True, text=True, cwd=ROOT)
        snap = json.loads(out.stdout)
        assert snap["service"]["death_words"] == "watching"
        rows = {r["name"]: r for r in snap["slots"]}
        assert rows["dw-other"]["death_word"] == "other_pid" and rows["dw-self"]["death_word"] == "armed"
        text = subprocess.run([PY, "-m", "procwatch", "status", "--key", hex(key)], capture_output=True,
                              text=True, cwd=ROOT).stdout
        assert "death words watched" in text and "connector-only (registered for another pid)" in text
    finally:
        end_process(victim)


def test_waiters_take_127_death_words_each(key):
    """futex_waitv takes 128 words and one is the generation word: 127 armed slots a waiter."""
    import types
    from procwatch import deathwatch
    table, _ = Table.create_or_adopt(key, 256)
    try:
        for i in range(200):
            with table.lock():
                table.claim(i)
                table.arm(i, os.getpid())            # no service runs: nothing waits on these
                table.publish(i, os.getpid(), 1, f"w{i}".encode())
        watch = deathwatch.DeathWatch(types.SimpleNamespace(table=table), done=None)
        assert [len(watch.shard(0)), len(watch.shard(1)), watch.shard(2)] == [127, 73, None]
        assert {s for k in (0, 1) for s, _ in watch.shard(k)} == set(range(200))
        assert deathwatch.PER_WAITER + 1 == deathword.WAITV_MAX == 128
    finally:
        table.detach()


def test_the_ctypes_fallback_matches_the_extension():
    """Where procwatch._deathword could not be built, ctypes and libatomic do the same work."""
    import ctypes
    if deathword._libatomic() is None:
        pytest.skip("no libatomic here")
    word = ctypes.c_uint32(5)
    addr = ctypes.addressof(word)
    native = deathword._native
    try:
        for impl in ("native", "ctypes"):
            deathword._native = native if impl == "native" else None
            if impl == "native" and native is None:
                continue
            word.value = 5
            assert deathword.cas32(addr, 4, 9) == 5 and word.value == 5, impl      # no swap
            assert deathword.cas32(addr, 5, 9) == 5 and word.value == 9, impl      # swapped
            assert deathword.waitv([addr], [1], 0.0) == -1, impl                   # differs: EAGAIN
            assert deathword.waitv([addr], [9], 0.01) == -2, impl                  # times out
    finally:
        deathword._native = native
