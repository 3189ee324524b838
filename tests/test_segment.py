"""The SysV segment: creation, adoption, validation, and error translation."""

import os
import signal
import time

import pytest
import sysv_ipc

from procwatch import abi, native
from procwatch.errors import SegmentCorrupt, SegmentMissing
from procwatch.segment import Table, resolve_key


def test_new_table_is_zeroed_not_spaces(key):
    """sysv_ipc fills new segments with spaces unless told; a table must start at 0."""
    t, adopted = Table.create_or_adopt(key, 8)
    try:
        assert not adopted
        body = bytes(t.buf[abi.HEADER_SIZE:])
        assert body == bytes(len(body))
        assert t.pid_words() == [0] * 8
        h = t.header()
        assert h["slot_count"] == 8 and h["generation"] == 0
        assert bytes(t.buf[:8]) == abi.MAGIC
    finally:
        t.detach()


def test_table_mode_is_0660(key):
    t, _ = Table.create_or_adopt(key, 4)
    try:
        assert sysv_ipc.SharedMemory(key).mode & 0o777 == 0o660
        assert sysv_ipc.Semaphore(key).mode & 0o777 == 0o660
    finally:
        t.detach()


def test_adopt_keeps_registrations(key):
    t, _ = Table.create_or_adopt(key, 4)
    t.set64(2, abi.S_START_TIME, 1234)
    t.set32(2, abi.S_STATE, abi.State.ALIVE)
    t.u32[t.pid_index(2)] = os.getpid()
    t.detach()
    t2, adopted = Table.create_or_adopt(key, 16)   # a different --slots is not applied
    try:
        assert adopted and t2.slot_count == 4
        s = t2.read_slot(2)
        assert (s.pid, s.start_time, s.state) == (os.getpid(), 1234, abi.State.ALIVE)
    finally:
        t2.detach()


def test_attach_missing_is_segment_missing(key):
    with pytest.raises(SegmentMissing) as e:
        Table.attach(key)
    assert f"{key:#010x}" in str(e.value) and "procwatch serve" in str(e.value)


@pytest.mark.parametrize("damage, why", [
    (lambda b: b.__setitem__(slice(0, 8), b"NOTPWTAB"), "magic"),
    (lambda b: b.__setitem__(slice(8, 12), (99).to_bytes(4, "little")), "version 99"),
    (lambda b: b.__setitem__(slice(16, 20), (64).to_bytes(4, "little")), "sizes"),
    (lambda b: b.__setitem__(slice(20, 24), (10**6).to_bytes(4, "little")), "slot count"),
])
def test_corrupt_header_names_key_and_ipcrm(key, damage, why):
    t, _ = Table.create_or_adopt(key, 4)
    damage(t.buf)
    t.detach()
    for opener in (lambda: Table.attach(key), lambda: Table.create_or_adopt(key, 4)):
        with pytest.raises(SegmentCorrupt) as e:
            opener()
        msg = str(e.value)
        assert why in msg and f"ipcrm -M {key:#010x}" in msg and "\n" not in msg


def test_foreign_small_segment_is_corrupt(key):
    shm = sysv_ipc.SharedMemory(key, sysv_ipc.IPC_CREX, size=16)
    shm.detach()
    with pytest.raises(SegmentCorrupt, match="smaller than"):
        Table.attach(key)


def test_resolve_key_from_env(monkeypatch):
    monkeypatch.setenv("PROCWATCH_KEY", "0x7e001234")
    assert resolve_key() == 0x7E001234
    assert resolve_key(5) == 5
    monkeypatch.setenv("PROCWATCH_KEY", "banana")
    with pytest.raises(ValueError, match="PROCWATCH_KEY"):
        resolve_key()
    monkeypatch.delenv("PROCWATCH_KEY")
    assert resolve_key() == abi.DEFAULT_KEY


def test_lock_is_undone_when_holder_dies(key):
    """SEM_UNDO: a client killed while holding the lock does not deadlock the table."""
    t, _ = Table.create_or_adopt(key, 4)
    try:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                       # child: take the lock, then die holding it
            try:
                os.close(r)
                c = Table.attach(key)
                assert c.try_lock()
                os.write(w, b"x")
                signal.pause()             # until killed (os has no pause())
            finally:
                os._exit(0)
        os.close(w)
        assert os.read(r, 1) == b"x"
        assert not t.try_lock()            # the child holds it
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        with t.lock(timeout=2):            # the kernel released it
            pass
    finally:
        t.detach()


def test_record_end_never_lands_on_a_reregistration(key):
    """The service zeroes a word, a client re-registers the name into the same slot before
    the service writes the record: the record must not be written over the newcomer."""
    import subprocess

    import procwatch
    t, _ = Table.create_or_adopt(key, 2)
    a, b = subprocess.Popen(["sleep", "60"]), subprocess.Popen(["sleep", "60"])
    try:
        old = procwatch.register_pid("same", pid=a.pid, key=key)
        old_start = t.get64(old.slot, abi.S_START_TIME)
        assert t.clear_pid(old.slot, a.pid)                       # the service's first step
        new = procwatch.register_pid("same", pid=b.pid, key=key)  # a peer's restart, at once
        assert new.slot == old.slot
        assert t.record_end(old.slot, abi.State.EXITED, abi.Cause.EXITED, 9, start_time=old_start) is False
        s = t.read_slot(new.slot)
        assert (s.pid, s.state, s.exit_status, s.cause) == (b.pid, abi.State.ALIVE, -1, abi.Cause.NONE)
        # ... while a record for a slot nobody took is written.
        new_start = t.get64(new.slot, abi.S_START_TIME)
        assert t.clear_pid(new.slot, b.pid)
        assert t.record_end(new.slot, abi.State.EXITED, abi.Cause.EXITED, 9, start_time=new_start) is True
        assert t.read_slot(new.slot).state == abi.State.EXITED and t.header()["exits"] == 1
    finally:
        for p in (a, b):
            p.kill()
            p.wait()
        t.detach()


def test_record_end_waits_for_the_table_lock(key):
    """lock_timeout=0 (the detector thread): a client holding the lock means 'later', not a
    write next to its half-done registration."""
    t, _ = Table.create_or_adopt(key, 1)
    try:
        t.set32(0, abi.S_STATE, abi.State.ALIVE)          # an ALIVE slot whose word was zeroed
        assert t.try_lock()                               # a client, mid-registration
        try:
            assert t.record_end(0, abi.State.EXITED, abi.Cause.EXITED, 0, lock_timeout=0) is None
            assert t.get32(0, abi.S_STATE) == abi.State.ALIVE
        finally:
            t.unlock()
        assert t.record_end(0, abi.State.EXITED, abi.Cause.EXITED, 0, lock_timeout=0) is True
        assert t.get32(0, abi.S_STATE) == abi.State.EXITED
        assert t.try_lock()                               # and the record gave the lock back
        t.unlock()
    finally:
        t.detach()


# -- the PID word's two rules: cleared first, published last ------------------------
# Table's operations are the only writers of slot fields, so each rule is held
# here to the order of the stores they make.  _Stores wraps the table's views of
# the real segment and notes the byte range of each store, in order.

class _Stores:
    def __init__(self, view, width, log):
        self.view, self.width, self.log = view, width, log

    def __getitem__(self, k):
        return self.view[k]

    def __setitem__(self, k, value):
        self.view[k] = value
        if isinstance(k, slice):
            self.log.append((k.start, k.stop, "slice", bytes(value)))
        else:
            self.log.append((k * self.width, (k + 1) * self.width, self.width, value))


@pytest.fixture
def recorded(key):
    """A fresh 4-slot table whose stores are noted in ``t.stores`` (start, end, width, value)."""
    t, _ = Table.create_or_adopt(key, 4)
    views = t.u32, t.u64, t.buf
    t.stores = []
    t.u32, t.u64, t.buf = _Stores(t.u32, 4, t.stores), _Stores(t.u64, 8, t.stores), _Stores(t.buf, 1, t.stores)
    t.peer = Table.attach(key)              # reads through a second, plain attachment
    yield t
    t.u32, t.u64, t.buf = views
    t.peer.detach()
    t.detach()


def _slot_stores(t, i):
    """The stores into slot ``i``, in order, as (start, end, width, value) relative to the slot."""
    lo = abi.slot_offset(i)
    return [(a - lo, b - lo, w, v) for a, b, w, v in t.stores if a < lo + abi.SLOT_SIZE and b > lo]


def _pid_word_rule(stores):
    """Every store touching the PID word is one aligned 4-byte store of the whole word."""
    for a, b, w, _ in stores:
        if a < abi.S_PID + 4 and b > abi.S_PID:
            assert (a, b, w) == (abi.S_PID, abi.S_PID + 4, 4), f"PID word written as {(a, b, w)}"


def _publish(t, i, pid=4242, name=b"alpha"):
    t.claim(i)
    t.publish(i, pid, 777, name, heartbeat_ms=100, owner_uid=0)


def test_publish_writes_the_pid_word_last(recorded):
    t = recorded
    _publish(t, 1)
    stores = _slot_stores(t, 1)
    _pid_word_rule(stores)
    assert stores[-1][:2] == (abi.S_PID, abi.S_PID + 4) and stores[-1][3] == 4242
    assert [s for s in stores if s[0] == abi.S_PID and s[3] != 0] == [stores[-1]]
    s = t.peer.read_slot(1)
    assert (s.pid, s.start_time, s.raw_name, s.state) == (4242, 777, b"alpha", abi.State.ALIVE)


def test_claim_clears_the_pid_word_first(recorded):
    t = recorded
    _publish(t, 2)
    t.stores.clear()
    t.claim(2)
    stores = _slot_stores(t, 2)
    _pid_word_rule(stores)
    assert stores[0] == (abi.S_PID, abi.S_PID + 4, 4, 0)
    assert t.pid(2) == 0 and t.state(2) == abi.State.CLAIMING


def test_release_clears_the_pid_word_first(recorded):
    t = recorded
    _publish(t, 3)
    t.stores.clear()
    assert not t.release(3, 999)            # not its PID: nothing written
    assert _slot_stores(t, 3) == []
    assert t.release(3, 4242)
    stores = _slot_stores(t, 3)
    _pid_word_rule(stores)
    assert stores[0] == (abi.S_PID, abi.S_PID + 4, 4, 0)
    assert t.state(3) == abi.State.UNREGISTERED and t.cause(3) == abi.Cause.UNREGISTERED


def test_service_end_clears_the_pid_word_first(recorded):
    t = recorded
    _publish(t, 0)
    t.stores.clear()
    assert t.clear_pid(0, 4242, pend=True)
    assert t.peer.pid(0) == 0
    if native.AVAILABLE:
        # The clear is the C extension's compare-and-swap (the one the hot step does), which
        # these recorded views do not see: nothing else in the slot was stored before it.
        assert _slot_stores(t, 0) == []
    assert not t.clear_pid(0, 4242)         # already ended: no second report
    assert t.record_end(0, abi.State.EXITED, abi.Cause.EXITED, 3 << 8, 12, start_time=777)
    stores = _slot_stores(t, 0)
    _pid_word_rule(stores)
    if not native.AVAILABLE:
        assert stores[0] == (abi.S_PID, abi.S_PID + 4, 4, 0)
    s = t.peer.read_slot(0)
    assert (s.pid, s.state, s.exit_status, s.latency_us) == (0, abi.State.EXITED, 3 << 8, 12)
    assert t.take_pending_ends() == [(0, 4242)]     # noted before the word was zeroed, never logged


def test_note_checks_stores_only_where_the_pid_still_is(key):
    """The heartbeat pass's stores: a slot re-registered since the pass read it is left alone."""
    import types
    t, _ = Table.create_or_adopt(key, 4)
    try:
        for i, pid in ((0, 100), (1, 101)):
            t.claim(i)
            t.publish(i, pid, 1, b"n%d" % i, now_ns=5)
        beat = [types.SimpleNamespace(i=0, pid=100), types.SimpleNamespace(i=1, pid=999)]
        miss = [types.SimpleNamespace(i=0, pid=100, misses=2), types.SimpleNamespace(i=1, pid=999, misses=7)]
        stale = t.note_checks(beat, miss, 12345)
        assert stale == [beat[1], miss[1]]
        s0, s1 = t.read_slot(0), t.read_slot(1)
        assert (s0.last_beat_ns, s0.misses) == (12345, 2)
        assert (s1.last_beat_ns, s1.misses) == (5, 0)          # untouched: not its PID
    finally:
        t.detach()


def test_nudge_generation_moves_it_so_a_late_sleeper_does_not_sleep(table):
    """The service's stop moves the generation, not only wakes it: a waiter that looked before the
    nudge and sleeps after it (a bare wake would be lost on it) finds the word moved at once."""
    from procwatch import futex
    seen = table.generation
    table.nudge_generation()
    assert table.generation == (seen + 1) & 0xFFFFFFFF
    t0 = time.monotonic()
    assert futex.wait(table.generation_address, seen, 5.0) is True      # not a timeout
    assert time.monotonic() - t0 < 1.0
