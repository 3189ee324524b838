"""procwatch._hotstep (issue 16): the C hot step, its atomics, the C Peer, and the Python path.

Real parts only: SysV segments on private keys, real processes that really
die, the real proc connector (root), and the service as a subprocess.
"""

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import procwatch
from conftest import PY, ROOT, end_process, require_root, sched_policy, wait_until
from procwatch import abi, native
from procwatch.segment import Table

hot = pytest.importorskip("procwatch._hotstep")


@pytest.fixture
def table(key):
    t, _ = Table.create_or_adopt(key, 64)
    yield t
    t.remove()


def _fds():
    return set(os.listdir("/proc/self/fd"))


def _claim(t, i, pid, name):
    """Write a registration the way register_pid() does (used_end past it first, the PID word last)."""
    t.hset32(abi.H_USED_END, max(t.used_end(), i + 1))
    t.set32(i, abi.S_STATE, abi.State.ALIVE)
    t.set64(i, abi.S_START_TIME, procwatch.procfs.start_time(pid) or 1)
    t.write_name(i, name)
    t.u32[t.pid_index(i)] = pid


def test_layout_matches_abi():
    """The C module's copy of the offsets is the one abi.py owns."""
    c = hot.layout()
    assert (c["HEADER_SIZE"], c["SLOT_SIZE"], c["H_GENERATION"]) == (abi.HEADER_SIZE, abi.SLOT_SIZE, abi.H_GENERATION)
    assert (c["S_PID"], c["S_STATE"], c["S_START_TIME"], c["S_NAME"], c["NAME_SIZE"]) == \
        (abi.S_PID, abi.S_STATE, abi.S_START_TIME, abi.S_NAME, abi.NAME_SIZE)
    assert (c["EMPTY"], c["CLAIMING"]) == (abi.State.EMPTY, abi.State.CLAIMING)
    assert (c["S_DEATH_ARM"], c["S_DEATH_MUTEX"], c["ARMED"], c["FUTEX_OWNER_DIED"]) == \
        (abi.S_DEATH_ARM, abi.S_DEATH_MUTEX, abi.Arm.ARMED, abi.FUTEX_OWNER_DIED)
    from procwatch.connector import EXIT_OFFSET, PROC_EVENT_EXIT
    assert (c["EXIT_OFFSET"], c["PROC_EVENT_EXIT"]) == (EXIT_OFFSET, PROC_EVENT_EXIT)


def test_one_end_has_one_reporter(table):
    """Many threads clear the same word at once: exactly one wins, and only its pending note stays."""
    t = table
    for rnd in range(20):
        pid = 1000 + rnd
        t.u32[t.pid_index(3)] = pid
        wins = []
        go = threading.Barrier(8)

        def clear():
            go.wait()
            if t.clear_pid(3, pid, pend=True):
                wins.append(1)
        threads = [threading.Thread(target=clear) for _ in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        assert len(wins) == 1 and t.u32[t.pid_index(3)] == 0
        notes = [t.u64[(abi.H_PENDING_ENDS >> 3) + k] for k in range(abi.PENDING_ENDS)]
        assert notes.count((pid << 32) | 4) == 1 and sum(1 for v in notes if v) == 1
        t.end_logged(3, pid)
        assert not any(t.u64[(abi.H_PENDING_ENDS >> 3) + k] for k in range(abi.PENDING_ENDS))


def test_clear_pid_refuses_another_pid(table):
    t = table
    t.u32[t.pid_index(1)] = 4242
    assert hot.clear_pid(t.pid_address(1), 4241, t.address + abi.H_PENDING_ENDS, abi.PENDING_ENDS, 1) is None
    assert t.u32[t.pid_index(1)] == 4242
    assert not any(t.u64[(abi.H_PENDING_ENDS >> 3) + k] for k in range(abi.PENDING_ENDS))


def test_hotstep_keeps_its_own_pidfd_copies(table):
    """A sync may close its pidfd at any time: the step's copy still tells the exit, and remove() closes it."""
    before = _fds()
    h = hot.HotStep(-1, table.address, table.address + abi.H_PENDING_ENDS, abi.PENDING_ENDS, table.service_lock)
    p = subprocess.Popen(["sleep", "60"])
    try:
        fd = os.pidfd_open(p.pid)
        h.add(5, p.pid, fd)
        os.close(fd)                    # Python's copy gone, as a sync would
        assert h.exited() == [] and h.watched == 1
        p.kill()
        p.wait()
        wait_until(lambda: h.exited() == [(5, p.pid)], 5, "the step's own pidfd to turn readable")
        assert h.remove(5, p.pid) and not h.remove(5, p.pid) and h.watched == 0
    finally:
        end_process(p)
    del h
    assert _fds() == before             # the epoll set, the eventfd and the copy are all closed


def test_hotstep_map_grows_and_finds_every_entry(table):
    """Open addressing with deletions: 3000 adds, half removed, every lookup still right."""
    h = hot.HotStep(-1, table.address, 0, 0, table.service_lock)
    pids = random.Random(7).sample(range(2, 4_000_000), 3000)
    for i, pid in enumerate(pids):
        h.add(i % 64, pid, -1)
    for i, pid in enumerate(pids[::2]):
        assert h.remove((2 * i) % 64, pid)
    assert h.watched == 1500
    for i, pid in enumerate(pids):
        assert h.remove(i % 64, pid) == (i % 2 == 1)
    assert h.watched == 0


def test_changes_reports_only_moved_slots(table):
    t = table
    ch = hot.Changes(t.slot_count)
    assert ch.diff(t.address) == []
    _claim(t, 7, os.getpid(), b"me")
    assert ch.diff(t.address) == [(7, os.getpid(), t.get64(7, abi.S_START_TIME))]
    assert ch.diff(t.address) == []
    t.u32[t.pid_index(7)] = 0
    assert ch.diff(t.address) == [(7, 0, 0)]


def test_changes_reads_the_used_slots_and_what_it_remembers(table):
    """diff() stops at the first EMPTY slot at or after used_end, yet sees a remembered slot end.

    A slot written past used_end (by hand: no client does) is seen once the
    service's guard moves used_end over it; a slot diff() remembers with a PID
    is read whatever used_end says, so a hostile lowering of used_end cannot
    hide an end from the watch list.
    """
    t = table
    ch = hot.Changes(t.slot_count)
    _claim(t, 2, os.getpid(), b"near")
    start = t.get64(2, abi.S_START_TIME)
    assert ch.diff(t.address) == [(2, os.getpid(), start)]
    # Past used_end and past an EMPTY slot: not read.
    t.set32(40, abi.S_STATE, abi.State.ALIVE)
    t.set64(40, abi.S_START_TIME, start)
    t.u32[t.pid_index(40)] = os.getppid()
    assert t.scan_end() == 3
    assert ch.diff(t.address) == []
    assert t.fix_used_end() == (3, 41)          # the guard's look
    assert ch.diff(t.address) == [(40, os.getppid(), start)]
    # used_end written down to 0: the remembered slots are still read.
    t.hset32(abi.H_USED_END, 0)
    t.u32[t.pid_index(40)] = 0
    t.u32[t.pid_index(2)] = 0
    assert ch.diff(t.address) == [(2, 0, 0), (40, 0, 0)]
    # A slot right after used_end (a client that does not keep it) is read on into.
    t.hset32(abi.H_USED_END, 2)
    t.u32[t.pid_index(2)] = os.getpid()
    assert t.scan_end() == 3
    assert ch.diff(t.address) == [(2, os.getpid(), start)]


def test_scan_end_is_clamped_and_true_end_reads_the_tail(table):
    """A used_end past the table reads as the table; true_end() finds the last slot in use."""
    t = table
    assert (t.scan_end(), t.true_end()) == (0, 0)
    t.hset32(abi.H_USED_END, 0xFFFFFFFF)
    assert t.scan_end() == t.slot_count
    assert t.fix_used_end() == (0xFFFFFFFF, 0)
    t.u32[t.pid_index(63)] = 12345                  # a PID word alone (state EMPTY) counts too
    assert t.true_end() == 64
    t.u32[t.pid_index(63)] = 0
    t.set32(5, abi.S_STATE, 99)
    assert t.true_end() == 6
    assert t.fix_used_end() == (0, 6)


def test_find_name_agrees_with_python(table, monkeypatch):
    t = table
    rnd = random.Random(3)
    for i in range(t.slot_count):
        if rnd.random() < 0.6:
            t.set32(i, abi.S_STATE, rnd.choice(list(abi.State)[1:]))
            t.write_name(i, rnd.choice([b"a", b"b", b"c", b"abc"]))
    for used_end in (0, 7, 40, t.slot_count, 0xFFFFFFFF):
        for name in (b"a", b"b", b"abc", b"zz", b"ab"):
            t.hset32(abi.H_USED_END, used_end)
            got = t.find_name(name), t.used_end()
            t.hset32(abi.H_USED_END, used_end)
            monkeypatch.setattr("procwatch.segment._hot", None)
            assert (t.find_name(name), t.used_end()) == got
            assert (t.scan_end(), t.true_end()) == (_hot_ends(t))
            monkeypatch.undo()


def test_armed_slots_agrees_with_python(table, monkeypatch):
    """armed_slots() in one C pass is the Python columns' answer: a PID word and an ARMED death word,
    up to scan_end (a slot armed past used_end, with a PID, is not read; an EMPTY slot stops it)."""
    t = table
    rnd = random.Random(5)
    for i in range(t.slot_count):
        t.set32(i, abi.S_STATE, rnd.choice([abi.State.EMPTY, abi.State.ALIVE, abi.State.ALIVE]))
        t.set32(i, abi.S_DEATH_ARM, rnd.choice([abi.Arm.ARMED, abi.Arm.ARMED, abi.Arm.NONE, abi.Arm.LOST]))
        t.u32[t.pid_index(i)] = rnd.choice([0, 1, 4242, 0xFFFFFFFF])
    for used_end in (0, 7, 40, t.slot_count, 0xFFFFFFFF):
        t.hset32(abi.H_USED_END, used_end)
        got = t.armed_slots()
        monkeypatch.setattr("procwatch.segment._hot", None)
        want = t.armed_slots()
        monkeypatch.undo()
        assert got == want and all(isinstance(p, tuple) for p in got)
    assert len(want) > 10           # the random table has armed slots up to the end


def _hot_ends(t):
    return hot.scan_end(t.address, t.slot_count), hot.true_end(t.address, t.slot_count)


def test_c_peer_reads_the_word_and_follows(key):
    """Peer.pid/alive come from the C base; a re-registration is followed, a closed Peer refuses."""
    t, _ = Table.create_or_adopt(key, 8)
    try:
        reg = procwatch.register_pid("peer-target", key=key)
        peer = procwatch.Peer("peer-target", key=key)
        assert isinstance(peer, hot.PeerWord)
        assert peer.pid == os.getpid() and peer.alive
        t.u32[t.pid_index(reg.slot)] = 0
        assert peer.pid == 0 and not peer.alive
        t.u32[t.pid_index(reg.slot)] = os.getppid()      # re-registered under the same name
        assert peer.pid == os.getppid() and peer.alive
        peer.close()
        with pytest.raises(ValueError, match="closed"):
            peer.alive
        reg.table.detach()
    finally:
        t.remove()


@require_root()
def test_step_ends_a_registered_exit_and_wakes(table):
    """The step on a real connector socket: kill -> word 0 and a futex waiter woken, before Python runs."""
    from procwatch.connector import ProcConnector
    t = table
    conn = ProcConnector()
    h = hot.HotStep(conn.fileno(), t.address, t.address + abi.H_PENDING_ENDS, abi.PENDING_ENDS, t.service_lock)
    p = subprocess.Popen(["sleep", "60"])
    try:
        _claim(t, 9, p.pid, b"victim")
        fd = os.pidfd_open(p.pid)
        h.add(9, p.pid, fd)
        os.close(fd)
        h.synced_generation = t.generation
        woken = []
        waiter = threading.Thread(target=lambda: woken.append(procwatch.futex.wait(t.pid_address(9), p.pid, 10)))
        waiter.start()
        result = []
        stepper = threading.Thread(target=lambda: result.append(h.step()))
        stepper.start()
        wait_until(lambda: h.parked, 5, "the step to park in poll")
        p.kill()
        stepper.join(10)
        waiter.join(10)
        kind, tgid, status, ts, zeroed, ended = result[0]
        assert kind == "exit" and tgid == p.pid and os.WTERMSIG(status) == signal.SIGKILL
        assert ended[0][:2] == (9, p.pid) and t.u32[t.pid_index(9)] == 0 and woken == [True]
        assert ts <= zeroed and h.events >= 1
        t.end_logged(9, p.pid)
        t.adopt_pending(9, p.pid, ended[0][2])
        t.end_logged(9, p.pid)
        # stop() wakes a parked step at once
        stepper = threading.Thread(target=lambda: result.append(h.step()))
        stepper.start()
        wait_until(lambda: h.parked, 5, "the step to park again")
        h.stop()
        stepper.join(5)
        assert result[-1] == ("stop",)
    finally:
        end_process(p)
        conn.close()


def _wakeups(pid):
    """{thread name: voluntary context switches} of ``pid`` (the detector is 'pw-detector')."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        out[name] = out.get(name, 0) + int(line.split()[1])
        except FileNotFoundError:
            pass
    return out


@require_root()
def test_idle_service_sleeps(key, service):
    """An idle service (1024 empty slots) wakes for its 1 s tick and reconcile, and for exit events.

    Before issue 16 it woke ~18 times a second on timers (checker 0.1 s,
    detector 0.25 s, registrations 0.5 s).  The detector still wakes for
    every exit on the machine (the connector sends them all), so its
    wake-ups are held to the exits a listener of our own saw meanwhile.
    This counts wake-ups; it does not time anything.
    """
    from procwatch.connector import ProcConnector, decode_exit
    svc = service()
    time.sleep(1.0)                 # start-up settles
    listener = ProcConnector(timeout=0.05)
    buf = bytearray(1024)
    exits = 0
    before = _wakeups(svc.pid)
    end = time.monotonic() + 4.0
    while time.monotonic() < end:
        try:
            n = listener.sock.recv_into(buf)
        except BlockingIOError:
            continue
        exits += decode_exit(buf, n) is not None
    after = _wakeups(svc.pid)
    listener.close()
    assert "pw-detector" in after, after
    timers = sum(after.get(k, 0) - before.get(k, 0) for k in after if k != "pw-detector")
    detector = after["pw-detector"] - before.get("pw-detector", 0)
    assert timers <= 4 * 4, f"{timers} timer wake-ups in 4 s: {before} -> {after}"
    assert detector <= exits + 4, f"detector woke {detector} times for {exits} exits"


@require_root()
def test_pure_python_path_said_once_and_works(key, service, clients):
    """$PROCWATCH_NO_NATIVE: the Python path runs, says so once, and reports exits as before."""
    svc = service(env=dict(os.environ, PROCWATCH_NO_NATIVE="1"))
    started = svc.events("started")[0]
    assert "pure-Python hot step" in started["message"] and started["hot_step"] == "python"
    assert svc.log().count("pure-Python hot step") == 1
    c = clients(key, "py-victim")
    svc.wait_event("registered", name="py-victim")
    c.kill()
    svc.wait_event("exit", name="py-victim")
    out = subprocess.run([PY, "-m", "procwatch", "status", "--key", hex(key)], capture_output=True,
                         text=True, cwd=ROOT)
    assert "pure-Python hot step" in out.stdout.splitlines()[0], out.stdout


@require_root()
def test_native_path_said_in_start_line_and_status(key, service):
    svc = service()
    started = svc.events("started")[0]
    assert "native hot step" in started["message"] and started["hot_step"] == "c"
    out = subprocess.run([PY, "-m", "procwatch", "status", "--key", hex(key)], capture_output=True,
                         text=True, cwd=ROOT)
    assert "native hot step" in out.stdout.splitlines()[0], out.stdout


@require_root()
def test_next_detector_is_parked_before_the_exit(key, clients):
    """The thread that reads after an exit was started before it (issue 16), and respawn still
    happens once per registered exit (the user's design): the ending thread releases its
    successor, makes it current and parks the next one itself, with no main-loop step
    (start() without run(): run() wants the main thread for its signal handlers)."""
    from procwatch import service as service_mod
    from procwatch.config import Config
    svc = service_mod.Service(Config(key=key))
    try:
        svc.start()
        for n in range(3):
            first = svc.detector
            parked = first.successor
            assert parked is not None and parked.is_alive() and not parked.released()
            c = clients(key, f"parked-{n}", "--no-arm")     # ended by the connector, not a death word
            wait_until(lambda: any(w.name == f"parked-{n}" for w in svc.reporter.watch.entries()), 10,
                       "the registration to be watched")
            c.kill()
            first.join(10)
            assert not first.is_alive() and first.ended_pid == c.pid
            assert parked.released()            # released by the ending thread itself
            assert svc.detector is parked and svc.stats.respawns == n + 1
            assert parked.successor is not None and parked.successor.is_alive()
            assert svc._queue.empty()           # the main loop had nothing to do
    finally:
        svc.stop()


@require_root()
def test_a_successor_that_ends_before_it_was_made_current_is_respawned(key):
    """The released successor reads at once and can end (the next exit) before the thread it
    followed has made it current.  Its end is left to that thread, which goes on from it: a
    fresh detector reads the third exit, with no main loop running.  (Queued to the main loop
    instead, the successor was made current after it had ended, and nothing read again:
    tests/reliability/test_faults.py's churn found the slots dead 10 s later.)"""
    from procwatch import service as service_mod
    from procwatch.config import Config
    svc = service_mod.Service(Config(key=key))
    targets, regs = [], []
    try:
        svc.start()
        for i in range(3):
            targets.append(subprocess.Popen(["sleep", "600"]))
            regs.append(procwatch.register_pid(f"quick-{i}", pid=targets[-1].pid, key=key, arm=False))
        wait_until(lambda: len(svc.reporter.watch.entries()) == 3, 10, "the registrations to be watched")
        first = svc.detector
        second = first.successor
        waiting, second_done = threading.Event(), threading.Event()
        real_done = first.done

        def first_done(d):              # the first thread's respawn waits for the second's end
            waiting.set()
            second_done.wait(10)
            real_done(d)

        def second_done_then(d):
            real_done(d)
            second_done.set()
        first.done, second.done = first_done, second_done_then
        t = svc.table
        targets[0].kill()
        wait_until(waiting.is_set, 10, "the first detector to end")
        targets[1].kill()
        wait_until(second_done.is_set, 10, "its successor to end before it was made current")
        first.join(10)
        wait_until(lambda: svc.detector not in (first, second) and svc.detector.is_alive(), 10,
                   "a fresh detector to be current")
        targets[2].kill()
        wait_until(lambda: t.pid(regs[2].slot) == 0, 10, "the third exit to be read")
        assert [t.state(r.slot) for r in regs] == [abi.State.EXITED] * 3
        assert svc._queue.empty()
    finally:
        svc.stop()
        for p in targets:
            p.kill()
            p.wait()
        for r in regs:
            r.table.detach()


def test_stale_claims_swept_only_by_the_periodic_reconcile(table):
    from procwatch.watch import Reporter
    from procwatch.stats import Stats
    t = table
    t.claim(4)                                          # a client died mid-registration
    r = Reporter(t, Stats())
    r.reconcile()                                       # after a respawn: no sweep
    assert t.get32(4, abi.S_STATE) == abi.State.CLAIMING
    r.reconcile(sweep=True)
    assert t.get32(4, abi.S_STATE) == abi.State.EMPTY
    r.watch.close()


# -- the death step: the death-word waiter's wait, confirm, zero and wake in C (issue 14) ----------

def _armed(key, then="sleep", mib=0):
    """tests/progs/armed.py registered (and armed) in the table: (Popen, slot, pid)."""
    p = subprocess.Popen([PY, str(ROOT / "tests" / "progs" / "armed.py"), "--key", hex(key),
                          "--name", f"ds-{then}", "--mib", str(mib), "--then", then],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    line = p.stdout.readline().decode().split()
    assert line[:1] == ["READY"], line
    return p, int(line[1]), int(line[2])


def _pidfds():
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]"
        except FileNotFoundError:
            pass                                         # listdir's own descriptor
    return n


def _step_in_thread(t, entries, timeout=10.0, priority=0, until_decided=False, **kw):
    """Run t.death_step() in a thread; (thread, result list, thread's native id list).

    ``until_decided``: step again while it answers "fired", as the service's
    confirm would look again.  An exit(3) fires the sentinel's word from
    zap_other_threads(), a moment before the leader marks itself PF_EXITING:
    a step that reads the leader in that moment cannot decide yet."""
    out, tid = [], []

    def run():
        tid.append(threading.get_native_id())
        deadline = time.monotonic() + timeout
        while True:
            r = t.death_step(t.generation, entries, timeout, priority, **kw)
            if not (until_decided and r[0] == "fired" and time.monotonic() < deadline):
                break
            time.sleep(0.0002)
        out.append(r)
    th = threading.Thread(target=run)
    th.start()
    return th, out, tid


def _sleeping_on(t, slot):
    wait_until(lambda: t.death_word(slot) & abi.FUTEX_WAITERS, 10, "the step to set FUTEX_WAITERS")


def _comm(pid):
    """pid's /proc comm, or None in the moment of an exec from a second thread when /proc has
    no leader to show (de_thread() moving the PID to the exec'ing thread)."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _policies(pid):
    """{tid: scheduling policy (stat field 41)} of the threads /proc lists for pid."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        policy = sched_policy(pid, tid)
        if policy is not None:              # gone since the listing
            out[int(tid)] = policy
    return out


@pytest.fixture(params=["held", "by-path"])
def stat_files(request, table):
    """The step's /proc reads through descriptors held since the arming, or by path."""
    files = table.death_stat_files() if request.param == "held" else None
    yield files
    if files is not None:
        files.close()


@pytest.mark.parametrize("how", ["kill", "exit"])
def test_death_step_zeroes_a_dying_process_and_hands_back_its_pidfd(table, key, how, stat_files):
    """A real armed process dies: the step zeroes its PID word and wakes, before its exit is final."""
    p, slot, pid = _armed(key, then="sleep" if how == "kill" else "exit", mib=256)
    try:
        before = _pidfds()
        th, out, _ = _step_in_thread(table, [(slot, pid, table.start_time(slot))], stat_files=stat_files,
                                     until_decided=True)
        _sleeping_on(table, slot)
        held = _pidfds()                                 # + the held pidfd, with stat_files
        waiter = threading.Thread(target=lambda: hot.wait(table.pid_address(slot), pid, 10.0))
        waiter.start()                                   # a peer asleep on the PID word
        if how == "kill":
            p.kill()
        else:
            p.stdin.write(b"go\n")
            p.stdin.flush()
        th.join(10)
        waiter.join(10)
        assert not waiter.is_alive()                     # woken
        kind, s, dead_pid, fired_ns, zeroed_ns, fd = out[0]
        assert (kind, s, dead_pid) == ("dead", slot, pid) and 0 < fired_ns <= zeroed_ns
        assert table.pid(slot) == 0
        assert _pidfds() == held + 1 and os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]"
        assert p.wait(10) == (-signal.SIGKILL if how == "kill" else 3)
        assert procwatch.procfs.pidfd_exited(fd)         # a pidfd of that very process
        os.close(fd)
        assert _pidfds() == held                         # nothing else left open
        if stat_files is not None:
            assert table.death_step(table.generation, [], 0.0, stat_files=stat_files) == ("timeout",)
            assert stat_files.held == 0 and _pidfds() == before     # the entry left: all closed
        table.end_logged(slot, pid)                      # its pending-ends note was kept
        assert not any(table.u64[(abi.H_PENDING_ENDS >> 3) + k] for k in range(abi.PENDING_ENDS))
    finally:
        end_process(p)


@pytest.mark.parametrize("then", ["exec", "thread-exec", "crowd-exec"])
def test_death_step_leaves_an_exec_to_python(table, key, then, stat_files):
    """execve(2) fires the word while the process lives on: 'fired', never an end, never a yield.

    From a second thread, de_thread() kills both the leader and the sentinel
    (whose word fires): the two threads the step reads first are dying, and
    only the thread count tells the exec from a death.  With 40 more threads
    ("crowd-exec", five processes) the kernel releases them while the step
    lists /proc/PID/task, and a listing can stop short of the exec'ing thread."""
    for _ in range(5 if then == "crowd-exec" else 1):
        p, slot, pid = _armed(key, then=then)
        try:
            th, out, _ = _step_in_thread(table, [(slot, pid, table.start_time(slot))], stat_files=stat_files,
                                         yield_us=10_000_000)
            _sleeping_on(table, slot)
            p.stdin.write(b"go\n")
            p.stdin.flush()
            th.join(10)
            assert out[0][:3] == ("fired", slot, pid) and table.pid(slot) == pid
            wait_until(lambda: p.poll() is not None or _comm(pid) == "sleep\n", 10, "the exec")
            assert p.poll() is None, p.returncode
            assert set(_policies(pid).values()) == {os.SCHED_OTHER}
        finally:
            end_process(p)


def test_death_step_never_ends_a_live_process_whose_word_is_junk(table, key):
    """OWNER_DIED written by hand into the word of a live process, or a start time that is not its own."""
    victim = subprocess.Popen(["sleep", "60"])
    try:
        _claim(table, 3, victim.pid, b"ds-junk")
        table.set32(3, abi.S_DEATH_ARM, abi.Arm.ARMED)
        table.set32(3, abi.S_DEATH_MUTEX, abi.FUTEX_OWNER_DIED | victim.pid)
        start = table.start_time(3)
        files = table.death_stat_files()
        for entry in ((3, victim.pid, start), (3, victim.pid, start + 1)):
            for held in (None, files):
                assert table.death_step(table.generation, [entry], 5.0, yield_us=10_000_000,
                                        stat_files=held)[:3] == ("fired", 3, victim.pid)
                assert table.pid(3) == victim.pid and victim.poll() is None
                assert _policies(victim.pid) == {victim.pid: os.SCHED_OTHER}
        files.close()
    finally:
        end_process(victim)


def test_stat_files_close_never_waits_for_the_step_that_holds_them(table, key):
    """DeathWatch.stop() closes the held files while a waiter may still sleep in its step (one
    that missed the stop's wake): close() returns at once, the step closes them on its way out,
    and a closed StatFds stays closed for any later step."""
    p, slot, pid = _armed(key)
    try:
        before = _pidfds()
        files = table.death_stat_files()
        entries = [(slot, pid, table.start_time(slot))]
        th, out, _ = _step_in_thread(table, entries, timeout=1.0, stat_files=files)
        _sleeping_on(table, slot)
        assert files.held == 3 and _pidfds() == before + 1     # leader's stat, sentinel's stat, pidfd
        t0 = time.monotonic()
        assert files.close() is False                          # the step holds them: not waited for
        assert time.monotonic() - t0 < 0.5
        th.join(5)
        assert out == [("timeout",)]
        assert files.held == 0 and _pidfds() == before
        assert table.death_step(table.generation, entries, 0.0, stat_files=files) == ("timeout",)
        assert files.held == 0 and _pidfds() == before         # closed for good
        assert files.close() is True
        assert p.poll() is None and table.pid(slot) == pid
    finally:
        end_process(p)


def test_death_step_yields_the_dying_teardown_to_the_woken_and_gives_it_back(table, key):
    """After the wake the dying group's threads run at SCHED_IDLE; yield_us later the next
    step turn (on any shard) puts back the policy they had; restore_yielded() does it at once."""
    for wait_for_turn in (False, True):
        p, slot, pid = _armed(key, mib=64)
        try:
            counts = hot.restore_yielded()
            th, out, _ = _step_in_thread(table, [(slot, pid, table.start_time(slot))],
                                         yield_us=200_000 if wait_for_turn else 10_000_000)
            _sleeping_on(table, slot)
            assert set(_policies(pid).values()) == {os.SCHED_OTHER}
            p.kill()
            th.join(10)
            assert out[0][:3] == ("dead", slot, pid)
            os.close(out[0][5])
            os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)     # a zombie: still there to read
            assert _policies(pid) == {pid: os.SCHED_IDLE}
            if wait_for_turn:
                assert table.death_step(table.generation, [], 0.5) == ("timeout",)
                assert _policies(pid) == {pid: os.SCHED_OTHER}      # that step's turn gave it back
            now = hot.restore_yielded()
            assert _policies(pid) == {pid: os.SCHED_OTHER}
            assert now[0] > counts[0] and now[1] > counts[1] and now[2] == counts[2] == 0
        finally:
            end_process(p)


def test_death_step_returns_when_the_generation_moves_or_time_is_up(table):
    assert table.death_step(table.generation, [], 0.01) == ("timeout",)
    th, out, _ = _step_in_thread(table, [])
    time.sleep(0.05)
    table.bump_generation()
    th.join(5)
    assert out == [("moved",)]
    assert table.death_step(table.generation - 1, [], 5.0) == ("moved",)      # moved already


def test_death_step_waits_real_time_and_returns_at_normal_priority(table):
    """SCHED_FIFO from the sleep to the wake; SCHED_OTHER again before Python runs."""
    if hot.realtime_probe(1) != 0:
        pytest.skip("SCHED_FIFO refused here")
    th, out, tid = _step_in_thread(table, [], timeout=5.0, priority=1)
    wait_until(lambda: tid and os.sched_getscheduler(tid[0]) == os.SCHED_FIFO, 5, "the step at SCHED_FIFO")
    assert os.sched_getparam(tid[0]).sched_priority == 1
    policy = []
    table.bump_generation()
    th.join(5)
    assert out == [("moved",)]

    def after():
        table.death_step(table.generation, [], 0.0, 1)
        policy.append(os.sched_getscheduler(0))
    t2 = threading.Thread(target=after)
    t2.start()
    t2.join(5)
    assert policy == [os.SCHED_OTHER]


def test_death_step_gives_up_real_time_when_a_word_keeps_moving(table):
    """A group member that rewrites and wakes a death word in a loop never gets a real-time spinner."""
    if hot.realtime_probe(1) != 0:
        pytest.skip("SCHED_FIFO refused here")
    victim = subprocess.Popen(["sleep", "60"])
    stop = threading.Event()
    try:
        _claim(table, 5, victim.pid, b"ds-restless")
        table.set32(5, abi.S_DEATH_ARM, abi.Arm.ARMED)
        table.set32(5, abi.S_DEATH_MUTEX, victim.pid)
        address = table.death_mutex_address(5)

        def hostile():
            n = 0
            while not stop.is_set():
                n += 1
                table.set32(5, abi.S_DEATH_MUTEX, victim.pid + (n & 1))     # never OWNER_DIED
                hot.wake(address)
        th, out, tid = _step_in_thread(table, [(5, victim.pid, table.start_time(5))], timeout=10.0, priority=1)
        wait_until(lambda: tid and os.sched_getscheduler(tid[0]) == os.SCHED_FIFO, 5, "the step at SCHED_FIFO")
        writer = threading.Thread(target=hostile)
        writer.start()
        wait_until(lambda: os.sched_getscheduler(tid[0]) == os.SCHED_OTHER, 5, "the step back at SCHED_OTHER")
        assert th.is_alive() and not out                 # still in the step: it only gave its priority up
        stop.set()
        writer.join(5)
        table.bump_generation()
        th.join(5)
        assert out == [("moved",)] and table.pid(5) == victim.pid
    finally:
        stop.set()
        end_process(victim)
