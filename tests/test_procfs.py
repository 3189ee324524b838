"""procfs.py on real processes: the scheduler samples and the PIDs that name no process."""

import os
import subprocess
import threading

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
