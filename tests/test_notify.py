"""sd_notify(3) from the service, read off a real $NOTIFY_SOCKET (root: the connector).

As python-systemd's own tests do, a datagram socket bound in tmp_path stands
in for systemd's notify socket; SO_PASSCRED shows which process sent each
message (NotifyAccess=main accepts only the main PID).  Under a real systemd
the same is checked by tests/system/test_systemd.py.
"""

import os
import select
import signal
import socket
import struct

import pytest

from conftest import require_root, wait_until
from procwatch import abi
from procwatch import service as service_mod
from procwatch.config import Config
from procwatch.segment import Table

pytestmark = [require_root()]


class NotifySocket:
    def __init__(self, path):
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(self.path)
        self.seen = []              # (sender pid, {key: value})

    def poll(self, timeout=0.0):
        """Read what has arrived (waiting up to ``timeout`` for the first); the new messages."""
        new = []
        while select.select([self.sock], [], [], timeout)[0]:
            data, anc, _f, _a = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            pid = next((struct.unpack("3i", d[:12])[0] for lvl, typ, d in anc
                        if lvl == socket.SOL_SOCKET and typ == socket.SCM_CREDENTIALS), None)
            msg = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            new.append((pid, msg))
            timeout = 0.0
        self.seen += new
        return new

    def wait_for(self, key, value=None, timeout=15.0, what=None):
        def found():
            for pid, msg in self.poll(0.05):
                if key in msg and (value is None or value in msg[key]):
                    return pid, msg
            return None
        return wait_until(found, timeout, what or f"{key}={value or ''} on the notify socket",
                          detail=lambda: repr(self.seen[-5:]))

    def close(self):
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path):
    s = NotifySocket(tmp_path / "notify")
    yield s
    s.close()


# asm/unistd.h: __NR_sendmsg
SYS_SENDMSG = {"x86_64": 46, "aarch64": 211}[os.uname().machine]


def _fill(path):
    """Queue datagrams on the notify socket until it is full (net.unix.max_dgram_qlen):
    the next sender blocks in sendmsg(2) until the queue is read."""
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    n = 0
    try:
        while True:
            filler.sendto(b"FILLER=%d" % n, socket.MSG_DONTWAIT, path)
            n += 1
    except BlockingIOError:
        return n
    finally:
        filler.close()


def _in_syscall(pid, nr):
    with open(f"/proc/{pid}/syscall") as f:
        return f.read().split()[0] == str(nr)


def test_ready_after_start_up_then_status_watchdog_and_stopping(key, service, clients, notify_socket):
    """READY=1 goes out once the table is set up, the backend subscribed and the
    first reconcile done.  Checked at the moment it is sent: the notify socket is
    full, so the service blocks in sendmsg(2) with READY=1 until the test reads;
    a READY sent early would find the start-up unfinished."""
    filled = _fill(notify_socket.path)
    env = dict(os.environ, NOTIFY_SOCKET=notify_socket.path, WATCHDOG_USEC="3000000")
    svc = service(env=env, ready=False)
    wait_until(lambda: svc.proc.poll() is None and _in_syscall(svc.pid, SYS_SENDMSG), 15,
               "the service to block sending its first notification", detail=svc.log)
    t = Table.attach(key)
    try:
        assert t.hget32(abi.H_SERVICE_PID) == svc.pid
        assert t.hget32(abi.H_BACKEND) != abi.Backend.NONE
    finally:
        t.detach()
    assert "event=started" in svc.log()       # logged at the end of exactly that start-up
    assert not notify_socket.seen
    pid, ready = notify_socket.wait_for("READY", "1")
    assert [m for _p, m in notify_socket.seen][:filled + 1] == \
        [{"FILLER": str(i)} for i in range(filled)] + [ready]       # the blocked message was READY=1
    assert pid == svc.pid                                   # from the main process
    assert ready["STATUS"] == "watching 0 processes, 0 exits"

    c = clients(key, "notified")
    c.kill(signal.SIGKILL)
    svc.wait_event("exit", name="notified")
    pid, msg = notify_socket.wait_for("STATUS", "last: notified killed by SIGKILL", timeout=10)
    assert msg.get("WATCHDOG") == "1" and pid == svc.pid     # pings carry the summary
    assert msg["STATUS"].startswith("watching 0 processes, 1 exits, last: notified killed by SIGKILL ")

    # SIGHUP (ExecReload=): RELOADING=1, then READY=1 once the configuration is re-read
    notify_socket.seen.clear()
    svc.proc.send_signal(signal.SIGHUP)
    notify_socket.wait_for("READY", "1", what="READY=1 after the reload")
    kinds = [next(iter(m)) for _p, m in notify_socket.seen if "RELOADING" in m or "READY" in m]
    assert kinds == ["RELOADING", "READY"], notify_socket.seen

    assert svc.stop() == 0
    notify_socket.poll(0.0)                 # it has exited: everything it sent is queued
    assert (svc.pid, {"STOPPING": "1"}) in notify_socket.seen


def test_a_silent_detector_stops_the_watchdog(key, notify_socket, monkeypatch):
    """The watchdog follows detection, not a timer: a detector thread that no
    longer wakes up (here: really ended, with nobody to respawn it) gets no
    WATCHDOG=1 from the main loop's tick, and STATUS says why."""
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.path)
    monkeypatch.setattr(service_mod, "DETECTOR_STALE", 0.5)
    svc = service_mod.Service(Config(key=key))
    try:
        svc.start()
        notify_socket.wait_for("READY", "1")
        svc._tick()
        assert notify_socket.poll(5.0)[-1][1].get("WATCHDOG") == "1"
        detector = svc.detector
        detector.request_stop()                 # wakes it (the C step sleeps in poll with no timeout)
        detector.join(5.0)
        assert not detector.is_alive()

        def silent():
            svc._tick()
            return [m for _p, m in notify_socket.poll(0.05) if "silent" in m.get("STATUS", "")]
        [msg] = wait_until(silent, 10, "a STATUS saying the detector is silent")
        assert "WATCHDOG" not in msg and detector.name in msg["STATUS"]
        svc._tick()
        assert all("WATCHDOG" not in m for _p, m in notify_socket.poll(0.2))
    finally:
        svc.stop()
