"""Hang detection end to end: real clients that stop beating, stop, or resume; a real service (root).

Intervals are 0.1-0.4 s so that each test takes a few seconds.  Nothing here
asserts a duration: progress is followed through the slot's own words
(``last_beat_ns`` written by the checker, ``misses``) and the service's log.
"""

import json
import os
import signal
import subprocess
import threading
import time

import pytest

import procwatch
from conftest import PY, ROOT, asleep_in_futex, ctx_switches, plant_slot, require_root, wait_until
from procwatch import abi, cheader, procfs
from procwatch.segment import Table

pytestmark = [require_root()]


@pytest.fixture
def service_table(key):
    """Factory: the service's table, attached once (the service creates it)."""
    held = []

    def attach():
        if not held:
            held.append(Table.attach(key))
        return held[0]
    yield attach
    for t in held:
        t.detach()


def beat_seen(t, c, after=None):
    """Wait until the checker has recorded progress of client ``c`` (after ``after`` ns)."""
    base = t.get64(c.slot, abi.S_REGISTERED_NS) if after is None else after
    return wait_until(lambda: t.get64(c.slot, abi.S_LAST_BEAT_NS) > base and t.get64(c.slot, abi.S_LAST_BEAT_NS),
                      10, f"the checker to see {c.name} beat")


def ask(c, command):
    c.tell(command)
    assert c.proc.stdout.readline().decode().strip() == f"OK {command}"


def ended(t, c, timeout=10):
    return wait_until(lambda: t.u32[t.pid_index(c.slot)] == 0 and t.get32(c.slot, abi.S_STATE) == abi.State.EXITED
                      and t.read_slot(c.slot), timeout, f"{c.name}'s slot to end")


def test_client_that_stops_beating_is_hung_then_killed_with_the_configured_signal(key, service, clients, service_table):
    svc = service("--hang-signal", "SIGTERM")
    c = clients(key, "stalls", "--heartbeat", "0.1", "--then", "beat", "--beat-every", "0.02")
    t = service_table()
    beat_seen(t, c)
    ask(c, "stop")
    hung = svc.wait_event("hung", name="stalls")
    assert hung["action"] == "kill" and int(hung["misses"]) == 3 and "refused" not in hung
    # Three checks at least one interval apart, each without progress, since the last one with it.
    assert int(hung["since_beat_ms"]) >= 3 * 100 * 0.95, hung
    killed = svc.wait_event("killed", name="stalls")
    assert killed["signal"] == "SIGTERM" and killed["pid"] == str(c.pid)
    s = ended(t, c)
    assert s.cause == abi.Cause.KILLED_HUNG
    assert os.WIFSIGNALED(s.exit_status) and os.WTERMSIG(s.exit_status) == signal.SIGTERM
    assert c.proc.wait(10) == -signal.SIGTERM
    e = svc.wait_event("exit", name="stalls")
    assert e["cause"] == "killed_hung" and "killed: hung" in e["message"]


def test_slow_beater_within_its_interval_is_never_killed(key, service, clients, service_table):
    svc = service()
    c = clients(key, "slow", "--heartbeat", "0.3", "--then", "beat", "--beat-every", "0.2")
    t = service_table()
    seen = set()

    def checked_many():
        seen.add(t.get64(c.slot, abi.S_LAST_BEAT_NS))
        return len(seen) >= 8              # progress recorded at 7+ checks: ~7 intervals
    wait_until(checked_many, 20, "seven checks that saw progress")
    assert c.proc.poll() is None
    s = t.read_slot(c.slot)
    assert s.pid == c.pid and s.state == abi.State.ALIVE and s.misses < 3
    assert not svc.events("hung") and not svc.events("killed")


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_stopped_client_is_hung_and_killed(key, service, clients, service_table, sig):
    """SIGKILL acts on a stopped process; SIGTERM needs the SIGCONT the checker adds."""
    svc = service("--hang-signal", sig)
    c = clients(key, "frozen", "--heartbeat", "0.1", "--then", "beat", "--beat-every", "0.02")
    t = service_table()
    beat_seen(t, c)
    os.kill(c.pid, signal.SIGSTOP)
    hung = svc.wait_event("hung", name="frozen")
    assert hung["verdict"] == "stopped" and "stopped (state T" in hung["message"], hung
    s = ended(t, c)
    assert s.cause == abi.Cause.KILLED_HUNG and os.WTERMSIG(s.exit_status) == signal.Signals[sig]
    assert s.verdict == abi.Verdict.STOPPED
    killed = svc.wait_event("killed", name="frozen")
    assert killed["signal"] == sig and killed["verdict"] == "stopped"


def test_action_log_never_kills_and_a_beat_recovers(key, service, clients, service_table):
    """Service default 'log'; a second client overrides it per slot with kill + SIGUSR1."""
    svc = service("--hang-action", "log")
    quiet = clients(key, "quiet", "--heartbeat", "0.1", "--then", "beat", "--beat-every", "0.02")
    strict = clients(key, "strict", "--heartbeat", "0.1", "--then", "beat", "--beat-every", "0.02",
                     "--hang-action", "kill", "--hang-signal", "USR1")
    other = clients(key, "other", "--heartbeat", "0.1", "--then", "beat", "--beat-every", "0.02")
    t = service_table()
    for c in (quiet, strict, other):
        beat_seen(t, c)
        ask(c, "stop")
    assert svc.wait_event("hung", name="quiet")["action"] == "log"
    # A hung process that procwatch did not kill ends as an ordinary exit, not "killed: hung".
    svc.wait_event("hung", name="other")
    other.kill(signal.SIGKILL)
    s = ended(t, other)
    assert s.cause == abi.Cause.EXITED and svc.wait_event("exit", name="other")["cause"] == "exited"
    s = ended(t, strict)
    assert s.cause == abi.Cause.KILLED_HUNG and os.WTERMSIG(s.exit_status) == signal.SIGUSR1
    # Several more intervals go by, counted by the checker itself.
    wait_until(lambda: t.get32(quiet.slot, abi.S_MISSES) >= 8, 10, "five more missed checks")
    assert quiet.proc.poll() is None
    s = t.read_slot(quiet.slot)
    assert s.pid == quiet.pid and s.state == abi.State.HUNG and s.cause == abi.Cause.NONE
    assert [e["name"] for e in svc.events("killed")] == ["strict"]
    assert len(svc.events("hung")) == 3                  # logged once each

    out = subprocess.run([PY, "-m", "procwatch", "status", "--key", hex(key), "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    row = {r["name"]: r for r in json.loads(out.stdout)["slots"]}["quiet"]
    assert row["state"] == "hung" and row["heartbeat_ms"] == 100 and row["misses"] >= 8
    assert row["last_beat_age_s"] >= 0.8 and row["hang_action"] is None and row["kill_sent"] is False
    gone = {r["name"]: r for r in json.loads(out.stdout)["slots"]}["strict"]
    assert gone["hang_action"] == "kill" and gone["hang_signal"] == "SIGUSR1" and gone["cause"] == "killed_hung"
    text = subprocess.run([PY, "-m", "procwatch", "status", "--key", hex(key)],
                          capture_output=True, text=True, cwd=ROOT, timeout=30).stdout
    line = next(ln for ln in text.splitlines() if " quiet " in ln)
    assert " hung " in line and "0.1s/" in line and "missed" in line, text

    ask(quiet, "start")
    svc.wait_event("recovered", name="quiet")
    wait_until(lambda: t.get32(quiet.slot, abi.S_MISSES) == 0, 10, "misses back to 0")
    assert t.get32(quiet.slot, abi.S_STATE) == abi.State.ALIVE and quiet.proc.poll() is None


def test_register_hang_action_log_under_a_kill_default(key, service, clients, service_table):
    """register_pid(hang_action="log") under a service whose default is kill: the hang
    is only logged, however long it lasts; a client without the override is killed,
    so the default really was kill."""
    svc = service()
    gentle = clients(key, "gentle", "--heartbeat", "0.1", "--then", "beat", "--beat-every", "0.02",
                     "--hang-action", "log")
    control = clients(key, "control", "--heartbeat", "0.1", "--then", "beat", "--beat-every", "0.02")
    t = service_table()
    for c in (gentle, control):
        beat_seen(t, c)
        ask(c, "stop")
    assert svc.wait_event("hung", name="gentle")["action"] == "log"
    assert svc.wait_event("hung", name="control")["action"] == "kill"
    assert ended(t, control).cause == abi.Cause.KILLED_HUNG
    wait_until(lambda: t.get32(gentle.slot, abi.S_MISSES) >= 8, 10, "five more missed checks of gentle")
    s = t.read_slot(gentle.slot)
    assert gentle.proc.poll() is None and s.pid == gentle.pid and s.state == abi.State.HUNG
    assert [e["name"] for e in svc.events("killed")] == ["control"]


def test_set_heartbeat_zero_turns_hang_detection_off(key, service, clients, service_table):
    """set_heartbeat(0) under a running service (default kill): a client that then stops
    beating is never declared hung, while a witness with the same interval that stopped
    at the same time misses check after check; and a hung slot that turns detection
    off is no longer hung."""
    svc = service()
    off = clients(key, "off", "--heartbeat", "0.1", "--then", "beat", "--beat-every", "0.02")
    witness = clients(key, "witness", "--heartbeat", "0.1", "--then", "beat", "--beat-every", "0.02",
                      "--hang-action", "log")
    t = service_table()
    for c in (off, witness):
        beat_seen(t, c)
    ask(off, "hb 0")
    assert t.get32(off.slot, abi.S_HEARTBEAT_MS) == 0
    ask(off, "stop")
    ask(witness, "stop")
    svc.wait_event("hung", name="witness")
    wait_until(lambda: t.get32(witness.slot, abi.S_MISSES) >= 8, 10, "eight missed checks of the witness")
    s = t.read_slot(off.slot)
    assert off.proc.poll() is None and s.pid == off.pid and s.state == abi.State.ALIVE and s.misses == 0
    assert not [e for e in svc.events("hung") if e["name"] == "off"] and not svc.events("killed")
    # Turned off while hung: no longer hung.
    ask(witness, "hb 0")
    e = svc.wait_event("recovered", name="witness")
    assert "turned hang detection off" in e["message"]
    assert t.get32(witness.slot, abi.S_STATE) == abi.State.ALIVE and witness.proc.poll() is None


def test_two_misses_then_resume_is_not_killed_and_misses_reset(key, service, clients, service_table):
    svc = service()
    c = clients(key, "hiccup", "--heartbeat", "0.4", "--then", "beat", "--beat-every", "0.05")
    t = service_table()
    beat_seen(t, c)
    ask(c, "stop")
    wait_until(lambda: t.get32(c.slot, abi.S_MISSES) == 2, 10, "two missed checks")
    stopped_at = t.get64(c.slot, abi.S_LAST_BEAT_NS)
    ask(c, "start")
    beat_seen(t, c, after=stopped_at)
    assert t.get32(c.slot, abi.S_MISSES) == 0
    s = t.read_slot(c.slot)
    assert s.pid == c.pid and s.state == abi.State.ALIVE and c.proc.poll() is None
    # The count starts again from 0: the next miss is the first, not the third.
    ask(c, "stop")
    assert wait_until(lambda: t.get32(c.slot, abi.S_MISSES), 10, "a new miss") == 1
    ask(c, "start")
    assert not svc.events("hung") and not svc.events("killed")


def test_hostile_slots_are_never_signalled(key, service, clients, service_table):
    """PID 1, the service, a process without the table attached, a PID whose start time
    is not the slot's, an attached process of another uid than the slot's owner, a
    root `procwatch wait` (a reader: read-only attachment; issue 13), and a PID word
    no kernel could hand out: each is declared hung, each kill is refused with one
    line, nobody is signalled, and the checker keeps going."""
    # A long reconcile interval keeps the reused-PID slot for the checker (reconcile would end it).
    svc = service("--reconcile-interval", "3600", "--max-misses", "2")
    bystander = subprocess.Popen(["sleep", "60"])
    readers = []
    try:
        member = clients(key, "member")                       # has the table attached, runs as root
        waiter = subprocess.Popen([PY, "-m", "procwatch", "wait", "member", "--key", hex(key)],
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env=dict(os.environ, PYTHONPATH=str(ROOT)))
        readers.append(waiter)
        shmid = service_table().shmid
        wait_until(lambda: procfs.maps_has_sysv(waiter.pid, shmid), 15, "procwatch wait to attach the table")
        # Planted after the service's watch list took in "member" (and with no generation
        # bump), the detector leaves these slots to the checker.
        svc.wait_event("registered", name="member")
        t = service_table()
        n = t.slot_count
        planted = {
            n - 1: (1, procfs.start_time(1), 0, "init"),
            n - 2: (svc.pid, procfs.start_time(svc.pid), 0, "self"),
            n - 3: (bystander.pid, procfs.start_time(bystander.pid), 0, "not_attached"),
            n - 4: (bystander.pid, procfs.start_time(bystander.pid) + 1, 0, "pid_reused"),
            n - 5: (member.pid, procfs.start_time(member.pid), 65534, "uid"),
            n - 6: (0xFFFFFFF0, 1, 0, "invalid"),
            n - 7: (waiter.pid, procfs.start_time(waiter.pid), 0, "read_only"),
        }
        for i, (pid, start, uid, why) in planted.items():
            plant_slot(t, i, pid, start, uid, name=f"hostile-{why}")

        def refused():
            got = {e["name"]: e for e in svc.events("hung") if "refused" in e}
            return len(got) == len(planted) and got
        got = wait_until(refused, 15, "a refusal for each planted slot", detail=lambda: svc.log()[-3000:])
        for i, (pid, _start, _uid, why) in planted.items():
            e = got[f"hostile-{why}"]
            assert e["refused"] == why and e["pid"] == str(pid), e
            assert t.u32[t.pid_index(i)] == pid and t.get32(i, abi.S_STATE) == abi.State.HUNG
            assert t.get32(i, abi.S_CAUSE) == abi.Cause.NONE
        assert not svc.events("killed") and "Traceback" not in svc.log()
        assert bystander.poll() is None and member.proc.poll() is None and svc.proc.poll() is None
        assert waiter.poll() is None
        assert procfs.stat_state(1) not in (None, "Z")
        # Each refusal is said once, however many more checks go by.
        wait_until(lambda: all(t.get32(i, abi.S_MISSES) >= 5 for i in planted), 10, "more missed checks")
        assert len([e for e in svc.events("hung") if "refused" in e]) == len(planted)
    finally:
        for p in [bystander, *readers]:
            p.kill()
            p.wait()


def test_monitor_alive_follows_the_service(key, service, service_table):
    assert not procwatch.monitor_alive(key)
    svc = service()
    assert procwatch.monitor_alive(key)
    t = service_table()
    first = t.hget64(abi.H_SERVICE_HEARTBEAT)
    wait_until(lambda: t.hget64(abi.H_SERVICE_HEARTBEAT) > first, 5, "the service heartbeat to move")
    svc.stop()
    assert not procwatch.monitor_alive(key)


def test_hang_settings_are_checked_and_written(key):
    t, _ = Table.create_or_adopt(key, 4)
    try:
        with pytest.raises(ValueError, match="not 'kill' or 'log'"):
            procwatch.register_pid("x", key=key, heartbeat=1, hang_action="reboot")
        with pytest.raises(ValueError, match="is not a signal"):
            procwatch.register_pid("x", key=key, heartbeat=1, hang_signal="SIGNOPE")
        with procwatch.register_pid("x", key=key, heartbeat=1, hang_signal="SIGABRT") as reg:
            s = t.read_slot(reg.slot)
            assert s.heartbeat_action == abi.HangAction.DEFAULT and s.heartbeat_signal == signal.SIGABRT
            reg.set_hang_action("log")
            s = t.read_slot(reg.slot)
            assert s.heartbeat_action == abi.HangAction.LOG and s.heartbeat_signal == 0
    finally:
        t.detach()
    out = subprocess.run([PY, "-m", "procwatch", "serve", "--key", hex(key), "--hang-signal", "SIGNOPE"],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    assert out.returncode == 2 and "is not a signal" in out.stderr


# -- verdicts (issue 15): what the kernel says the process did while it missed its beats ----------

def status_row(key, name):
    out = subprocess.run([PY, "-m", "procwatch", "status", "--key", hex(key), "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=30)
    text = subprocess.run([PY, "-m", "procwatch", "status", "--key", hex(key)],
                          capture_output=True, text=True, cwd=ROOT, timeout=30).stdout
    row = {r["name"]: r for r in json.loads(out.stdout)["slots"]}[name]
    line = next(ln for ln in text.splitlines() if f"  {name}  " in ln)
    return row, line


def test_busy_loop_is_busy_and_killed(key, service, clients, service_table):
    svc = service()
    c = clients(key, "spinner", "--heartbeat", "0.2", "--then", "beat", "--beat-every", "0.02")
    t = service_table()
    beat_seen(t, c)
    ask(c, "spin")                      # no beats, all CPU (bounded to 60 s by the client)
    hung = svc.wait_event("hung", name="spinner")
    assert hung["verdict"] == "busy" and hung["action"] == "kill", hung
    assert int(hung["cpu_ms"]) > 0.1 * int(hung["window_ms"]) and "without a beat" in hung["message"]
    s = ended(t, c)
    assert s.cause == abi.Cause.KILLED_HUNG and s.verdict == abi.Verdict.BUSY
    assert svc.wait_event("killed", name="spinner")["verdict"] == "busy"
    row, line = status_row(key, "spinner")
    assert row["verdict"] == "busy" and "hung (busy)" in line


def test_deadlocked_client_is_blocked_and_killed(key, service, clients, service_table):
    svc = service()
    c = clients(key, "deadlock", "--heartbeat", "0.2", "--then", "beat", "--beat-every", "0.02")
    t = service_table()
    beat_seen(t, c)
    ask(c, "deadlock")                  # waits on a lock it holds (bounded to 60 s)
    hung = svc.wait_event("hung", name="deadlock")
    assert hung["verdict"] == "blocked" and "futex" in hung["wchan"], hung
    assert f"waiting in {hung['wchan']}" in hung["message"]
    s = ended(t, c)
    assert s.cause == abi.Cause.KILLED_HUNG and s.verdict == abi.Verdict.BLOCKED


def test_client_stuck_in_the_kernel_is_stuck_with_its_wchan_and_still_killed(key, service, service_table, compiled):
    """A vfork parent waits in D (TASK_KILLABLE): the verdict says a signal may not act; SIGKILL does."""
    svc = service()
    exe = compiled("vfork_stuck", "-std=c99", "-Wextra", "-I", cheader.include_dir())
    p = subprocess.Popen([str(exe), "vforker", hex(key), "200"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        ready = p.stdout.readline().decode().split()
        assert ready[0] == "READY", ready
        slot = int(ready[1])
        t = service_table()
        wait_until(lambda: t.get64(slot, abi.S_LAST_BEAT_NS) > t.get64(slot, abi.S_REGISTERED_NS), 10,
                   "the checker to see a beat")
        p.stdin.write(b"go\n")
        p.stdin.flush()
        assert p.stdout.readline() == b"OK vfork\n"
        hung = svc.wait_event("hung", name="vforker")
        assert hung["verdict"] == "stuck" and hung["wchan"], hung
        assert "may not take effect until it returns" in hung["message"]
        assert p.wait(10) == -signal.SIGKILL
        assert svc.wait_event("killed", name="vforker")["verdict"] == "stuck"
        assert t.read_slot(slot).verdict == abi.Verdict.STUCK
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(10)


def throttle(c, cg):
    """Move beating client ``c`` into ``cg`` limited to 1 ms of CPU a second, between two beats.

    Stopped first (it sleeps in select()), so it starts a whole unit of work
    in the cgroup: its next beat is --work-ms seconds away, not whatever was
    left of a unit it was in the middle of.
    """
    ask(c, "stop")
    cg.limit(1000, 1_000_000)
    cg.add(c.pid)
    ask(c, "start")             # answered within its first 1 ms: the work follows, throttled


@pytest.mark.parametrize("version", [1, 2])
def test_throttled_client_is_starved_watched_not_killed_and_recovers(key, service, clients, service_table,
                                                                     cpu_cgroup, version):
    """15 ms of work per beat in a cgroup that may run 1 ms a second: runnable, but no beats."""
    cg = cpu_cgroup(version)
    svc = service()                                         # action kill, starved "log" (the defaults)
    c = clients(key, "throttled", "--heartbeat", "1", "--then", "beat", "--beat-every", "0.01",
                "--work-ms", "15")
    t = service_table()
    beat_seen(t, c)
    throttle(c, cg)
    hung = svc.wait_event("hung", name="throttled", timeout=30)
    assert hung["verdict"] == "starved" and hung["action"] == "log", hung
    assert int(hung["throttled_periods"]) >= 1 and 'not killed ([hang] starved = "log")' in hung["message"]
    misses = int(hung["misses"])
    # Watched on: more checks go by, judged again, not killed.
    wait_until(lambda: t.get32(c.slot, abi.S_MISSES) >= misses + 3, 15, "three more missed checks")
    s = t.read_slot(c.slot)
    assert (s.pid, s.state, s.verdict) == (c.pid, abi.State.HUNG, abi.Verdict.STARVED)
    assert c.proc.poll() is None and not svc.events("killed") and not svc.events("recovered")
    row, line = status_row(key, "throttled")
    assert row["verdict"] == "starved" and row["state"] == "hung" and "hung (starved)" in line
    cg.lift()
    rec = svc.wait_event("recovered", name="throttled", timeout=20)
    assert rec["verdict"] == "starved" and "beats again" in rec["message"]
    s = t.read_slot(c.slot)
    assert (s.state, s.verdict) == (abi.State.ALIVE, abi.Verdict.NONE)
    assert len(svc.events("hung")) == 1


@pytest.mark.parametrize("version", [1, 2])
def test_throttled_client_is_killed_when_its_rule_says_starved_kill(key, service, clients, service_table,
                                                                    cpu_cgroup, tmp_path, version):
    cg = cpu_cgroup(version)
    cfg = tmp_path / "procwatch.toml"
    cfg.write_text('[hang]\nstarved = "log"\n\n[[rule]]\nname = "throttled-*"\nstarved = "kill"\n')
    svc = service("--config", str(cfg))
    c = clients(key, "throttled-1", "--heartbeat", "1", "--then", "beat", "--beat-every", "0.01",
                "--work-ms", "15")
    t = service_table()
    beat_seen(t, c)
    throttle(c, cg)
    hung = svc.wait_event("hung", name="throttled-1", timeout=30)
    assert hung["verdict"] == "starved" and hung["action"] == "kill", hung
    s = ended(t, c)
    assert s.cause == abi.Cause.KILLED_HUNG and s.verdict == abi.Verdict.STARVED
    assert svc.wait_event("killed", name="throttled-1")["verdict"] == "starved"


def test_a_hang_refused_by_a_changed_state_is_declared_at_the_next_check(key):
    """A writer of the table (a member of its group, a torn write) may change a
    slot's state word between the checker's pass reading the states and the
    checker marking the slot hung; the hang is then refused.  That must not count
    as declared: the flag outlived every later pass, so the hang was never
    reported once the slot was sane again (the flake of
    tests/reliability/test_fuzz.py under a CPU hog, where the fuzzer's writes,
    slowed down, landed in that window).  The window is held open here with the
    table's service lock, which the checker takes to mark the slot."""
    from procwatch.heartbeat import HeartbeatChecker
    t, _ = Table.create_or_adopt(key, 4)
    target = subprocess.Popen(["sleep", "600"])
    try:
        plant_slot(t, 0, target.pid, procfs.start_time(target.pid), name="torn")
        t.set32(0, abi.S_HEARTBEAT_MS, 10)
        checker = HeartbeatChecker(t, action=abi.HangAction.LOG, max_misses=2)
        deadline = time.monotonic() + 10
        while t.get32(0, abi.S_MISSES) < 1:         # the checker's own pacing, as its thread does
            assert time.monotonic() < deadline, "the checker never missed a beat"
            time.sleep(checker.check())
        tid = []

        def second_miss():                          # declares the hang: blocks on the lock we hold
            tid.append(threading.get_native_id())
            while t.get32(0, abi.S_MISSES) < 2:
                time.sleep(checker.check())
        with t.service_lock:
            th = threading.Thread(target=second_miss)
            th.start()
            wait_until(lambda: tid and asleep_in_futex(os.getpid(), tid[0]) and t.get32(0, abi.S_MISSES) == 2,
                       10, "the checker to wait for the lock to mark the slot hung")
            t.set32(0, abi.S_STATE, abi.State.EXITED)          # the state changes under it
        th.join(10)
        assert t.get32(0, abi.S_STATE) == abi.State.EXITED    # refused: not ALIVE or HUNG
        t.set32(0, abi.S_STATE, abi.State.ALIVE)              # and sane again
        while t.get32(0, abi.S_STATE) != abi.State.HUNG:
            assert time.monotonic() < deadline, "the hang was never declared once the slot was sane"
            time.sleep(checker.check())
        assert target.poll() is None
    finally:
        target.kill()
        target.wait()
        t.detach()


def test_the_idle_checker_sleeps_through_registrations_without_a_heartbeat(key, monkeypatch):
    """In the service the idle checker is woken by the registrations thread, and only when a
    registered slot asks for beats (issue 16): twenty registrations without a heartbeat leave
    it asleep; one with a heartbeat is tracked at once.  IDLE_DISCOVERY is made long here, so
    only that wake-up can make the checker see it."""
    from procwatch import heartbeat as heartbeat_mod
    from procwatch import service as service_mod
    from procwatch.config import Config
    monkeypatch.setattr(heartbeat_mod, "IDLE_DISCOVERY", 600.0)
    svc = service_mod.Service(Config(key=key))
    targets = []

    def target():
        targets.append(subprocess.Popen(["sleep", "600"]))
        return targets[-1].pid
    try:
        svc.start()
        checker = svc.checker
        wait_until(lambda: asleep_in_futex(os.getpid(), checker.native_id), 10, "the checker to sleep")
        before = ctx_switches(os.getpid(), checker.native_id)
        for i in range(20):
            procwatch.register_pid(f"quiet-{i}", pid=target(), key=key, arm=False)
        wait_until(lambda: len(svc.reporter.watch.entries()) == 20, 10, "the registrations to be watched")
        assert ctx_switches(os.getpid(), checker.native_id) - before < 5
        assert not checker._tracks
        r = procwatch.register_pid("beats", pid=target(), key=key, heartbeat=60, arm=False)
        wait_until(lambda: r.slot in checker._tracks, 10, "the checker to track the slot asking for beats")
    finally:
        svc.stop()
        for p in targets:
            p.kill()
            p.wait()
