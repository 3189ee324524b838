"""Faults from outside, made for real (root): ipcrm, hidepid, a closed socket, no journald.

* the segment or its semaphore removed with ``ipcrm`` while the service runs;
* /proc hiding one registered process from the service (a hidepid= mount in
  the service's own mount namespace, CAP_SYS_PTRACE dropped);
* the connector socket closed inside the running service (gdb calls close()
  on its fd, as a stray close() elsewhere in the process would);
* journald unreachable: socket missing, refusing, or not reading.
"""

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
import sysv_ipc

from conftest import PY, ROOT, ServiceProcess, proc_state, require_root, wait_until
from procwatch import abi
from procwatch.journal import Event
from pwrel import (MS_BIND, MadeUsers, attached, cap_eff, connector_sockets, forked,  # noqa: F401
                   mount, private_mounts, sysv_info)

pytestmark = [require_root()]


def count(svc, kind, **match):
    return sum(all(e.get(k) == str(v) for k, v in match.items()) for e in svc.events(kind))


# -- ipcrm ---------------------------------------------------------------------------------
def test_segment_removed_is_recreated_and_clients_register_again(key, service, forked):  # noqa: F811
    svc = service("--reconcile-interval", "0.1")
    before = forked(key, "before")
    old = sysv_info("shm", key)
    assert subprocess.run(["ipcrm", "-M", hex(key)]).returncode == 0
    e = svc.wait_event("corrupt", problem="segment")
    assert f"slot table key {key:#010x} was removed" in e["message"] and "(before)" in e["message"]
    wait_until(lambda: len(svc.events("started")) == 2, 15, "the service to start over in place")
    assert svc.proc.poll() is None                       # same process, same PID
    # The service keeps no mapping of the removed segment (issue 13): only its client does.
    with open(f"/proc/{svc.pid}/maps") as f:
        mapped = {ln.split()[4] for ln in f if "/SYSV" in ln}
    assert old["shmid"] not in mapped, mapped
    new = sysv_info("shm", key)
    assert new is not None and new["shmid"] != old["shmid"]
    assert int(new["perms"], 8) & 0o777 == 0o660
    with attached(key) as t:
        assert t.hget32(abi.H_SERVICE_PID) == svc.pid and t.used_slots() == []
    after = forked(key, "after")
    after.kill()
    svc.wait_event("exit", name="after", pid=after.pid, signal="SIGKILL")
    # The removed segment lived on only while attached: gone once its last client is.
    before.kill()
    wait_until(lambda: not any(r.split()[1] == old["shmid"] for r in open("/proc/sysvipc/shm").readlines()[1:]),
               10, "the removed segment to be freed")


def test_semaphore_removed_is_recreated_and_registrations_kept(key, service, forked):  # noqa: F811
    svc = service("--reconcile-interval", "0.1")
    kept = forked(key, "kept")
    old = sysv_info("sem", key)
    assert subprocess.run(["ipcrm", "-S", hex(key)]).returncode == 0
    svc.wait_event("corrupt", problem="semaphore")
    wait_until(lambda: len(svc.events("started")) == 2, 15, "the service to start over in place")
    new = sysv_info("sem", key)
    assert new is not None and new["semid"] != old["semid"] and int(new["perms"], 8) & 0o777 == 0o660
    assert "adopted table" in svc.events("started")[-1]["message"]
    kept.kill()
    svc.wait_event("exit", name="kept", pid=kept.pid, signal="SIGKILL")
    late = forked(key, "late")
    late.exit(5)
    svc.wait_event("exit", name="late", pid=late.pid, exit_code=5)


def test_lock_taken_without_undo_by_a_process_that_exited_is_put_back_once(key, service, forked):  # noqa: F811
    """Issue 13: `s.undo = False; s.acquire()` then exit wedged the table for good."""
    svc = service("--reconcile-interval", "0.1")
    grab = ("import sys, sysv_ipc; s = sysv_ipc.Semaphore(int(sys.argv[1], 0)); s.undo = False; "
            "s.acquire(); print(__import__('os').getpid())")
    holder = int(subprocess.run([PY, "-c", grab, hex(key)], capture_output=True, text=True,
                                check=True).stdout)
    assert sysv_ipc.Semaphore(key).value == 0 and sysv_ipc.Semaphore(key).last_pid == holder
    # A registration now waits on the lock: the service must give it back within its 5 s.
    c = forked(key, "after-wedge", wait=False)
    assert c.ready(15).startswith("READY"), svc.log()[-2000:]
    e = svc.wait_event("corrupt", problem="lock")
    assert f"PID {holder}, which has exited" in e["message"], e
    c.exit(0)
    svc.wait_event("exit", name="after-wedge", pid=c.pid)
    for _ in range(3):                              # a few more passes: still one line
        forked(key, "again").exit(0)
    assert count(svc, "corrupt", problem="lock") == 1


def test_busy_lock_error_says_its_holder_has_exited(key):
    """The message named a PID that no longer exists as if it could be checked."""
    from procwatch.errors import TableBusy
    from procwatch.segment import Table
    t, _ = Table.create_or_adopt(key, 4)
    try:
        grab = "import sys, sysv_ipc; s = sysv_ipc.Semaphore(int(sys.argv[1], 0)); s.undo = False; s.acquire()"
        subprocess.run([PY, "-c", grab, hex(key)], check=True)
        with pytest.raises(TableBusy) as e:
            with t.lock(timeout=0.2):
                pass
        assert "has exited without giving it back" in str(e.value) and "\n" not in str(e.value)
    finally:
        t.remove()


# -- /proc hiding a process --------------------------------------------------------------------
@pytest.fixture
def outsider():
    u = MadeUsers()
    try:
        yield u.make(outsiders=("x",))
    finally:
        u.remove()


@pytest.mark.parametrize("hidepid", [1, 2], ids=["hidepid=1-noaccess", "hidepid=2-invisible"])
def test_process_hidden_by_proc_is_not_reported_dead(key, tmp_path, outsider, hidepid):
    """The service cannot read /proc/PID of the target: it must watch it by pidfd,
    say so, never call it dead while it lives, and report its real exit."""
    import procwatch
    # gid= names a group the service is not in: hidepid's default gid is 0, which root is.
    opts = f"hidepid={hidepid},gid={outsider.gid}"
    svc = ServiceProcess(key, tmp_path / "service.log", "--reconcile-interval", "0.1",
                         preexec=private_mounts(lambda: mount("proc", "/proc", "proc", 0, opts),
                                                drop_ptrace=True)).wait_ready()
    target = subprocess.Popen([*outsider.as_user("x"), "sleep", "600"])
    try:
        assert not cap_eff(svc.pid) & (1 << 19)                       # no CAP_SYS_PTRACE
        reg = procwatch.register_pid("hidden", pid=target.pid, key=key)
        svc.wait_event("registered", name="hidden", pid=target.pid)
        wait_until(lambda: f"cannot read /proc/{target.pid}/stat although PID {target.pid} lives" in svc.log(),
                   10, "the service to say it cannot check the start time")
        time.sleep(1.0)          # ten reconcile periods: none may call it dead
        assert not svc.events("found_dead") and not svc.events("exit"), svc.log()[-2000:]
        with attached(key) as t:
            assert t.u32[t.pid_index(reg.slot)] == target.pid
        target.kill()
        e = svc.wait_event("exit", name="hidden", pid=target.pid)
        assert e["signal"] == "SIGKILL" and int(e["latency_us"]) >= 0     # measured: a kernel event
        assert "Traceback" not in svc.log()
    finally:
        target.kill()
        target.wait()
        svc.stop()


# -- the connector socket closed under the detector ------------------------------------------------
def test_connector_socket_closed_under_the_detector(key, service, forked):  # noqa: F811
    assert shutil.which("gdb"), "gdb is needed: scripts/setup installs it"
    svc = service("--reconcile-interval", "0.2")
    during = forked(key, "during")
    after = forked(key, "after")
    (fd, inode), = connector_sockets(svc.pid).items()
    gdb = subprocess.run(["gdb", "-p", str(svc.pid), "-batch", "-nx", "-ex", f"call (int)close({fd})"],
                         capture_output=True, text=True, timeout=60)
    assert "$1 = 0" in gdb.stdout, gdb.stdout + gdb.stderr
    during.kill()                               # dies while the detector has no socket
    wait_until(lambda: "subscribed again on a new one" in svc.log(), 10, "the connector to be reopened",
               detail=lambda: svc.log()[-2000:])
    wait_until(lambda: count(svc, "exit", name="during") + count(svc, "found_dead", name="during") == 1,
               10, "the death during the outage to be reported")
    socks = connector_sockets(svc.pid)
    assert len(socks) == 1 and inode not in socks.values(), socks      # a new socket, no leak
    after.kill()
    e = svc.wait_event("exit", name="after", pid=after.pid, signal="SIGKILL")
    assert int(e["latency_us"]) >= 0            # measured: from a kernel event on the new socket
    assert svc.log().count("detector thread failed") == 1, svc.log()[-3000:]  # not a respawn loop
    assert count(svc, "exit", name="during") + count(svc, "found_dead", name="during") == 1
    assert svc.proc.poll() is None


# -- journald unreachable ---------------------------------------------------------------------
def _private_run():
    mount("tmpfs", "/run", "tmpfs", 0, "mode=755")
    os.makedirs("/run/systemd/journal")


def _stale_socket():
    _private_run()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("/run/systemd/journal/socket")
    s.close()                                   # the path stays; nobody listens


@pytest.mark.parametrize("how, why", [(_private_run, "does not exist"), (_stale_socket, "Connection refused")],
                         ids=["socket-missing", "socket-refusing"])
def test_journald_unreachable_falls_back_to_stderr(key, tmp_path, forked, how, why):  # noqa: F811
    svc = ServiceProcess(key, tmp_path / "service.log", "--log", "journal",
                         preexec=private_mounts(how)).wait_ready()
    try:
        notice = [ln for ln in svc.log().splitlines() if "journald is unreachable" in ln]
        assert len(notice) == 1 and why in notice[0], svc.log()
        c = forked(key, "logged")
        c.kill()
        svc.wait_event("exit", name="logged", pid=c.pid, signal="SIGKILL")
        assert "Logging error" not in svc.log() and "Traceback" not in svc.log()
    finally:
        assert svc.stop() == 0


@pytest.mark.parametrize("stderr_is_journal", [False, True], ids=["stderr-a-file", "stderr-journald-too"])
def test_journald_not_reading_never_stalls_detection(key, tmp_path, stderr_is_journal):
    """journald alive but stuck: its socket queue fills and send() would block.  The
    detector must go on zeroing words; records beyond the queue go to stderr, or,
    when stderr is journald's stream too ($JOURNAL_STREAM), are dropped and counted."""
    jdir = tmp_path / "journal"
    jdir.mkdir()
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    stuck.bind(str(jdir / "socket"))                     # bound; read only when the test says
    log = tmp_path / "service.log"
    log.touch()
    env = dict(os.environ)
    if stderr_is_journal:                                # as systemd sets it for StandardError=journal
        st = os.stat(log)
        env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    svc = ServiceProcess(key, log, "--log", "journal", "--slots", "64", env=env,
                         preexec=private_mounts(_private_run,
                                                lambda: mount(str(jdir), "/run/systemd/journal", None, MS_BIND)))
    stuck.settimeout(10)

    def journal_until(text, limit=5000):
        for _ in range(limit):
            fields = stuck.recv(1 << 16).split(b"\n")
            if any(text in f for f in fields):
                return fields
        raise AssertionError(f"{text!r} not in the first {limit} journal records")
    try:
        def ready():
            assert svc.proc.poll() is None, svc.log()
            try:
                with attached(key) as t:
                    return t.hget32(abi.H_SERVICE_PID) == svc.pid
            except Exception:
                return False
        wait_until(ready, 15, "the service to be up")
        # While journald reads, records reach it whole, in its native protocol.
        first = journal_until(b"PROCWATCH_EVENT=started", 5)
        assert b"SYSLOG_IDENTIFIER=procwatch" in first, first
        assert b"MESSAGE_ID=" + Event.STARTED.value[0].encode() in first
        assert not svc.log(), "nothing on stderr while journald takes every record"
        # From now on it reads nothing.
        n = 450                                 # ~3 records each: past the 1024-record queue
        churn = subprocess.run([PY, str(ROOT / "tests/progs/churn.py"), "--key", hex(key), "--count", str(n)],
                               capture_output=True, text=True, cwd=ROOT, timeout=120,
                               env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert f"registered={n} " in churn.stdout, churn.stdout + churn.stderr

        def all_ended():
            with attached(key) as t:
                used = t.used_slots()
            return all(s.pid == 0 and s.state == abi.State.EXITED for s in used)
        def unended():
            with attached(key) as t:
                return [s for s in t.used_slots() if not (s.pid == 0 and s.state == abi.State.EXITED)]
        wait_until(all_ended, 30, "every churned process to be ended in the table",
                   detail=lambda: f"{unended()}\n{svc.log()[-2000:]}")
        assert svc.proc.poll() is None
        if not stderr_is_journal:
            wait_until(lambda: "journald has not taken the last 1024 records" in svc.log(), 10,
                       "the stderr fallback notice", detail=lambda: svc.log()[-2000:])
            assert svc.events("exit"), "records beyond the queue must reach stderr"
        else:
            assert not svc.log(), "stderr is journald too: nothing may be written there"
            # journald reads again: the queued records arrive, then the count of the dropped ones.
            note = journal_until(b"were dropped")
            assert any(f.startswith(b"MESSAGE=journald did not take ") for f in note), note
    finally:
        stuck.setblocking(False)
        svc.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        while svc.proc.poll() is None and time.monotonic() < deadline:   # unstick it to stop
            try:
                stuck.recv(1 << 16)
            except BlockingIOError:
                svc.proc.poll() is None and time.sleep(0.01)
        svc.stop()
        stuck.close()


# -- a zombie is dead, not reused -------------------------------------------------------------
def test_unreaped_zombie_is_found_dead_not_pid_reused(key, service, forked):  # noqa: F811
    """A client dies while the service is down and its parent has not reaped it yet:
    the restarted service must call it found dead, not "PID now belongs to another"."""
    svc = service()
    c = forked(key, "zombie")
    svc.stop()
    os.kill(c.pid, signal.SIGKILL)              # not reaped: a zombie with its own start time
    wait_until(lambda: proc_state(c.pid) == "Z", 10,
               "the client to be a zombie")
    svc2 = service()
    e = svc2.wait_event("found_dead", name="zombie", pid=c.pid)
    assert e["cause"] == "found_dead", e["message"]
    c.reap()
