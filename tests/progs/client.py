"""A test client: registers, prints READY <slot> <pid>, then does what it is told.

Modes (--then): sleep (until killed or stdin closes), exit (exit with --code
once stdin gives a line), beat (call beat() every --beat-every seconds, after
--work-ms of CPU work each time; a 'stop' line on stdin stops the beats and
the client sleeps in read() until the next line, 'start' resumes them,
'spin' stops them and burns CPU, 'hb SECONDS' calls set_heartbeat(SECONDS), 'deadlock' stops them and waits on a lock
it holds itself (each bounded to 60 s), each answered with a line 'OK
<command>'; once stdin closes, sleep without beating).
"""

import argparse
import os
import select
import sys
import threading
import time

import procwatch

ap = argparse.ArgumentParser()
ap.add_argument("--key", type=lambda s: int(s, 0), required=True)
ap.add_argument("--name", required=True)
ap.add_argument("--then", default="sleep", choices=("sleep", "exit", "beat", "exit-now"))
ap.add_argument("--code", type=int, default=0)
ap.add_argument("--heartbeat", type=float, default=0)
ap.add_argument("--beat-every", type=float, default=0.1)
ap.add_argument("--work-ms", type=float, default=0)
ap.add_argument("--hang-action", default=None)
ap.add_argument("--hang-signal", default=None)
ap.add_argument("--no-arm", action="store_true", help="leave the death word unarmed (connector-only)")
args = ap.parse_args()

try:
    reg = procwatch.register_pid(args.name, key=args.key, heartbeat=args.heartbeat,
                                 hang_action=args.hang_action, hang_signal=args.hang_signal,
                                 arm=not args.no_arm)
except procwatch.ProcwatchError as e:
    print(f"ERROR {type(e).__name__} {e}", flush=True)
    sys.exit(3)
if reg is None:
    print("NONE", flush=True)
    time.sleep(3600)
    sys.exit(0)
print(f"READY {reg.slot} {os.getpid()}", flush=True)
if args.then == "exit-now":
    os._exit(args.code)
if args.then == "exit":
    sys.stdin.readline()
    os._exit(args.code)


def work(seconds):
    """Burn ``seconds`` of this process's own CPU time (not wall time)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


if args.then == "beat":
    beating = True
    while True:
        if beating:
            work(args.work_ms / 1000)
            reg.beat()
        # Not beating: no timeout, so the client sleeps without waking (a clean "blocked").
        if select.select([sys.stdin], [], [], args.beat_every if beating else None)[0]:
            line = sys.stdin.readline()
            if not line:
                break
            command = line.strip()
            if command.startswith("hb "):
                reg.set_heartbeat(float(command.split()[1]))
            else:
                beating = command == "start"
            print(f"OK {command}", flush=True)
            if command == "spin":
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    pass
            elif command == "deadlock":
                lock = threading.Lock()
                lock.acquire()
                lock.acquire(timeout=60)
while True:
    # Sleep until stdin closes (the test's teardown) or a signal ends us.
    if not sys.stdin.readline():
        time.sleep(3600)
