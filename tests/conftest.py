"""Shared fixtures: private table keys, a real service, real client processes.

Everything here is real: the service is ``python -m procwatch serve`` in a
subprocess, clients are processes that register and really die.  Each test
gets its own SysV key (never the default one) and its segment and semaphore
are removed afterwards.  Processes a test starts are ended by PID at
teardown, never by name.
"""

import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sysv_ipc

ROOT = Path(__file__).resolve().parent.parent
PROGS = Path(__file__).resolve().parent / "progs"
PY = sys.executable


_issued = set()


def fresh_key():
    """A key no other test run uses: 0x7e, then 24 random bits, at which no segment or semaphore exists.

    Several test runs may share a machine (two checkouts, CI beside a developer):
    a key built from a few bits of the PID collided between them, and two
    services then shared one table.  A random key that is free at the time,
    and never handed out twice by this run, keeps runs apart.
    """
    while True:
        key = 0x7E000000 | random.getrandbits(24)
        if key in _issued or key <= 0x7E000000:
            continue
        if _ipc_exists(key):
            continue
        _issued.add(key)
        return key


def _ipc_exists(key):
    for cls in (sysv_ipc.SharedMemory, sysv_ipc.Semaphore):
        try:
            cls(key)
            return True
        except sysv_ipc.ExistentialError:
            pass
        except sysv_ipc.PermissionsError:
            return True
    return False


def remove_ipc(key):
    for cls in (sysv_ipc.SharedMemory, sysv_ipc.Semaphore):
        try:
            cls(key).remove()
        except (sysv_ipc.ExistentialError, sysv_ipc.PermissionsError):
            pass


def wait_until(predicate, timeout=10.0, what="condition", detail=None):
    """Poll ``predicate`` until true; fail the test with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            extra = f"\n{detail()}" if detail else ""
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}{extra}")
        time.sleep(0.005)


# -- processes as /proc shows them -----------------------------------------------------
# asm/unistd.h: __NR_futex
SYS_FUTEX = {"x86_64": 202, "aarch64": 98}[os.uname().machine]


def stat_fields(pid, tid=None):
    """Fields 3.. of /proc/PID/stat (or of thread ``tid``), None if it is gone.

    ``comm`` (field 2) may hold spaces and ')': split after the last ')'.
    So field N is ``stat_fields(pid)[N - 3]``.
    """
    path = f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat"
    try:
        with open(path, "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return data[data.rindex(b")") + 2:].decode().split()


def start_time(pid):
    """Field 22 of /proc/PID/stat (clock ticks since boot): half of a process's identity."""
    fields = stat_fields(pid)
    return None if fields is None else int(fields[19])


def proc_state(pid, tid=None):
    """Field 3 of /proc/PID/stat ("R", "S", "Z", ...), None if it is gone."""
    fields = stat_fields(pid, tid)
    return None if fields is None else fields[0]


def sched_policy(pid, tid=None):
    """Field 41 of /proc/PID/stat (os.SCHED_*), zombie or not; None if it is gone."""
    fields = stat_fields(pid, tid)
    return None if fields is None else int(fields[38])


def futex_waits(pid):
    """{tid: (uaddr, timeout)} of the threads of ``pid`` inside futex(2) right now.

    From /proc/PID/task/TID/syscall: "nr arg1 .. arg6 sp pc", futex(uaddr, op,
    val, timeout, ...).  ``timeout`` is the pointer argument: 0 is a wait with
    no timeout, which only a FUTEX_WAKE (or a signal) ends.
    """
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                words = f.read().split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if words and words[0] == str(SYS_FUTEX):
            out[int(tid)] = (int(words[1], 16), int(words[4], 16))
    return out


def asleep_in_futex(pid, tid=None):
    """Whether thread ``tid`` of ``pid`` sleeps in futex(2); with no ``tid``, every thread of ``pid``."""
    try:
        waits = futex_waits(pid)
        if tid is not None:
            return tid in waits
        return bool(waits) and set(waits) == {int(t) for t in os.listdir(f"/proc/{pid}/task")}
    except FileNotFoundError:
        return False


def ctx_switches(pid, tid=None):
    """Voluntary + involuntary context switches of thread ``tid`` (default: every thread of ``pid``).

    A thread asleep in the kernel has none until something wakes it: a
    poller, however slow, adds one per wake-up.
    """
    tids = [tid] if tid is not None else os.listdir(f"/proc/{pid}/task")
    total = 0
    for t in tids:
        with open(f"/proc/{pid}/task/{t}/status") as f:
            for line in f:
                if "ctxt_switches" in line:
                    total += int(line.split()[1])
    return total


def run_cli(*args, timeout=30, env=None):
    """``python -m procwatch ARGS`` run to its end (CompletedProcess, text)."""
    return subprocess.run([PY, "-m", "procwatch", *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)) if env is None else env,
                          timeout=timeout)


def scrape_metrics(port, timeout=30):
    """The metric families a service exposes on 127.0.0.1:``port``, by name."""
    import urllib.request
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
        assert r.status == 200
        return {f.name: f for f in text_string_to_metric_families(r.read().decode())}


def metric_value(families, name, **labels):
    """The sample ``name`` with exactly ``labels``, from any family; KeyError if absent."""
    for family in families.values():
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    raise KeyError((name, labels))


# -- clients that race ---------------------------------------------------------------
RACE_ROUNDS = 200           # rounds of a registration race (a round costs about a millisecond)
RACE_MIN_OVERLAP = 0.25     # share of rounds whose calls must overlap, or the race proved nothing


def barrier_file(tmp_path, racers):
    """A file of one zero u64 per racer: the racers' spinning barrier (tests/progs/racer.py)."""
    path = tmp_path / "barrier"
    path.write_bytes(bytes(8 * racers))
    return path


def run_race(argvs, timeout=120):
    """Run racers (argv each) to their end; per round, each racer's (outcome, slot, t0, t1).

    A racer prints one line a round: "ROUND OUTCOME SLOT T0 T1".  Every racer
    must finish, and every round must have every racer's line.  Racing takes two
    CPUs at least: on one, spinning racers can only take turns.
    """
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("a registration race needs two CPUs")
    procs = [subprocess.Popen(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env=dict(os.environ, PYTHONPATH=str(ROOT))) for a in argvs]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, f"racer {p.args} ended with {p.returncode}: {err[-2000:]}"
    rounds = {}
    for out, _ in outs:
        for line in out.splitlines():
            r, outcome, slot, t0, t1 = line.split()
            rounds.setdefault(int(r), []).append((outcome, int(slot), int(t0), int(t1)))
    assert all(len(calls) == len(argvs) for calls in rounds.values()), "a racer missed a round"
    return [rounds[r] for r in sorted(rounds)]


def overlapped(rounds):
    """How many rounds had every racer inside its call at one moment (max start < min end)."""
    return sum(max(c[2] for c in calls) < min(c[3] for c in calls) for calls in rounds)


def end_process(p, timeout=5.0):
    """End a Popen we started: SIGTERM, then SIGKILL, by PID; reap it."""
    if p.poll() is None:
        try:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(timeout)
        except ProcessLookupError:
            pass


def read_slot(key, i):
    """A snapshot of slot ``i`` of the table at ``key`` (attach, read, detach)."""
    from procwatch.segment import Table
    t = Table.attach(key)
    try:
        return t.read_slot(i)
    finally:
        t.detach()


def wait_ended(key, i, timeout=10):
    """Wait until slot ``i``'s PID word is 0 and its state is no longer ALIVE; the slot."""
    from procwatch import abi

    def ended():
        s = read_slot(key, i)
        return s if s.pid == 0 and s.state != abi.State.ALIVE else None
    return wait_until(ended, timeout, f"slot {i} to be ended")


def plant_slot(t, i, pid, start, owner_uid=0, name=None):
    """Write slot ``i`` of Table ``t`` as no client did: ALIVE, 100 ms heartbeat, PID word last.

    No generation bump: the service learns of it at its next full sync (a
    reconcile), unless the test wakes it.
    """
    import time as _t
    from procwatch import abi
    now = _t.time_ns()
    t.u32[t.pid_index(i)] = 0
    t.set32(i, abi.S_STATE, abi.State.CLAIMING)
    t.clear_slot_body(i)
    t.set64(i, abi.S_START_TIME, start)
    t.write_name(i, (name or f"planted-{i}").encode())
    t.set32(i, abi.S_HEARTBEAT_MS, 100)
    t.set64(i, abi.S_REGISTERED_NS, now)
    t.set64(i, abi.S_LAST_BEAT_NS, now)
    t.set32(i, abi.S_OWNER_UID, owner_uid)
    t.set32(i, abi.S_STATE, abi.State.ALIVE)
    t.u32[t.pid_index(i)] = pid


@pytest.fixture
def table(key):
    """A table of 8 slots at the test's key and no service (the client API needs none)."""
    from procwatch.segment import Table
    t, _ = Table.create_or_adopt(key, 8)
    yield t
    t.detach()


@pytest.fixture
def key():
    k = fresh_key()
    remove_ipc(k)
    yield k
    remove_ipc(k)


class ServiceProcess:
    """``procwatch serve`` in a subprocess, its stderr kept for event checks.

    ``wrap``: a command that execs the rest (e.g. tests/progs/no_futex_waitv.c):
    the service keeps its PID.
    """

    def __init__(self, key, log_path, *args, env=None, preexec=None, log_level="debug", wrap=()):
        self.key = key
        self.log_path = log_path
        self._log = open(log_path, "ab")
        level = ["--log-level", log_level] if log_level else []     # None: the configuration's
        self.proc = subprocess.Popen(
            [*wrap, PY, "-m", "procwatch", "serve", "--key", hex(key), "--log", "stderr", *level, *args],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            env=env, cwd=ROOT, preexec_fn=preexec)

    @property
    def pid(self):
        return self.proc.pid

    def wait_ready(self, timeout=15.0):
        from procwatch import abi
        from procwatch.segment import Table

        def ready():
            if self.proc.poll() is not None:
                pytest.fail(f"service exited with {self.proc.returncode}:\n{self.log()}")
            try:
                t = Table.attach(self.key)
            except Exception:
                return False
            try:
                return t.hget32(abi.H_SERVICE_PID) == self.proc.pid and "event=started" in self.log()
            finally:
                t.detach()
        wait_until(ready, timeout, "the service to be ready")
        return self

    def log(self):
        if not self._log.closed:
            self._log.flush()
        return Path(self.log_path).read_text(errors="replace")

    def events(self, kind=None):
        """Event lines of the log as dicts of their key=value fields."""
        out = []
        for line in self.log().splitlines():
            if "  event=" not in line:
                continue
            fields = dict(kv.split("=", 1) for kv in line.rsplit("  ", 1)[1].split() if "=" in kv)
            fields["message"] = line
            if kind is None or fields.get("event") == kind:
                out.append(fields)
        return out

    def backend(self):
        """The backend its latest ``started`` line names (``connector`` or ``pidfd``).

        A test about the connector asserts this: ``auto`` falls back to pidfd
        quietly, and a test that only waits for ``started`` would then pass
        without the connector ever having run.
        """
        started = self.events("started")
        assert started, f"no started line in the service log:\n{self.log()[-2000:]}"
        return started[-1]["backend"]

    def wait_event(self, kind, timeout=10.0, **match):
        def found():
            for e in self.events(kind):
                if all(e.get(k) == str(v) for k, v in match.items()):
                    return e
            return None
        return wait_until(found, timeout, f"event {kind} {match} in the service log",
                          detail=lambda: self.log()[-3000:])

    def stop(self, sig=signal.SIGTERM, timeout=10.0):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if not self._log.closed:
            self._log.close()
        return self.proc.returncode


@pytest.fixture
def service(key, tmp_path):
    """Factory: ``service()`` starts a ready service on the test's key."""
    started = []

    def start(*args, key_=None, ready=True, **kw):
        s = ServiceProcess(key_ or key, tmp_path / f"service-{len(started)}.log", *args, **kw)
        started.append(s)
        return s.wait_ready() if ready else s
    yield start
    for s in started:
        s.stop()


class Client:
    """A real client process (tests/progs/client.py) that registered itself."""

    def __init__(self, proc, name, slot, pid):
        self.proc, self.name, self.slot, self.pid = proc, name, slot, pid

    def kill(self, sig=signal.SIGKILL):
        os.kill(self.pid, sig)

    def tell(self, line):
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()


@pytest.fixture
def clients():
    """Factory: ``clients(key, name, *args)`` starts tests/progs/client.py and waits for READY."""
    started = []

    def spawn(key, name, *args, expect_ready=True, timeout=15.0, user=None):
        cmd = [PY, str(PROGS / "client.py"), "--key", hex(key), "--name", name, *args]
        if user is not None:
            cmd = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *cmd]
        p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
        started.append(p)
        if not expect_ready:
            return p
        line = _read_line(p, timeout)
        if not line.startswith("READY"):
            p.kill()
            pytest.fail(f"client {name} did not register: {line!r} {p.stderr.read().decode()}")
        _, slot, pid = line.split()
        return Client(p, name, int(slot), int(pid))
    yield spawn
    for p in started:
        end_process(p)


def _read_line(p, timeout):
    r, _, _ = select.select([p.stdout], [], [], timeout)
    if not r:
        return "(no output within %gs)" % timeout
    return p.stdout.readline().decode().strip()


@pytest.fixture(scope="session")
def compiled(tmp_path_factory):
    """Factory: compile tests/progs/NAME.c once per session; returns the binary's path."""
    out = tmp_path_factory.mktemp("bin")
    cache = {}

    def build(name, *flags):
        if name not in cache:
            exe = out / name
            subprocess.run(["gcc", "-O2", "-Wall", "-Werror", "-o", str(exe),
                            str(PROGS / f"{name}.c"), "-pthread", *flags], check=True)
            cache[name] = exe
        return cache[name]
    return build


def require_root():
    return pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the proc connector needs CAP_NET_ADMIN)")


class CpuCgroup:
    """A cgroup of our own under the cpu controller (v1 or v2): limit it, move our processes in.

    Only processes the test started are moved, and :meth:`remove` moves
    them back to where they were before it removes the directory.
    """

    def __init__(self, version, path):
        self.version, self.path, self._moved = version, path, {}
        os.mkdir(path)

    def _write(self, name, text):
        with open(f"{self.path}/{name}", "w") as f:
            f.write(text)

    def limit(self, quota_us, period_us):
        """Let the cgroup run quota_us of CPU per period_us (cpu.max; cpu.cfs_*_us on v1)."""
        if self.version == 2:
            self._write("cpu.max", f"{quota_us} {period_us}")
        else:
            self._write("cpu.cfs_period_us", str(period_us))
            self._write("cpu.cfs_quota_us", str(quota_us))

    def lift(self):
        if self.version == 2:
            self._write("cpu.max", "max")
        else:
            self._write("cpu.cfs_quota_us", "-1")

    def add(self, pid):
        from procwatch import cgroup
        paths = cgroup.paths(pid, "/proc")
        self._moved[pid] = paths["cpu" if self.version == 1 else ""]
        self._write("cgroup.procs", str(pid))

    def remove(self):
        from procwatch import cgroup
        m = cgroup.mounts()
        mount = m.v1 if self.version == 1 else m.v2
        for pid, old in self._moved.items():
            try:
                with open(cgroup.directory(mount, old) + "/cgroup.procs", "w") as f:
                    f.write(str(pid))
            except (ProcessLookupError, FileNotFoundError):
                pass                            # it ended: nothing to move
        deadline = time.monotonic() + 5
        while True:
            try:
                os.rmdir(self.path)
                return
            except OSError:                     # EBUSY while an exiting process leaves it
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


@pytest.fixture
def cpu_cgroup():
    """Factory: ``cpu_cgroup(1)`` or ``cpu_cgroup(2)``, a fresh cgroup under the cpu controller
    of that cgroup version (skips where there is none), removed at teardown."""
    from procwatch import cgroup
    made = []

    def make(version):
        if os.geteuid() != 0:
            pytest.skip("needs root to create a cgroup")
        m = cgroup.mounts()
        name = f"procwatch-test-{os.getpid()}-{len(made)}-{time.monotonic_ns()}"
        if version == 1:
            if m.v1 is None:
                pytest.skip("no cgroup v1 hierarchy with the cpu controller")
            path = f"{m.v1[0]}/{name}"
        else:
            if m.v2 is None:
                pytest.skip("no cgroup v2 mount")
            try:
                with open(f"{m.v2[0]}/cgroup.subtree_control") as f:
                    enabled = f.read().split()
            except OSError:
                enabled = []
            if "cpu" not in enabled:
                pytest.skip(f"the cpu controller is not enabled in {m.v2[0]} (cgroup v1 holds it here)")
            path = f"{m.v2[0]}/{name}"
        try:
            cg = CpuCgroup(version, path)
        except OSError as e:
            pytest.skip(f"cannot create a cgroup at {path}: {e.strerror}")
        made.append(cg)
        return cg
    yield make
    for cg in made:
        cg.remove()
