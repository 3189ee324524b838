"""The proc connector: decoding recorded kernel bytes, and the real socket (root)."""

import collections
import errno
import fcntl
import os
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

from conftest import require_root
from procwatch import connector

FIX = Path(__file__).parent / "fixtures" / "cn_proc"


def load(name):
    data = (FIX / name).read_bytes()
    return bytearray(data), len(data)


def test_decode_normal_exit():
    tgid, status, ts, pid = connector.decode_exit(*load("exit_code3.bin"))
    assert (tgid, pid) == (30458, 30458)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 3
    assert ts > 0


def test_decode_sigkill_exit():
    tgid, status, _, _ = connector.decode_exit(*load("exit_sigkill.bin"))
    assert tgid == 30459
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_decode_sigsegv_exit():
    _, status, _, _ = connector.decode_exit(*load("exit_sigsegv.bin"))
    assert os.WTERMSIG(status) == signal.SIGSEGV and not os.WCOREDUMP(status)


def test_fork_event_is_not_an_exit():
    assert connector.decode_exit(*load("fork.bin")) is None


def test_ack_decodes_cookie_and_error():
    seq, ack, err = connector.decode_ack(*load("ack_ok.bin"))
    assert ack == 0x1234567 + 1 and err == 0
    assert connector.decode_ack(*load("exit_code3.bin")) is None


@pytest.mark.parametrize("cut", [0, 1, 16, 36, 52, 59])
def test_truncated_messages_decode_to_none(cut):
    buf, _ = load("exit_code3.bin")
    assert connector.decode_exit(buf, cut) is None
    assert connector.decode_ack(buf, min(cut, 55)) is None


def test_subscribe_request_layout():
    """The filtered request carries struct proc_input; the legacy one a bare op."""
    filtered = connector.subscribe_request(connector.PROC_CN_MCAST_LISTEN, 5, True)
    legacy = connector.subscribe_request(connector.PROC_CN_MCAST_LISTEN, 5, False)
    assert len(filtered) == 16 + 20 + 8 and len(legacy) == 16 + 20 + 4
    assert struct.unpack_from("=I", filtered, 0)[0] == len(filtered)
    idx, val, _seq, ack, length, _ = struct.unpack_from("=IIIIHH", filtered, 16)
    assert (idx, val, ack, length) == (1, 1, 5, 8)
    assert struct.unpack_from("=II", filtered, 36) == (1, 0x80000000)


def test_kernel_filter_version_probe():
    assert connector.kernel_has_filter("6.6.0")
    assert connector.kernel_has_filter("6.18.44-fc")
    assert not connector.kernel_has_filter("6.5.13")
    assert not connector.kernel_has_filter("5.15.0-91-generic")
    assert not connector.kernel_has_filter("garbage")


@require_root()
def test_real_subscription_sees_a_child_exit():
    conn = connector.ProcConnector()
    try:
        assert conn.mode == ("filtered" if connector.kernel_has_filter() else "legacy")
        assert conn.rcvbuf_effective >= connector.DEFAULT_RCVBUF
        child = subprocess.Popen(["sh", "-c", "exit 5"])
        buf = bytearray(1024)
        deadline = time.monotonic() + 10
        seen = None
        while time.monotonic() < deadline and seen is None:
            try:
                n = conn.sock.recv_into(buf)
            except BlockingIOError:
                continue
            except OSError:         # ENOBUFS on a busy machine: keep reading
                continue
            ev = connector.decode_exit(buf, n)
            if ev and ev[0] == child.pid:
                seen = ev
        child.wait()
        assert seen is not None, "the child's exit event never arrived"
        assert os.WEXITSTATUS(seen[1]) == 5
        # The kernel timestamp is CLOCK_MONOTONIC (ktime_get_ns): it is in the past.
        assert 0 < seen[2] <= time.monotonic_ns()
    finally:
        conn.close()


# include/uapi/linux/cn_proc.h: enum what
PROC_EVENT_FORK = 0x00000001
PROC_EVENT_EXEC = 0x00000002
STORM_EXECS = 400


def _read_events(conn, until, deadline_s=30.0):
    """Read (what, tgid) of each message until ``until(what, tgid)`` is true.

    ENOBUFS (the machine is busy) is not a failure here: it is counted, and
    the reading goes on.
    """
    buf = bytearray(1024)
    seen, overflows = [], 0
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            n = conn.sock.recv_into(buf)
        except BlockingIOError:
            continue
        except OSError as e:
            if e.errno != errno.ENOBUFS:
                raise
            overflows += 1
            continue
        if n < connector.EXIT_OFFSET + 4:
            continue
        what = struct.unpack_from("=I", buf, connector.EXIT_OFFSET)[0]
        # Every kind of event names a process at offset 52 (fork: the parent).
        tgid = struct.unpack_from("=I", buf, 56)[0] if n >= 60 else 0
        seen.append((what, tgid))
        if until(what, tgid):
            return seen, overflows
    pytest.fail(f"the awaited event did not arrive within {deadline_s:g} s "
                f"({len(seen)} messages, {overflows} overflows)")


@require_root()
def test_exit_only_subscriber_receives_no_fork_or_exec_event():
    """The filter checked by the kernel, not by our own bookkeeping: under a storm
    of fork + exec + exit, a subscriber in ``filtered`` mode must be sent exits
    and nothing else (cn_filter() drops the rest before they are queued).

    The subscription is acknowledged in legacy mode first, so events queued
    before the filtered request may be of any kind: a marker child, started
    once the constructor returned, separates them; everything after its exit
    was filtered.
    """
    if not connector.kernel_has_filter():
        pytest.skip(f"kernel {os.uname().release} < 6.6 has no exit-only filter")
    conn = connector.ProcConnector()
    try:
        assert conn.mode == "filtered"
        marker = subprocess.Popen(["true"])
        marker.wait()
        _read_events(conn, lambda what, tgid: what == connector.PROC_EVENT_EXIT and tgid == marker.pid)
        # A storm of its own: each /bin/true is a fork, an exec and an exit.
        storm = subprocess.Popen(["sh", "-c", f'i=0; while [ $i -lt {STORM_EXECS} ]; do /bin/true; '
                                               f'i=$((i+1)); done'])
        storm.wait()
        seen, overflows = _read_events(
            conn, lambda what, tgid: what == connector.PROC_EVENT_EXIT and tgid == storm.pid)
    finally:
        conn.close()
    kinds = collections.Counter(what for what, _ in seen)
    assert kinds[PROC_EVENT_FORK] == 0 and kinds[PROC_EVENT_EXEC] == 0, \
        f"an exit-only subscriber was sent {kinds[PROC_EVENT_FORK]} forks and {kinds[PROC_EVENT_EXEC]} execs"
    assert set(kinds) == {connector.PROC_EVENT_EXIT}, {hex(k): n for k, n in kinds.items()}
    # The storm was there to be filtered: its exits came through (the ones not lost to ENOBUFS).
    assert kinds[connector.PROC_EVENT_EXIT] >= (STORM_EXECS if not overflows else 1), (kinds, overflows)


@require_root()
def test_socket_blocks_so_an_idle_detector_sleeps():
    """recv_into must block (SO_RCVTIMEO bounds the wait).  A non-blocking socket
    turns the detector into a busy loop: it did, at 100 % CPU, while the socket
    was a dup of pyroute2's O_NONBLOCK one (issue 7)."""
    conn = connector.ProcConnector()
    try:
        assert conn.sock.getblocking()
        assert not fcntl.fcntl(conn.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
    finally:
        conn.close()


@require_root()
def test_connector_loads_no_pyroute2():
    """The service pays for what it uses: importing pyroute2 costs ~80 ms and ~18 MB."""
    code = ("import sys, procwatch.service, procwatch.connector as c; c.ProcConnector().close(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'pyroute2'))")
    out = subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).parent.parent, timeout=60)
    assert out.stdout.strip() == "[]", out


_UNPRIVILEGED_PROBE = """
import os, subprocess
import procwatch.connector as c
try:
    conn = c.ProcConnector()
except Exception as e:
    print(type(e).__name__, e)
    raise SystemExit
child = subprocess.Popen(["true"])
buf = bytearray(1024)
for _ in range(100000):
    try:
        n = conn.sock.recv_into(buf)
    except OSError:
        continue
    ev = c.decode_exit(buf, n)
    if ev and ev[0] == child.pid:
        print("SAW", conn.mode)
        break
"""


@require_root()
def test_unprivileged_subscriber():
    """Without CAP_NET_ADMIN: kernels >= 6.6 let any user in the initial
    namespaces subscribe (the series that added filtering also opened the
    connector to non-root), so the subscriber must really see exits; older
    kernels refuse the multicast bind, and that must be one clear line."""
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                          os.sys.executable, "-c", _UNPRIVILEGED_PROBE], capture_output=True,
                         text=True, cwd=Path(__file__).parent.parent, timeout=60)
    if connector.kernel_has_filter():
        assert out.stdout.strip() == "SAW filtered", out
    else:
        assert out.stdout.startswith("ConnectorUnavailable"), out
        assert "CAP_NET_ADMIN" in out.stdout and "--backend pidfd" in out.stdout
        assert len(out.stdout.strip().splitlines()) == 1


# pyroute2 is the reference for the connector's constants and message layout:
# the service owns its socket and hot decode (pyroute2's eager __init__ costs
# ~22 MB and ~130 ms, see connector.py), so these tests hold the two together.

def test_constants_agree_with_pyroute2():
    from pyroute2.netlink.connector import cn_proc
    for name in ("CN_IDX_PROC", "CN_VAL_PROC", "PROC_CN_MCAST_LISTEN", "PROC_CN_MCAST_IGNORE",
                 "PROC_EVENT_NONE", "PROC_EVENT_EXIT"):
        assert getattr(connector, name) == getattr(cn_proc, name), name
    assert connector.EXIT_OFFSET == cn_proc.ProcEventMarshal.key_offset


@pytest.mark.parametrize("name", ["exit_code3.bin", "exit_sigkill.bin", "exit_sigsegv.bin"])
def test_hot_decode_agrees_with_pyroute2(name):
    from pyroute2.netlink.connector import cn_proc
    buf, n = load(name)
    msg = cn_proc.proc_event_exit(bytes(buf))
    msg.decode()
    assert connector.decode_exit(buf, n) == (msg["process_tgid"], msg["exit_code"],
                                             msg["timestamp_ns"], msg["process_pid"])


def test_ack_decode_agrees_with_pyroute2():
    from pyroute2.netlink.connector import cn_proc
    buf, n = load("ack_ok.bin")
    msg = cn_proc.proc_event_base(bytes(buf))
    msg.decode()
    assert msg["what"] == connector.PROC_EVENT_NONE
    assert connector.decode_ack(buf, n)[:2] == (msg["seq"], msg["ack"])


_RCVBUF_PROBE = """
import sys
import procwatch.connector as c
conn = c.ProcConnector(int(sys.argv[1]))
print(conn.rcvbuf_effective)
conn.close()
"""


@require_root()
def test_rcvbuf_above_rmem_max_needs_cap_net_admin():
    """--rcvbuf past net.core.rmem_max: granted with CAP_NET_ADMIN (SO_RCVBUFFORCE),
    capped at rmem_max without it (the kernel doubles what it grants, for its
    bookkeeping: socket(7))."""
    rmem_max = int(open("/proc/sys/net/core/rmem_max").read())
    want = max(4 * rmem_max, connector.DEFAULT_RCVBUF * 2)
    root = subprocess.run([os.sys.executable, "-c", _RCVBUF_PROBE, str(want)], capture_output=True,
                          text=True, cwd=Path(__file__).parent.parent, timeout=60)
    assert int(root.stdout) >= want, root
    if not connector.kernel_has_filter():
        pytest.skip("kernel < 6.6: an unprivileged process cannot subscribe at all")
    nobody = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                             os.sys.executable, "-c", _RCVBUF_PROBE, str(want)], capture_output=True,
                            text=True, cwd=Path(__file__).parent.parent, timeout=60)
    assert int(nobody.stdout) <= 2 * rmem_max < want, nobody
