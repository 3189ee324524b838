"""The bare proc-connector listener in Python: csrc/cnlisten.c's protocol
and output, standard library only.

It shows what the interpreter adds to the floor, per event and per
unrelated exit of a storm: a Python connector service cannot do less than
this loop (one ``recv_into``, one precompiled ``Struct.unpack_from`` at
offset 36).  Usage and output as cnlisten: ``--parent PID --rcvbuf BYTES``.
"""

import errno
import os
import resource
import signal
import socket
import struct
import sys
import time

NETLINK_CONNECTOR = 11
CN_IDX_PROC = CN_VAL_PROC = 1                      # include/uapi/linux/connector.h
PROC_CN_MCAST_LISTEN, PROC_CN_MCAST_IGNORE = 1, 2  # include/uapi/linux/cn_proc.h
PROC_EVENT_EXIT = 0x80000000
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
NLMSG_DONE = 3
REQUEST = struct.Struct("=IHHII" "IIIIHH" "II")    # nlmsghdr, cn_msg, proc_input {mcast_op, event_type}
# nlmsghdr (16) + cn_msg (20) = 36: proc_event {what, cpu, timestamp_ns, exit {pid, tgid, code, signal,
# parent_pid, parent_tgid}}
EXIT = struct.Struct("=I4xQIIIIII")


class _Stop(Exception):
    pass


def _stop(signum, frame):
    raise _Stop


def _request(op, filtered):
    payload = 8 if filtered else 4
    raw = REQUEST.pack(16 + 20 + payload, NLMSG_DONE, 0, 0, os.getpid(),
                       CN_IDX_PROC, CN_VAL_PROC, 0, 0, payload, 0, op, PROC_EVENT_EXIT)
    return raw[:16 + 20 + payload]


def main(argv):
    parent, rcvbuf = 0, 0
    it = iter(argv)
    for a in it:
        if a == "--parent":
            parent = int(next(it))
        elif a == "--rcvbuf":
            rcvbuf = int(next(it))
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    filtered = (major, minor) >= (6, 6)            # the exit-only filter: kernel >= 6.6
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
        signal.signal(sig, _stop)
    signal.alarm(600)
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
    if rcvbuf:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind((os.getpid(), CN_IDX_PROC))
    sock.send(_request(PROC_CN_MCAST_LISTEN, filtered))
    out = sys.stdout
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out.write(f"ready {'filter' if filtered else 'legacy'} rcvbuf={sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)} "
              f"cpu_us={int((ru.ru_utime + ru.ru_stime) * 1e6)}\n")
    out.flush()
    buf = bytearray(4096)
    unpack, clock = EXIT.unpack_from, time.monotonic_ns
    events = exits = matched = enobufs = 0
    try:
        while True:
            try:
                n = sock.recv_into(buf)
            except OSError as err:
                if err.errno == errno.ENOBUFS:
                    enobufs += 1
                    continue
                raise
            events += 1
            if n < 36 + 40:
                continue
            what, ts, pid, tgid, code, _sig, _ppid, ptgid = unpack(buf, 36)
            if what != PROC_EVENT_EXIT:
                continue
            exits += 1
            if parent and ptgid != parent:
                continue
            matched += 1
            out.write(f"exit {tgid} {pid} {clock()} {ts} {code}\n")
            out.flush()
    except _Stop:
        pass
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    out.write(f"stats events={events} exits={exits} matched={matched} enobufs={enobufs} "
              f"cpu_us={int((ru.ru_utime + ru.ru_stime) * 1e6)}\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
