"""``procwatch run -- CMD`` and ``procwatch wait NAME``, as a shell script uses them (root)."""

import os
import signal
import subprocess
import time

import pytest

import procwatch
from conftest import (PY, ROOT, asleep_in_futex, ctx_switches, futex_waits, require_root, run_cli, start_time,
                      wait_until)
from procwatch import abi
from procwatch.segment import Table

pytestmark = [require_root()]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


def procwatch_cmd(*args):
    return [PY, "-m", "procwatch", *args]


def find_slot(key, name):
    t = Table.attach(key)
    try:
        for s in t.used_slots():
            if s.name == name:
                return s
        return None
    finally:
        t.detach()


def sig_ignored(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("SigIgn:"):
            return int(line.split()[1], 16)
    raise AssertionError("no SigIgn line")


# -- run ----------------------------------------------------------------------------

def test_run_execs_in_place_and_passes_the_exit_code(key, service):
    svc = service()
    p = subprocess.Popen(procwatch_cmd("run", "--key", hex(key), "--name", "job", "--",
                                       "sh", "-c", "read x; exit 3"),
                         stdin=subprocess.PIPE, cwd=ROOT, env=ENV)
    try:
        # Once sh runs, the PID is the one we started, and so is the start time.
        wait_until(lambda: open(f"/proc/{p.pid}/comm").read().strip() == "sh", 10, "the exec of sh")
        s = find_slot(key, "job")
        assert s.pid == p.pid and s.state == abi.State.ALIVE
        assert s.start_time == start_time(p.pid)
        p.stdin.write(b"go\n")
        p.stdin.flush()
        assert p.wait(10) == 3
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()
    wait_until(lambda: find_slot(key, "job").state == abi.State.EXITED, 10, "the exit to be recorded")
    s = find_slot(key, "job")
    assert s.cause == abi.Cause.EXITED and os.WEXITSTATUS(s.exit_status) == 3   # not an unregister
    svc.wait_event("exit", name="job", exit_code=3)


def test_run_passes_signals_and_leaves_dispositions_alone(key, service):
    """The caller sees CMD killed by its signal; CMD does not inherit the SIGPIPE and
    SIGXFSZ that Python ignores."""
    svc = service()
    baseline = subprocess.Popen(["sleep", "60"])
    p = subprocess.Popen(procwatch_cmd("run", "--key", hex(key), "--name", "sleeper", "--", "sleep", "60"),
                         cwd=ROOT, env=ENV)
    try:
        wait_until(lambda: open(f"/proc/{p.pid}/comm").read().strip() == "sleep", 10, "the exec of sleep")
        assert sig_ignored(p.pid) == sig_ignored(baseline.pid)
        assert not sig_ignored(p.pid) & (1 << (signal.SIGPIPE - 1) | 1 << (signal.SIGXFSZ - 1))
        svc.wait_event("registered", name="sleeper")
        os.kill(p.pid, signal.SIGTERM)
        assert p.wait(10) == -signal.SIGTERM
    finally:
        for q in (p, baseline):
            if q.poll() is None:
                q.kill()
            q.wait()
    svc.wait_event("exit", name="sleeper", signal="SIGTERM")


@pytest.mark.parametrize("cmd, status, says", [
    ("no-such-command-procwatch", 127, "no-such-command-procwatch: command not found"),
    ("{tmp}/missing", 127, "{tmp}/missing: command not found"),
    ("{tmp}/plain", 126, "{tmp}/plain: permission denied: not an executable file"),
    ("{tmp}", 126, "{tmp}: permission denied"),
])
def test_run_cannot_start_like_a_shell(table, tmp_path, cmd, status, says):
    (tmp_path / "plain").write_text("not a program\n")
    (tmp_path / "plain").chmod(0o644)
    cmd, says = cmd.format(tmp=tmp_path), says.format(tmp=tmp_path)
    out = run_cli("run", "--key", hex(table.key), "--name", "never", "--", cmd)
    lines = out.stderr.splitlines()
    assert out.returncode == status
    assert len(lines) == 1 and lines[0].startswith(f"procwatch run: {says}"), lines
    assert table.used_slots() == []                          # looked up before registering


def test_run_exec_failure_undoes_the_registration(table, tmp_path):
    """Found and executable, yet exec fails (ENOEXEC): 126, and the slot is not left alive."""
    bogus = tmp_path / "bogus"
    bogus.write_bytes(b"\x7fELF garbage")
    bogus.chmod(0o755)
    out = run_cli("run", "--key", hex(table.key), "--name", "bogus", "--", str(bogus))
    assert out.returncode == 126
    assert out.stderr.splitlines() == [f"procwatch run: cannot execute {bogus}: Exec format error"]
    s = find_slot(table.key, "bogus")
    assert s.pid == 0 and s.state == abi.State.UNREGISTERED


def test_run_name_in_use_does_not_start_the_command(table, tmp_path):
    marker = tmp_path / "ran"
    with procwatch.register_pid("taken", key=table.key):
        out = run_cli("run", "--key", hex(table.key), "--name", "taken", "--", "touch", str(marker))
    assert out.returncode == 125 and not marker.exists()
    assert out.stderr.startswith("procwatch run: name 'taken' is registered by live PID")
    assert out.stderr.strip().endswith("touch not started")


@pytest.mark.parametrize("name", ["a\tb", "a\x1bb", "  ", " x", "x" * 40])
def test_run_and_wait_keep_the_one_name_rule(table, name):
    """Issue 13: one rule for every entry point; here the CLI's (run --name, wait NAME)."""
    r = run_cli("run", "--name", name, "--key", hex(table.key), "--", "true")
    assert r.returncode == 125 and len(r.stderr.splitlines()) == 1 and "not started" in r.stderr, r
    w = run_cli("wait", name, "--key", hex(table.key), "--timeout", "0")
    assert w.returncode == 2 and len(w.stderr.splitlines()) == 1 and "name" in w.stderr, w
    assert table.used_slots() == []


def test_run_without_a_service_warns_once_and_runs(key):
    out = run_cli("run", "--key", hex(key), "--", "sh", "-c", "echo hello; exit 4")
    assert out.returncode == 4 and out.stdout == "hello\n"
    assert len(out.stderr.splitlines()) == 1 and "continuing without it" in out.stderr


def test_run_default_name_is_the_command_and_heartbeat_is_set(table):
    p = subprocess.Popen(procwatch_cmd("run", "--key", hex(table.key), "--heartbeat", "1.5", "--",
                                       "sleep", "60"), cwd=ROOT, env=ENV)
    try:
        s = wait_until(lambda: find_slot(table.key, "sleep"), 10, "a slot named sleep")
        assert s.pid == p.pid and s.heartbeat_ms == 1500
    finally:
        p.kill()
        p.wait()


BEATING_PROGRAM = """
import os, sys, time, procwatch
reg = procwatch.register_pid(os.environ["PROCWATCH_NAME"])     # adopts the slot run made
print(reg.slot, reg.pid == os.getpid(), os.environ["PROCWATCH_KEY"], flush=True)
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    reg.beat()
    time.sleep(0.05)
"""


def test_run_heartbeat_with_a_program_that_beats_just_works(key, service):
    """Issue 13: the exec'd program adopts run's slot and its beats keep it from being hung."""
    svc = service()
    p = subprocess.Popen(procwatch_cmd("run", "--name", "beats", "--key", hex(key), "--heartbeat", "0.3",
                                       "--", PY, "-c", BEATING_PROGRAM, "3"),
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        slot, own, exported = p.stdout.readline().split()
        assert own == "True" and int(exported, 0) == key
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    e = svc.wait_event("exit", name="beats", pid=p.pid, exit_code=0)
    assert e["slot"] == slot
    # 3 s of beats at a 0.3 s interval: ten intervals, no miss run, so never hung.
    assert [x for x in svc.events() if x.get("name") == "beats" and x["event"] in ("hung", "corrupt")] == []
    assert [x["pid"] for x in svc.events("registered") if x.get("name") == "beats"] == [str(p.pid)]


# -- wait ---------------------------------------------------------------------------

def test_wait_blocks_until_killed_and_says_how(key, service, clients):
    service()
    c = clients(key, "target")
    w = subprocess.Popen(procwatch_cmd("wait", "--key", hex(key), "target"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
    try:
        wait_until(lambda: asleep_in_futex(w.pid), 10, "procwatch wait to sleep in futex()")
        # No --timeout: an untimed sleep that no clock ends, so no wake-up until the kill.
        assert [timeout for _uaddr, timeout in futex_waits(w.pid).values()] == [0]
        before = ctx_switches(w.pid)
        time.sleep(0.5)
        assert ctx_switches(w.pid) == before, "procwatch wait woke up before its target died: a poller"
        c.kill(signal.SIGKILL)
        out, err = w.communicate(timeout=10)
        assert w.returncode == 0, err
        assert out == f"target (pid {c.pid}) killed by SIGKILL\n" and err == ""
    finally:
        if w.poll() is None:
            w.kill()
        w.wait()


def _read_available(fd):
    """What the pipe holds now, without waiting for more."""
    os.set_blocking(fd, False)
    out = b""
    try:
        while chunk := os.read(fd, 65536):
            out += chunk
    except BlockingIOError:
        pass
    os.set_blocking(fd, True)
    return out


def test_wait_imports_nothing_once_woken(key, service, clients):
    """Issue 13: after its futex woke, wait imported the detector and connector (~18 ms).

    ``-X importtime`` writes a line per import to stderr as it happens, into
    the same pipe as the answer: everything imported must be there before the
    target dies.  (The time from the wake to the exit is a figure printed by
    test_wait_wake_to_exit_figures, never a pass/fail bound.)
    """
    svc = service()
    c = clients(key, "quick")
    w = subprocess.Popen([PY, "-X", "importtime", *procwatch_cmd("wait", "quick", "--key", hex(key))[1:]],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, env=ENV)
    try:
        wait_until(lambda: asleep_in_futex(w.pid), 15, "wait to sleep in FUTEX_WAIT")
        before = _read_available(w.stdout.fileno()).decode()
        assert "import time:" in before and "procwatch.runwait" in before
        c.kill()
        after = w.stdout.read().decode()
        assert w.wait(10) == 0
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()
    svc.wait_event("exit", name="quick", pid=c.pid)
    assert after == f"quick (pid {c.pid}) killed by SIGKILL\n", after


def test_wait_wake_to_exit_figures(key, service, clients):
    """Prints (with -s) how long wait takes from the service's wake to its exit.

    The slot's exit_time_ns is taken right after the word is zeroed and its
    waiters woken; the exit is seen through a pidfd on the waiter.  A figure,
    not a bound: timing goals live in scripts/bench.
    """
    import select
    svc = service()
    took = []
    for n in range(5):
        c = clients(key, f"fig-{n}")
        w = subprocess.Popen(procwatch_cmd("wait", f"fig-{n}", "--key", hex(key)), stdout=subprocess.PIPE,
                             text=True, cwd=ROOT, env=ENV)
        wait_until(lambda: asleep_in_futex(w.pid), 15, "wait to sleep in FUTEX_WAIT")
        fd = os.pidfd_open(w.pid)
        try:
            c.kill()
            select.select([fd], [], [], 10)
            exited_ns = time.time_ns()
        finally:
            os.close(fd)
        assert w.wait(10) == 0 and w.stdout.read() == f"fig-{n} (pid {c.pid}) killed by SIGKILL\n"
        w.stdout.close()
        s = wait_until(lambda: find_slot(key, f"fig-{n}") if find_slot(key, f"fig-{n}").pid == 0 else None,
                       10, "the end recorded")
        took.append((exited_ns - s.exit_time_ns) / 1e6)
    took.sort()
    print(f"\nWAIT wake_to_exit_ms median={took[2]:.1f} min={took[0]:.1f} max={took[-1]:.1f} "
          f"runs={len(took)} load={os.getloadavg()[0]:.1f}")
    assert svc.proc.poll() is None


def test_wait_for_an_ended_process_returns_at_once(key, service, clients):
    service()
    c = clients(key, "done", "--then", "exit", "--code", "3")
    c.tell("go")
    wait_until(lambda: find_slot(key, "done").state == abi.State.EXITED, 10, "the exit")
    out = run_cli("wait", "--key", hex(key), "done")
    assert (out.returncode, out.stdout) == (0, "done exited with code 3\n")


def test_wait_timeout_is_124(key, service, clients):
    service()
    c = clients(key, "stays")
    out = run_cli("wait", "--key", hex(key), "stays", "--timeout", "0.2")
    assert out.returncode == 124
    assert out.stdout == f"stays (pid {c.pid}) is still running after 0.2 s\n"
    assert find_slot(key, "stays").pid == c.pid


def test_two_live_slots_with_one_name_are_reported_and_refused(key, service, clients):
    """Issue 13: a forged second live slot made root's wait report a death while the real
    process lived.  The service says so once; wait refuses the name with one line."""
    from procwatch import procfs
    svc = service("--reconcile-interval", "0.1")
    real = clients(key, "real")
    decoy = subprocess.Popen(["sleep", "60"])
    try:
        t = Table.attach(key)
        try:
            i = next(j for j in range(t.slot_count) if t.get32(j, abi.S_STATE) == abi.State.EMPTY)
            a, b = abi.slot_offset(real.slot), abi.slot_offset(i)
            t.buf[b + 4:b + abi.SLOT_SIZE] = t.buf[a + 4:a + abi.SLOT_SIZE]
            t.set64(i, abi.S_START_TIME, procfs.start_time(decoy.pid))
            t.u32[t.pid_index(i)] = decoy.pid          # a live process: the service watches it
        finally:
            t.detach()
        e = svc.wait_event("corrupt", problem="name")
        assert f"slot {real.slot}: pid {real.pid}" in e["message"] and f"slot {i}: pid {decoy.pid}" in e["message"]
        r = run_cli("wait", "real", "--key", hex(key), "--timeout", "5")
        assert r.returncode == 1 and r.stdout == "", r
        assert len(r.stderr.splitlines()) == 1 and "held by 2 live slots" in r.stderr, r.stderr
        decoy.kill()
        decoy.wait()
        svc.wait_event("exit", name="real", pid=decoy.pid)
        r = run_cli("wait", "real", "--key", hex(key), "--timeout", "0")
        assert r.returncode == 124 and str(real.pid) in r.stdout, r
        assert len([x for x in svc.events("corrupt") if x.get("problem", "").startswith("name")]) == 1
    finally:
        if decoy.poll() is None:
            decoy.kill()
            decoy.wait()


def test_wait_unknown_name_is_2_and_no_table_is_1(table, key):
    out = run_cli("wait", "--key", hex(table.key), "nobody-here")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr == (f"procwatch wait: no process named 'nobody-here' in slot table key "
                          f"{table.key:#010x}: see 'procwatch status' for the registered names\n")
    missing = table.key ^ 0x800
    if os.system(f"ipcs -m | grep -qi {missing:#010x}") == 0:
        pytest.skip(f"key {missing:#010x} is in use")
    out = run_cli("wait", "--key", hex(missing), "x")
    assert out.returncode == 1
    assert out.stderr == (f"procwatch: no slot table at key {missing:#010x}: start the service "
                          f"('procwatch serve' or 'systemctl start procwatch')\n")


def test_wait_woken_by_unregister_without_a_service(table):
    code = ("import procwatch,sys; r=procwatch.register_pid('polite', key=int(sys.argv[1],0)); "
            "print(r.pid, flush=True); sys.stdin.readline(); r.unregister()")
    c = subprocess.Popen([PY, "-c", code, hex(table.key)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, cwd=ROOT, env=ENV)
    w = None
    try:
        pid = int(c.stdout.readline())
        w = subprocess.Popen(procwatch_cmd("wait", "--key", hex(table.key), "polite"), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
        wait_until(lambda: asleep_in_futex(w.pid), 10, "procwatch wait to sleep in futex()")
        c.stdin.write("go\n")
        c.stdin.flush()
        out, err = w.communicate(timeout=10)
        assert (w.returncode, out) == (0, f"polite (pid {pid}) unregistered\n")
        assert "no procwatch service is watching" in err and len(err.splitlines()) == 1
    finally:
        for p in (c, w):
            if p is not None:
                if p.poll() is None:
                    p.kill()
                p.wait()


@pytest.mark.parametrize("state, cause, status, says", [
    (abi.State.EXITED, abi.Cause.EXITED, 11, "killed by SIGSEGV"),
    (abi.State.EXITED, abi.Cause.EXITED, 0x8b, "killed by SIGSEGV (core dumped)"),
    (abi.State.EXITED, abi.Cause.EXITED, -1, "ended (status unknown)"),
    (abi.State.EXITED, abi.Cause.KILLED_HUNG, 9, "was hung and procwatch ended it: killed by SIGKILL"),
    (abi.State.FOUND_DEAD, abi.Cause.FOUND_DEAD, -1,
     "found dead (it exited while no event reached procwatch); exit status unknown"),
    (abi.State.FOUND_DEAD, abi.Cause.PID_REUSED, -1,
     "found dead (its PID now belongs to another process); exit status unknown"),
    (abi.State.UNREGISTERED, abi.Cause.UNREGISTERED, -1, "unregistered"),
])
def test_wait_prints_each_kind_of_end(table, state, cause, status, says):
    """Slots written the way the service ends them (PID word already 0)."""
    table.set32(0, abi.S_STATE, state)
    table.write_name(0, b"ended")
    abi.SLOT_END.pack_into(table.buf, abi.slot_offset(0) + abi.S_EXIT_STATUS, status, cause, 1)
    out = run_cli("wait", "--key", hex(table.key), "ended")
    assert (out.returncode, out.stdout, out.stderr) == (0, f"ended {says}\n", "")


# -- run: the death word through the preload library (issue 14) ----------------------

def _threads(pid):
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))


def test_run_arms_the_command_itself_but_not_its_children(key, service):
    from conftest import end_process
    svc = service()
    p = subprocess.Popen(procwatch_cmd("run", "--key", hex(key), "--name", "dw-run", "--",
                                       "sh", "-c", "sleep 1000 & echo $!; wait"),
                         stdout=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
    child = None
    try:
        child = int(p.stdout.readline())
        s = wait_until(lambda: (lambda s: s if s and s.death_arm == abi.Arm.ARMED else None)(
            find_slot(key, "dw-run")), 10, "the preload library to arm the slot")
        assert s.pid == p.pid and s.death_tid in _threads(p.pid) and s.death_tid != p.pid
        # The child loaded the library too (inherited LD_PRELOAD) but did not arm: no sentinel thread.
        wait_until(lambda: "_preload" in open(f"/proc/{child}/maps").read(), 10, "the child's exec")
        assert _threads(child) == [child]
        p.kill()
        e = svc.wait_event("exit", name="dw-run", signal="SIGKILL")
        assert e["detected_by"] in ("death_word", "exit_event")
    finally:
        end_process(p)
        if child is not None:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_big_run_target_is_reported_from_its_death_word(key, service):
    from conftest import end_process
    svc = service()
    code = ("import mmap, time\nm = mmap.mmap(-1, 512 << 20)\nfor o in range(0, 512 << 20, 4096): m[o] = 1\n"
            "print('ready', flush=True)\ntime.sleep(1000)\n")
    p = subprocess.Popen(procwatch_cmd("run", "--key", hex(key), "--name", "dw-runbig", "--", PY, "-c", code),
                         stdout=subprocess.PIPE, text=True, cwd=ROOT, env=ENV)
    try:
        assert p.stdout.readline().strip() == "ready"
        wait_until(lambda: (find_slot(key, "dw-runbig") or abi).death_arm == abi.Arm.ARMED, 10, "armed")
        t = Table.attach(key)
        try:
            slot = find_slot(key, "dw-runbig").index
            wait_until(lambda: t.death_word(slot) & abi.FUTEX_WAITERS, 10, "the service to wait on it")
        finally:
            t.detach()
        p.kill()
        e = svc.wait_event("exit", timeout=30, name="dw-runbig", signal="SIGKILL")
        assert e["detected_by"] == "death_word", e["message"]
    finally:
        end_process(p)


def test_run_of_a_static_or_setuid_program_stays_connector_only(key, service, tmp_path):
    import shutil
    import stat
    from procwatch import runwait
    service()
    static = "/sbin/ldconfig"
    if runwait._elf_interpreter(static) is not False:
        pytest.skip(f"{static} is not statically linked here")
    r = run_cli("run", "--key", hex(key), "--name", "dw-static", "--", static, "-p")
    assert r.returncode == 0, r.stderr
    s = find_slot(key, "dw-static")
    assert s.death_arm == abi.Arm.NOT_PRELOADABLE
    out = run_cli("status", "--key", hex(key))
    assert "connector-only (static or setuid program)" in out.stdout
    suid = tmp_path / "suid-true"
    shutil.copy("/bin/true", suid)
    os.chmod(suid, 0o755 | stat.S_ISUID)
    assert runwait.preload_arm(str(suid))[0] == abi.Arm.NOT_PRELOADABLE
    assert runwait.preload_arm("/bin/true") == (abi.Arm.PRELOAD, runwait.preload_library())
