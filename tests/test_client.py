"""The client API against a real table (no service needed for most of it)."""

import logging
import os
import time
import subprocess
import sys
import threading
import warnings

import pytest
import sysv_ipc

import procwatch
from conftest import (PROGS, RACE_MIN_OVERLAP, RACE_ROUNDS, asleep_in_futex, barrier_file, overlapped,
                      run_race, start_time, wait_until)
from procwatch import abi
from procwatch.segment import Table


def test_no_service_warns_once_and_returns_none(key, caplog):
    with caplog.at_level(logging.WARNING, logger="procwatch"):
        assert procwatch.register_pid("lonely", key=key) is None
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "continuing without it" in warnings[0].getMessage()


def test_register_writes_slot_and_publishes_pid(table):
    reg = procwatch.register_pid("dp-1", key=table.key)
    try:
        s = table.read_slot(reg.slot)
        assert s.pid == os.getpid() and s.name == "dp-1" and s.state == abi.State.ALIVE
        assert s.start_time == start_time(os.getpid())
        assert s.owner_uid == os.getuid() and s.exit_status == -1
        assert s.latency_us == abi.LATENCY_UNKNOWN
        assert table.generation == 1
    finally:
        reg.unregister()
    s = table.read_slot(reg.slot)
    assert s.pid == 0 and s.state == abi.State.UNREGISTERED and s.cause == abi.Cause.UNREGISTERED
    assert table.generation == 2


def test_context_manager_unregisters(table):
    with procwatch.register_pid("cm", key=table.key) as reg:
        assert procwatch.Peer("cm", key=table.key).pid == os.getpid()
    assert table.read_slot(reg.slot).pid == 0


def test_default_name_is_comm_and_pid(table):
    reg = procwatch.register_pid(key=table.key)
    try:
        assert reg.name.endswith(f"-{os.getpid()}")
    finally:
        reg.unregister()


@pytest.mark.parametrize("name, why", [
    ("x" * 32, "limit is 31"),
    ("é" * 16, "limit is 31"),          # 32 bytes of UTF-8
    (b"\xff\xfe", "not valid UTF-8"),
    ("\ud800", "cannot be encoded"),
    ("", "empty"),
    ("a\0b", "NUL"),
])
def test_bad_names_are_clear_errors(table, name, why):
    with pytest.raises(ValueError, match=why):
        procwatch.register_pid(name, key=table.key)
    assert table.used_slots() == []


def test_an_oversized_name_is_cut_in_its_error(table):
    """Issue 13: a 100,000-byte name came back whole in the message (a 10 MB one, 10 MB)."""
    for name in ("n" * 100_000, b"\xff" * 100_000):
        with pytest.raises(ValueError) as e:
            procwatch.register_pid(name, key=table.key)
        assert len(str(e.value)) < 300 and "100000" in str(e.value), str(e.value)[:400]
    with pytest.raises(ValueError) as e:
        procwatch.Peer("p" * 100_000, key=table.key)
    assert len(str(e.value)) < 300


def test_names_of_whitespace_are_refused_in_python_and_peer(table):
    for name in (" ", "   ", " x", "x ", "\u3000"):
        with pytest.raises(ValueError, match="whitespace"):
            procwatch.register_pid(name, key=table.key)
        with pytest.raises(ValueError, match="whitespace"):
            procwatch.Peer(name, key=table.key)
    assert table.used_slots() == []


def test_31_byte_utf8_name_fits(table):
    name = "é" * 15 + "x"                 # 31 bytes
    with procwatch.register_pid(name, key=table.key) as reg:
        assert table.read_slot(reg.slot).name == name


@pytest.mark.parametrize("pid", [0, -1, 2**22 + 5, 10**9, "12"])
def test_hostile_pids_are_refused(table, pid):
    with pytest.raises(ValueError, match="not a valid process ID"):
        procwatch.register_pid("h", pid=pid, key=table.key)


def test_name_held_by_another_live_process_is_an_error(table):
    p = subprocess.Popen(["sleep", "60"])
    try:
        with procwatch.register_pid("dup", pid=p.pid, key=table.key) as reg:
            with pytest.raises(procwatch.NameInUse) as e:
                procwatch.register_pid("dup", key=table.key)
            assert str(p.pid) in str(e.value)
            assert table.read_slot(reg.slot).pid == p.pid
    finally:
        p.kill()
        p.wait()


def test_registering_a_name_this_process_holds_adopts_its_slot(table):
    """Issue 13: what `procwatch run --heartbeat` needs.  The slot is kept, never cleared."""
    first = procwatch.register_pid("mine", key=table.key, heartbeat=2, hang_action="log")
    try:
        before = table.read_slot(first.slot)
        gen = table.generation
        again = procwatch.register_pid("mine", key=table.key)       # nothing given: all kept
        s = table.read_slot(again.slot)
        assert again.slot == first.slot and s.pid == os.getpid()
        assert (s.registered_ns, s.heartbeat_ms, s.heartbeat_action) == \
            (before.registered_ns, 2000, abi.HangAction.LOG)
        assert table.generation == gen + 1
        again.beat()
        assert table.read_slot(first.slot).heartbeat_seq == before.heartbeat_seq + 1
        third = procwatch.register_pid("mine", key=table.key, heartbeat=0.5, hang_signal="SIGTERM")
        s = table.read_slot(third.slot)
        assert (s.heartbeat_ms, s.heartbeat_signal, s.registered_ns) == (500, 15, before.registered_ns)
        third.table.detach()
        again.table.detach()
    finally:
        first.unregister()


def forge_twin(table, slot, pid):
    """Copy slot ``slot`` into a free slot and publish ``pid`` there: what a hostile member can do."""
    i = next(j for j in range(table.slot_count) if table.get32(j, abi.S_STATE) == abi.State.EMPTY)
    a, b = abi.slot_offset(slot), abi.slot_offset(i)
    table.buf[b + 4:b + abi.SLOT_SIZE] = table.buf[a + 4:a + abi.SLOT_SIZE]
    table.u32[table.pid_index(i)] = pid
    return i


def test_peer_refuses_a_name_two_live_slots_carry(table):
    """Issue 13: root's Peer picked a forged slot and reported a death while the real one lived."""
    with procwatch.register_pid("twin", key=table.key) as reg:
        forged = forge_twin(table, reg.slot, 1)
        with pytest.raises(procwatch.NameAmbiguous) as e:
            procwatch.Peer("twin", key=table.key)
        msg = str(e.value)
        assert f"slot {reg.slot}: pid {os.getpid()}" in msg and f"slot {forged}: pid 1" in msg
        assert "\n" not in msg and "will not guess" in msg
        table.u32[table.pid_index(forged)] = 0          # the forged one ended: no doubt left
        with procwatch.Peer("twin", key=table.key) as peer:
            assert peer.pid == os.getpid()


def test_readers_attach_the_table_read_only(table):
    """A hang kill needs a writable attachment; readers must not have one (issue 13)."""
    from procwatch import procfs
    with procwatch.register_pid("rw", key=table.key) as reg:
        with procwatch.Peer("rw", key=table.key) as peer:
            with open("/proc/self/maps") as f:
                perms = sorted(ln.split()[1] for ln in f if ln.split()[4:5] == [str(table.shmid)])
            # the fixture's table and the registration: rw; the peer: read-only
            assert perms == ["r--s", "rw-s", "rw-s"], perms
            assert peer.table.buf.readonly and not reg.table.buf.readonly
            assert procfs.maps_has_sysv(os.getpid(), table.shmid) == "rw"
            with pytest.raises(TypeError):
                peer.table.u32[peer.table.pid_index(peer.slot)] = 0
    assert procwatch.monitor_alive(table.key) is False


def _hole(table, i):
    """Free slot ``i`` the way the service does (a stale claim or a corrupt slot reset): EMPTY."""
    table.u32[table.pid_index(i)] = 0
    table.reset(i)


def test_registrations_keep_used_end_past_every_slot_they_take(table):
    """used_end (issue 16): a registration reads up to it, so every slot in use lies before it."""
    sleepers = [subprocess.Popen(["sleep", "60"]) for _ in range(2)]
    try:
        a = procwatch.register_pid("a", pid=sleepers[0].pid, key=table.key)
        b = procwatch.register_pid("b", pid=sleepers[1].pid, key=table.key)
        assert (a.slot, b.slot, table.used_end()) == (0, 1, 2)
        a.unregister()
        _hole(table, 0)                 # the first EMPTY slot is now before b's
        with pytest.raises(procwatch.NameInUse):
            procwatch.register_pid("b", key=table.key)
        with procwatch.register_pid("c", key=table.key) as c:
            assert c.slot == 0 and table.used_end() == 2        # the hole; used_end never goes down
        b.unregister()
    finally:
        for p in sleepers:
            p.kill()
            p.wait()


def test_a_slot_taken_past_used_end_by_an_older_client_is_read_on_into(table):
    """A client that does not keep used_end takes the first EMPTY slot: the pass reads on into it."""
    p = subprocess.Popen(["sleep", "60"])
    try:
        with procwatch.register_pid("new", key=table.key):
            assert table.used_end() == 1
            table.claim(1)                          # an older client: used_end left alone
            table.hset32(abi.H_USED_END, 1)
            table.publish(1, p.pid, start_time(p.pid), b"legacy")
            with pytest.raises(procwatch.NameInUse):
                procwatch.register_pid("legacy", key=table.key)
            with procwatch.register_pid("next", key=table.key) as reg:
                assert reg.slot == 2 and table.used_end() == 3
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize("written", [0xFFFFFFFF, 9, 8])
def test_a_used_end_past_the_table_is_read_as_the_table(table, written):
    """Any group member can write used_end: past the table it means the table, and is never lowered."""
    table.hset32(abi.H_USED_END, written)
    with procwatch.register_pid("x", key=table.key) as reg:
        assert reg.slot == 0 and table.used_end() == written
        with pytest.raises(procwatch.NameInUse):
            procwatch.register_pid("x", pid=os.getppid(), key=table.key)


def test_name_of_dead_process_reuses_its_slot(table):
    p = subprocess.Popen(["sleep", "60"])
    reg = procwatch.register_pid("again", pid=p.pid, key=table.key)
    p.kill()
    p.wait()
    reg2 = procwatch.register_pid("again", key=table.key)
    try:
        assert reg2.slot == reg.slot and table.read_slot(reg2.slot).pid == os.getpid()
    finally:
        reg2.unregister()


def test_full_table_is_clear_and_disturbs_nothing(table):
    regs = [procwatch.register_pid(f"n{i}", key=table.key) for i in range(8)]
    before = bytes(table.buf)
    with pytest.raises(procwatch.TableFull, match="full"):
        procwatch.register_pid("one-too-many", key=table.key)
    assert bytes(table.buf) == before
    for r in regs:
        r.unregister()


def test_ended_slot_is_reused_when_table_is_full(table):
    regs = [procwatch.register_pid(f"n{i}", key=table.key) for i in range(8)]
    regs[3].unregister()
    with procwatch.register_pid("late", key=table.key) as reg:
        assert reg.slot == regs[3].slot
    for r in regs:
        r.unregister()


def test_beat_and_set_heartbeat(table):
    with procwatch.register_pid("beater", key=table.key, heartbeat=0.5) as reg:
        assert table.read_slot(reg.slot).heartbeat_ms == 500
        for _ in range(5):
            reg.beat()
        assert table.read_slot(reg.slot).heartbeat_seq == 5
        reg.set_heartbeat(2)
        assert table.read_slot(reg.slot).heartbeat_ms == 2000
        with pytest.raises(ValueError):
            reg.set_heartbeat(-1)


def test_set_heartbeat_wakes_the_generation(table):
    """An idle hang checker sleeps on the generation (issue 16): set_heartbeat() must bump and wake it."""
    import threading
    from procwatch import futex
    with procwatch.register_pid("late-beater", key=table.key) as reg:
        seen = table.generation
        woken = []
        sleeper = threading.Thread(target=lambda: woken.append(futex.wait(table.generation_address, seen, 10)))
        sleeper.start()
        time.sleep(0.05)                # let it sleep there
        reg.set_heartbeat(1)
        sleeper.join(10)
        assert table.generation == seen + 1 and woken == [True]


def test_peer_unknown_name(table):
    with pytest.raises(procwatch.NameNotFound, match="procwatch status"):
        procwatch.Peer("nobody-here", key=table.key)


def test_peer_without_table(key):
    with pytest.raises(procwatch.SegmentMissing):
        procwatch.Peer("x", key=key)


def test_peer_wait_exit_times_out_while_alive(table):
    with procwatch.register_pid("steady", key=table.key):
        peer = procwatch.Peer("steady", key=table.key)
        assert peer.alive and peer.wait_exit(timeout=0.05) is False


def test_peer_wakes_on_unregister(table):
    """The futex: a waiting thread wakes when the word is cleared."""
    reg = procwatch.register_pid("leaving", key=table.key)
    peer = procwatch.Peer("leaving", key=table.key)
    result = []
    t = threading.Thread(target=lambda: result.append(peer.wait_exit(timeout=30)))
    t.start()
    reg.unregister()
    t.join(30)
    assert result == [True] and peer.pid == 0


@pytest.mark.parametrize("change", ["successor", "renamed", "spurious"])
def test_peer_wait_exit_ends_when_its_pid_leaves_the_slot(table, change):
    """As procwatch_peer_wait() in C: the PID seen when the call began leaving the slot
    ends the wait, even if the waiter never sees the 0 in between (a successor under
    the same name, or the slot given to another name); a wake-up alone does not."""
    from procwatch import futex
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        reg = procwatch.register_pid("watched", key=table.key)
        peer = procwatch.Peer("watched", key=table.key)
        result, tid = [], []

        def waiter():
            tid.append(threading.get_native_id())
            result.append(peer.wait_exit(timeout=30 if change != "spurious" else 0.5))
        t = threading.Thread(target=waiter)
        t.start()
        wait_until(lambda: tid and asleep_in_futex(os.getpid(), tid[0]), 10, "the waiter to sleep in futex()")
        if change == "successor":
            table.u32[table.pid_index(reg.slot)] = sleeper.pid     # one aligned store
        elif change == "renamed":
            table.write_name(reg.slot, b"someone-else")
        futex.wake(table.pid_address(reg.slot))
        t.join(30)
        assert result == [change != "spurious"]
        peer.close()
    finally:
        sleeper.kill()
        sleeper.wait()


_RACER = """
import sys, procwatch
try:
    r = procwatch.register_pid(sys.argv[2], key=int(sys.argv[1], 0))
    print("WON", r.slot, flush=True)
    sys.stdin.readline()
except procwatch.NameInUse:
    print("LOST", flush=True)
"""


def _racers(table, names):
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, hex(table.key), n],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for n in names]
    outs = [p.stdout.readline().split() for p in procs]
    return procs, outs


def test_twenty_concurrent_registrations_get_distinct_slots(key):
    t, _ = Table.create_or_adopt(key, 32)
    procs, outs = _racers(t, [f"c{i}" for i in range(20)])
    try:
        slots = [int(o[1]) for o in outs if o[0] == "WON"]
        assert len(slots) == 20 and len(set(slots)) == 20
        assert sorted(s.pid for s in t.used_slots()) == sorted(p.pid for p in procs)
    finally:
        for p in procs:
            p.stdin.close()
            p.wait()
        t.detach()


def _race_python(tmp_path, key, names):
    barrier = barrier_file(tmp_path, len(names))
    return run_race([[sys.executable, str(PROGS / "racer.py"), "--key", hex(key), "--barrier", str(barrier),
                      "--index", str(i), "--racers", str(len(names)), "--rounds", str(RACE_ROUNDS),
                      "--name", n] for i, n in enumerate(names)])


def _check_raced(rounds):
    """The calls really overlapped, in enough rounds that a missing lock would show."""
    n = overlapped(rounds)
    assert n >= RACE_MIN_OVERLAP * len(rounds), \
        f"the calls overlapped in only {n} of {len(rounds)} rounds: the race proved nothing"


def test_two_clients_racing_for_one_name(table, tmp_path):
    """Two interpreters call register_pid() for one name at the same moment, round
    after round (a barrier in shared memory): the table's semaphore lets exactly
    one win each round, and the table never holds the name twice."""
    rounds = _race_python(tmp_path, table.key, ["contested"] * 2)
    _check_raced(rounds)
    bad = [(r, calls) for r, calls in enumerate(rounds, 1) if sorted(c[0] for c in calls) != ["LOST", "WON"]]
    assert not bad, f"{len(bad)} of {len(rounds)} rounds without exactly one winner: {bad[:3]}"
    assert [s.name for s in table.used_slots()] == ["contested"]


def test_two_clients_registering_at_once_get_distinct_slots(table, tmp_path):
    """Fresh names each round: every call allocates a slot (once the table is
    full, an ended one), and two calls at once must never get the same one."""
    rounds = _race_python(tmp_path, table.key, ["left%d", "right%d"])
    _check_raced(rounds)
    bad = [(r, calls) for r, calls in enumerate(rounds, 1)
           if [c[0] for c in calls] != ["WON", "WON"] or calls[0][1] == calls[1][1]]
    assert not bad, f"{len(bad)} of {len(rounds)} rounds without two slots: {bad[:3]}"
    assert {s.name for s in table.used_slots()} >= {f"left{RACE_ROUNDS}", f"right{RACE_ROUNDS}"}


def test_monitor_alive_without_service(table):
    assert procwatch.monitor_alive(table.key) is False


def test_import_procwatch_loads_no_pyroute2_or_systemd():
    code = "import sys, procwatch; print(sorted(m for m in sys.modules if m.split('.')[0] in ('pyroute2', 'systemd')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_import_procwatch_is_cheap():
    """A client pays for every module at start-up: no dataclasses (~9 ms, once only for
    segment.Slot), no platform, no logging.handlers, no argparse (issue 12)."""
    heavy = ("dataclasses", "platform", "argparse", "logging.handlers", "tomllib")
    code = f"import sys, procwatch; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_monitor_alive_never_raises_for_a_table_it_cannot_trust(key, caplog):
    """A foreign segment at the key (SegmentCorrupt) is False and one logged line, not an exception."""
    shm = sysv_ipc.SharedMemory(key, sysv_ipc.IPC_CREX, size=4096, init_character=b"x")
    try:
        with caplog.at_level(logging.ERROR, logger="procwatch.client"):
            assert procwatch.monitor_alive(key) is False
        assert any("cannot tell whether a service watches it" in r.getMessage() for r in caplog.records)
    finally:
        shm.detach()
        shm.remove()


def test_unregister_never_raises_when_the_lock_stays_taken(table, caplog):
    """TableBusy inside Registration.__exit__ is logged: a client never crashes because of procwatch."""
    reg = procwatch.register_pid("busy", key=table.key)
    assert table.try_lock()                 # held by "another client" for longer than the lock timeout
    try:
        with caplog.at_level(logging.ERROR, logger="procwatch.client"):
            reg.__exit__(None, None, None)
    finally:
        table.unlock()
    assert any("cannot unregister busy" in r.getMessage() for r in caplog.records)
    assert table.pid(reg.slot) == os.getpid()   # still registered: the service ends it at exit


def test_default_name_reads_comm_and_closes_it(table):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = procwatch.register_pid(key=table.key)
        reg.unregister()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]


def test_control_characters_are_refused_and_escaped(table):
    with pytest.raises(ValueError, match="control character"):
        procwatch.register_pid("two\nlines", key=table.key)
    # A writer that bypasses the client still cannot put a control byte in a log or a terminal.
    assert abi.decode_name(b"a\nb\x1b[31m\xff\0ignored") == "a\\x0ab\\x1b[31m\\xff"


def test_peer_alive_agrees_with_pid_as_the_slot_changes_hands(key):
    """Peer.alive reads the word itself (it is on every hot path): it must say
    exactly what ``pid != 0`` says, through re-registration and slot reuse."""
    t, _ = Table.create_or_adopt(key, 1)
    procs = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    try:
        reg = procwatch.register_pid("dp", pid=procs[0].pid, key=key)
        peer = procwatch.Peer("dp", key=key)
        assert peer.alive and peer.pid == procs[0].pid
        reg.unregister()
        assert not peer.alive and peer.pid == 0
        reg = procwatch.register_pid("dp", pid=procs[1].pid, key=key)      # same name: same slot
        assert peer.alive and peer.pid == procs[1].pid
        reg.unregister()
        other = procwatch.register_pid("other", pid=procs[2].pid, key=key)  # the only slot, reused
        assert t.u32[t.pid_index(0)] == procs[2].pid
        assert not peer.alive and peer.pid == 0
        other.unregister()
        peer.close()
    finally:
        for p in procs:
            p.kill()
            p.wait()
        t.detach()
