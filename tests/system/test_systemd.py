"""procwatch.service under a real systemd, its events in a real journald (issue 6).

Everything runs inside one container (conftest.py ``installed``: systemd as
PID 1, procwatch installed by scripts/install), because the container has
its own SysV IPC namespace: the service and its clients must share it.  The
proc connector refuses subscribers there (ECONNREFUSED outside the initial
network namespace), so the service falls back to the pidfd backend: this is
also that fallback's end-to-end check.  Clients are tests/progs/client.py
run by the installed interpreter as transient units.

The tests build on each other, in file order, on one procwatch.service:
1. start reaches active (READY=1), STATUS shows in ``systemctl status``;
2. a killed client gives one journald entry with every field, and
   ``procwatch events`` reads it back;
3. a frozen service (SIGSTOP) stops its WATCHDOG=1, systemd restarts it, and
   the new service re-adopts the table: the living client is still
   registered, the one killed meanwhile is found dead;
4. ``systemctl reload`` keeps the process (RELOADING=1, READY=1); ``systemctl
   stop`` is clean (STOPPING=1, status 0) and leaves the table.
For that last one PID 1 logs at debug level, so that the sd_notify messages
it accepts ("Got notification message from PID ...") are in the journal.
Not before: at debug level a unit's forked child logs to journald before it
execs, and journald's per-PID cache then files procwatch's first entries
under init.scope instead of procwatch.service.
"""

import json
import time

import pytest

from procwatch.journal import Event

from .conftest import REPO_INSIDE
from .container import poll_until

UNIT = "procwatch.service"
KEY = "0x70770001"                         # the default: the container has its own IPC namespace
PY = "/opt/procwatch/bin/python"           # the interpreter scripts/install set up
CLIENT = f"{REPO_INSIDE}/tests/progs/client.py"


def require(value, what, ct=None):
    if not value:
        detail = ""
        if ct is not None:
            detail = "\n" + ct.exec("journalctl", "-b", "--no-pager", "-n", "40", "-p", "info",
                                    "-o", "short-monotonic", "-u", UNIT, "-u", "pwclient-*").stdout
        pytest.fail(f"{what}{detail}", pytrace=False)
    return value


def events(ct, kind, **match):
    """procwatch's journal entries of ``kind`` (journalctl -o json), matched by fields."""
    args = [f"PROCWATCH_EVENT={kind}"] + [f"PROCWATCH_{k.upper()}={v}" for k, v in match.items()]
    return ct.journal(*args)


def wait_event(ct, kind, timeout=15.0, **match):
    return require(poll_until(lambda: events(ct, kind, **match), timeout, 0.1),
                   f"no {kind} entry {match} within {timeout:g} s", ct)[-1]


def status(ct):
    r = ct.exec("procwatch", "status", "--key", KEY, "--json")
    return r.returncode, json.loads(r.stdout)


def slot_of(snapshot, name):
    return next((s for s in snapshot["slots"] if s["name"] == name), None)


def require_running(ct):
    """Later checks need the service of the earlier ones: fail at once, not by timeouts."""
    require(ct.show(UNIT, "ActiveState") == "active", f"{UNIT} is not active (see test_1)", ct)


def start_client(ct, name):
    """A registered client in a transient unit; its PID once the service watches it."""
    unit = f"pwclient-{name}"
    ct.exec("systemd-run", f"--unit={unit}", "--collect", "--service-type=exec", "--quiet",
            PY, CLIENT, "--key", KEY, "--name", name, check=True)
    pid = int(ct.show(f"{unit}.service", "MainPID"))
    wait_event(ct, "registered", name=name, pid=pid)
    return pid


@pytest.fixture(scope="module")
def ct(installed):
    installed.t0 = time.monotonic()
    yield installed
    installed.systemctl("stop", UNIT, "pwevents.service")
    installed.exec("systemd-analyze", "log-level", "info")
    print(f"test_systemd: {time.monotonic() - installed.t0:.2f} s after boot and install")


def unit_log(ct):
    """What PID 1 and the service logged about the unit, as text."""
    ct.exec("journalctl", "--sync")
    return ct.exec("journalctl", "-b", "--no-pager", "-o", "cat", "-u", UNIT).stdout


def notifications(ct, pid):
    """The sd_notify messages PID 1 accepted from ``pid`` (debug log)."""
    log = unit_log(ct)
    marker = f"{UNIT}: Got notification message from PID {pid} ("
    return [ln.split(marker, 1)[1][:-1] for ln in log.splitlines() if marker in ln]


# -- 1 ---------------------------------------------------------------------------

def test_1_start_reaches_active_after_ready_with_a_status(ct):
    t0 = time.monotonic()
    r = ct.systemctl("start", UNIT, timeout=60)           # Type=notify: returns after READY=1
    print(f"systemctl start -> active: {time.monotonic() - t0:.3f} s")
    require(r.returncode == 0, f"systemctl start failed: {r.stderr}", ct)
    assert ct.show(UNIT, "ActiveState") == "active" and ct.show(UNIT, "SubState") == "running"
    main = int(ct.show(UNIT, "MainPID"))
    text = ct.systemctl("status", UNIT).stdout
    assert 'Status: "watching 0 processes, 0 exits"' in text, text
    # the fallback the container forces, said once at start
    started = wait_event(ct, "started")
    assert started["PROCWATCH_BACKEND"] == "pidfd", started["MESSAGE"]
    assert "ECONNREFUSED" in started["MESSAGE"], started["MESSAGE"]
    assert started["_SYSTEMD_UNIT"] == UNIT and started["_PID"] == str(main)
    # LimitRTPRIO=1 lets the death-word waiters run real-time; where a cgroup v1 RT budget is
    # missing (RT group scheduling), the line says it was refused and why.
    priority = started["PROCWATCH_DEATH_WORD_PRIORITY"]
    assert priority == "1" or (priority == "0" and "SCHED_FIFO 1 refused" in started["MESSAGE"]), \
        started["MESSAGE"]
    # the teardown yield is off by default (the unit leaves CAP_SYS_NICE out for it)
    assert started["PROCWATCH_TEARDOWN_YIELD_MS"] == "0", started["MESSAGE"]
    assert "keep their scheduling policy (teardown_yield_ms = 0)" in started["MESSAGE"], started["MESSAGE"]


# -- 2 ---------------------------------------------------------------------------

def test_2_a_killed_client_is_one_structured_journal_entry(ct):
    require_running(ct)
    # --since: the follower may start reading after the exit below was logged (Python's
    # start-up under load); without it, it would wait at the journal's end and miss it.
    follower = ct.exec("systemd-run", "--unit=pwevents", "--collect", "--quiet",
                       "--property=StandardOutput=file:/root/follow.jsonl",
                       "procwatch", "events", "--follow", "--json", "--event", "exit",
                       f"--since=@{time.time() - 1:.3f}")
    assert follower.returncode == 0, follower.stderr
    pid = start_client(ct, "dp-1")
    ct.exec("kill", "-KILL", str(pid), check=True)
    e = wait_event(ct, "exit", name="dp-1")
    assert e["PROCWATCH_PID"] == str(pid) and e["OBJECT_PID"] == str(pid)
    assert e["PROCWATCH_SIGNAL"] == "SIGKILL" and e["PROCWATCH_CORE_DUMPED"] == "0", e
    assert "PROCWATCH_EXIT_CODE" not in e
    assert e["MESSAGE_ID"] == Event.EXIT.message_id.hex and e["PRIORITY"] == "4"
    assert e["PROCWATCH_SLOT"].isdigit() and e["_SYSTEMD_UNIT"] == UNIT
    assert e["MESSAGE"].startswith(f"dp-1 (pid {pid}) killed by SIGKILL")
    # The container forces the pidfd backend (test 1), which has no kernel timestamp: an
    # unknown latency is left out of the entry, not written as 4294967295 or empty.  The
    # client is armed (issue 14), so its death word may win the race with the pidfd: then
    # the latency is the service's own, death word -> zeroed, and it must be a number.
    if e.get("PROCWATCH_DETECTED_BY") == "death_word":
        assert e["PROCWATCH_LATENCY_US"].isdigit(), e
    else:
        assert "PROCWATCH_LATENCY_US" not in e, e

    # journalctl OBJECT_PID= finds it, and the catalog explains it (journalctl -x)
    text = ct.exec("journalctl", "-x", "--no-pager", f"OBJECT_PID={pid}",
                   f"MESSAGE_ID={Event.EXIT.message_id.hex}").stdout
    assert f"Subject: Watched process dp-1 (PID {pid}) exited" in text, text
    assert "@PROCWATCH" not in text, text

    # procwatch events reads the same entry back through systemd.journal.Reader
    r = ct.exec("procwatch", "events", "--json", "--name", "dp-1", "--since=-10min", check=True)
    got = [json.loads(line) for line in r.stdout.splitlines()]
    assert [g["event"] for g in got] == ["registered", "exit"], got
    x = got[-1]
    assert (x["name"], x["pid"], x["object_pid"], x["signal"], x["core_dumped"]) == \
        ("dp-1", pid, pid, "SIGKILL", False), x
    assert x["message_id"] == Event.EXIT.message_id.hex and x["service_pid"] == int(e["_PID"])
    human = ct.exec("procwatch", "events", "--pid", str(pid), "--event", "exit", check=True).stdout
    assert human.count("\n") == 1 and f"exit         dp-1 (pid {pid}) killed by SIGKILL" in human

    def followed():
        text = ct.exec("cat", "/root/follow.jsonl").stdout
        return [json.loads(line) for line in text.splitlines()]
    seen = require(poll_until(followed, 10, 0.1), "events --follow printed nothing", ct)
    assert [(s["event"], s["pid"]) for s in seen] == [("exit", pid)], seen
    ct.systemctl("stop", "pwevents.service")


# -- 3 ---------------------------------------------------------------------------

def test_3_a_frozen_service_is_restarted_by_the_watchdog_and_readopts(ct):
    require_running(ct)
    stays = start_client(ct, "stays")
    doomed = start_client(ct, "doomed")
    old = int(ct.show(UNIT, "MainPID"))
    assert int(ct.show(UNIT, "NRestarts")) == 0
    t0 = time.monotonic()
    ct.exec("kill", "-STOP", str(old), check=True)
    ct.exec("kill", "-KILL", str(doomed), check=True)          # dies while nobody watches
    require(poll_until(lambda: int(ct.show(UNIT, "NRestarts")) >= 1, 30, 0.1),
            "the watchdog did not restart the frozen service", ct)
    require(poll_until(lambda: ct.show(UNIT, "ActiveState") == "active"
                       and int(ct.show(UNIT, "MainPID")) not in (0, old), 30, 0.1),
            "the restarted service did not become active", ct)
    print(f"SIGSTOP -> restarted and active: {time.monotonic() - t0:.3f} s")
    new = int(ct.show(UNIT, "MainPID"))
    log = unit_log(ct)
    assert "Watchdog timeout" in log, log[-3000:]

    dead = wait_event(ct, "found_dead", name="doomed")
    assert dead["PROCWATCH_PID"] == str(doomed) and dead["OBJECT_PID"] == str(doomed)
    assert dead["_PID"] == str(new) and dead["PROCWATCH_CAUSE"] == "found_dead"
    started = poll_until(lambda: [e for e in events(ct, "started") if e["_PID"] == str(new)], 10, 0.1)
    assert started and "adopted" in started[0]["MESSAGE"], started
    rc, snap = status(ct)
    assert rc == 0 and snap["service"]["pid"] == new
    assert (slot_of(snap, "stays")["state"], slot_of(snap, "stays")["pid"]) == ("alive", stays)
    assert slot_of(snap, "doomed")["state"] == "found_dead"
    # still detecting: the survivor's exit is seen by the new service
    ct.exec("kill", "-TERM", str(stays), check=True)
    e = wait_event(ct, "exit", name="stays")
    assert e["_PID"] == str(new) and e["PROCWATCH_SIGNAL"] == "SIGTERM"


# -- 4 ---------------------------------------------------------------------------

def test_4_reload_then_a_clean_stop_that_leaves_the_table(ct):
    require_running(ct)
    kept = start_client(ct, "kept")
    main = int(ct.show(UNIT, "MainPID"))
    ct.exec("systemd-analyze", "log-level", "debug", check=True)
    # systemctl reload (ExecReload=): SIGHUP, the same process goes on, RELOADING=1 then READY=1
    assert ct.systemctl("reload", UNIT, timeout=60).returncode == 0
    require(poll_until(lambda: [n for n in notifications(ct, main) if n.startswith("READY=1")], 10, 0.1),
            "no READY=1 after the reload", ct)
    said = [n.split("=")[0] for n in notifications(ct, main) if n.startswith(("RELOADING", "READY"))]
    assert said == ["RELOADING", "READY"], said
    assert int(ct.show(UNIT, "MainPID")) == main and ct.show(UNIT, "ActiveState") == "active"
    r = ct.systemctl("stop", UNIT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert poll_until(lambda: "STOPPING=1" in notifications(ct, main), 10, 0.1)
    assert ct.show(UNIT, "ActiveState") == "inactive"
    assert ct.show(UNIT, "Result") == "success"
    assert ct.show(UNIT, "ExecMainStatus") == "0"
    log = unit_log(ct)
    assert f"{UNIT}: Main process exited, code=exited, status=0/SUCCESS" in log    # not killed
    stopping = poll_until(lambda: [e for e in events(ct, "stopping") if e["_PID"] == str(main)], 10, 0.1)
    assert len(stopping) == 1 and stopping[0]["PROCWATCH_KEY"] == KEY, stopping
    assert KEY in ct.exec("ipcs", "-m").stdout                   # RemoveIPC=no: the table stays
    rc, snap = status(ct)
    assert rc == 3 and snap["service"]["alive"] is False         # 3: not running
    assert (slot_of(snap, "kept")["state"], slot_of(snap, "kept")["pid"]) == ("alive", kept)
    ct.exec("kill", "-KILL", str(kept))


def test_5_metrics_configured_under_the_unit_are_served(ct):
    """The unit's sandbox lets a configured [metrics] listener open its TCP socket.

    Before AF_INET was in RestrictAddressFamilies=, such a service failed at
    start-up with EAFNOSUPPORT; the metrics are then scraped inside the
    container, from loopback, with the service still watching the table.
    """
    port = 9464
    conf = f'[metrics]\naddress = "127.0.0.1:{port}"\n'
    ct.exec("install", "-d", "-m", "0755", "/etc/procwatch", check=True)
    ct.exec("sh", "-c", f"printf '%s' '{conf}' > /etc/procwatch/procwatch.toml", check=True)
    try:
        r = ct.systemctl("start", UNIT, timeout=60)
        require(r.returncode == 0, f"{UNIT} with [metrics] did not start: {r.stderr.strip()}", ct)
        scrape = (f"import urllib.request; print(urllib.request.urlopen("
                  f"'http://127.0.0.1:{port}/metrics', timeout=5).read().decode())")
        text = require(poll_until(lambda: ct.exec(PY, "-c", scrape).stdout, 15, 0.2),
                       "no metrics scraped from the unit's service", ct)
        assert "procwatch_registered_processes" in text, text[:500]
        assert ct.show(UNIT, "ActiveState") == "active"
    finally:
        ct.systemctl("stop", UNIT, timeout=60)
        ct.exec("rm", "-f", "/etc/procwatch/procwatch.toml")
