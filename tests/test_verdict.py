"""Hang verdicts from what the kernel says about real processes (issue 15).

Each test starts a real process in the state it names (a CPU loop, a sleep,
SIGSTOP, a vfork parent in D, a loop throttled by its cgroup), takes a
sample, lets a short window pass and asks :func:`verdict.judge`.  Every
process is bounded in time and ended by PID; cgroups are our own and removed.
Nothing asserts a duration.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import wait_until
from procwatch import abi, cheader, verdict

SPIN = "import time\nend = time.monotonic() + 60\nwhile time.monotonic() < end: pass\n"


@pytest.fixture
def procs():
    started = []

    def start(argv, **kw):
        p = subprocess.Popen(argv, stdin=kw.pop("stdin", subprocess.DEVNULL), **kw)
        started.append(p)
        return p
    yield start
    for p in started:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
        p.wait(10)


def state(pid):
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(") ", 1)[1][0]


def window(pid, seconds=0.5):
    before = verdict.sample(pid)
    assert before is not None
    time.sleep(seconds)        # the window itself, not synchronisation: the kernel counts through it
    return verdict.judge(pid, before)


def test_a_cpu_loop_is_busy(procs):
    p = procs([sys.executable, "-c", SPIN])
    j = window(p.pid)
    assert j.verdict == abi.Verdict.BUSY, j
    assert j.fields["CPU_MS"] > verdict.BARELY * j.fields["WINDOW_MS"] and "busy" in j.text


def test_a_sleeper_is_blocked_and_says_where(procs):
    p = procs(["sleep", "60"])
    wait_until(lambda: state(p.pid) == "S", 10, "sleep to sleep")
    j = window(p.pid)
    assert j.verdict == abi.Verdict.BLOCKED, j
    assert j.fields["CPU_MS"] == 0 and j.fields["WCHAN"] and j.fields["WCHAN"] in j.text


def test_a_stopped_process_is_stopped(procs):
    p = procs(["sleep", "60"])
    os.kill(p.pid, signal.SIGSTOP)
    wait_until(lambda: state(p.pid) == "T", 10, "the stop")
    assert window(p.pid, 0.1).verdict == abi.Verdict.STOPPED


def test_a_vfork_parent_is_stuck_in_the_kernel_and_sigkill_still_ends_it(procs, compiled):
    exe = compiled("vfork_stuck", "-std=c99", "-Wextra", "-I", cheader.include_dir())
    p = procs([str(exe), "stuck", "0x7e7e7e7e", "100"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert p.stdout.readline().startswith(b"READY")
    p.stdin.write(b"go\n")
    p.stdin.flush()
    assert p.stdout.readline() == b"OK vfork\n"
    wait_until(lambda: state(p.pid) == "D", 10, "the vfork wait (D)")
    j = window(p.pid, 0.2)
    assert j.verdict == abi.Verdict.STUCK, j
    assert j.fields["WCHAN"] and j.fields["WCHAN"] in j.text and "only when it returns" in j.text
    os.kill(p.pid, signal.SIGKILL)          # TASK_KILLABLE: SIGKILL acts
    assert p.wait(10) == -signal.SIGKILL


def test_no_first_sample_judges_by_state_alone(procs):
    spin = procs([sys.executable, "-c", SPIN])
    sleeper = procs(["sleep", "60"])
    wait_until(lambda: state(sleeper.pid) == "S", 10, "sleep to sleep")
    wait_until(lambda: "R" in verdict.sample(spin.pid).sched.states.values(), 10, "the loop to run")
    assert verdict.judge(sleeper.pid, None).verdict == abi.Verdict.BLOCKED
    assert verdict.judge(spin.pid, None).verdict == abi.Verdict.BUSY


def test_a_process_that_is_gone_is_unknown(procs):
    p = procs(["true"])
    p.wait(10)
    j = verdict.judge(p.pid, None)
    assert j.verdict == abi.Verdict.UNKNOWN and j.fields == {"VERDICT": "unknown"}


@pytest.mark.parametrize("version", [1, 2])
def test_a_loop_throttled_by_its_cgroup_is_starved(procs, cpu_cgroup, version):
    """1 ms of CPU per second: runnable all the time, on a CPU almost never."""
    cg = cpu_cgroup(version)
    p = procs([sys.executable, "-c", SPIN])
    cg.limit(1000, 1_000_000)
    cg.add(p.pid)
    j = window(p.pid, 2.5)          # the kernel counts throttling per 1 s period
    assert j.verdict == abi.Verdict.STARVED, j
    assert j.fields["THROTTLED_PERIODS"] >= 1 and j.fields["CPU_QUOTA_US"] == 1000
    assert j.fields["CPU_MS"] <= verdict.BARELY * j.fields["WINDOW_MS"]
    assert ("cpu.max 1000 1000000" if version == 2 else "cpu.cfs_quota_us 1000 per 1000000") in j.text
    cg.lift()
    j = window(p.pid, 0.5)
    assert j.verdict == abi.Verdict.BUSY, j       # the same loop, given its CPU back
