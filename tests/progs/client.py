"""A test client: registers, prints READY <slot> <pid>, then does what it is told.

Modes (--then): sleep (until killed or stdin closes), exit (exit with --code
once stdin gives a line), beat (call beat() every --beat-every seconds; a
'stop' line on stdin stops the beats, 'start' resumes them, each answered
with a line 'OK <command>'; once stdin closes, sleep without beating).
"""

import argparse
import os
import select
import sys
import time

import procwatch

ap = argparse.ArgumentParser()
ap.add_argument("--key", type=lambda s: int(s, 0), required=True)
ap.add_argument("--name", required=True)
ap.add_argument("--then", default="sleep", choices=("sleep", "exit", "beat", "exit-now"))
ap.add_argument("--code", type=int, default=0)
ap.add_argument("--heartbeat", type=float, default=0)
ap.add_argument("--beat-every", type=float, default=0.1)
ap.add_argument("--hang-action", default=None)
ap.add_argument("--hang-signal", default=None)
args = ap.parse_args()

try:
    reg = procwatch.register_pid(args.name, key=args.key, heartbeat=args.heartbeat,
                                 hang_action=args.hang_action, hang_signal=args.hang_signal)
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
if args.then == "beat":
    beating = True
    while True:
        if beating:
            reg.beat()
        if select.select([sys.stdin], [], [], args.beat_every)[0]:
            line = sys.stdin.readline()
            if not line:
                break
            beating = line.strip() != "stop"
            print(f"OK {line.strip()}", flush=True)
while True:
    # Sleep until stdin closes (the test's teardown) or a signal ends us.
    if not sys.stdin.readline():
        time.sleep(3600)
