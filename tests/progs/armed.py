"""An armed test client with memory: touches --mib MiB, registers (arming its death word),
prints READY <slot> <pid> <sentinel tid>, then ends the way --then says once a line arrives
on stdin (or sleeps until killed):

  sleep      never ends by itself (the test kills it)
  exit       libc's exit(3): atexit handlers, then exit_group(3) (not sys.exit: Python's
             finalisation would unmap the ballast before the exit)
  segv       a real SIGSEGV (a read of address 0); no core dump (PR_SET_DUMPABLE 0)
  exec       execv /bin/sleep 1000 (same PID; the death word fires, the process lives on)
  thread-exec the same from a second thread: de_thread() kills the leader and the sentinel,
             so the process's only live thread is neither of those two
  crowd-exec the same with 40 more threads, all killed and released while /proc lists them
  fork       fork a child that tries to unregister (a child is not registered) and exits;
             print CHILD <pid> <status> once reaped, then sleep
  unregister unregister, print UNREGISTERED, then sleep
"""

import argparse
import ctypes
import mmap
import os
import sys
import time

import procwatch

ap = argparse.ArgumentParser()
ap.add_argument("--key", type=lambda s: int(s, 0), required=True)
ap.add_argument("--name", required=True)
ap.add_argument("--mib", type=int, default=0)
ap.add_argument("--then", default="sleep",
                choices=("sleep", "exit", "segv", "exec", "thread-exec", "crowd-exec", "fork", "unregister"))
args = ap.parse_args()

ballast = mmap.mmap(-1, max(args.mib << 20, 4096))
for off in range(0, args.mib << 20, 4096):
    ballast[off] = 1
reg = procwatch.register_pid(args.name, key=args.key)
if reg is None:
    print("NONE", flush=True)
    sys.exit(1)
print(f"READY {reg.slot} {os.getpid()} {reg._sentinel._thread.native_id}", flush=True)
sys.stdin.readline()
if args.then == "exit":
    ctypes.CDLL(None).exit(3)
if args.then == "segv":
    libc = ctypes.CDLL(None)
    libc.prctl(4, 0, 0, 0, 0)            # PR_SET_DUMPABLE 0: no core file of the ballast
    ctypes.string_at(0)
if args.then == "exec":
    os.execv("/bin/sleep", ["sleep", "1000"])
if args.then in ("thread-exec", "crowd-exec"):
    import threading
    for _ in range(40 if args.then == "crowd-exec" else 0):
        threading.Thread(target=time.sleep, args=(1000,), daemon=True).start()
    threading.Thread(target=os.execv, args=("/bin/sleep", ["sleep", "1000"])).start()
if args.then == "fork":
    pid = os.fork()
    if pid == 0:
        reg.unregister()                 # the parent's registration: only detaches here
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    print(f"CHILD {pid} {status}", flush=True)
if args.then == "unregister":
    reg.unregister()
    print("UNREGISTERED", flush=True)
time.sleep(3600)
