"""A procwatch peer in Python: ``Peer.wait_exit()``, as an application would call it.

Same line protocol as csrc/pwwait.c, by name instead of offset::

    stdin   watch <pid> <name>
    stdout  ok <pid> | gone <pid> | exit <pid> <t1_ns> | stats seen=N

Usage: ``pwpeer.py KEY``; needs procwatch importable (PYTHONPATH).
"""

import sys
import time

import procwatch


def main(argv):
    key = int(argv[0], 0)
    out = sys.stdout
    out.write("ready\n")
    out.flush()
    seen = 0
    for line in sys.stdin:
        parts = line.split()
        if len(parts) != 3 or parts[0] != "watch":
            continue
        pid = int(parts[1])
        try:
            peer = procwatch.Peer(parts[2], key=key)
        except procwatch.ProcwatchError:
            out.write(f"gone {pid}\n")
            out.flush()
            continue
        try:
            if peer.pid != pid:
                out.write(f"gone {pid}\n")
                out.flush()
                continue
            out.write(f"ok {pid}\n")
            out.flush()
            peer.wait_exit()
            t1 = time.monotonic_ns()
            seen += 1
            out.write(f"exit {pid} {t1}\n")
            out.flush()
        finally:
            peer.close()
    out.write(f"stats seen={seen}\n")
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
