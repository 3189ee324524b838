"""Register-and-die churn: children that register and exit at once, P at a time.

    churn.py --key K --count N [--parallel P] [--prefix NAME] [--first I] [--pids FILE]

Child i calls register_pid(f"{prefix}-{i}", key=K) and exits at once: code
0 when it registered, 3 when register_pid() returned None, 4 on an error.
Forking from this one interpreter costs a fraction of a millisecond, where
starting a Python client per cycle would cost tens.  Dies with its parent.
stdout at the end: "CHURN registered=R none=N errors=E seconds=S".
``--pids FILE``: one "NAME PID" line per child, so that a report of a death
can be checked against the process that really had that name.
"""

import argparse
import ctypes
import os
import signal
import sys
import time

import procwatch

ap = argparse.ArgumentParser()
ap.add_argument("--key", type=lambda s: int(s, 0), required=True)
ap.add_argument("--count", type=int, required=True)
ap.add_argument("--parallel", type=int, default=4)
ap.add_argument("--prefix", default="churn")
ap.add_argument("--first", type=int, default=0)
ap.add_argument("--pids", type=argparse.FileType("w"))
args = ap.parse_args()
ctypes.CDLL(None).prctl(1, signal.SIGKILL)          # PR_SET_PDEATHSIG

t0 = time.monotonic()
tally = {0: 0, 3: 0, 4: 0}
running = 0
i = args.first
end = args.first + args.count
while i < end or running:
    while running < args.parallel and i < end:
        pid = os.fork()
        if pid == 0:
            code = 4
            try:
                code = 0 if procwatch.register_pid(f"{args.prefix}-{i}", key=args.key) else 3
            except BaseException as e:               # noqa: B036 - the child must never return
                print(f"churn child {i}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            finally:
                os._exit(code)
        if args.pids:
            args.pids.write(f"{args.prefix}-{i} {pid}\n")
        running += 1
        i += 1
    _, status = os.wait()
    running -= 1
    code = os.waitstatus_to_exitcode(status)
    tally[code if code in tally else 4] += 1
if args.pids:
    args.pids.close()
print(f"CHURN registered={tally[0]} none={tally[3]} errors={tally[4]} "
      f"seconds={time.monotonic() - t0:.2f}", flush=True)
