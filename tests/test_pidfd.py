"""The pidfd backend: where it is chosen, and what only it has to get right (root).

The detection semantics shared with the connector (SIGKILL, exit code, a
leader thread that exits first, restart, futex waiters, unregister) are
tested against both backends in test_detector.py.  Here: ``auto`` falling
back to pidfd in namespaces the connector does not serve, an unprivileged
service, where the exit status comes from, and registrations that must reach
the epoll set at once.
"""

import ctypes
import json
import os
import select
import signal
import subprocess
import sys

import pytest

from conftest import PROGS, PY, ROOT, read_slot, require_root, wait_ended, wait_until
from procwatch import abi, cheader, connector, pidfd_backend, procfs
from procwatch.segment import Table

pytestmark = [require_root()]
NOBODY = 65534
CLONE_NEWNET = 0x40000000


def kernel_keeps_exit_status():
    """PIDFD_INFO_EXIT: kernel >= 6.15."""
    major, minor = (int(x) for x in os.uname().release.split(".")[:2])
    return (major, minor) >= (6, 15)


def _unshare_net():
    """preexec_fn: a new, empty network namespace (the service's proc connector refuses)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET)")


def _as_nobody():
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


@pytest.fixture
def cclient(compiled):
    """Factory: start the C client (tests/progs/cclient.c); ended by PID at teardown."""
    exe = compiled("cclient", "-std=c99", "-Wextra", "-I", cheader.include_dir())
    started = []

    def start(key, name, *args, read_ready=True):
        p = subprocess.Popen([str(exe), name, hex(key), *args], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
        started.append(p)
        if not read_ready:
            return p
        line = p.stdout.readline().split()
        assert line[:1] == ["READY"], line
        p.slot = int(line[1])
        return p
    yield start
    for p in started:
        if p.poll() is None:
            p.kill()
        p.wait()


def test_auto_picks_pidfd_in_a_new_network_namespace(key, service, clients):
    """ECONNREFUSED outside the initial network namespace: auto says so and uses pidfd."""
    svc = service(preexec=_unshare_net)
    started = svc.wait_event("started")
    assert started["backend"] == "pidfd"
    assert "auto: the kernel refused the subscription (ECONNREFUSED" in started["message"]
    t = Table.attach(key)
    try:
        assert t.hget32(abi.H_BACKEND) == abi.Backend.PIDFD
    finally:
        t.detach()
    c = clients(key, "netns-victim")
    c.kill(signal.SIGKILL)
    s = wait_ended(key, c.slot)
    assert s.state == abi.State.EXITED and os.WTERMSIG(s.exit_status) == signal.SIGKILL
    svc.wait_event("exit", name="netns-victim", signal="SIGKILL")
    out = subprocess.run([PY, "-m", "procwatch", "status", "--key", hex(key), "--json"],
                         capture_output=True, text=True, cwd=ROOT)
    assert json.loads(out.stdout)["service"]["backend"] == "pidfd"


def test_readme_states_the_fallback_deadline_the_code_has():
    readme = (ROOT / "README.md").read_text()
    assert f"within {connector.ACK_DEADLINE:g} s where it never acknowledges it" in " ".join(readme.split())


def test_connector_backend_refuses_in_a_new_network_namespace(key, service):
    svc = service("--backend", "connector", preexec=_unshare_net, ready=False)
    assert svc.proc.wait(30) == 1
    lines = [ln for ln in svc.log().splitlines() if ln.strip()]
    assert lines == ["procwatch: proc connector unavailable: the kernel refused the subscription "
                     "(ECONNREFUSED: not in the initial network namespace): use --backend pidfd, "
                     "or run on the host"], lines


_IN_PIDNS = r"""
import os, signal, subprocess, sys, time
py, key, log, client = sys.argv[1:5]
from procwatch import abi
from procwatch.segment import Table
svc = subprocess.Popen([py, "-m", "procwatch", "serve", "--key", key, "--log", "stderr"],
                       stdin=subprocess.DEVNULL, stderr=open(log, "ab"))
deadline = time.monotonic() + 20
while True:
    assert time.monotonic() < deadline and svc.poll() is None, "service not ready"
    try:
        t = Table.attach(int(key, 0))
        ready = t.hget32(abi.H_SERVICE_PID) == svc.pid and "event=started" in open(log).read()
        t.detach()
        if ready:
            break
    except Exception:
        pass
    time.sleep(0.01)
c = subprocess.Popen([py, client, "--key", key, "--name", "pidns-victim"],
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
print(c.stdout.readline().strip(), flush=True)
sys.stdin.readline()
os.kill(c.pid, signal.SIGKILL)
sys.stdin.readline()
svc.terminate()
print("STOPPED", svc.wait(20), flush=True)
"""


def test_auto_picks_pidfd_in_a_new_pid_namespace(key, tmp_path):
    """No ack outside the initial PID namespace: auto gives up within the deadline and
    uses pidfd; a client in the same namespace is still reported.  (The table is
    shared: unshare --pid keeps the IPC namespace.)"""
    log = tmp_path / "service.log"
    driver = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", PY, "-c", _IN_PIDNS,
         PY, hex(key), str(log), str(PROGS / "client.py")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        ready, _, _ = select.select([driver.stdout], [], [], 30)
        line = driver.stdout.readline().split() if ready else []
        assert line[:1] == ["READY"], (line, log.read_text() if log.exists() else "")
        slot, inner_pid = int(line[1]), int(line[2])
        assert read_slot(key, slot).pid == inner_pid          # a PID of the inner namespace
        text = log.read_text()
        # The README's promise: auto falls back "within 2 s where it never acknowledges
        # it"; the line names the deadline the code waited (no deadline: no start at all).
        assert "backend=pidfd" in text, text
        assert f"did not acknowledge the subscription within {connector.ACK_DEADLINE:g} s" in text, text
        driver.stdin.write("kill\n")
        driver.stdin.flush()
        s = wait_ended(key, slot)
        assert s.state == abi.State.EXITED and os.WTERMSIG(s.exit_status) == signal.SIGKILL
        wait_until(lambda: "pidns-victim (pid %d) killed by SIGKILL" % inner_pid in log.read_text(),
                   10, "the exit line in the service log")
        driver.stdin.write("stop\n")
        driver.stdin.flush()
        assert driver.stdout.readline().split() == ["STOPPED", "0"]
        assert driver.wait(20) == 0
    finally:
        if driver.poll() is None:
            driver.kill()             # --kill-child takes the namespace's processes with it
        driver.wait()


@pytest.mark.parametrize("backend", ["auto", "pidfd"])
def test_unprivileged_service_reports_a_kill_of_its_own_user(key, service, clients, backend):
    """A service run as nobody (on this kernel nobody may even subscribe the connector, so
    auto may pick either): it says which backend, and reports a kill of a nobody client,
    with the status (read from the zombie's /proc/PID/stat under pidfd)."""
    svc = service("--backend", backend, preexec=_as_nobody)
    started = svc.wait_event("started")
    assert started["backend"] in ("connector", "pidfd") and "backend (" in started["message"]
    if backend == "pidfd":
        assert started["backend"] == "pidfd" and "(--backend pidfd)" in started["message"]
    c = clients(key, "nobodys", user=str(NOBODY))
    c.kill(signal.SIGKILL)
    s = wait_ended(key, c.slot)
    assert s.state == abi.State.EXITED and os.WTERMSIG(s.exit_status) == signal.SIGKILL
    e = svc.wait_event("exit", name="nobodys", signal="SIGKILL")
    if started["backend"] == "pidfd":
        assert e["status_source"] == "procfs"       # the zombie waits for us (its parent)


def test_another_users_zombie_is_status_unknown_not_exit_code_0(key, service, clients):
    """Without ptrace rights /proc/PID/stat shows exit_code 0; that must not become
    "exited with code 0".  The root client stays a zombie (we do not reap it), so the
    nobody service has no PIDFD_INFO_EXIT either: the status is unknown, and says why."""
    svc = service("--backend", "pidfd", preexec=_as_nobody)
    c = clients(key, "roots")
    c.kill(signal.SIGKILL)
    s = wait_ended(key, c.slot)
    assert s.state == abi.State.EXITED and s.exit_status == abi.EXIT_STATUS_UNKNOWN
    e = svc.wait_event("exit", name="roots")
    assert e["status_source"] == "unknown" and "another user's process" in e["message"]
    assert "status unknown" in e["message"] and "exit_code" not in e


def test_status_of_a_reaped_process_comes_from_the_pidfd(key, service, clients):
    """The service is stopped (SIGSTOP) while the client dies and is reaped, so when it
    looks there is no zombie left: kernels >= 6.15 still give the status (PIDFD_INFO_EXIT)."""
    svc = service("--backend", "pidfd")
    c = clients(key, "reaped")
    svc.wait_event("registered", name="reaped")          # its pidfd is open
    os.kill(svc.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: all(procfs.stat_state(int(tid), f"/proc/{svc.pid}/task") == "T"
                               for tid in os.listdir(f"/proc/{svc.pid}/task")),
                   10, "every thread of the service to be stopped")
        c.kill(signal.SIGKILL)
        c.proc.wait()
        assert not os.path.exists(f"/proc/{c.pid}")
    finally:
        os.kill(svc.pid, signal.SIGCONT)
    s = wait_ended(key, c.slot)
    e = svc.wait_event("exit", name="reaped")
    assert s.state == abi.State.EXITED
    if kernel_keeps_exit_status():
        assert e["status_source"] == "pidfd" and os.WTERMSIG(s.exit_status) == signal.SIGKILL
    else:
        assert e["status_source"] == "unknown" and s.exit_status == abi.EXIT_STATUS_UNKNOWN


def test_registrations_reach_the_epoll_set_at_once(key, service, cclient):
    """Forty C clients register and exit at once, in parallel: each must be reported as
    EXITED with its own code, none found dead.  With reconcile off (60 s), a registration
    that did not reach the epoll set at once would never be reported.  They are reaped
    only afterwards: a process reaped before the service even saw its registration can
    only be found dead (no pidfd can be opened for it any more)."""
    svc = service("--backend", "pidfd", "--reconcile-interval", "60", "--slots", "64")
    procs = [cclient(key, f"flash-{i}", "exit-now", str(i), read_ready=False) for i in range(40)]
    t = Table.attach(key)
    try:
        def all_ended():
            used = {s.name: s for s in t.used_slots()}
            return len(used) == 40 and all(s.pid == 0 and s.state != abi.State.ALIVE
                                           for s in used.values()) and used
        used = wait_until(all_ended, 20, "all 40 slots to be ended", detail=lambda: svc.log()[-2000:])
    finally:
        t.detach()
    for i in range(40):
        s = used[f"flash-{i}"]
        assert s.state == abi.State.EXITED, (s, svc.log()[-2000:])
        assert os.WEXITSTATUS(s.exit_status) == i
    # The log line comes after the record (peers first, bookkeeping after): wait for it.
    wait_until(lambda: len(svc.events("exit")) == 40, 10, "40 exit lines", detail=lambda: svc.log()[-2000:])
    assert not svc.events("found_dead")
    assert [p.wait(10) for p in procs] == list(range(40))


def test_a_kill_right_after_registration_is_caught(key, service, cclient):
    """The registrations thread adds the pidfd, the detector is woken through the eventfd:
    a client killed the moment it has registered is reported by the backend, not reconcile."""
    svc = service("--backend", "pidfd", "--reconcile-interval", "60")
    for i in range(5):
        p = cclient(key, f"quick-{i}")
        p.kill()
        s = wait_ended(key, p.slot)
        assert s.state == abi.State.EXITED and os.WTERMSIG(s.exit_status) == signal.SIGKILL
    assert len(svc.events("exit")) == 5 and not svc.events("found_dead")


def test_exit_status_sources_against_real_processes():
    """pidfd_backend.exit_status() directly: a zombie, then the same process reaped."""
    p = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline(); sys.exit(5)"],
                         stdin=subprocess.PIPE)
    from procwatch.watch import Watched
    fd = os.pidfd_open(p.pid)
    try:
        w = Watched(0, p.pid, procfs.start_time(p.pid), "x", fd)
        p.stdin.write(b"\n")
        p.stdin.flush()
        wait_until(lambda: procfs.pidfd_exited(fd), 10, "the child to exit")
        status, source, _ = pidfd_backend.exit_status(w, fd)
        assert (source, os.WEXITSTATUS(status)) == ("procfs", 5)
        p.wait()
        status, source, note = pidfd_backend.exit_status(w, fd)
        if kernel_keeps_exit_status():
            assert (source, os.WEXITSTATUS(status)) == ("pidfd", 5)
        else:
            assert (source, status) == ("unknown", -1) and "reaped" in note
    finally:
        os.close(fd)
        p.stdin.close()
        if p.poll() is None:
            p.kill()
        p.wait()


def test_pidfd_set_follows_the_watchlist(key):
    """PidfdSet.resync(): exactly the open pidfds of the watch list, old numbers dropped."""
    from procwatch.stats import Stats
    from procwatch.watch import Reporter
    t, _ = Table.create_or_adopt(key, 4)
    sleepers = [subprocess.Popen(["sleep", "60"]) for _ in range(3)]
    pidfds = pidfd_backend.PidfdSet()
    try:
        reporter = Reporter(t, Stats())
        kicks = []
        pidfds.attach(reporter.watch)
        reporter.watch.on_change = lambda: (kicks.append(1), pidfds.kick())
        regs = [__import__("procwatch").register_pid(f"s{i}", pid=p.pid, key=key)
                for i, p in enumerate(sleepers)]
        reporter.watch.sync()
        assert kicks == [1]
        pidfds.resync(reporter.watch)
        assert sorted(pidfds.members) == sorted(w.pidfd for w in reporter.watch.entries())
        assert len(pidfds.members) == 3
        regs[0].unregister()
        reporter.watch.sync()
        assert kicks == [1, 1]
        pidfds.resync(reporter.watch)
        assert len(pidfds.members) == 2 and all(w.pid != sleepers[0].pid for w in pidfds.members.values())
        pidfds.drain()
        sleepers[1].kill()
        ready = [fd for fd, _ in pidfds.epoll.poll(10) if fd != pidfds.wake_fd]
        assert [pidfds.members[fd].pid for fd in ready] == [sleepers[1].pid]
    finally:
        pidfds.close()
        for p in sleepers:
            p.kill()
            p.wait()
        t.detach()


def test_a_detector_that_ends_still_adds_the_registrations_it_was_woken_for(key):
    """One epoll batch holds both an exit and the wake-up for a new registration: the
    detector drains the wake-up, so it must add the new pidfd before it ends, or the
    next detector would never hear of it."""
    import queue

    import procwatch
    from procwatch.stats import Stats
    from procwatch.watch import Reporter
    t, _ = Table.create_or_adopt(key, 4)
    a, b = subprocess.Popen(["sleep", "60"]), subprocess.Popen(["sleep", "60"])
    pidfds = pidfd_backend.PidfdSet()
    try:
        reporter = Reporter(t, Stats())
        procwatch.register_pid("a", pid=a.pid, key=key)
        reporter.watch.sync()
        pidfds.attach(reporter.watch)
        pidfds.drain()
        pidfds.resync(reporter.watch)
        procwatch.register_pid("b", pid=b.pid, key=key)
        reporter.watch.sync()                                  # kicks: b is not in the set yet
        (wa,) = reporter.watch.by_pid[a.pid]
        a.kill()
        wait_until(lambda: procfs.pidfd_exited(wa.pidfd), 10, "a to exit")
        done = queue.SimpleQueue()
        d = pidfd_backend.PidfdDetector(pidfds, reporter, done.put, 1)
        d.start()
        assert done.get(timeout=10) is d and d.error is None and d.ended_pid == a.pid
        assert [w.pid for w in pidfds.members.values()] == [b.pid]
    finally:
        pidfds.close()
        for p in (a, b):
            p.kill()
            p.wait()
        t.detach()
