"""procfs.py on real processes: the scheduler samples and the PIDs that name no process."""

import os
import subprocess
import sys
import threading
import time

from procwatch import procfs


def test_a_thread_id_has_no_pidfd():
    """A thread's ID is no process's PID: None, not an exception (ENOENT on Linux 6.18)."""
    started, done = threading.Event(), threading.Event()
    tid = []

    def run():
        tid.append(threading.get_native_id())
        started.set()
        done.wait(10)
    t = threading.Thread(target=run)
    t.start()
    try:
        started.wait(10)
        assert tid[0] != os.getpid()
        assert procfs.pidfd_open(tid[0]) is None
    finally:
        done.set()
        t.join()
    fd = procfs.pidfd_open(os.getpid())
    assert fd is not None
    os.close(fd)


def test_sched_sample_counts_every_thread():
    started, done = threading.Event(), threading.Event()
    t = threading.Thread(target=lambda: (started.set(), done.wait(10)))
    t.start()
    try:
        started.wait(10)
        s = procfs.sched_sample(os.getpid())
        assert os.getpid() in s.states and len(s.states) >= 2
        assert s.cpu_ns > 0 and s.wait_ns >= 0
    finally:
        done.set()
        t.join()


def test_gone_process_has_no_sample_and_no_wchan():
    p = subprocess.Popen(["true"])
    p.wait(10)
    assert procfs.sched_sample(p.pid) is None and procfs.wchan(p.pid) is None


EXEC_FROM_THREAD = r"""
import os, sys, threading, time
stop = threading.Event()
for _ in range(40):
    threading.Thread(target=stop.wait, daemon=True).start()
def execer():
    sys.stdin.readline()
    os.execv("/bin/sleep", ["sleep", "30"])
threading.Thread(target=execer).start()
print("ready", flush=True)
stop.wait()
"""


def test_group_exiting_never_takes_an_exec_from_a_thread_for_a_death():
    """execve(2) from a non-leader thread of a 42-thread process, read while the kernel releases
    the other 41: the listing of /proc/PID/task can stop short at a thread released while it
    is listed, and the exec'ing thread (the one not exiting) may not be shown.  group_exiting()
    must then say "ask again" (None), never True, while the process lives on."""
    for _ in range(10):
        p = subprocess.Popen([sys.executable, "-c", EXEC_FROM_THREAD], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout.readline() == "ready\n"
            start = procfs.start_time(p.pid)
            verdicts = []
            p.stdin.write("go\n")
            p.stdin.flush()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                verdicts.append(procfs.group_exiting(p.pid, start))
                with open(f"/proc/{p.pid}/comm") as f:
                    if f.read() == "sleep\n" and len(os.listdir(f"/proc/{p.pid}/task")) == 1:
                        break
            assert p.poll() is None                          # it lives on, as sleep
            assert True not in verdicts, verdicts.count(True)
            assert procfs.group_exiting(p.pid, start) is False
        finally:
            p.kill()
            p.wait(10)
