"""csrc/pwwait.c in Python: a waiter of the same kind as Peer.wait_exit(), for the relay.

The minimal C relay's row with a Python waiter is the baseline of
procwatch's ``pw-peer`` row (issue 16: "the relay with the same kind of
waiter").  It sleeps in FUTEX_WAIT through procwatch.futex, as
Peer.wait_exit() does, on a word of a SysV segment.

    stdin   watch <pid> <offset>
    stdout  ok <pid> | gone <pid> | exit <pid> <t1_ns> | stats seen=N

Usage: ``pywait.py KEY``; needs procwatch importable (PYTHONPATH).
"""

import sys
import time

import sysv_ipc

from procwatch import futex


def main(argv):
    shm = sysv_ipc.SharedMemory(int(argv[0], 0))
    words = memoryview(shm).cast("I")
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    seen = 0
    for line in sys.stdin:
        parts = line.split()
        if len(parts) != 3 or parts[0] != "watch":
            continue
        pid, offset = int(parts[1]), int(parts[2])
        if words[offset // 4] != pid:
            out.write(f"gone {pid}\n")
            out.flush()
            continue
        out.write(f"ok {pid}\n")
        out.flush()
        address = shm.address + offset
        while words[offset // 4] == pid:
            futex.wait(address, pid)
        t1 = time.monotonic_ns()
        seen += 1
        out.write(f"exit {pid} {t1}\n")
        out.flush()
    out.write(f"stats seen={seen}\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
