"""The service as an operator meets it: start-up, refusals, hostile tables, stop (root)."""

import json
import os
import random
import signal
import subprocess

import pytest
import sysv_ipc

import procwatch
from conftest import PY, ROOT, end_process, fresh_key, remove_ipc, require_root, run_cli, wait_until
from procwatch import abi
from procwatch.segment import Table

pytestmark = [require_root()]


def test_second_service_on_same_key_refuses_first_unharmed(key, service, clients):
    first = service()
    c = clients(key, "kept")
    second = service(ready=False)
    assert second.proc.wait(30) == 1
    err = second.log()
    assert f"procwatch PID {first.pid} already serves key {key:#010x}" in err
    assert first.proc.poll() is None
    t = Table.attach(key)
    try:
        assert t.hget32(abi.H_SERVICE_PID) == first.pid
    finally:
        t.detach()
    c.kill()
    first.wait_event("exit", name="kept")


def test_corrupt_header_refuses_with_ipcrm_hint(key, service):
    t, _ = Table.create_or_adopt(key, 4)
    t.buf[0:8] = b"GARBAGE!"
    t.detach()
    svc = service(ready=False)
    assert svc.proc.wait(30) == 1
    lines = [ln for ln in svc.log().splitlines() if ln.strip()]
    assert len(lines) == 1 and f"ipcrm -M {key:#010x}" in lines[0], lines
    # Nothing was wiped: the foreign bytes are still there for the operator to look at.
    assert sysv_ipc.SharedMemory(key).read(8) == b"GARBAGE!"


def test_hostile_slots_never_crash_or_signal(key, service, clients):
    """Random bytes, PID 1, an unrelated live process, a PID above pid_max: the
    service clears or ends those slots, says so, signals nobody, and keeps working."""
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        t, _ = Table.create_or_adopt(key, 16)
        rnd = random.Random(1234)
        t.buf[abi.slot_offset(0):abi.slot_offset(1)] = bytes(rnd.randrange(256) for _ in range(abi.SLOT_SIZE))
        for i, pid in ((1, 1), (2, bystander.pid), (3, 4194304 + 17)):
            t.set32(i, abi.S_STATE, abi.State.ALIVE)
            t.set64(i, abi.S_START_TIME, 1)           # never the real one
            t.write_name(i, f"hostile-{i}".encode())
            t.u32[t.pid_index(i)] = pid
        t.buf[abi.slot_offset(4) + abi.S_NAME:abi.slot_offset(4) + abi.S_NAME + 4] = b"\xff\xfe\xfd\x00"
        t.set32(4, abi.S_STATE, abi.State.ALIVE)
        t.u32[t.pid_index(4)] = bystander.pid
        t.detach()
        svc = service()
        t = Table.attach(key)
        try:
            wait_until(lambda: all(t.u32[t.pid_index(i)] == 0 for i in range(5)), 10,
                       "hostile slots to be cleared")
        finally:
            t.detach()
        assert svc.events("corrupt"), svc.log()
        ended = {e["name"] for e in svc.events("found_dead")}
        assert {"hostile-1", "hostile-2"} <= ended
        assert bystander.poll() is None and os.kill(1, 0) is None
        # ... and it still does its job.
        c = clients(key, "honest")
        c.kill()
        svc.wait_event("exit", name="honest")
        assert svc.proc.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_stops_cleanly_and_keeps_the_table(key, service, clients, sig):
    """SIGTERM (systemctl stop) and SIGINT (Ctrl-C in a terminal): exit 0, the table kept for the clients."""
    svc = service()
    c = clients(key, "stays")
    svc.wait_event("registered", name="stays")
    assert procwatch.monitor_alive(key)
    assert svc.stop(sig) == 0
    assert not procwatch.monitor_alive(key)
    t = Table.attach(key)
    try:
        s = t.read_slot(c.slot)
        assert s.pid == c.pid and s.state == abi.State.ALIVE
        assert t.hget32(abi.H_SERVICE_PID) == 0
    finally:
        t.detach()
    assert svc.events("stopping") and "Traceback" not in svc.log() and "KeyboardInterrupt" not in svc.log()


def test_procwatch_key_wins_over_the_files_key(key, tmp_path):
    """For ``serve`` the key is --key, else $PROCWATCH_KEY, else the file's service.key."""
    file_key = fresh_key()
    remove_ipc(file_key)
    cfg = tmp_path / "procwatch.toml"
    cfg.write_text(f"[service]\nkey = {file_key:#x}\n")
    log = open(tmp_path / "service.log", "wb")
    p = subprocess.Popen([PY, "-m", "procwatch", "serve", "--config", str(cfg), "--log", "stderr"],
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=ROOT,
                         env=dict(os.environ, PROCWATCH_KEY=hex(key)))
    try:
        wait_until(lambda: p.poll() is None and procwatch.monitor_alive(key), 15, "a service on $PROCWATCH_KEY",
                   detail=lambda: (tmp_path / "service.log").read_text())
        with pytest.raises(sysv_ipc.ExistentialError):
            sysv_ipc.SharedMemory(file_key)
        wait_until(lambda: f"event=started key={key:#010x}" in (tmp_path / "service.log").read_text(), 10,
                   "the started line naming $PROCWATCH_KEY")
    finally:
        end_process(p)
        log.close()
        remove_ipc(file_key)


def test_status_summary_line(key, service, clients):
    """Under the service line: the table, its live and used slots of all, and the exits."""
    svc = service("--slots", "16")
    clients(key, "alive-one")
    gone = clients(key, "gone-one")
    gone.kill()
    svc.wait_event("exit", name="gone-one")
    out = run_cli("status", "--key", hex(key))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"procwatch: running, PID {svc.pid}, connector backend")
    assert lines[1] == f"table {key:#010x}: 1 live, 2 used of 16 slots, 1 exits"


def test_status_json_and_exit_codes(key, service, clients):
    out = run_cli("status", "--key", hex(key))
    assert out.returncode == 3 and "not running" in out.stdout
    svc = service()
    alive = clients(key, "alive-one")
    dead = clients(key, "dead-one")
    dead.kill()
    svc.wait_event("exit", name="dead-one")
    out = run_cli("status", "--key", hex(key), "--json")
    assert out.returncode == 0, out.stderr
    snap = json.loads(out.stdout)
    assert snap["service"] == {"pid": svc.pid, "alive": True, "backend": "connector",
                               "heartbeat": snap["service"]["heartbeat"], "hot_step": "c",
                               "death_words": "watching"}
    rows = {r["name"]: r for r in snap["slots"]}
    assert rows["alive-one"]["pid"] == alive.pid and rows["alive-one"]["state"] == "alive"
    d = rows["dead-one"]
    assert d["pid"] == 0 and d["state"] == "exited" and d["signal"] == "SIGKILL"
    assert d["cause"] == "exited" and d["latency_us"] is not None
    text = run_cli("status", "--key", hex(key))
    assert text.returncode == 0
    assert "alive-one" in text.stdout and "killed by SIGKILL" in text.stdout
    svc.stop()
    assert run_cli("status", "--key", hex(key)).returncode == 3


def test_help_reads_like_a_man_page():
    for args in ([], ["serve"], ["status"]):
        out = run_cli(*args, "--help")
        assert out.returncode == 0
        assert "usage: procwatch" in out.stdout
    top = run_cli("--help").stdout
    assert "PROCWATCH_KEY" in top and "SIGTERM" in top and "exit status" in top


def test_bad_arguments_are_usage_errors():
    out = run_cli("serve", "--slots", "0")
    assert out.returncode == 2 and "out of range" in out.stderr
    out = run_cli("status", "--key", "banana")
    assert out.returncode == 2 and "not an integer key" in out.stderr


def test_service_raises_its_open_file_limit_for_pidfds(key, service):
    """Each watched process holds a pidfd: a soft limit of 256 must not cap the table."""
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard > 256
    svc = service(preexec=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)))
    with open(f"/proc/{svc.pid}/limits") as f:
        line = next(ln for ln in f if ln.startswith("Max open files"))
    assert line.split()[3:5] == [str(hard)] * 2, line


def test_status_into_a_closed_pipe_ends_quietly(key, service, clients):
    """Issue 13: `status | true` ended in a BrokenPipeError traceback with exit 1.

    The reader's end is closed before status starts, so every write fails
    (EPIPE) whatever the timing: no traceback, exit 141 as for SIGPIPE.
    """
    service()
    clients(key, "piped")
    for extra in ([], ["--json"]):
        r, w = os.pipe()
        os.close(r)
        p = subprocess.run([PY, "-m", "procwatch", "status", "--key", hex(key), *extra], stdout=w,
                           stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=30)
        os.close(w)
        assert (p.returncode, p.stderr) == (128 + signal.SIGPIPE, ""), (extra, p.returncode, p.stderr)


def test_a_slot_written_past_used_end_is_watched_and_used_end_put_right(key, service, clients):
    """Registrations stop reading at the header's used_end (issue 16), so the service keeps it
    over every slot in use: a live slot written by hand far past it is watched and its exit
    reported, and a used_end written past the used slots is lowered again."""
    svc = service()
    clients(key, "near")
    target = subprocess.Popen(["sleep", "60"])
    t = Table.attach(key)
    try:
        assert t.used_end() == 1
        far = t.slot_count - 1
        t.set64(far, abi.S_START_TIME, procwatch.procfs.start_time(target.pid))
        t.write_name(far, b"far")
        t.set32(far, abi.S_STATE, abi.State.ALIVE)
        t.u32[t.pid_index(far)] = target.pid                # no generation bump, as a hand would
        svc.wait_event("registered", name="far")
        assert t.used_end() == far + 1
        target.kill()
        svc.wait_event("exit", name="far")
        assert t.u32[t.pid_index(far)] == 0
        t.hset32(abi.H_USED_END, 0xFFFFFFFF)
        wait_until(lambda: t.used_end() == far + 1, 10, "used_end to be lowered to the slots in use")
        assert "used_end said 4294967295" in svc.log() and "Traceback" not in svc.log()
    finally:
        t.detach()
        target.kill()
        target.wait()


def test_header_junk_is_put_back_backend_and_exits_counter_too(key, service, clients):
    """Issue 13: after junk writes the header repair left `backend` and the exits
    counter garbage, and a restart kept the garbage counter."""
    svc = service("--reconcile-interval", "0.1")
    c = clients(key, "one")
    c.kill()
    svc.wait_event("exit", name="one")
    t = Table.attach(key)
    try:
        assert t.hget64(abi.H_EXITS) == 1
        t.hset32(abi.H_BACKEND, 0xDEAD)
        t.hset32(abi.H_HEARTBEAT_PERIOD_MS, 7)
        t.hset64(abi.H_EXITS, 0x4141414141414141)
        e = svc.wait_event("corrupt", problem="header:")
        assert all(w in e["message"] for w in ("backend", "heartbeat period", "exits counter")), e
        assert (t.hget32(abi.H_BACKEND), t.hget32(abi.H_HEARTBEAT_PERIOD_MS), t.hget64(abi.H_EXITS)) == \
            (abi.Backend.CONNECTOR, 1000, 1)
        snap = json.loads(run_cli("status", "--key", hex(key), "--json").stdout)
        assert (snap["service"]["backend"], snap["exits"]) == ("connector", 1)
        svc.stop()
        t.hset64(abi.H_EXITS, 0x4141414141414141)          # while no service runs
        again = service("--reconcile-interval", "0.1")
        e = again.wait_event("corrupt", problem="header:")
        assert "exits counter was 4702111234474983745" in e["message"], e
        assert t.hget64(abi.H_EXITS) == 1                   # the one ended slot
        assert "Traceback" not in again.log()
    finally:
        t.detach()


def test_status_columns_stay_aligned_with_wide_names(key, service, clients):
    """Issue 13: a CJK name (2 columns a character) pushed its row's later columns out of line."""
    from procwatch.status import display_width
    service()
    wide = clients(key, "数据面")
    narrow = clients(key, "dp")
    out = run_cli("status", "--key", hex(key)).stdout.splitlines()
    head = next(ln for ln in out if ln.startswith("SLOT"))
    rows = {ln.split()[1]: ln for ln in out if ln.split()[:1] and ln.split()[0].isdigit()}
    col = display_width(head[:head.index("PID")])
    for name, c in (("数据面", wide), ("dp", narrow)):
        line = rows[name]
        at = line.index(str(c.pid))
        assert display_width(line[:at]) == col, (name, line)
