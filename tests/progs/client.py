"""A test client: registers, prints READY <slot> <pid>, then does what it is told.

Modes (--then): sleep (until killed or stdin closes), exit (exit with --code
once stdin gives a line), beat (call beat() every --beat-every seconds until
told 'stop' on stdin, then stop beating and sleep).
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
args = ap.parse_args()

try:
    reg = procwatch.register_pid(args.name, key=args.key, heartbeat=args.heartbeat)
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
    while True:
        reg.beat()
        if select.select([sys.stdin], [], [], args.beat_every)[0]:
            sys.stdin.readline()
            break
while True:
    # Sleep until stdin closes (the test's teardown) or a signal ends us.
    if not sys.stdin.readline():
        time.sleep(3600)
