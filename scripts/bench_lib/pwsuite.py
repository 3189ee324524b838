"""procwatch's own measurements, each beside the baselines of the same run.

1. kill -> a peer sees the PID word turn 0: two observers for the kill
   harness (``latency.measure``), idle and under storm, each with its own
   service: ``pw-futex``, a C peer asleep in FUTEX_WAIT on the slot word
   (csrc/pwwait.c: the least a peer can do), and ``pw-peer``, a Python
   process blocked in ``procwatch.Peer.wait_exit()`` (what an application
   does).  ``pw-pidfd`` is ``pw-futex`` against a service run with
   ``--backend pidfd`` (issue 5), for the backend containers get.  The
   harness registers every target by PID and waits for the service's
   "registered" line before it kills: the steady state, not the first-sight
   path.
2. kernel event timestamp -> slot zeroed: the slot's ``latency_us``, which
   the service writes right after zeroing the word and waking its waiters.
3. capacity: storms at rising exit rates, kills throughout; an exit is lost
   when it is not reported from its kernel event (found dead instead, or
   never); service CPU per exit event from /proc/PID/stat over the events
   the service says it read (its "stopping" line).  One step with a 4 KiB
   receive buffer shows overflow handling.
4. peer side: ns per ``Peer.pid``, ``Peer.alive``, ``Registration.beat()``
   (timeit, best of several), beside ``os.kill(pid, 0)``.
5. footprint: service RSS and start -> READY=1 (sd_notify, caught on our
   own NOTIFY_SOCKET), 1024 and 65536 slots.

Every service runs on a private key (``0x7b`` + PID bits + counter; the
tests use ``0x7e``) and its segment is removed when it stops.
"""

import importlib.util as _ilu
import itertools as _itertools
import os as _os
import signal as _signal
import socket as _socket
import statistics as _statistics
import subprocess as _subprocess
import sys as _sys
import tempfile as _tempfile
import time as _time
import timeit as _timeit

from . import latency as _latency
from . import procs as _procs
from . import report as _report

CORE_MODULES = ("procwatch.abi", "procwatch.segment", "procwatch.client",
                "procwatch.futex", "procwatch.service", "procwatch.cli")
ROOT = _os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
TARGET_NAME = "bench-target"
_serial = _itertools.count(1)

# The targets: (id, what, limit, unit, lower is better)
TARGETS = {
    "p50_ratio_idle": "kill -> peer sees 0, p50 / bare listener p50 (idle)",
    "p50_ratio_storm": "kill -> peer sees 0, p50 / bare listener p50 (storm)",
    "p99_idle": "kill -> peer sees 0, p99 idle (µs)",
    "p99_storm": "kill -> peer sees 0, p99 under storm (µs)",
    "lost_at_top": "registered exits lost at the top exit rate",
    "cpu_per_exit": "service CPU per unrelated exit (µs)",
    "alive_ns": "Peer.alive (ns)",
    "p50_vs_relay_random": "kill -> peer woken at random moments, p50 / relay p50 (same waiter)",
    "p99_vs_relay_random": "kill -> peer woken at random moments, p99 / relay p99 (same waiter)",
    "p50_vs_relay_storm": "kill -> peer woken under storm, p50 / relay p50 (same waiter)",
    "p99_vs_relay_storm": "kill -> peer woken under storm, p99 / relay p99 (same waiter)",
    "cpu_per_cycle": "service CPU per register + kill cycle (µs)",
    "idle_cpu": "idle service CPU (ms/s)",
    "register_ms": "register_pid(), 65536 slots (ms)",
    "rss_mb": "service RSS, 65536 slots (MB)",
    "ready_ms": "start -> ready, 65536 slots (ms)",
}
LIMITS = {"p50_ratio_idle": 1.3, "p50_ratio_storm": 1.3, "p99_idle": 1000, "p99_storm": 1000,
          "lost_at_top": 0, "cpu_per_exit": 10, "alive_ns": 50, "rss_mb": 40, "ready_ms": 300,
          "p50_vs_relay_random": 1.2, "p99_vs_relay_random": 1.5, "p50_vs_relay_storm": 1.2,
          "p99_vs_relay_storm": 1.5, "cpu_per_cycle": 250, "idle_cpu": 0.5, "register_ms": 1.0}
# (waiter kind -> the relay row with the same kind of waiter)
SAME_WAITER = {"pw-futex": "relay", "pw-peer": "relay-py"}


def missing_modules():
    """Core modules this tree does not have."""
    out = []
    for name in CORE_MODULES:
        try:
            if _ilu.find_spec(name) is None:
                out.append(name)
        except ModuleNotFoundError:
            out.append(name)
    return out


def _why_not():
    missing = missing_modules()
    return f"not measured: procwatch core is not in this tree (missing {', '.join(missing)})" if missing else None


def private_key():
    return 0x7B000000 | ((_os.getpid() & 0xFFF) << 12) | (next(_serial) & 0xFFF)


def remove_table(key):
    import sysv_ipc
    for cls in (sysv_ipc.SharedMemory, sysv_ipc.Semaphore):
        try:
            cls(key).remove()
        except (sysv_ipc.ExistentialError, sysv_ipc.PermissionsError):
            pass


def _fields(line):
    """The key=value fields procwatch's stderr format appends after two spaces."""
    if "  event=" not in line:
        return None
    return dict(kv.split("=", 1) for kv in line.rsplit("  ", 1)[1].split() if "=" in kv)


class LogTail:
    """Follow a service's stderr log and hand out its event lines as dicts."""

    def __init__(self, path):
        self._f = open(path, "rb")
        self._rest = b""
        self.events = []

    def poll(self):
        data = self._f.read()
        if not data:
            return []
        lines = (self._rest + data).split(b"\n")
        self._rest = lines.pop()
        new = [f for f in (_fields(ln.decode(errors="replace")) for ln in lines) if f]
        self.events += new
        return new

    def wait(self, pred, timeout):
        """The first event (old or new) matching ``pred``, or None after ``timeout`` s."""
        for e in self.events:
            if pred(e):
                return e
        end = _time.monotonic() + timeout
        delay = 0.0001
        while True:
            for e in self.poll():
                if pred(e):
                    return e
            if _time.monotonic() >= end:
                return None
            _time.sleep(delay)
            delay = min(delay * 2, 0.005)

    def close(self):
        self._f.close()


class PwService:
    """``procwatch serve`` on a private key, logging to a file; removed on stop."""

    def __init__(self, outdir, slots=1024, rcvbuf=None, notify=False, backend=None, extra=()):
        self.key = private_key()
        self.extra = tuple(extra)       # more 'serve' arguments (etcdfleet.py: --config)
        self.slots = slots
        self.rcvbuf = rcvbuf
        self.backend = backend
        self.notify = notify
        self.log_path = _os.path.join(outdir, f"service-{self.key:08x}.log")
        self.proc = None
        self.ready_ms = None
        self.cpu_at_ready = None
        self.stopping = {}

    def start(self, timeout=15.0):
        """Start it and wait for READY; on failure nothing is left behind (process, table)."""
        try:
            return self._start(timeout)
        except BaseException:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait(5)
            remove_table(self.key)
            if getattr(self, "_notify_path", None):
                self._notify_sock.close()
                _os.unlink(self._notify_path)
            raise

    def _start(self, timeout):
        remove_table(self.key)
        argv = [_sys.executable, "-m", "procwatch", "serve", "--key", hex(self.key), "--slots", str(self.slots),
                "--log", "stderr", "--log-level", "info"]
        if self.rcvbuf:
            argv += ["--rcvbuf", str(self.rcvbuf)]
        if self.backend:
            argv += ["--backend", self.backend]
        argv += self.extra
        env = dict(_os.environ, PYTHONPATH=ROOT)
        env.pop("NOTIFY_SOCKET", None)
        sock = None
        if self.notify:
            # READY=1 is what systemd waits for: catch it on a socket of our own.
            path = _os.path.join(_tempfile.gettempdir(), f"pwbench-notify-{_os.getpid()}-{self.key:x}")
            if _os.path.exists(path):
                _os.unlink(path)
            sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
            sock.bind(path)
            env["NOTIFY_SOCKET"] = path
            self._notify_sock, self._notify_path = sock, path
        log = open(self.log_path, "wb")
        t0 = _time.monotonic()
        self.proc = _subprocess.Popen(argv, stdin=_subprocess.DEVNULL, stdout=log, stderr=log, env=env, cwd=ROOT)
        log.close()
        _procs._track(self.proc.pid, "procwatch")
        self.log = LogTail(self.log_path)
        end = t0 + timeout
        if sock is not None:
            sock.settimeout(timeout)
            while b"READY=1" not in sock.recv(4096):
                if _time.monotonic() > end:
                    raise _procs.HelperDied("procwatch sent no READY=1")
        elif self.log.wait(lambda e: e.get("event") == "started", timeout) is None:
            raise _procs.HelperDied(f"procwatch did not start:\n{open(self.log_path).read()[-2000:]}")
        self.ready_ms = (_time.monotonic() - t0) * 1000
        if self.proc.poll() is not None:
            raise _procs.HelperDied(f"procwatch exited:\n{open(self.log_path).read()[-2000:]}")
        self.cpu_at_ready = _procs.cpu_us(self.proc.pid)
        return self

    def cpu_us(self):
        return _procs.cpu_us(self.proc.pid)

    def rss_kb(self):
        out = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "RssAnon:", "RssFile:", "RssShmem:")):
                    out[line.split(":")[0]] = int(line.split()[1])
        return out

    def stop(self):
        """SIGTERM, then the counters of its "stopping" line; the segment is removed."""
        if self.proc.poll() is None:
            self.proc.send_signal(_signal.SIGTERM)
        try:
            self.proc.wait(10)
        except _subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        _procs._CHILDREN.pop(self.proc.pid, None)
        self.log.poll()
        self.stopping = next((e for e in reversed(self.log.events) if e.get("event") == "stopping"), {})
        self.log.close()
        if self.notify:
            self._notify_sock.close()
            _os.unlink(self._notify_path)
        remove_table(self.key)
        _os.unlink(self.log_path)
        return self.stopping


# A target dies long after it registered, when the service sleeps.  Killed
# within a few hundred µs of registering, it would find the service still
# busy with that registration (and with the previous exit's respawn and
# reconcile): another thread holding the GIL, or waiting for a CPU with it,
# delays the detector by milliseconds on a loaded machine.  So the harness
# waits, at most this long, until every service thread sleeps.
SETTLE_S = 0.003


def _service_asleep(pid, timeout):
    """Wait until every thread of ``pid`` sleeps (state S); False after ``timeout`` s."""
    end = _time.monotonic() + timeout
    while True:
        try:
            tasks = _os.listdir(f"/proc/{pid}/task")
            states = []
            for t in tasks:
                with open(f"/proc/{pid}/task/{t}/stat", "rb") as f:
                    states.append(f.read().rsplit(b")", 1)[1].split()[0])
        except OSError:
            states = [b"?"]
        if all(st == b"S" for st in states):
            return True
        if _time.monotonic() >= end:
            return False
        _time.sleep(0.00005)


class PwObserver(_latency._LineObserver):
    """A peer of a registered target, with its own procwatch service.

    ``kind`` "futex": csrc/pwwait.c; "peer": pwpeer.py (Peer.wait_exit).
    ``backend`` "pidfd": the service runs ``--backend pidfd`` (key pw-pidfd).
    """

    def __init__(self, ctx, kind, rcvbuf=None, backend=None):
        super().__init__()
        self.ctx = ctx
        self.kind = kind
        self.rcvbuf = rcvbuf
        self.backend = backend
        self.key = f"pw-{backend or kind}"
        self.label = ("procwatch, C futex waiter on the PID word" if kind == "futex"
                      else "procwatch, Python Peer.wait_exit()")
        if backend:
            self.label += f" (--backend {backend})"
        self.svc = None
        self.reg = None
        self.zero_us = []           # slot latency_us: kernel event -> word zeroed
        self.causes = {}            # Cause name -> count
        self.not_asleep = 0
        self.busy_at_kill = 0       # kills made while a service thread still ran (storm: most)

    def start(self):
        from procwatch import abi
        self.abi = abi
        self.svc = PwService(self.ctx.args.out, rcvbuf=self.rcvbuf, backend=self.backend).start()
        if self.kind == "futex":
            argv = [self.ctx.bins["pwwait"], hex(self.svc.key)]
        else:
            argv = [_sys.executable, _os.path.join(_os.path.dirname(__file__), "pwpeer.py"), hex(self.svc.key)]
        self.proc = _procs.LineProc(argv, name=f"observer-{self.key}")
        self.proc.expect("ready", timeout=10.0)

    def prepare(self, pid):
        import procwatch
        self._drop_reg()
        self.reg = procwatch.register_pid(TARGET_NAME, pid=pid, key=self.svc.key)
        if self.svc.log.wait(lambda e: e.get("event") == "registered" and e.get("pid") == str(pid), 5.0) is None:
            raise _procs.HelperDied(f"procwatch did not watch target {pid} within 5 s")

    def watch(self, pid):
        if self.kind == "futex":
            self.proc.send(f"watch {pid} {self.abi.slot_offset(self.reg.slot) + self.abi.S_PID}")
        else:
            self.proc.send(f"watch {pid} {TARGET_NAME}")
        line = self.proc.readline(5.0)
        if line != f"ok {pid}":
            raise _procs.HelperDied(f"{self.proc.name}: '{line}' for watch {pid}")
        # Kill only once the peer sleeps in FUTEX_WAIT, as a waiting peer would,
        # and the service has finished with the registration (see SETTLE_S).
        if not _latency.wait_asleep(self.proc.pid):
            self.not_asleep += 1
        if not _service_asleep(self.svc.proc.pid, SETTLE_S):
            self.busy_at_kill += 1

    def _event(self, parts):
        return int(parts[1]), int(parts[2]), None

    def collected(self, pid, seen):
        """Read how the slot ended (the service writes it right after the wake)."""
        reg = self.reg
        if reg is None or reg.pid != pid:
            return
        t, abi = reg.table, self.abi
        end = _time.monotonic() + 2.0
        while t.state(reg.slot) in (abi.State.ALIVE, abi.State.HUNG) and _time.monotonic() < end:
            _time.sleep(0.0001)
        s = t.read_slot(reg.slot)
        name = s.cause_name if s.pid == 0 else "unreported"
        self.causes[name] = self.causes.get(name, 0) + 1
        if s.state == abi.State.EXITED and s.latency_us != abi.LATENCY_UNKNOWN:
            self.zero_us.append(s.latency_us)
        self._drop_reg()

    def _drop_reg(self):
        if self.reg is not None:
            self.reg.unregister()       # the word is 0 by now: this only detaches
            self.reg = None

    def stop(self):
        self._drop_reg()
        stats = self.proc.stop(how="eof") if self.proc else {}
        cpu = self.svc.cpu_us()
        st = self.svc.stop()
        events = int(st.get("events", 0))
        return {"cpu_us": cpu, "cpu_us_at_ready": self.svc.cpu_at_ready, "events": events,
                "enobufs": int(st.get("overflows", 0)), "found_dead": self.causes.get("found_dead", 0)
                + self.causes.get("found_dead_overflow", 0), "causes": dict(self.causes),
                "not_asleep": self.not_asleep, "busy_at_kill": self.busy_at_kill,
                "ready_ms": round(self.svc.ready_ms, 1), **stats}


# -- measurement 1 ------------------------------------------------------------
def observers(ctx):
    """procwatch observers for the kill -> peer-sees-0 rows."""
    if _why_not():
        return {}
    return {"pw-futex": lambda: PwObserver(ctx, "futex"), "pw-peer": lambda: PwObserver(ctx, "peer"),
            "pw-pidfd": lambda: PwObserver(ctx, "futex", backend="pidfd")}


def notes_for_latency(ctx):
    why = _why_not()
    if why:
        return [f"procwatch rows {why}"]
    return ["procwatch rows: each row runs its own `procwatch serve` (default 4 MiB receive buffer) on a "
            "private key; the harness registers each target by PID and waits for the service's 'registered' "
            "line, then kills it once the peer sleeps in FUTEX_WAIT and every service thread sleeps "
            f"(waiting at most {SETTLE_S * 1000:g} ms: under storm the detector never sleeps); 'found dead' "
            "counts exits reported by reconcile instead of by their event; 'observer CPU' is the service's, "
            "over the exit events it read"]


# -- measurements 2-5 ---------------------------------------------------------------
def _zero_section(rows, observers_by_row):
    out = []
    for r in rows:
        if r["key"] == "cn" and "kernel_to_seen" in r:
            k = r["kernel_to_seen"]
            out.append({"what": "bare listener: event -> recv() returns", "condition": r["condition"],
                        "n": k["n"], "p50": k["p50_us"], "p99": k["p99_us"], "max": k["max_us"]})
    for r in rows:
        obs = [o for o in observers_by_row.get(id(r), ()) if isinstance(o, PwObserver)]
        zero = [u for o in obs for u in o.zero_us]
        if zero:
            s = _report.summarize_ns([u * 1000 for u in zero])
            out.append({"what": f"procwatch ({r['key']}): event -> word zeroed", "condition": r["condition"],
                        "n": s["n"], "p50": s["p50_us"], "p99": s["p99_us"], "max": s["max_us"]})
    return {"id": "pw_kernel_to_zero",
            "title": "kernel event timestamp -> slot zeroed (µs): procwatch's own overhead",
            "columns": [["what", "what"], ["condition", "condition"], ["n", "n"], ["p50", "p50"], ["p99", "p99"],
                        ["max", "max"]],
            "rows": out,
            "notes": ["procwatch: the slot's latency_us (whole µs): the service's CLOCK_MONOTONIC just before it "
                      "zeroes the word, less the event's timestamp (ktime_get_ns, the same clock); the bare "
                      "listener's row is the same span for a loop that does nothing else"]}


def _cpu_per_exit(cpu_us, events):
    return round(cpu_us / events, 2) if cpu_us is not None and events else None


def capacity(ctx, seconds):
    """Storm steps at rising rates: CPU per unrelated exit, then registered kills all along.

    Each step, inside one storm: the bare C listener alone for ``seconds``/2
    (its CPU per exit), a procwatch service with nothing to do but read the
    storm for as long (its CPU per unrelated exit), then a fresh service with
    the C futex peer and kills for ``seconds`` (what was lost).
    """
    top = ctx.top_rate or 0
    steps = [(f"{p}% of top", int(top * p / 100), None) for p in (25, 50, 75)] if top else []
    steps += [("as fast as it goes", 0, None), ("as fast as it goes, --rcvbuf 4096", 0, 4096)]
    quiet = max(1.0, seconds / 2)
    rows = []
    for label, rate, rcvbuf in steps:
        if ctx.final_left() < seconds + 2 * quiet + 4:
            print(f"bench: budget spent, skipping capacity step '{label}'", file=_sys.stderr)
            continue
        print(f"bench: capacity {label} ...", end="", file=_sys.stderr, flush=True)
        with _procs.Storm(ctx.bins["forker"], rate=rate, workers=ctx.args.storm_workers,
                          seconds=seconds + 2 * quiet + 8) as storm:
            cn = _latency.ConnectorObserver(ctx.bins["cnlisten"], rcvbuf=rcvbuf or ctx.args.rcvbuf)
            cn.start()
            _time.sleep(quiet)
            cn_st = cn.stop()
            svc = PwService(ctx.args.out, rcvbuf=rcvbuf).start()
            _time.sleep(quiet)
            svc_cpu = svc.cpu_us() - svc.cpu_at_ready
            svc_st = svc.stop()
            obs = PwObserver(ctx, "futex", rcvbuf=rcvbuf)
            obs.start()
            try:
                res = _latency.measure(obs, ctx.bins["target"], 10 ** 6, _time.monotonic() + seconds)
            finally:
                st = obs.stop()
        sr = storm.result
        never = st["causes"].get("unreported", 0)
        lost = st["found_dead"] + never
        svc_events = int(svc_st.get("events", 0))
        row = {"step": label, "asked": rate or None, "rate": sr.get("rate"), "kills": res["attempted"],
               "lost": lost, "found_dead": st["found_dead"], "never": never, "peer_timeouts": len(res["lost"]),
               "overflows": st["enobufs"] + int(svc_st.get("overflows", 0)),
               "cn_cpu": _cpu_per_exit(cn_st.get("cpu_us", 0) - cn_st.get("cpu_us_at_ready", 0), cn_st.get("events")),
               "svc_cpu": _cpu_per_exit(svc_cpu, svc_events), "svc_events": svc_events, "rcvbuf": rcvbuf}
        if row["cn_cpu"] and row["svc_cpu"]:
            row["cpu_ratio"] = round(row["svc_cpu"] / row["cn_cpu"], 2)
        rows.append(row)
        print(f" {row['rate']} exits/s, {row['kills']} kills, {lost} lost, {row['overflows']} overflows, "
              f"{row['svc_cpu']} µs CPU/exit (bare listener {row['cn_cpu']})", file=_sys.stderr)
    ok = [r for r in rows if r["lost"] == 0 and not r["rcvbuf"] and r["rate"]]
    best = max(ok, key=lambda r: r["rate"]) if ok else None
    notes = [f"each step runs one storm of {ctx.args.storm_workers} forking processes: the bare C listener alone for "
             f"{quiet:g} s, then a procwatch service with nothing registered for {quiet:g} s (CPU per unrelated "
             f"exit: utime+stime after READY over the exit events it says it read), then a fresh service, the C "
             f"futex peer and kills for {seconds:g} s",
             "lost = registered exits not reported from their own event: found dead (by reconcile) + never "
             "reported; 'never reported' must stay 0 in every step, the 4 KiB one included",
             "at lower rates every exit wakes the reader from recv(): that sleep/wake is most of the CPU per exit, "
             "for the C listener too",
             f"capacity: {best['rate']:,.0f} exits/s with no registered exit lost" if best
             else "capacity: every step lost a registered exit"]
    return {"id": "pw_capacity", "title": "procwatch: capacity under exit storms",
            "columns": [["step", "storm"], ["rate", "exits/s reached"], ["kills", "kills"], ["lost", "lost"],
                        ["found_dead", "found dead"], ["never", "never reported"], ["overflows", "overflows"],
                        ["svc_cpu", "service CPU µs/exit"], ["cn_cpu", "bare listener CPU µs/exit"],
                        ["cpu_ratio", "ratio"]],
            "rows": rows, "notes": notes, "best": best}


class _Constant:
    @property
    def alive(self):
        return True


def _ns_per_call(stmts, glb, number, repeat):
    """{stmt: ns per call}: the best of ``repeat`` short runs, the statements taking turns,
    so that a burst of load from elsewhere costs each statement a run, not its result."""
    timers = {st: _timeit.Timer(st, globals=glb) for st in stmts}
    best = {st: float("inf") for st in stmts}
    for _ in range(repeat):
        for st, t in timers.items():
            n = number // 10 if st.startswith("os.") else number
            best[st] = min(best[st], t.timeit(n) / n)
    return {st: round(v * 1e9, 1) for st, v in best.items()}


def peer_side(ctx):
    """ns per Peer.pid / Peer.alive / beat(), and a system call for scale."""
    import procwatch
    from procwatch.segment import Table
    key = private_key()
    remove_table(key)
    table, _ = Table.create_or_adopt(key, 1024)
    table.detach()
    reg = procwatch.register_pid("bench-self", key=key)
    peer = procwatch.Peer("bench-self", key=key)
    number, repeat = (50_000, 20) if ctx.args.quick else (100_000, 40)
    glb = {"peer": peer, "reg": reg, "os": _os, "pid": _os.getpid(), "prop": _Constant()}
    ops = [("Peer.pid", "peer.pid"), ("Peer.alive", "peer.alive"), ("Registration.beat()", "reg.beat()"),
           ("(timeit loop alone: pass)", "pass"), ("(a property returning True: CPython's floor)", "prop.alive"),
           ("os.kill(pid, 0), for scale", "os.kill(pid, 0)")]
    try:
        ns = _ns_per_call([st for _, st in ops], glb, number, repeat)
    finally:
        reg.unregister()
        peer.close()
        remove_table(key)
    return {"id": "pw_peer_side", "title": "procwatch: peer-side cost (ns per call, Python)",
            "columns": [["op", "operation"], ["ns", "ns"]], "rows": [{"op": op, "ns": ns[st]} for op, st in ops],
            "notes": [f"timeit in the bench process (Python {_sys.version.split()[0]}): the best of {repeat} runs "
                      f"of {number:,} calls, the operations taking turns; the loop's own cost is included "
                      "(see 'pass')"]}


def footprint(ctx, reps):
    rows = []
    t = []
    for _ in range(reps):
        t0 = _time.monotonic()
        _subprocess.run([_sys.executable, "-c", "pass"], check=True)
        t.append((_time.monotonic() - t0) * 1000)
    rows.append({"what": "python -c pass (the interpreter alone)", "ready_ms": round(_statistics.median(t), 1),
                 "ready_min": round(min(t), 1), "ready_max": round(max(t), 1)})
    for slots in (1024, 65536):
        ready, rss = [], []
        for _ in range(reps):
            svc = PwService(ctx.args.out, slots=slots, notify=True).start()
            try:
                _time.sleep(1.2)        # one reconcile has read every slot
                rss.append(svc.rss_kb())
            finally:
                svc.stop()
            ready.append(svc.ready_ms)
        last = rss[-1]
        rows.append({"what": f"procwatch serve --slots {slots}", "ready_ms": round(_statistics.median(ready), 1),
                     "ready_min": round(min(ready), 1), "ready_max": round(max(ready), 1),
                     "rss_mb": round(max(r["VmRSS"] for r in rss) / 1024, 1),
                     "anon_mb": round(last["RssAnon"] / 1024, 1), "file_mb": round(last["RssFile"] / 1024, 1),
                     "shmem_mb": round(last["RssShmem"] / 1024, 1), "slots": slots})
    return {"id": "pw_footprint", "title": "procwatch: footprint",
            "columns": [["what", "what"], ["ready_ms", "start -> ready ms (median)"], ["ready_min", "min"],
                        ["ready_max", "max"], ["rss_mb", "VmRSS MB (max)"], ["anon_mb", "anon"], ["file_mb", "file"],
                        ["shmem_mb", "table (shmem)"]],
            "rows": rows,
            "notes": [f"{reps} starts each; ready = READY=1 received on a NOTIFY_SOCKET of the bench's own, "
                      "counted from fork; RSS 1.2 s after READY, when a reconcile has touched every slot "
                      "(the table's pages count as shmem)"]}


_DETECTOR_SYSCALLS = {"45", "7"}     # x86_64 recvfrom (the Python detector), poll (the C step)


def _threads(pid):
    """{tid: (is_detector, on-CPU ns, voluntary context switches)} of every thread of ``pid``.

    On-CPU time from /proc/PID/task/TID/schedstat (ns, not clock ticks); the
    detector is the thread named pw-detector (the C step names it) or, in a
    build without it, the one sleeping in recvfrom/poll on the connector.
    """
    out = {}
    for tid in _os.listdir(f"/proc/{pid}/task"):
        base = f"/proc/{pid}/task/{tid}"
        try:
            with open(f"{base}/comm") as f:
                comm = f.read().strip()
            with open(f"{base}/syscall") as f:
                nr = f.read().split()[0]
            with open(f"{base}/schedstat") as f:
                ns = int(f.read().split()[0])
            with open(f"{base}/status") as f:
                vol = next(int(line.split()[1]) for line in f if line.startswith("voluntary_ctxt_switches"))
        except (FileNotFoundError, ProcessLookupError, StopIteration):
            continue
        out[tid] = (comm == "pw-detector" or nr in _DETECTOR_SYSCALLS, ns, vol)
    return out


def _split(before, after):
    """(own ns, own wake-ups, detector ns, detector wake-ups) between two _threads() samples."""
    own_ns = own_w = det_ns = det_w = 0
    for tid, (det, ns, vol) in after.items():
        _d, ns0, vol0 = before.get(tid, (det, 0, 0))
        if det:
            det_ns, det_w = det_ns + ns - ns0, det_w + vol - vol0
        else:
            own_ns, own_w = own_ns + ns - ns0, own_w + vol - vol0
    return own_ns, own_w, det_ns, det_w


def _register_ms(key, n):
    """Median ms of register_pid() + unregister() on the table at ``key`` (this process, new names)."""
    import procwatch
    times = []
    for i in range(n):
        t0 = _time.perf_counter()
        reg = procwatch.register_pid(f"bench-reg-{i}", key=key)
        times.append((_time.perf_counter() - t0) * 1000)
        reg.unregister()
    return round(_statistics.median(times), 3), round(max(times), 3)


def idle_cost(ctx, seconds):
    """What an idle service costs: CPU and wake-ups a second, by table size and live registrations.

    Live registrations without heartbeats: 100 names per sleeping process
    (the service watches each slot with its own pidfd, whatever the PID).
    The service's own exit-event count says how many unrelated exits of the
    machine it read meanwhile (each wakes the detector: not idleness lost).
    """
    import procwatch
    configs = [(1024, 0), (1024, 1024), (8192, 0), (8192, 4000), (65536, 0)]
    rows = []
    for slots, live in configs:
        if ctx.final_left() < seconds + 10:
            print(f"bench: budget spent, skipping idle cost {slots}/{live}", file=_sys.stderr)
            continue
        svc = PwService(ctx.args.out, slots=slots).start()
        sleepers, regs = [], []
        try:
            for i in range(-(-live // 100)):
                sleepers.append(_subprocess.Popen(["sleep", "600"]))
                _procs._track(sleepers[-1].pid, "sleeper")
            for i in range(live):
                regs.append(procwatch.register_pid(f"idle-{i}", pid=sleepers[i // 100].pid, key=svc.key))
            if live:
                svc.log.wait(lambda e: e.get("event") == "registered" and e.get("name") == f"idle-{live - 1}", 30)
            _time.sleep(2.0)                        # settle: one reconcile and a tick
            pid = svc.proc.pid
            cn = _latency.ConnectorObserver(ctx.bins["cnlisten"])   # counts the machine's exits meanwhile
            cn.start()
            th0, t0 = _threads(pid), _time.monotonic()
            _time.sleep(seconds)
            th1, t1 = _threads(pid), _time.monotonic()
            exits = int(cn.stop().get("events", 0))
            reg_ms = _register_ms(svc.key, 20) if slots == 65536 or (slots, live) == (1024, 0) else (None, None)
        finally:
            for r in regs:
                r.unregister()
            st = svc.stop()
            for p in sleepers:
                p.kill()
                p.wait()
                _procs._CHILDREN.pop(p.pid, None)
        dt = t1 - t0
        own_ns, own_w, det_ns, det_w = _split(th0, th1)
        ms_s = own_ns / 1e6 / dt
        rows.append({"slots": slots, "live": live, "cpu_ms_s": round(ms_s, 3), "cpu_pct": round(ms_s / 10, 4),
                     "wakeups_s": round(own_w / dt, 2), "exits_s": round(exits / dt, 1),
                     "det_ms_s": round(det_ns / 1e6 / dt, 2), "det_wakeups_s": round(det_w / dt, 1),
                     "det_us_exit": round(det_ns / 1e3 / exits, 1) if exits else None,
                     "register_ms": reg_ms[0], "register_max_ms": reg_ms[1]})
        print(f"bench: idle {slots} slots, {live} live: own {ms_s:.3f} ms/s, {own_w / dt:.1f} wake-ups/s; "
              f"detector {det_ns / 1e6 / dt:.2f} ms/s for {exits / dt:.0f} exits/s of the machine", file=_sys.stderr)
    return {"id": "pw_idle", "title": "procwatch: an idle service, by table size and live registrations",
            "columns": [["slots", "slots"], ["live", "live registrations"], ["cpu_ms_s", "own CPU ms/s"],
                        ["cpu_pct", "% of a CPU"], ["wakeups_s", "own wake-ups/s"],
                        ["exits_s", "machine exits/s"], ["det_ms_s", "detector CPU ms/s"],
                        ["det_wakeups_s", "detector wake-ups/s"], ["det_us_exit", "detector µs/exit"],
                        ["register_ms", "register_pid() ms (median of 20)"], ["register_max_ms", "max"]],
            "rows": rows,
            "notes": [f"each row: its own service; live registrations have no heartbeat (100 names per sleeping "
                      f"process); after 2 s of settling, on-CPU time (schedstat) and voluntary context switches "
                      f"of every service thread over {seconds:g} s",
                      "own = every thread but the detector: what the service costs by itself (timers, reconcile, "
                      "guard, heartbeat checker). The detector wakes for every exit of the machine (the connector "
                      "sends them all; 'machine exits/s', counted by a bare listener meanwhile): on this shared "
                      "machine those are other people's processes, so its CPU is shown apart, per exit",
                      "how it grows: every pass over the slots (registration, watch list, stale claims, "
                      "guard, hang checker, death words) stops at the header's used_end, past the last slot "
                      "ever taken; the rest of the table is read by one backward pass over its EMPTY tail "
                      "every slots/16384 periods (the guard keeping used_end right), the watch list handles "
                      "only slots whose (PID, start time) moved, and the checks of live registrations are one "
                      "epoll_wait over their pidfds: so idle CPU grows with the slots in use, not the table "
                      "size; register_pid() reads the used slots' names (C), not the table"]}


def _row(rows, key, condition):
    return next((r for r in rows if r["key"] == key and r["condition"] == condition), None)


def summary(ctx, rows, cap, peer, foot, idle=None):
    """The core issue's closing-note line, and each target against its limit."""
    lines, trows = [], []
    for cond in ("idle", "random", "storm"):
        cn, pw, relay = _row(rows, "cn", cond), _row(rows, "pw-futex", cond), _row(rows, "relay", cond)
        if cn and pw and pw["p50_us"] is not None:
            line = (f"{cond}: kill -> slot zeroed (seen by a C futex waiter): p50 {pw['p50_us']} µs, "
                    f"p99 {pw['p99_us']} µs over {pw['n']} kills; bare connector listener, same run: "
                    f"p50 {cn['p50_us']} µs, p99 {cn['p99_us']} µs over {cn['n']} kills "
                    f"(p50 ratio {pw['p50_us'] / cn['p50_us']:.2f})")
            if relay and relay["p50_us"]:
                line += (f"; minimal C relay: p50 {relay['p50_us']} µs, p99 {relay['p99_us']} µs "
                         f"(ratio {relay['p50_us'] / cn['p50_us']:.2f})")
            lines.append(line)
        pidfd = _row(rows, "pw-pidfd", cond)
        if pw and pidfd and pidfd["p50_us"] is not None and pw["p50_us"] is not None:
            lines.append(f"{cond}: the pidfd backend (--backend pidfd, same C futex waiter): p50 "
                         f"{pidfd['p50_us']} µs, p99 {pidfd['p99_us']} µs over {pidfd['n']} kills, beside the "
                         f"connector backend's p50 {pw['p50_us']} µs, p99 {pw['p99_us']} µs")

    def cn_p99(cond):
        r = _row(rows, "cn", cond)
        return f"; bare listener {r['p99_us']:,.0f}" if r and r["p99_us"] is not None else ""

    def add(tid, value, detail=""):
        if value is None:
            return
        lim = LIMITS[tid]
        trows.append({"target": TARGETS[tid], "measured": value, "limit": lim, "detail": detail,
                      "met": "yes" if value <= lim else "NO"})
    for obs in ("pw-futex", "pw-peer"):
        for cond in ("idle", "storm"):
            r = _row(rows, obs, cond)
            if r and r.get("p50_vs_cn") is not None:
                add(f"p50_ratio_{cond}", r["p50_vs_cn"], obs)
            if r and r["p99_us"] is not None:
                add(f"p99_{cond}", r["p99_us"], obs + cn_p99(cond))
    if cap:
        # The machine's top exit rate: the fastest step that had the default buffer.
        top = sorted((r for r in cap["rows"] if not r["rcvbuf"] and r["rate"]), key=lambda r: r["rate"])[-1:]
        if top:
            add("lost_at_top", top[0]["lost"], f"{top[0]['rate']:,.0f} exits/s ({top[0]['step']})")
            add("cpu_per_exit", top[0]["svc_cpu"], f"{top[0]['rate']:,.0f} exits/s; bare listener {top[0]['cn_cpu']}")
    for obs, base in SAME_WAITER.items():
        for cond in ("random", "storm"):
            r, b = _row(rows, obs, cond), _row(rows, base, cond)
            if r and b and r["p50_us"] and b["p50_us"]:
                add(f"p50_vs_relay_{cond}", round(r["p50_us"] / b["p50_us"], 2),
                    f"{obs} {r['p50_us']:,.0f} µs; {base} {b['p50_us']:,.0f} µs")
                add(f"p99_vs_relay_{cond}", round(r["p99_us"] / b["p99_us"], 2),
                    f"{obs} {r['p99_us']:,.0f} µs; {base} {b['p99_us']:,.0f} µs")
    for cond in ("idle", "random"):
        r, cn = _row(rows, "pw-futex", cond), _row(rows, "cn", cond)
        if r and r.get("cpu_us_per_kill") is not None:
            add("cpu_per_cycle", r["cpu_us_per_kill"],
                f"pw-futex, {cond}: service utime+stime over {r['kills']} register + kill cycles"
                + (f"; bare listener {cn['cpu_us_per_event']} µs/event" if cn else ""))
    if idle:
        for r in idle["rows"]:
            add("idle_cpu", r["cpu_ms_s"], f"{r['slots']} slots, {r['live']} live; {r['wakeups_s']} wake-ups/s")
            if r["slots"] == 65536 and r["register_ms"] is not None:
                add("register_ms", r["register_ms"], "median of 20")
    if peer:
        add("alive_ns", next(r["ns"] for r in peer["rows"] if r["op"] == "Peer.alive"), "timeit")
    if foot:
        big = [r for r in foot["rows"] if r.get("slots") == 65536]
        if big:
            add("rss_mb", big[0]["rss_mb"], "VmRSS")
            add("ready_ms", big[0]["ready_ms"], "median")
    return {"id": "summary", "title": "Summary: procwatch against the issue's targets",
            "columns": [["target", "target"], ["detail", "row"], ["measured", "measured"], ["limit", "limit"],
                        ["met", "met"]],
            "rows": trows, "notes": lines}


def sections(ctx, rows, observers_by_row):
    """Measurements 2-5 and the summary, as report sections (summary first)."""
    why = _why_not()
    if why:
        titles = [("pw_kernel_to_zero", "procwatch: kernel event timestamp -> slot zeroed"),
                  ("pw_capacity", "procwatch: capacity under exit storms"),
                  ("pw_peer_side", "procwatch: peer-side cost"), ("pw_footprint", "procwatch: footprint")]
        return [], [{"id": sid, "title": title, "columns": [], "rows": [], "notes": [why]} for sid, title in titles]
    zero = _zero_section(rows, observers_by_row)
    cap = capacity(ctx, 3.0 if ctx.args.quick else 5.0) if "storm" in ctx.args.conditions.split(",") else None
    peer = peer_side(ctx)
    idle = idle_cost(ctx, 4.0 if ctx.args.quick else 8.0)
    foot = footprint(ctx, 2 if ctx.args.quick else 3)
    head = [summary(ctx, rows, cap, peer, foot, idle)]
    return head, [s for s in (zero, cap, peer, idle, foot) if s]


def reserve_seconds(quick):
    """Time to keep for measurements 2-5 after the kill rows."""
    return 130.0 if quick else 190.0
