"""Hang verdicts: what the kernel says a process did while it missed its heartbeats (issue 15).

A missed heartbeat has several causes, and a kill cures only some of them.
Heartbeat monitors that cannot tell them apart kill healthy processes under
CPU load: iceoryx turned its keep-alive monitoring off by default after such
false kills (eclipse-iceoryx/iceoryx#1361, #1580), Kafka raised its session
timeout from 10 s to 45 s (KIP-735), and systemd users ask for a watchdog
that logs instead of killing (systemd/systemd#26090).  procwatch has the PID,
so before it acts it looks at what the kernel says about the time the beats
were missed.

The heartbeat checker takes a :func:`sample` when a slot first misses, and
:func:`judge` takes a second one when the slot reaches ``max_misses`` and
compares the two.  Nothing is read for slots that beat.  The verdicts, in
the order they are tried:

* **stopped**: every thread is in state T or t (SIGSTOP, a debugger).
* **stuck**: a thread was uninterruptible (D) in both samples.  A signal
  takes effect only when it returns from the kernel; ``wchan`` names the
  kernel function it waits in.
* **starved**: a thread is runnable (R) in both samples, but the process got at most
  :data:`BARELY` of the window on a CPU, while it waited for one for most
  of the window (:data:`STARVED_WAIT`: its run-queue wait, or its cgroup's
  CPU pressure), or a CPU limit of its cgroup throttled it.  A kill does not
  make a CPU appear, so by default this one is only logged (``[hang]
  starved``).
* **busy**: more than :data:`BARELY` of the window on a CPU, without a
  beat: a livelock, or a loop that forgot to beat.

* **blocked**: asleep, no CPU to speak of: a deadlock, or a wait that never
  ends.

With no first sample (``max_misses`` 1, or a slot that was already missing
when the service started) there is no window: the states alone decide, and
a runnable process counts as busy.  A process /proc will not show (gone
meanwhile, hidepid=) is **unknown**, and the hang action applies as before.

XXX: a machine so overloaded that a process that wakes now and then (a poll
loop) waits for a CPU most of the time it wants one reads as starved even
when it stopped beating for another reason: the kernel cannot tell "would
beat if it ran" from "would not".  Both samples must find it runnable,
which makes this less likely, and starved errs on the side of not killing.
"""

import collections as _collections
import dataclasses as _dc

from . import abi as _abi
from . import cgroup as _cgroup
from . import procfs as _procfs

__all__ = ("BARELY", "STARVED_WAIT", "Sample", "Judgement", "sample", "judge", "NAMES")

BARELY = 0.10         # share of the window on a CPU at or below which CPU time "barely moved"
STARVED_WAIT = 0.50   # share of the window spent waiting for a CPU that makes a runnable process starved

# The verdict names, for metric labels and config: a fixed set.
NAMES = tuple(v.name.lower() for v in _abi.Verdict if v != _abi.Verdict.NONE)

Sample = _collections.namedtuple("Sample", "sched cgroup")
Sample.__doc__ = "A :data:`procfs.SchedSample` and a :data:`cgroup.CgroupSample` (or None) of one moment."


@_dc.dataclass(frozen=True)
class Judgement:
    """A verdict, the words for the log line, and its journal fields (PROCWATCH_ prefix left out)."""
    verdict: _abi.Verdict
    text: str
    fields: dict

    @property
    def name(self):
        return self.verdict.name.lower()


def sample(pid, procfs=_procfs.PROCFS):
    """A :data:`Sample` of ``pid``, or None if /proc does not show it."""
    sched = _procfs.sched_sample(pid, procfs)
    if sched is None:
        return None
    return Sample(sched, _cgroup.sample(pid, procfs))


def _dur(ns):
    if ns >= 1e9:
        return f"{ns / 1e9:.2f} s"
    if ns >= 1e6:
        return f"{ns / 1e6:.0f} ms"
    return f"{ns / 1e3:.0f} µs"


def judge(pid, before, procfs=_procfs.PROCFS, after=None):
    """The :class:`Judgement` for ``pid`` over the window since ``before`` (a :data:`Sample` or None)."""
    after = after if after is not None else sample(pid, procfs)
    if after is None:
        return Judgement(_abi.Verdict.UNKNOWN, f"no verdict: /proc/{pid} could not be read",
                         {"VERDICT": "unknown"})
    states = after.sched.states
    live = {tid: s for tid, s in states.items() if s not in "ZX"} or states
    shown = "".join(sorted(set(live.values())))
    fields = {"STATE": shown}
    if before is not None:
        window = max(1, after.sched.mono_ns - before.sched.mono_ns)
        cpu = max(0, after.sched.cpu_ns - before.sched.cpu_ns)
        wait = max(0, after.sched.wait_ns - before.sched.wait_ns)
        fields.update(WINDOW_MS=window // 1_000_000, CPU_MS=cpu // 1_000_000, WAIT_MS=wait // 1_000_000)
    if all(s in "Tt" for s in live.values()):
        return Judgement(_abi.Verdict.STOPPED, "stopped (state T: SIGSTOP or a debugger)",
                         dict(fields, VERDICT="stopped"))

    old = before.sched.states if before is not None else live
    stuck = [tid for tid, s in sorted(live.items(), key=lambda kv: kv[0] != pid)
             if s == "D" and old.get(tid) == "D"]
    if stuck:
        where = _procfs.wchan(pid, stuck[0], procfs)
        fields.update(VERDICT="stuck", WCHAN=where, TID=stuck[0])
        return Judgement(_abi.Verdict.STUCK,
                         f"stuck in the kernel: uninterruptible (D) in {where or 'an unknown function'} "
                         f"through the missed checks, so a signal takes effect only when it returns", fields)

    runnable = "R" in live.values() and "R" in old.values()
    if before is None:
        if runnable:
            return Judgement(_abi.Verdict.BUSY, "busy: running (no earlier sample to compare with)",
                             dict(fields, VERDICT="busy"))
        return _blocked(pid, procfs, fields, "asleep (no earlier sample to compare with)")

    throttled = _cgroup.throttled_between(before.cgroup, after.cgroup)
    pressure = None
    if before.cgroup is not None and after.cgroup is not None and \
            before.cgroup.pressure_us is not None and after.cgroup.pressure_us is not None:
        pressure = max(0, after.cgroup.pressure_us - before.cgroup.pressure_us) * 1000
        fields["PRESSURE_MS"] = pressure // 1_000_000
    if throttled is not None:
        level, periods, throttled_us = throttled
        fields.update(CGROUP=level.path, CPU_QUOTA_US=level.quota_us, CPU_PERIOD_US=level.period_us,
                      THROTTLED_PERIODS=periods)
    waited = max(wait, pressure or 0)
    if runnable and cpu <= BARELY * window and (waited >= STARVED_WAIT * window or throttled):
        text = f"starved: runnable, but ran {_dur(cpu)} in {_dur(window)}"
        if wait >= STARVED_WAIT * window:
            text += f", waiting {_dur(wait)} for a CPU"
        if pressure is not None and pressure >= STARVED_WAIT * window:
            text += f"; its cgroup's cpu.pressure: some task waited {_dur(pressure)}"
        if throttled is not None:
            text += (f"; its cgroup's CPU limit ({_cgroup.describe_limit(after.cgroup.version, level)}) "
                     f"throttled it in {periods} period{'s' if periods != 1 else ''}")
        return Judgement(_abi.Verdict.STARVED, text, dict(fields, VERDICT="starved"))
    if cpu > BARELY * window:
        return Judgement(_abi.Verdict.BUSY, f"busy: {_dur(cpu)} on a CPU in {_dur(window)} without a beat "
                         f"(a livelock?)", dict(fields, VERDICT="busy"))
    return _blocked(pid, procfs, fields, f"asleep, {_dur(cpu)} on a CPU in {_dur(window)}")


def _blocked(pid, procfs, fields, how):
    where = _procfs.wchan(pid, None, procfs)
    fields.update(VERDICT="blocked", WCHAN=where)
    return Judgement(_abi.Verdict.BLOCKED, f"blocked: {how}" + (f", waiting in {where}" if where else "")
                     + " (a deadlock?)", fields)
