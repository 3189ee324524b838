"""Fuzzing: hostile and broken bytes in a live table, and in connector messages.

Against a running service (root): random slots, torn writes, forged
registrations naming live processes this test owns (and PID 1, the service),
with random heartbeats, hang actions, signals and owner uids, states out of
range, random header bytes.  The service must never crash, never signal
anybody (every target is asserted alive after each example), settle to a
table with no PID word it cannot vouch for, and report what it can recognise
as corruption with an Event.CORRUPT line.

The test's own process is not a target: it has the table attached and runs as
root, so a forged slot naming it with owner_uid 0 is, by the threat model of
docs/RELIABILITY.md, one the hang kill may act on.

The decoders of connector messages are fuzzed too: short, truncated and
unknown messages decode to None, never to an exception.
"""

import collections
import os
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from conftest import require_root, wait_until
from procwatch import abi, connector, futex, procfs
from pwrel import attached

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "cn_proc"
SLOTS = 8
# One service serves every example, so a failing example cannot be replayed
# against the same state: no shrinking, no example database.
FUZZ = settings(max_examples=40, deadline=None, database=None,
                phases=[Phase.explicit, Phase.generate],
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# -- connector decoding (no root needed) ---------------------------------------------
FIXTURES = [bytearray((FIX / n).read_bytes()) for n in sorted(os.listdir(FIX)) if n.endswith(".bin")]


def _check_decoded(buf, n):
    e = connector.decode_exit(buf, n)
    assert e is None or (len(e) == 4 and all(isinstance(x, int) for x in e))
    if e is not None:
        assert n >= connector.MIN_EXIT_LEN
    a = connector.decode_ack(buf, n)
    assert a is None or (len(a) == 3 and all(isinstance(x, int) for x in a))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_fuzz_decode_random_bytes(raw):
    buf = bytearray(raw)
    for n in {0, len(buf) // 2, len(buf)}:
        _check_decoded(buf, n)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(range(len(FIXTURES))), st.integers(0, 128), st.binary(max_size=8),
       st.integers(0, 127))
def test_fuzz_decode_truncated_and_mutated_fixtures(which, cut, patch, at):
    """Real kernel messages, cut short at any length and with any bytes overwritten."""
    buf = bytearray(FIXTURES[which])
    buf[at:at + len(patch)] = patch
    _check_decoded(buf, min(cut, len(buf)))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 0xFFFFFFFF).filter(lambda w: w != connector.PROC_EVENT_EXIT))
def test_fuzz_unknown_event_kinds_are_not_exits(what):
    buf = bytearray(FIXTURES[0].ljust(connector.MIN_EXIT_LEN, b"\0"))
    struct.pack_into("=I", buf, connector.EXIT_OFFSET, what)
    assert connector.decode_exit(buf, len(buf)) is None


# -- a live table ---------------------------------------------------------------------------
@pytest.fixture
def targets():
    """Live processes the fuzzer points forged slots at; asserted alive after every example."""
    procs = [subprocess.Popen(["sleep", "600"]) for _ in range(3)]
    yield procs
    for p in procs:
        p.kill()
        p.wait()


PID_KINDS = ("target0", "target1", "target2", "service", "init", "zero", "random", "over_max")
u32 = st.integers(0, 0xFFFFFFFF)
forged = st.tuples(
    st.just("forged"), st.integers(0, SLOTS - 1), st.sampled_from(PID_KINDS),
    st.one_of(st.just(abi.State.ALIVE), st.sampled_from(list(abi.State)), u32),     # state
    st.sampled_from([True, True, False]),                                            # the right start time?
    st.one_of(st.just(b"forged"), st.binary(max_size=abi.NAME_SIZE)),                # name
    st.tuples(st.one_of(st.integers(1, 50), st.integers(1, 50), u32),                # heartbeat ms
              st.one_of(st.sampled_from(list(abi.HangAction)), u32),                 # hang action
              st.one_of(st.sampled_from([0, 9, 15, 6, 10]), u32),                    # hang signal
              st.one_of(st.just(0), u32)),                                           # owner uid
    st.booleans())                                                                   # PID word first?
# A forgery the service cannot tell from a registration: the hang kill must refuse it.
plausible = st.tuples(
    st.just("forged"), st.integers(0, SLOTS - 1), st.sampled_from(PID_KINDS[:5]),
    st.just(abi.State.ALIVE), st.just(True), st.just(b"plausible"),
    st.tuples(st.integers(1, 50), st.one_of(st.sampled_from(list(abi.HangAction)), u32),
              st.one_of(st.sampled_from([0, 9, 15, 6, 10]), u32), st.one_of(st.just(0), u32)),
    st.booleans())
write = st.one_of(
    plausible,
    st.tuples(st.just("slot"), st.integers(0, SLOTS - 1), st.binary(min_size=abi.SLOT_SIZE,
                                                                      max_size=abi.SLOT_SIZE)),
    st.tuples(st.just("torn"), st.integers(0, SLOTS - 1), st.integers(0, abi.SLOT_SIZE - 1),
              st.binary(min_size=1, max_size=24)),
    forged, forged,
)


def _resolve(kind, targets, svc_pid, rnd):
    return {"service": svc_pid, "init": 1, "zero": 0,
            "random": rnd % procfs.pid_max(), "over_max": procfs.pid_max() + rnd % 1000,
            }.get(kind) if not kind.startswith("target") else targets[int(kind[-1])].pid


def _apply(t, w, targets, svc_pid):
    kind, i = w[0], w[1]
    off = abi.slot_offset(i)
    if kind == "slot":
        t.buf[off:off + abi.SLOT_SIZE] = w[2]
    elif kind == "torn":
        at, data = w[2], w[3][:abi.SLOT_SIZE - w[2]]
        t.buf[off + at:off + at + len(data)] = data
    else:
        _, _, pid_kind, state, right_start, name, (hb_ms, action, sig, uid), pid_first = w
        pid = _resolve(pid_kind, targets, svc_pid, hb_ms)
        start = procfs.start_time(pid) if pid and right_start else (hb_ms << 7) | 1
        if pid_first:
            t.u32[t.pid_index(i)] = pid
        t.set32(i, abi.S_STATE, state)
        t.set64(i, abi.S_START_TIME, start or 0)
        t.buf[off + abi.S_NAME:off + abi.S_NAME + abi.NAME_SIZE] = name.ljust(abi.NAME_SIZE, b"\0")
        t.set32(i, abi.S_HEARTBEAT_MS, hb_ms)
        t.set32(i, abi.S_HEARTBEAT_ACTION, action)
        t.set32(i, abi.S_HEARTBEAT_SIGNAL, sig)
        t.set32(i, abi.S_OWNER_UID, uid)
        t.u32[t.pid_index(i)] = pid


def _vouched(t, i):
    """Whether slot i's PID word is 0 or names a live process by its true start time.

    (A forged slot that names a live process correctly is a registration
    like any other: the service watches it, and never signals it.)
    """
    pid = t.u32[t.pid_index(i)]
    if pid == 0:
        return True
    return (t.get32(i, abi.S_STATE) in (abi.State.ALIVE, abi.State.HUNG)
            and procfs.start_time(pid) == t.get64(i, abi.S_START_TIME))


def _utf8(raw):
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _recognisable(slot_bytes):
    """Whether the final bytes of a slot are corruption the service can recognise."""
    pid, state = struct.unpack_from("=II", slot_bytes, 0)
    if pid == 0:
        return state > max(abi.State)
    return not procfs.valid_pid(pid) or state not in (abi.State.ALIVE, abi.State.HUNG)


def _corrupt_lines(svc):
    return collections.Counter(e.get("slot") for e in svc.events("corrupt"))


@require_root()
@settings(FUZZ, max_examples=60)
@given(writes=st.lists(write, min_size=1, max_size=4), bump=st.booleans())
def test_fuzz_slots_never_crash_never_signal(key, service, targets, writes, bump):
    svc = _fuzz_service(service, key)
    before = _corrupt_lines(svc)
    with attached(key) as t:
        for w in writes:
            _apply(t, w, targets, svc.pid)
        final = {w[1]: bytes(t.buf[abi.slot_offset(w[1]):abi.slot_offset(w[1] + 1)]) for w in writes}
        if bump:                                   # as a client would after a registration
            t.hset32(abi.H_GENERATION, t.generation + 1)
            futex.wake(t.address + abi.H_GENERATION)
        wait_until(lambda: all(_vouched(t, i) for i in range(SLOTS)), 10,
                   "the service to end or clear every slot it cannot vouch for",
                   detail=lambda: f"{[t.read_slot(i) for i in range(SLOTS)]}\n{svc.log()[-2000:]}")
        # Slots it keeps watching with a short heartbeat nobody beats: the hang kill
        # runs for each, and must refuse (no target attached the table).
        # (A name that is not UTF-8 may still be cleared as corrupt: not counted.)
        due = {(str(i), str(t.u32[t.pid_index(i)])) for i in final
               if t.u32[t.pid_index(i)] and 0 < t.get32(i, abi.S_HEARTBEAT_MS) <= 50
               and _utf8(t.read_slot(i).raw_name)}
    wait_until(lambda: due <= {(e.get("slot"), e.get("pid")) for e in svc.events("hung")}, 10,
               f"hung lines for {sorted(due)}", detail=lambda: svc.log()[-2000:])
    assert not svc.events("killed"), svc.log()[-2000:]
    expect = {str(i) for i, b in final.items() if _recognisable(b)}
    wait_until(lambda: all(_corrupt_lines(svc)[i] > before[i] for i in expect), 10,
               f"CORRUPT lines for slots {sorted(expect)}", detail=lambda: svc.log()[-2000:])
    for p in targets:
        assert p.poll() is None, f"target {p.pid} was signalled"
    assert svc.proc.poll() is None, svc.log()[-3000:]
    assert "Traceback" not in svc.log(), svc.log()[-3000:]


@require_root()
@FUZZ
@given(patches=st.lists(st.tuples(st.integers(0, 63), st.binary(min_size=1, max_size=16)),
                        min_size=1, max_size=4))
def test_fuzz_header_is_put_back_and_reported(key, service, patches):
    svc = _fuzz_service(service, key)
    with attached(key) as t:
        good = bytes(t.buf[:abi.HEADER_STATIC.size])
        owned = (t.hget32(abi.H_SERVICE_PID), t.hget64(abi.H_SERVICE_START_TIME))
        # Counted before the damage: the service may put it back (and say so) at once.
        before = len(svc.events("corrupt"))
        for at, data in patches:
            t.buf[at:at + len(data)] = data[:abi.HEADER_SIZE - at]
        damaged = (bytes(t.buf[:abi.HEADER_STATIC.size]) != good or
                   (t.hget32(abi.H_SERVICE_PID), t.hget64(abi.H_SERVICE_START_TIME)) != owned)
        assume(damaged)
        wait_until(lambda: bytes(t.buf[:abi.HEADER_STATIC.size]) == good and
                   (t.hget32(abi.H_SERVICE_PID), t.hget64(abi.H_SERVICE_START_TIME)) == owned,
                   10, "the header to be put back", detail=lambda: svc.log()[-2000:])
    # This example's line: one from an earlier example would prove nothing.
    wait_until(lambda: any("header" in e.get("problem", "") + e["message"]
                           for e in svc.events("corrupt")[before:]), 10,
               "a CORRUPT line for the header", detail=lambda: svc.log()[-2000:])
    assert svc.proc.poll() is None and "Traceback" not in svc.log(), svc.log()[-3000:]


_services = {}


def _fuzz_service(service, key):
    """One service per test function, shared by its examples (hypothesis calls the body many times)."""
    svc = _services.get(key)
    if svc is None or svc.proc.poll() is not None:
        svc = _services[key] = service("--slots", str(SLOTS), "--reconcile-interval", "0.05")
    return svc

