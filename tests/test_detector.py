"""Exit detection end to end: a real service, real clients that really die (root).

The tests that take a ``backend`` run against both exit-detection backends:
the proc connector and the pidfd backend (which records no latency: a pidfd
carries no kernel timestamp).
"""

import os
import select
import signal
import subprocess
import time

import pytest

import procwatch
from conftest import (PY, ROOT, asleep_in_futex, ctx_switches, futex_waits, proc_state, read_slot,
                      require_root, start_time, wait_ended, wait_until)
from procwatch import abi
from procwatch.segment import Table

pytestmark = [require_root()]


@pytest.fixture(params=["connector", "pidfd"])
def backend(request):
    return request.param


def check_latency(backend, s, event):
    """The connector measures kernel event -> zeroed word; the pidfd backend cannot.

    An armed client's end may be zeroed by its death word instead (issue 14):
    then both backends know death word -> zeroed, and the teardown after it.
    """
    if s.detected_by == abi.Detection.DEATH_WORD:
        assert event["detected_by"] == "death_word" and int(event["latency_us"]) == s.latency_us
        assert s.teardown_us == int(event["teardown_us"]) != abi.LATENCY_UNKNOWN
        # Completed from the pidfd under both backends (the hot step's clear finds the word zeroed).
        assert event["status_source"] in ("pidfd", "procfs") and "before its pidfd was readable" in event["message"]
        assert "latency unknown" not in event["message"]    # the pidfd backend's phrase: not this end's
        return
    assert event["detected_by"] == "exit_event"
    if backend == "connector":
        assert s.latency_us != abi.LATENCY_UNKNOWN and int(event["latency_us"]) >= 0
    else:
        assert s.latency_us == abi.LATENCY_UNKNOWN
        assert "latency_us" not in event        # left out of the entry, not 4294967295 (journal.emit)
        assert event["status_source"] in ("pidfd", "procfs") and "seen through its pidfd" in event["message"]


def test_sigkill_zeroes_slot_and_records_signal(key, service, clients, backend):
    svc = service("--backend", backend)
    c = clients(key, "victim")
    assert read_slot(key, c.slot).pid == c.pid
    c.kill(signal.SIGKILL)
    s = wait_ended(key, c.slot)
    assert s.state == abi.State.EXITED and s.cause == abi.Cause.EXITED
    assert os.WIFSIGNALED(s.exit_status) and os.WTERMSIG(s.exit_status) == signal.SIGKILL
    assert s.exit_time_ns > s.registered_ns
    e = svc.wait_event("exit", name="victim")
    assert e["pid"] == str(c.pid) and e["signal"] == "SIGKILL"
    check_latency(backend, s, e)
    svc.wait_event("respawn")


def test_normal_exit_code_recorded(key, service, clients, backend):
    svc = service("--backend", backend)
    c = clients(key, "leaver", "--then", "exit", "--code", "42")
    c.tell("go")
    s = wait_ended(key, c.slot)
    assert s.state == abi.State.EXITED and os.WEXITSTATUS(s.exit_status) == 42
    check_latency(backend, s, svc.wait_event("exit", name="leaver", exit_code=42))


def test_hundred_register_then_die_at_once_none_missed(key, service, clients):
    svc = service("--slots", "128")
    procs = []
    for i in range(100):
        procs.append(subprocess.Popen(
            [PY, str(ROOT / "tests/progs/client.py"), "--key", hex(key), "--name", f"flash-{i}",
             "--then", "exit-now", "--code", str(i)], stdout=subprocess.PIPE, cwd=ROOT,
            env=dict(os.environ, PYTHONPATH=str(ROOT))))
        if len(procs) % 10 == 0:          # bounded: ten at a time
            for p in procs[-10:]:
                p.wait(30)
    for p in procs:
        p.wait(30)
    lines = [p.stdout.read().decode().split() for p in procs]
    assert all(ln and ln[0] == "READY" for ln in lines), lines
    t = Table.attach(key)
    try:
        def all_ended():
            used = {s.name: s for s in t.used_slots()}
            # Ended: the word zeroed *and* the end recorded (the record may follow the
            # zeroing by a moment: the recorder thread, when a client held the lock).
            return len(used) == 100 and all(s.pid == 0 and s.state != abi.State.ALIVE
                                            for s in used.values()) and used
        used = wait_until(all_ended, 30, "all 100 slots to be ended")
        for i in range(100):
            s = used.get(f"flash-{i}")
            assert s is not None, sorted(used)
            assert s.state == abi.State.EXITED, (s, svc.log()[-2000:])
            assert os.WEXITSTATUS(s.exit_status) == i
    finally:
        t.detach()
    # The log line comes after the record (peers first, bookkeeping after): wait for it.
    wait_until(lambda: len(svc.events("exit")) == 100, 10, "100 exit lines")
    assert not svc.events("found_dead")


def test_leader_thread_exit_is_not_death(key, service, compiled, backend):
    """pthread_exit() in main: the group lives on; report only its last thread's exit,
    at once (from the event, not the reconcile timer)."""
    svc = service("--reconcile-interval", "0.2", "--backend", backend)
    exe = compiled("leader_exits")
    p = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline().split()[0] == b"READY"
        reg = procwatch.register_pid("threads", pid=p.pid, key=key)
        # The leader is gone once its task shows as a zombie thread.
        wait_until(lambda: proc_state(p.pid, p.pid) == "Z", 10, "the main thread to exit")
        time.sleep(1.0)   # five reconcile periods: neither an event nor reconcile may report it
        s = read_slot(key, reg.slot)
        assert s.pid == p.pid and s.state == abi.State.ALIVE, svc.log()[-2000:]
        p.stdin.write(b"x\n")
        p.stdin.flush()
        s = wait_ended(key, reg.slot)
        # EXITED with a status: from the event (or the pidfd), not the reconcile timer.
        assert s.state == abi.State.EXITED and s.cause == abi.Cause.EXITED
        assert os.WEXITSTATUS(s.exit_status) == 7
        check_latency(backend, s, svc.wait_event("exit", name="threads"))
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize("backend,step", [("connector", "native"), ("connector", "python"), ("pidfd", "python")])
def test_a_leader_exit_read_after_the_group_died_reports_the_group_status(key, service, compiled, backend, step):
    """The leader's pthread_exit() event (code 0) is still unread when the process exit(7)s:
    the end must carry 7, the process's status, not the leader thread's 0.

    The service is stopped (SIGSTOP) while both exits happen, so that its detector reads
    the leader's event first with the whole group already gone (a busy detector does the
    same on a loaded machine: the CI saw "exited with code 0" for an exit(5)).
    """
    svc = service("--backend", backend, env=dict(os.environ, PROCWATCH_NO_NATIVE="1") if step == "python" else None)
    exe = compiled("leader_exits_on_cue")
    p = subprocess.Popen([str(exe)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    pidfd = None
    try:
        assert p.stdout.readline().split()[0] == b"READY"
        reg = procwatch.register_pid("on-cue", pid=p.pid, key=key)
        svc.wait_event("registered", name="on-cue")
        pidfd = os.pidfd_open(p.pid)
        os.kill(svc.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: {proc_state(svc.pid, int(tid)) for tid in os.listdir(f"/proc/{svc.pid}/task")}
                       == {"T"}, 10, "every thread of the service to stop")
            p.stdin.write(b"leader\n")
            p.stdin.flush()
            wait_until(lambda: proc_state(p.pid, p.pid) == "Z", 10, "the main thread to exit")
            p.stdin.write(b"group\n")
            p.stdin.flush()
            wait_until(lambda: select.select([pidfd], [], [], 0)[0], 10, "the whole group to exit")
        finally:
            os.kill(svc.pid, signal.SIGCONT)
        s = wait_ended(key, reg.slot)
        assert s.state == abi.State.EXITED, svc.log()[-2000:]
        assert os.WIFEXITED(s.exit_status) and os.WEXITSTATUS(s.exit_status) == 7, svc.log()[-2000:]
        assert svc.wait_event("exit", name="on-cue")["exit_code"] == "7"
    finally:
        if pidfd is not None:
            os.close(pidfd)
        p.kill()
        p.wait()


@pytest.mark.parametrize("step", ["native", "python"])
def test_an_entry_found_gone_takes_no_later_exit_of_its_pid(key, service, clients, step):
    """A slot whose process was already reaped when the service adopted it has no pidfd:
    only an exit event stamped before then can be its own.  A later process that got the
    same PID must not end it with its status (seen once: a slot EXITED with the status of
    whoever had its PID next); the reconcile finds it dead instead."""
    env = dict(os.environ, PROCWATCH_NO_NATIVE="1") if step == "python" else None
    svc = service("--backend", "connector", "--reconcile-interval", "5", env=env)
    ghost = subprocess.Popen(["sleep", "60"])
    start = start_time(ghost.pid)
    ghost.kill()
    ghost.wait()
    before = clients(key, "before")
    before.kill(signal.SIGKILL)             # its event comes after the ghost's: that one was read
    svc.wait_event("exit", name="before")
    t = Table.attach(key)
    try:
        with t.lock():          # what a group member may write: a slot for a process reaped already
            slot = t.slot_count - 1
            t.claim(slot)
            t.publish(slot, ghost.pid, start, b"ghost")
    finally:
        t.detach()
    wait_until(lambda: f"ghost (pid {ghost.pid}) in slot {slot} is gone already" in svc.log(), 10,
               "the service to adopt the slot of a process gone already", detail=lambda: svc.log()[-2000:])
    reuser = _spawn_at_pid(ghost.pid)
    if reuser is None:
        pytest.skip(f"PID {ghost.pid} was not handed out again in 50 forks (a busy machine)")
    reuser.send_signal(signal.SIGTERM)
    reuser.wait()
    after = clients(key, "after")
    after.kill(signal.SIGKILL)              # its event comes after the reuser's: that one was read
    svc.wait_event("exit", name="after")
    s = read_slot(key, slot)
    assert not (s.state == abi.State.EXITED and os.WIFSIGNALED(s.exit_status)), \
        f"ended with the SIGTERM of the process that reused its PID: {s}"
    s = wait_ended(key, slot, timeout=15)
    assert s.state == abi.State.FOUND_DEAD, s
    assert not [e for e in svc.events("exit") if e.get("name") == "ghost"]


def _spawn_at_pid(target_pid, attempts=50):
    """Fork a `sleep` that gets ``target_pid`` (real PID reuse via ns_last_pid), or None."""
    for _ in range(attempts):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(target_pid - 1))
        p = subprocess.Popen(["sleep", "60"])
        if p.pid == target_pid:
            return p
        p.kill()
        p.wait()
    return None


def test_pid_reuse_is_found_dead_and_the_new_process_is_untouched(key, service, clients):
    """A registered process dies while no service runs; its PID is reused by another
    process; the restarted service must end the slot (start time mismatch), not
    mistake the newcomer for the client."""
    svc = service()
    c = clients(key, "reused")
    svc.stop()
    c.kill()
    c.proc.wait()
    newcomer = _spawn_at_pid(c.pid)
    if newcomer is None:
        pytest.fail(f"could not get PID {c.pid} reused after 50 forks (a busy machine?)")
    try:
        svc2 = service()
        s = wait_ended(key, c.slot)
        assert s.state == abi.State.FOUND_DEAD and s.cause == abi.Cause.PID_REUSED
        svc2.wait_event("found_dead", name="reused", cause="pid_reused")
        assert newcomer.poll() is None
    finally:
        newcomer.kill()
        newcomer.wait()


def test_restart_reports_deaths_while_down_and_keeps_the_living(key, service, clients, backend):
    svc = service("--backend", backend)
    a, b, live = clients(key, "a"), clients(key, "b"), clients(key, "live")
    svc.stop()
    for c in (a, b):
        c.kill()
        c.proc.wait()
    svc2 = service("--backend", backend)
    for c in (a, b):
        s = wait_ended(key, c.slot)
        assert s.state == abi.State.FOUND_DEAD and s.cause == abi.Cause.FOUND_DEAD
        assert s.latency_us == abi.LATENCY_UNKNOWN
        svc2.wait_event("found_dead", name=c.name)
    s = read_slot(key, live.slot)
    assert s.pid == live.pid and s.state == abi.State.ALIVE
    live.kill()                                # and the kept one is still watched
    assert wait_ended(key, live.slot).state == abi.State.EXITED


def test_wait_exit_returns_on_kill_without_polling(key, service, clients, backend):
    service("--backend", backend)
    target = clients(key, "target")
    waiter = subprocess.Popen(
        [PY, "-c", "import procwatch,sys; p=procwatch.Peer('target', key=int(sys.argv[1],0)); "
                   "print('WAITING', flush=True); print(p.wait_exit(), flush=True)", hex(key)],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert waiter.stdout.readline().strip() == "WAITING"
        wait_until(lambda: asleep_in_futex(waiter.pid), 10, "every thread of the waiter to sleep in futex()")
        # On the target's PID word, with no timeout: only a FUTEX_WAKE ends that sleep.
        word = _table_address(waiter.pid, key) + abi.slot_offset(target.slot) + abi.S_PID
        assert futex_waits(waiter.pid) == {waiter.pid: (word, 0)}, "not asleep on the PID word, untimed"
        before = ctx_switches(waiter.pid)
        time.sleep(1.0)
        # A poller wakes at least once a period; a futex sleeper not at all.
        assert ctx_switches(waiter.pid) == before, "the waiter woke up before its target died"
        assert futex_waits(waiter.pid) == {waiter.pid: (word, 0)}
        target.kill()
        assert waiter.stdout.readline().strip() == "True"
        assert waiter.wait(10) == 0
    finally:
        waiter.kill()
        waiter.wait()


def _table_address(pid, key):
    """Where process ``pid`` has the SysV segment ``key`` mapped (/proc/PID/maps)."""
    for line in open(f"/proc/{pid}/maps"):
        if f"/SYSV{key:08x} " in line + " ":
            return int(line.split("-", 1)[0], 16)
    raise AssertionError(f"process {pid} has no mapping of key {key:#010x}")


def test_unregister_is_logged_and_not_an_exit(key, service, backend):
    """The service hears of a registration through the header's generation futex,
    not a timer: the reconcile that would also find it is an hour away, and the
    thread that syncs on the futex sleeps with no timeout, so only the client's
    FUTEX_WAKE can run it.  (With the connector, any exit on the machine also
    makes the detector sync: that the untimed sleeper itself woke is checked.)"""
    svc = service("--backend", backend, "--reconcile-interval", "3600")
    generation = _table_address(svc.pid, key) + abi.H_GENERATION
    # The registrations thread sleeps there with no timeout.  (An idle heartbeat checker
    # sleeps there too, with one: it also looks for heartbeats set without a bump.)
    untimed = wait_until(lambda: [t for t, (uaddr, timeout) in futex_waits(svc.pid).items()
                                  if uaddr == generation and timeout == 0],
                         10, "a service thread in an untimed sleep on the generation futex",
                         detail=lambda: f"futex sleepers {futex_waits(svc.pid)}, generation at {generation:#x}")
    woken = {t: ctx_switches(svc.pid, t) for t in untimed}
    code = ("import procwatch,sys; r=procwatch.register_pid('polite', key=int(sys.argv[1],0)); "
            "print('R', flush=True); sys.stdin.readline(); r.unregister()")
    p = subprocess.Popen([PY, "-c", code, hex(key)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert p.stdout.readline() == b"R\n"
        svc.wait_event("registered", name="polite")
        # Woken by the client's FUTEX_WAKE, it may not have run yet when another path logged
        # "registered" (the detector's sync on some exit of the machine); with no wake it never would.
        wait_until(lambda: any(ctx_switches(svc.pid, t) > n for t, n in woken.items()), 10,
                   "the untimed sleeper on the generation futex to wake")
        p.stdin.write(b"go\n")
        p.stdin.flush()
        assert p.wait(10) == 0
        svc.wait_event("unregistered", name="polite")
        time.sleep(0.3)
        assert not svc.events("exit") and not svc.events("found_dead")
    finally:
        p.kill()
        p.wait()


def test_reregistering_at_once_keeps_the_new_registration(key, service, compiled, backend):
    """A supervisor that re-registers the name the moment its word turns 0 gets the same
    slot back while the service is still recording the old end.  That record must not
    land on the newcomer (which the next sync would then clear as corrupt, its word
    zeroed while it lives)."""
    from procwatch import cheader
    exe = compiled("reregister", "-std=c99", "-Wextra", "-I", cheader.include_dir())
    svc = service("--backend", backend)
    out = subprocess.run([str(exe), "phoenix", hex(key), "150"], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["DONE", "150", "0"], out.stderr
    wait_until(lambda: len(svc.events("exit")) == 150, 10, "150 exits in the log",
               detail=lambda: svc.log()[-2000:])
    assert not svc.events("corrupt") and not svc.events("found_dead"), svc.log()[-3000:]
    t = Table.attach(key)
    try:
        (s,) = [s for s in t.used_slots() if s.name == "phoenix"]
        assert s.state == abi.State.EXITED and os.WTERMSIG(s.exit_status) == signal.SIGKILL
    finally:
        t.detach()


def test_a_closed_pidfd_never_reads_as_exited():
    """A pidfd closed by a sync on another thread polls as POLLNVAL: not a death."""
    from procwatch import procfs
    p = subprocess.Popen(["sleep", "60"])
    try:
        fd = os.pidfd_open(p.pid)
        assert not procfs.pidfd_exited(fd)
        os.close(fd)
        assert not procfs.pidfd_exited(fd)
        fd = os.pidfd_open(p.pid)
        p.kill()
        p.wait()
        assert procfs.pidfd_exited(fd)
        os.close(fd)
    finally:
        p.kill()
        p.wait()


def test_hot_decode_needs_a_whole_exit_event(key):
    """The detector's inlined decode uses connector's own sizes: a 60-byte message is not an
    exit event (it needs 64), so it ends nothing; the whole event ends the slot with its status.

    The messages come over a datagram socket pair, so the detector runs its real loop on
    them; the process whose exit they report really is dead (killed and reaped).
    """
    import socket
    import struct
    import threading
    import types

    from procwatch.connector import EXIT_EVENT, EXIT_OFFSET, MIN_EXIT_LEN, PROC_EVENT_EXIT
    from procwatch.detector import ConnectorDetector
    from procwatch.stats import Stats
    from procwatch.watch import Reporter

    assert MIN_EXIT_LEN == 64
    t, _ = Table.create_or_adopt(key, 4)
    victim = subprocess.Popen(["sleep", "1000"])
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 0, 100_000))
    detector = reg = None
    try:
        reg = procwatch.register_pid("decoded", pid=victim.pid, key=key)
        reporter = Reporter(t, Stats())
        reporter.watch.sync()
        victim.kill()
        victim.wait()
        ended = threading.Event()
        detector = ConnectorDetector(types.SimpleNamespace(sock=b), reporter, lambda d: ended.set(), 1)
        detector.start()
        msg = bytes(EXIT_OFFSET) + EXIT_EVENT.pack(PROC_EVENT_EXIT, 0, time.monotonic_ns(), victim.pid,
                                                   victim.pid, signal.SIGKILL)
        a.send(msg[:60])                    # a truncated event: everything but exit_code
        assert not ended.wait(1.0), "a 60-byte message ended the slot"
        assert t.pid(reg.slot) == victim.pid
        a.send(msg)
        assert ended.wait(10.0) and detector.error is None, detector.error
        s = t.read_slot(reg.slot)
        assert (s.pid, s.state, s.exit_status) == (0, abi.State.EXITED, signal.SIGKILL)
    finally:
        if detector is not None:
            detector.stop_requested = True
            detector.join(5)
        a.close()
        b.close()
        if victim.poll() is None:
            victim.kill()
            victim.wait()
        if reg is not None:
            reg.table.detach()
        t.detach()
