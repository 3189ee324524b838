"""A stand-in for ``procwatch serve`` under procwatch.service's own settings.

test_container.py starts it as a Type=notify unit built from
systemd/procwatch.service with only ExecStart= replaced, so every hardening
and capability line of the real unit applies to it.  It performs the kernel
operations the service performs, reports each result as one journal entry
(PWPROBE_* fields, read back with ``journalctl -o json``), then sends
READY=1 and WATCHDOG=1 every second until SIGTERM (STOPPING=1, exit 0).

Environment: PWPROBE_VICTIM (PID of a process of another user),
PWPROBE_KEY (SysV key to create or adopt), PWPROBE_GROUP.
"""

import ctypes
import errno
import grp
import json
import os
import signal
import socket
import struct
import time

from systemd import daemon, journal

MESSAGE_ID = "5e4c3ba0a3c94f0c8a1a5c6f0b7e1d21"    # the probe's own; not a procwatch event
SYS_futex, FUTEX_WAKE = 202, 1                      # x86_64; shared (not FUTEX_PRIVATE)
SYS_pidfd_send_signal = 424


def attempt(fn):
    try:
        r = fn()
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    return "ok" if r is None else str(r)


def main():
    victim = int(os.environ["PWPROBE_VICTIM"])
    key = int(os.environ["PWPROBE_KEY"], 0)
    libc = ctypes.CDLL(None, use_errno=True)

    def check_errno(ret):
        if ret == -1:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        return ret

    def stat22():
        with open(f"/proc/{victim}/stat", "rb") as f:
            int(f.read().rsplit(b")", 1)[1].split()[19])

    def maps():
        with open(f"/proc/{victim}/maps") as f:
            f.read()

    def pidfd_signal():
        fd = os.pidfd_open(victim)
        try:
            check_errno(libc.syscall(SYS_pidfd_send_signal, fd, 0, None, 0))
        finally:
            os.close(fd)

    def sysv_and_futex():
        import sysv_ipc
        gid = grp.getgrnam(os.environ.get("PWPROBE_GROUP", "procwatch")).gr_gid
        try:
            mem = sysv_ipc.SharedMemory(key, sysv_ipc.IPC_CREAT, mode=0o660, size=4096,
                                        init_character=b"\0")
            mem.gid = gid
        except sysv_ipc.Error as e:
            raise OSError(errno.EPERM, repr(e))
        mv = memoryview(mem).cast("I")
        mv[0] = os.getpid()                 # one aligned 4-byte store
        addr = mem.address
        # a shared futex wake on the word: no waiter, so 0 woken
        woken = check_errno(libc.syscall(SYS_futex, ctypes.c_void_p(addr), FUTEX_WAKE, 1,
                                         None, None, 0))
        return f"ok gid={mem.gid} mode={mem.mode:o} woken={woken}"

    def connector():
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 11)
        try:
            s.bind((0, 1))
            payload = struct.pack("=I", 1)
            cn = struct.pack("=IIIIHH", 1, 1, 0, 0, len(payload), 0) + payload
            s.send(struct.pack("=IHHII", 16 + len(cn), 3, 0, 0, 0) + cn)
            s.settimeout(0.5)
            try:
                s.recv(4096)
            except socket.timeout:
                return "no ack"
        finally:
            s.close()

    def pyroute2_import():
        import pyroute2  # noqa: F401  (under MemoryDenyWriteExecute=)

    def inet():
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).close()

    def write_usr():
        open("/usr/pwprobe-write-test", "w").close()

    with open("/proc/self/status") as f:
        capeff = next(ln.split()[1] for ln in f if ln.startswith("CapEff:"))
    results = {
        "stat": attempt(stat22), "maps": attempt(maps),
        "pidfd_open": attempt(lambda: os.close(os.pidfd_open(victim))),
        "pidfd_signal": attempt(pidfd_signal), "sysv_futex": attempt(sysv_and_futex),
        "connector": attempt(connector), "pyroute2": attempt(pyroute2_import),
        "af_inet": attempt(inet), "write_usr": attempt(write_usr), "capeff": capeff,
    }
    journal.send("pwprobe results", MESSAGE_ID=MESSAGE_ID, PRIORITY=6,
                 PWPROBE_RESULTS=json.dumps(results), OBJECT_PID=str(victim))

    stopping = []
    signal.signal(signal.SIGTERM, lambda *a: stopping.append(1))
    daemon.notify("READY=1\nSTATUS=probe done: " + " ".join(f"{k}={v}" for k, v in results.items()
                                                            if k in ("maps", "pidfd_signal")))
    while not stopping:
        daemon.notify("WATCHDOG=1")
        time.sleep(1)
    daemon.notify("STOPPING=1")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
