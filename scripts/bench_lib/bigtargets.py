"""Big targets (issue 14): kill -> a peer is woken, for processes that touched a lot of memory.

do_exit() tears the address space down (about 50 ms per GiB touched) before
a pidfd becomes readable and before the proc connector's exit event, so
every observer that waits for those is as late as the teardown; the death
word fires before it.  One row per observer and target size, all in one
run, the rows taking turns for each kill so that load from elsewhere falls
on all of them alike:

* armed Python   a Python client (register_pid arms the death word)
* armed C        a C client (procwatch.h, -pthread)
* armed C, real-time peer  the same, seen by a peer at SCHED_FIFO 1: what is left of the
                 armed rows' tail once the peer itself is not queued behind the
                 dying process's teardown on its CPU (left out where SCHED_FIFO is refused)
* procwatch run  a plain C program under 'procwatch run' (the preload library arms it)
* unarmed slot   a C client built with -DPROCWATCH_NO_DEATH_WORD (connector-only)
* bare connector cnlisten, a C proc-connector listener: the exit event itself
* pidfd+poll     pidfd_open(2) of the target, poll(2) until readable

The procwatch rows are seen by pwwait (a C peer in FUTEX_WAIT on the slot's
PID word, woken by the service); t0 is taken right before kill(SIGKILL).
A target size is left out when MemAvailable is below twice its size plus
2 GiB: other work shares the machine.
"""

import os as _os
import select as _select
import signal as _signal
import subprocess as _subprocess
import sys as _sys
import time as _time

from . import build as _build
from . import procs as _procs
from . import pwsuite as _pwsuite
from . import report as _report

ROOT = _os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
INCLUDE = _os.path.join(ROOT, "procwatch", "include")
ROWS = (("py", "armed Python client"), ("c", "armed C client"), ("c-rt", "armed C client, real-time peer"),
        ("c-yield", "armed C client, teardown yield 2 ms"), ("run", "procwatch run target"),
        ("unarmed", "unarmed slot (connector-only)"), ("cn", "bare connector listener (C)"),
        ("pidfd", "pidfd + poll"))
PY_TARGET = ("import mmap, sys, time, procwatch\n"
             "n = int(sys.argv[1]) << 20\n"
             "m = mmap.mmap(-1, max(n, 4096))\n"
             "for o in range(0, n, 4096): m[o] = 1\n"
             "r = procwatch.register_pid(sys.argv[2], key=int(sys.argv[3], 0))\n"
             "print('ready' if r is not None else 'error', flush=True)\n"
             "time.sleep(100000)\n")
SETTLE_S = 0.3          # after "ready": the service has adopted the slot and sleeps again
TIMEOUT_S = 30.0


def sizes(wanted):
    """The sizes (MiB) of ``wanted`` that fit this machine now, and the ones left out."""
    avail = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) >> 10
    fit = [s for s in wanted if 2 * s + 2048 <= avail]
    return fit, [s for s in wanted if s not in fit], avail


def _line(p, timeout=TIMEOUT_S):
    """One line of ``p`` (spawned unbuffered), or HelperDied after ``timeout``.

    select() sees only the pipe: a buffered reader could hold the next line
    already (cnlisten writes every exit of the machine, often two at once),
    and the select would then wait for a line that was read -- _spawn opens
    the pipe with bufsize=0, so readline() never takes more than one line.
    """
    r, _, _ = _select.select([p.stdout], [], [], timeout)
    if not r:
        raise _procs.HelperDied(f"no output from pid {p.pid} within {timeout:g} s")
    line = p.stdout.readline()
    if not line:
        raise _procs.HelperDied(f"pid {p.pid} closed its output")
    return line.decode().strip()


class _Bench:
    def __init__(self, ctx, outdir):
        self.out = outdir
        flags = ("-I", INCLUDE, "-pthread")
        self.armed = _build.build("bigtarget", outdir, flags=flags, variant="-armed")
        self.unarmed = _build.build("bigtarget", outdir, flags=flags + ("-DPROCWATCH_NO_DEATH_WORD",),
                                    variant="-unarmed")
        self.pwwait = ctx.bins["pwwait"]
        self.cnlisten = ctx.bins["cnlisten"]

    def __enter__(self):
        from procwatch.segment import Table
        self.svc = _pwsuite.PwService(self.out).start()
        self.table = Table.attach(self.svc.key)
        self.waiter = self._spawn([self.pwwait, hex(self.svc.key)], stdin=True)
        if not _line(self.waiter).startswith("ready"):
            raise _procs.HelperDied("pwwait did not start")
        try:
            self.rt_waiter = self._spawn([self.pwwait, hex(self.svc.key)], stdin=True, realtime=True)
        except _subprocess.SubprocessError:             # SCHED_FIFO refused: the row is left out
            self.rt_waiter = None
        if self.rt_waiter is not None and not _line(self.rt_waiter).startswith("ready"):
            raise _procs.HelperDied("pwwait (SCHED_FIFO) did not start")
        # The same C target under a second service that yields the dying teardown for 2 ms
        # (--teardown-yield-ms 2), seen by its own normal-priority pwwait; the armed C row is its
        # baseline.
        self.svc0 = _pwsuite.PwService(self.out, extra=("--teardown-yield-ms", "2")).start()
        self.table0 = Table.attach(self.svc0.key)
        self.waiter0 = self._spawn([self.pwwait, hex(self.svc0.key)], stdin=True)
        if not _line(self.waiter0).startswith("ready"):
            raise _procs.HelperDied("pwwait (yielding service) did not start")
        self.rows = [(k, label) for k, label in ROWS if k != "c-rt" or self.rt_waiter is not None]
        self.cn = self._spawn([self.cnlisten, "--parent", str(_os.getpid()), "--rcvbuf", str(8 << 20)])
        if not _line(self.cn).startswith("ready"):
            raise _procs.HelperDied("cnlisten did not start")
        self.serial = 0
        return self

    def __exit__(self, *exc):
        for p in (self.waiter, self.rt_waiter, self.waiter0, self.cn):
            if p is None:
                continue
            if p.poll() is None:
                p.kill()
            p.wait(5)
            _procs._CHILDREN.pop(p.pid, None)
        self.table.detach()
        self.table0.detach()
        self.svc.stop()
        self.svc0.stop()

    def _spawn(self, argv, stdin=False, realtime=False):
        rt = (lambda: _os.sched_setscheduler(0, _os.SCHED_FIFO, _os.sched_param(1))) if realtime else None
        p = _subprocess.Popen(argv, stdin=_subprocess.PIPE if stdin else _subprocess.DEVNULL,
                              stdout=_subprocess.PIPE, bufsize=0, cwd=ROOT,
                              env=dict(_os.environ, PYTHONPATH=ROOT), preexec_fn=rt)
        _procs._track(p.pid, argv[0])
        return p

    def _target(self, row, mib):
        self.serial += 1
        name = f"big-{row}-{self.serial}"
        key = hex(self.svc.key)
        argv = {"py": [_sys.executable, "-c", PY_TARGET, str(mib), name, key],
                "c": [self.armed, str(mib), name, key], "c-rt": [self.armed, str(mib), name, key],
                "c-yield": [self.armed, str(mib), name, hex(self.svc0.key)],
                "run": [_sys.executable, "-m", "procwatch", "run", "--key", key, "--name", name, "--",
                        self.armed, str(mib)],
                "unarmed": [self.unarmed, str(mib), name, key],
                "cn": [self.armed, str(mib)], "pidfd": [self.armed, str(mib)]}[row]
        p = self._spawn(argv)
        if _line(p) != "ready":
            raise _procs.HelperDied(f"{row} target did not start")
        return p, name

    def _slot(self, table, name):
        for s in table.used_slots():
            if s.name == name:
                return s
        raise _procs.HelperDied(f"{name} is not in the table")

    def kill_once(self, row, mib):
        """One kill of a fresh target: (kill -> seen ns, how the service zeroed it or None)."""
        from procwatch import abi
        p, name = self._target(row, mib)
        try:
            end = _time.monotonic() + TIMEOUT_S
            slot = None
            table = self.table0 if row == "c-yield" else self.table
            if row in ("py", "c", "c-rt", "c-yield", "run", "unarmed"):
                slot = self._slot(table, name).index
                armed = row != "unarmed"
                while armed and not (table.death_arm(slot) == abi.Arm.ARMED
                                     and table.death_word(slot) & abi.FUTEX_WAITERS):
                    if _time.monotonic() > end:
                        raise _procs.HelperDied(f"{name}: the service never waited on its death word")
                    _time.sleep(0.005)
            _time.sleep(SETTLE_S)
            waiter = {"c-rt": self.rt_waiter, "c-yield": self.waiter0}.get(row, self.waiter)
            if slot is not None:
                waiter.stdin.write(f"watch {p.pid} {table.pid_address(slot) - table.address}\n"
                                   .encode())
                waiter.stdin.flush()
                if _line(waiter) != f"ok {p.pid}":
                    raise _procs.HelperDied(f"pwwait does not see {name}")
            fd = _os.pidfd_open(p.pid) if row == "pidfd" else None
            t0 = _time.monotonic_ns()
            _os.kill(p.pid, _signal.SIGKILL)
            if row == "pidfd":
                poller = _select.poll()
                poller.register(fd, _select.POLLIN)
                poller.poll()
                t1 = _time.monotonic_ns()
                _os.close(fd)
            elif row == "cn":
                while True:
                    words = _line(self.cn).split()
                    if words[0] == "exit" and int(words[1]) == p.pid and int(words[2]) == p.pid:
                        t1 = int(words[3])
                        break
            else:
                words = _line(waiter).split()
                if words[:2] != ["exit", str(p.pid)]:
                    raise _procs.HelperDied(f"pwwait said {words}")
                t1 = int(words[2])
            p.wait(TIMEOUT_S)
            how = None
            if slot is not None:
                while table.state(slot) == abi.State.ALIVE and _time.monotonic() < end:
                    _time.sleep(0.002)          # the record follows the zeroing
                s = table.read_slot(slot)
                how = abi.Detection(s.detected_by).name.lower() if s.state == abi.State.EXITED else "?"
            return t1 - t0, how
        finally:
            if p.poll() is None:
                p.kill()
                p.wait(5)
            _procs._CHILDREN.pop(p.pid, None)


def section(ctx):
    """The big-target rows: one run, every row in turn for each kill."""
    args = ctx.args
    fit, left_out, avail = sizes([int(s) for s in args.big_sizes.split(",") if s.strip()])
    load0 = open("/proc/loadavg").read().split()[:3]
    rows = []
    notes = [f"{args.big_kills} kills per row and size, the rows taking turns for each kill; "
             "t0 right before kill(SIGKILL), t1 taken by the peer (pwwait, cnlisten) or, for pidfd+poll, "
             "by the bench process when poll(2) returns",
             "death word: how many of the row's ends the service zeroed from the death word (the rest "
             "from the exit event); the connector and pidfd rows wait for the address-space teardown",
             f"MemAvailable {avail} MiB at the start; load average {' '.join(load0)} at the start"]
    if left_out:
        notes.append(f"left out (MemAvailable below twice the size + 2 GiB): {', '.join(map(str, left_out))} MiB")
    if not fit or args.big_kills < 1:
        return {"id": "big_targets", "title": "big targets: kill -> peer woken (µs)", "columns": [],
                "rows": [], "notes": notes + ["no size fits: not measured"]}
    with _Bench(ctx, args.out) as b:
        notes.append("armed C client, real-time peer: the armed C row's target seen by a second pwwait at "
                     "SCHED_FIFO 1; every other peer runs at normal priority, and one that the scheduler puts "
                     "on the dying process's CPU waits behind its teardown there" if b.rt_waiter is not None
                     else "armed C client, real-time peer: left out (SCHED_FIFO refused here)")
        notes.append("armed C client, teardown yield 2 ms: the same target and peer under a second service "
                     "started with --teardown-yield-ms 2 (the dying process's threads at SCHED_IDLE for 2 ms "
                     "once its peers are woken); every other procwatch row: the default, no yield")
        for mib in fit:
            samples = {k: [] for k, _ in b.rows}
            hows = {k: [] for k, _ in b.rows}
            print(f"bench: big targets {mib} MiB: {args.big_kills} kills per row", file=_sys.stderr)
            for _ in range(args.big_kills):
                for key, _label in b.rows:
                    ns, how = b.kill_once(key, mib)
                    samples[key].append(ns)
                    hows[key].append(how)
            base = None
            for key, label in b.rows:
                s = _report.summarize_ns(samples[key])
                if key == "pidfd":
                    base = s["p50_us"]
                dw = sum(1 for h in hows[key] if h == "death_word")
                rows.append({"observer": label, "key": key, "mib": mib, **s,
                             "death_word": f"{dw}/{len(hows[key])}" if hows[key][0] is not None else "-"})
            for r in rows[-len(b.rows):]:
                r["p50_vs_pidfd"] = f"{r['p50_us'] / base:.3f}" if base and r["p50_us"] else None
                print(f"bench: {r['key']:>8} {mib:>5} MiB p50 {r['p50_us']} µs p99 {r['p99_us']} µs "
                      f"death word {r['death_word']}", file=_sys.stderr)
    notes.append(f"load average {' '.join(open('/proc/loadavg').read().split()[:3])} at the end")
    return {"id": "big_targets",
            "title": "big targets (issue 14): kill -> a peer is woken (µs), by memory touched",
            "columns": [["observer", "observer"], ["mib", "MiB"], ["n", "kills"], ["p50_us", "p50"],
                        ["p99_us", "p99"], ["max_us", "max"], ["p50_vs_pidfd", "p50 / pidfd"],
                        ["death_word", "death word"]],
            "rows": rows, "notes": notes}
