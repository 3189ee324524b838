"""Rules, hooks, metrics and SIGHUP with the real service, real clients and real kills (root).

Hooks are real commands the service runs; their results are read from files
they write and from the service's log.  Metrics are scraped over 127.0.0.1
and parsed with prometheus_client's own parser.
"""

import json
import os
import signal
import socket
import subprocess
import textwrap

import pytest

import procwatch
from conftest import (PY, ROOT, metric_value, plant_slot, proc_state, require_root, scrape_metrics, start_time,
                      wait_until)
from procwatch import abi
from procwatch.segment import Table

pytestmark = [require_root()]

# A hook that writes its PROCWATCH_* environment to DIR/<name>-<event>.json and says hello.
DUMP_ENV = ("import json, os, sys; env = {k: v for k, v in os.environ.items() if k.startswith('PROCWATCH_')}; "
            "path = os.path.join(sys.argv[1], env['PROCWATCH_NAME'] + '-' + env['PROCWATCH_EVENT'] + '.json'); "
            "open(path + '.tmp', 'w').write(json.dumps(env)); os.rename(path + '.tmp', path); "
            "print('hook says hello to', env['PROCWATCH_NAME'])")


def q(text):
    """A TOML basic string (JSON's escaping is valid TOML)."""
    return json.dumps(str(text))


def write(path, text):
    path.write_text(textwrap.dedent(text))
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slot_word(key, slot):
    t = Table.attach(key)
    try:
        return t.u32[t.pid_index(slot)], t.read_slot(slot)
    finally:
        t.detach()


def hook_pid_alive(pid):
    """The hook process exists and is not a zombie (the service reaps it)."""
    return proc_state(pid) not in (None, "Z")


def log_lines(svc):
    return svc.log().splitlines()


# -- hooks --------------------------------------------------------------------------

def test_hook_runs_on_a_real_exit_with_the_event_in_its_environment(key, service, clients, tmp_path):
    out = tmp_path / "env"
    out.mkdir()
    cfg = write(tmp_path / "procwatch.toml", f"""
        [[rule]]
        name = "env-*"
        [rule.hooks]
        on_exit = [{q(PY)}, "-c", {q(DUMP_ENV)}, {q(out)}]
        """)
    svc = service("--config", str(cfg))
    killed = clients(key, "env-killed")
    coded = clients(key, "env-coded", "--then", "exit", "--code", "3")
    other = clients(key, "no-rule")
    killed.kill(signal.SIGKILL)
    coded.tell("go")
    other.kill(signal.SIGKILL)
    wait_until(lambda: (out / "env-killed-exit.json").exists() and (out / "env-coded-exit.json").exists(),
               15, "both hooks to run", detail=lambda: svc.log()[-3000:])
    env = json.loads((out / "env-killed-exit.json").read_text())
    latency = env.pop("PROCWATCH_LATENCY_US")
    assert latency.isdigit()
    # A tiny armed client: its death word or its exit event may zero it first (a race; both said
    # as such, tests/test_hooks.py checks each with a target that decides it).
    detected, teardown = env.pop("PROCWATCH_DETECTED_BY"), env.pop("PROCWATCH_TEARDOWN_US")
    assert (detected == "death_word" and teardown.isdigit()) or (detected, teardown) == ("exit_event", ""), \
        (detected, teardown)
    stamp = env.pop("PROCWATCH_TIME")
    assert stamp.endswith("Z") and stamp[:4].isdigit()
    assert env == {
        "PROCWATCH_EVENT": "exit", "PROCWATCH_NAME": "env-killed", "PROCWATCH_PID": str(killed.pid),
        "PROCWATCH_SLOT": str(killed.slot), "PROCWATCH_EXIT_CODE": "", "PROCWATCH_SIGNAL": "SIGKILL",
        "PROCWATCH_CORE_DUMPED": "0", "PROCWATCH_CAUSE": "exited", "PROCWATCH_KEY": f"{key:#010x}",
        "PROCWATCH_VERDICT": "",
    }
    env = json.loads((out / "env-coded-exit.json").read_text())
    assert (env["PROCWATCH_EXIT_CODE"], env["PROCWATCH_SIGNAL"], env["PROCWATCH_PID"]) == ("3", "", str(coded.pid))
    # The hook's output is logged, and its run too; the event lines stay events.
    wait_until(lambda: "exit hook " + PY + ": hook says hello to env-coded" in svc.log(), 10,
               "the hook's output in the log")
    wait_until(lambda: "for 'env-killed' (pid %d): exit status 0" % killed.pid in svc.log(), 10,
               "the hook's run in the log", detail=lambda: svc.log()[-3000:])
    svc.wait_event("exit", name="no-rule")
    assert len(svc.events("exit")) == 3
    assert not (out / "no-rule-exit.json").exists()


def test_found_dead_hook_after_the_service_was_down(key, service, clients, tmp_path):
    out = tmp_path / "env"
    out.mkdir()
    first = service()
    c = clients(key, "fd-1")
    first.stop()
    c.kill(signal.SIGKILL)
    c.proc.wait(10)
    cfg = write(tmp_path / "procwatch.toml", f"""
        [[rule]]
        name = "fd-*"
        hooks = {{ on_found_dead = [{q(PY)}, "-c", {q(DUMP_ENV)}, {q(out)}] }}
        """)
    second = service("--config", str(cfg))
    second.wait_event("found_dead", name="fd-1")
    wait_until(lambda: (out / "fd-1-found_dead.json").exists(), 15, "the found_dead hook",
               detail=lambda: second.log()[-3000:])
    env = json.loads((out / "fd-1-found_dead.json").read_text())
    assert (env["PROCWATCH_EVENT"], env["PROCWATCH_CAUSE"], env["PROCWATCH_PID"]) == \
        ("found_dead", "found_dead", str(c.pid))
    assert (env["PROCWATCH_EXIT_CODE"], env["PROCWATCH_SIGNAL"], env["PROCWATCH_LATENCY_US"]) == ("", "", "")


def test_hanging_hook_is_killed_at_its_timeout_and_never_delays_detection(key, service, clients, tmp_path):
    marker = tmp_path / "hook.pid"
    cfg = write(tmp_path / "procwatch.toml", f"""
        [[rule]]
        name = "slow-*"
        [rule.hooks]
        on_exit = ["sh", "-c", "echo $$ > \\"$0.tmp\\"; mv \\"$0.tmp\\" \\"$0\\"; exec sleep 100000", {q(marker)}]
        timeout = 6.0   # long enough for the test's own steps on a loaded machine
        """)
    svc = service("--config", str(cfg))
    slow = clients(key, "slow-1")
    fast = clients(key, "fast-1")
    slow.kill()
    hook = int(wait_until(lambda: marker.exists() and marker.read_text().strip(), 15,
                          "the slow hook to start", detail=lambda: svc.log()[-3000:]))
    assert hook_pid_alive(hook)
    fast.kill()
    wait_until(lambda: slot_word(key, fast.slot)[0] == 0, 10, "fast-1's slot word to be zeroed")
    # The second exit was reported while the first hook still ran ...
    assert hook_pid_alive(hook), "the slow hook ended before the second exit was reported"
    svc.wait_event("exit", name="fast-1", signal="SIGKILL")
    assert slot_word(key, fast.slot)[1].state == abi.State.EXITED
    # ... and the hook was then killed at its timeout, and reaped.
    killed_line = wait_until(lambda: next((ln for ln in log_lines(svc) if "killed after its 6.0 s timeout" in ln),
                                          None), 20, "the timeout kill in the log")
    assert "for 'slow-1'" in killed_line
    wait_until(lambda: not hook_pid_alive(hook) and not os.path.exists(f"/proc/{hook}"), 10,
               "the hook process to be gone")
    lines = log_lines(svc)
    exit_fast = next(i for i, ln in enumerate(lines) if "event=exit" in ln and "name=fast-1" in ln)
    assert exit_fast < lines.index(killed_line)


def test_hook_burst_beyond_the_bound_is_dropped_and_counted(key, service, clients, tmp_path):
    ran, gate = tmp_path / "ran", tmp_path / "gate"
    os.mkfifo(gate)
    cfg = write(tmp_path / "procwatch.toml", f"""
        [hooks]
        workers = 1
        queue = 1

        [[rule]]
        name = "burst-*"
        [rule.hooks]
        # Blocks until the test writes a line into the FIFO.
        on_exit = ["sh", "-c", "echo $PROCWATCH_NAME >> \\"$0\\"; read x < \\"$1\\"", {q(ran)}, {q(gate)}]
        """)
    svc = service("--config", str(cfg))
    cs = [clients(key, f"burst-{i}") for i in range(5)]
    cs[0].kill()
    wait_until(lambda: ran.exists() and ran.read_text() == "burst-0\n", 15, "the first hook to block",
               detail=lambda: svc.log()[-3000:])
    for c in cs[1:]:
        c.kill()
    for c in cs[1:]:        # detection goes on while the only worker is stuck
        svc.wait_event("exit", name=c.name)
    gate_fd = os.open(gate, os.O_RDWR)      # never blocks on a FIFO (fifo(7)); keeps it open
    try:
        os.write(gate_fd, b"go\n" * 4)
        wait_until(lambda: "hooks: dropped 3 hook runs" in svc.log(), 15, "the drop count in the log",
                   detail=lambda: svc.log()[-3000:])
        wait_until(lambda: len(ran.read_text().split()) == 2 and
                   svc.log().count("exit hook ['sh'") == 2, 15, "the queued hook to run")
    finally:
        os.close(gate_fd)
    assert ran.read_text().split()[0] == "burst-0"
    assert "raise [hooks] queue or workers" in svc.log()


# -- metrics ------------------------------------------------------------------------

def test_metrics_scrape_after_a_real_kill(key, service, clients, tmp_path):
    port = free_port()
    svc = service("--metrics", f"127.0.0.1:{port}")
    assert f"metrics on http://127.0.0.1:{port}/metrics" in svc.log()
    c = clients(key, "scraped")
    keep = clients(key, "kept")
    before = scrape_metrics(port)
    assert metric_value(before, "procwatch_registered_processes") == 2
    assert metric_value(before, "procwatch_exits_total", cause="exited") == 0
    assert metric_value(before, "procwatch_detection_latency_seconds_count") == 0
    c.kill()
    e = svc.wait_event("exit", name="scraped")
    after = scrape_metrics(port)
    assert metric_value(after, "procwatch_registered_processes") == 1
    assert metric_value(after, "procwatch_exits_total", cause="exited") == 1
    # Counted in the family of what zeroed it: the exit event, or the death word (issue 14).
    family, other = {"exit_event": ("procwatch_detection_latency_seconds", "procwatch_death_word_latency_seconds"),
                     "death_word": ("procwatch_death_word_latency_seconds", "procwatch_detection_latency_seconds"),
                     }[e["detected_by"]]
    assert metric_value(after, f"{family}_count") == 1 and metric_value(after, f"{other}_count") == 0
    assert metric_value(after, f"{family}_bucket", le="+Inf") == 1
    assert metric_value(after, f"{family}_sum") > 0
    # The respawn is counted by the main loop once the detector thread has
    # returned, which is after it logged the exit: poll for it.
    wait_until(lambda: metric_value(scrape_metrics(port), "procwatch_detector_respawns_total") >= 1, 10,
               "the detector respawn to be counted")
    labels = {k for f in after.values() for s in f.samples for k in s.labels}
    assert labels == {"cause", "le", "verdict"}, "a label of unbounded cardinality crept in"
    assert keep.proc.poll() is None


def test_metrics_port_in_use_refuses_to_start(key, service):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        svc = service("--metrics", f"127.0.0.1:{port}", ready=False)
        assert svc.proc.wait(30) == 1
    lines = [ln for ln in svc.log().splitlines() if ln.strip()]
    assert lines == [f"procwatch: cannot serve metrics on 127.0.0.1:{port}: Address already in use: "
                     f"pick another metrics address, or 'off'"]


# -- SIGHUP --------------------------------------------------------------------------

def test_sighup_applies_a_good_file_and_refuses_a_bad_one(key, service, clients, tmp_path):
    out = tmp_path / "env"
    out.mkdir()
    cfg = write(tmp_path / "procwatch.toml", """
        [[rule]]
        name = "hup-*"
        """)
    svc = service("--config", str(cfg))
    first = clients(key, "hup-1")
    second = clients(key, "hup-2")
    third = clients(key, "hup-3")
    first.kill()
    svc.wait_event("exit", name="hup-1")

    port = free_port()
    good = f"""
        [service]
        slots = 8

        [hooks]
        workers = 3               # a new pool takes over from the old one

        [metrics]
        address = "127.0.0.1:{port}"

        [[rule]]
        name = "hup-*"
        [rule.hooks]
        on_exit = [{q(PY)}, "-c", {q(DUMP_ENV)}, {q(out)}]
        """
    write(cfg, good)
    svc.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "configuration reloaded from" in svc.log(), 10, "the reload",
               detail=lambda: svc.log()[-3000:])
    log = svc.log()
    assert f"configuration reloaded from {cfg}: changed metrics, hooks, rules" in log
    assert f"configuration: slots = 8 in {cfg} needs a restart; still running with 1024" in log
    second.kill()
    wait_until(lambda: (out / "hup-2-exit.json").exists(), 15, "the hook the reload added")
    assert metric_value(scrape_metrics(port), "procwatch_exits_total", cause="exited") == 2

    bad = good.replace('name = "hup-*"', 'name = "hup-*"\n        heartbeat = "1s"')
    write(cfg, bad)
    line = next(i for i, ln in enumerate(textwrap.dedent(bad).splitlines(), 1) if "heartbeat" in ln)
    svc.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload refused" in svc.log(), 10, "the refusal", detail=lambda: svc.log()[-3000:])
    refusal = next(ln for ln in log_lines(svc) if "reload refused" in ln)
    assert refusal.endswith(f"configuration reload refused, the old settings stay: {cfg}:{line}: "
                            f"key 'rule[0].heartbeat': expected 0 (off) or a number of seconds from "
                            f"0.001 to 4.29497e+06, got string '1s'")
    # The old settings stay: the hook and the metrics endpoint still work.
    third.kill()
    wait_until(lambda: (out / "hup-3-exit.json").exists(), 15, "the hook of the old settings")
    assert metric_value(scrape_metrics(port), "procwatch_exits_total", cause="exited") == 3
    assert svc.proc.poll() is None
    assert slot_word(key, third.slot)[1].state == abi.State.EXITED


# -- serve --config ----------------------------------------------------------------------

def test_command_line_wins_over_the_file(key, service, tmp_path):
    cfg = write(tmp_path / "procwatch.toml", f"""
        [service]
        key = {key + 1}
        slots = 16
        """)
    svc = service("--config", str(cfg), "--slots", "8")     # conftest passes --key too
    t = Table.attach(key)
    try:
        assert t.slot_count == 8
    finally:
        t.detach()
    svc.stop()
    remove = Table.attach(key)
    remove.remove()
    svc = service("--config", str(cfg))
    t = Table.attach(key)
    try:
        assert t.slot_count == 16           # the file's, since --slots was not given
    finally:
        t.detach()


def test_serve_with_a_bad_file_refuses_in_one_line(key, service, tmp_path):
    cfg = write(tmp_path / "procwatch.toml", """
        [service]
        slots = 8
        backend = "kernel"
        """)
    svc = service("--config", str(cfg), ready=False)
    assert svc.proc.wait(30) == 1
    lines = [ln for ln in svc.log().splitlines() if ln.strip()]
    assert lines == [f"procwatch: {cfg}:4: key 'service.backend': expected one of 'auto', "
                     f"'connector', 'pidfd', got string 'kernel'"]
    svc = service("--config", str(tmp_path / "absent.toml"), ready=False)
    assert svc.proc.wait(30) == 1
    assert "absent.toml: no such file: check the --config path" in svc.log()


# -- rules ----------------------------------------------------------------------------------

def test_rule_heartbeat_fills_only_slots_registered_without_one(key, service, clients, tmp_path):
    cfg = write(tmp_path / "procwatch.toml", """
        [[rule]]
        name = "hb-*"
        heartbeat = 2.5
        """)
    svc = service("--config", str(cfg))
    # Both beat, so that a heartbeat checker (issue 4) finds them alive.
    plain = clients(key, "hb-plain", "--then", "beat")
    own = clients(key, "hb-own", "--heartbeat", "0.5", "--then", "beat")
    other = clients(key, "other")
    wait_until(lambda: slot_word(key, plain.slot)[1].heartbeat_ms == 2500, 10,
               "the rule's heartbeat in hb-plain's slot", detail=lambda: svc.log()[-3000:])
    assert slot_word(key, own.slot)[1].heartbeat_ms == 500
    assert slot_word(key, other.slot)[1].heartbeat_ms == 0
    assert f"hb-plain (pid {plain.pid}): heartbeat 2.5 s from rule 'hb-*'" in svc.log()


def ask(c, command):
    """Tell a beating test client to 'stop' or 'start' its beats; it answers OK."""
    c.tell(command)
    assert c.proc.stdout.readline().decode().strip() == f"OK {command}"


def beating(key, *cs):
    """Wait until the heartbeat checker has seen each client beat."""
    def seen():
        t = Table.attach(key)
        try:
            return all(t.get64(c.slot, abi.S_LAST_BEAT_NS) > t.get64(c.slot, abi.S_REGISTERED_NS) for c in cs)
        finally:
            t.detach()
    wait_until(seen, 10, "the checker to see the clients beat")


def test_rule_hang_settings_hung_hook_and_hang_metrics(key, service, clients, tmp_path):
    out = tmp_path / "env"
    out.mkdir()
    port = free_port()
    cfg = write(tmp_path / "procwatch.toml", f"""
        [hang]
        max_misses = 5

        [[rule]]
        name = "dp-*"
        signal = "SIGUSR1"          # over [hang]'s SIGKILL
        max_misses = 2              # over [hang]'s 5
        [rule.hooks]
        on_hung = [{q(PY)}, "-c", {q(DUMP_ENV)}, {q(out)}]
        on_exit = [{q(PY)}, "-c", {q(DUMP_ENV)}, {q(out)}]
        """)
    svc = service("--config", str(cfg), "--metrics", f"127.0.0.1:{port}")
    beat = ("--heartbeat", "0.1", "--then", "beat", "--beat-every", "0.02")
    ruled = clients(key, "dp-1", *beat)
    own = clients(key, "dp-own", *beat, "--hang-signal", "SIGTERM")     # the client's own signal wins
    beating(key, ruled, own)
    ask(ruled, "stop")
    ask(own, "stop")
    hung = svc.wait_event("hung", name="dp-1")
    assert (hung["misses"], hung["action"]) == ("2", "kill")
    assert svc.wait_event("killed", name="dp-1")["signal"] == "SIGUSR1"
    assert svc.wait_event("killed", name="dp-own")["signal"] == "SIGTERM"
    assert ruled.proc.wait(10) == -signal.SIGUSR1 and own.proc.wait(10) == -signal.SIGTERM
    wait_until(lambda: all((out / f).exists() for f in ("dp-1-hung.json", "dp-1-exit.json", "dp-own-hung.json")),
               15, "the hung and exit hooks", detail=lambda: svc.log()[-3000:])
    env = json.loads((out / "dp-1-hung.json").read_text())
    assert (env["PROCWATCH_EVENT"], env["PROCWATCH_PID"], env["PROCWATCH_SIGNAL"]) == ("hung", str(ruled.pid), "SIGUSR1")
    assert env["PROCWATCH_VERDICT"] == "blocked"        # a stopped client sleeps in select()
    env = json.loads((out / "dp-1-exit.json").read_text())
    assert (env["PROCWATCH_CAUSE"], env["PROCWATCH_SIGNAL"]) == ("killed_hung", "SIGUSR1")
    assert env["PROCWATCH_VERDICT"] == ""
    assert json.loads((out / "dp-own-hung.json").read_text())["PROCWATCH_SIGNAL"] == "SIGTERM"
    svc.wait_event("exit", name="dp-own")
    m = scrape_metrics(port)
    assert metric_value(m, "procwatch_hung_total", verdict="blocked") == 2
    assert metric_value(m, "procwatch_killed_total", verdict="blocked") == 2
    assert metric_value(m, "procwatch_hung_total", verdict="busy") == 0
    assert metric_value(m, "procwatch_exits_total", cause="killed_hung") == 2
    assert metric_value(m, "procwatch_checker_duration_seconds_count") > 0


def test_sighup_gives_registered_processes_the_new_hang_policy(key, service, clients, tmp_path):
    rule = """
        [[rule]]
        name = "rl-*"
        action = "log"
        max_misses = {n}
        """
    cfg = write(tmp_path / "procwatch.toml", rule.format(n=1000))
    svc = service("--config", str(cfg))
    c = clients(key, "rl-1", "--heartbeat", "0.1", "--then", "beat", "--beat-every", "0.02")
    beating(key, c)
    write(cfg, rule.format(n=2))
    svc.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "configuration reloaded" in svc.log(), 10, "the reload")
    ask(c, "stop")
    hung = svc.wait_event("hung", name="rl-1")
    assert (hung["misses"], hung["action"]) == ("2", "log")
    assert c.proc.poll() is None and not svc.events("killed")


def test_a_refused_hang_kill_and_a_junk_signal_are_told_as_they_are(key, service, clients, tmp_path):
    """Issue 13: a refused kill was logged as 'sending SIGKILL ... action=kill' and on_hung got
    PROCWATCH_SIGNAL=SIGKILL; a junk signal number was shown by status but SIGKILL was sent."""
    out = tmp_path / "env"
    out.mkdir()
    cfg = write(tmp_path / "procwatch.toml", f"""
        [hang]
        max_misses = 2

        [[rule]]
        name = "ro-*"
        [rule.hooks]
        on_hung = [{q(PY)}, "-c", {q(DUMP_ENV)}, {q(out)}]
        """)
    svc = service("--config", str(cfg))
    beat = ("--heartbeat", "0.1", "--then", "beat", "--beat-every", "0.02")
    refused = clients(key, "ro-uid", *beat)
    junk = clients(key, "ro-junk", *beat)
    t = Table.attach(key)
    try:
        t.set32(refused.slot, abi.S_OWNER_UID, 65534)      # not this root process's uid: refused
        t.set32(junk.slot, abi.S_HEARTBEAT_SIGNAL, 99)     # no signal has that number
    finally:
        t.detach()
    beating(key, refused, junk)
    snap = json.loads(subprocess.run([PY, "-m", "procwatch", "status", "--key", hex(key), "--json"],
                                     capture_output=True, text=True, check=True).stdout)
    rows = {r["name"]: r for r in snap["slots"]}
    assert rows["ro-junk"]["hang_signal"] is None          # what is sent: the service's default
    ask(refused, "stop")
    ask(junk, "stop")
    hung = svc.wait_event("hung", name="ro-uid")
    assert (hung["action"], hung["refused"]) == ("refused", "uid"), hung
    assert "sending" not in hung["message"] and "will not be signalled" in hung["message"]
    wait_until(lambda: (out / "ro-uid-hung.json").exists(), 15, "the on_hung hook")
    env = json.loads((out / "ro-uid-hung.json").read_text())
    assert env["PROCWATCH_SIGNAL"] == "", env
    jhung = svc.wait_event("hung", name="ro-junk")
    assert jhung["action"] == "kill" and "sending SIGKILL" in jhung["message"], jhung
    assert svc.wait_event("killed", name="ro-junk")["signal"] == "SIGKILL"
    assert junk.proc.wait(10) == -signal.SIGKILL
    assert refused.proc.poll() is None and not [e for e in svc.events("killed") if e["name"] == "ro-uid"]
    assert len([e for e in svc.events("hung") if e["name"] == "ro-uid"]) == 1


def _subscribed(key, pid):
    """The service at ``pid`` owns the table and has its backend open (its exits are queued)."""
    try:
        t = Table.attach(key)
    except procwatch.ProcwatchError:       # not made yet, or its header not written yet
        return False
    try:
        return t.hget32(abi.H_SERVICE_PID) == pid and t.hget32(abi.H_BACKEND) != abi.Backend.NONE
    finally:
        t.detach()


def _dead_pid():
    """(PID, start time) of a process that ran and was reaped."""
    p = subprocess.Popen(["sleep", "60"])
    start = start_time(p.pid)
    p.kill()
    p.wait()
    return p.pid, start


def test_sighup_changes_log_level_and_reconcile_interval_at_once(key, service, clients, tmp_path):
    """One SIGHUP, two changes that take effect at once: log_level warning -> info
    (a registration line appears), reconcile_interval 3600 -> 0.2 s (a dead process
    that only a periodic reconcile can find is found)."""
    cfg = write(tmp_path / "procwatch.toml", """
        [service]
        log_level = "warning"
        reconcile_interval = 3600
        """)
    svc = service("--config", str(cfg), log_level=None, ready=False)
    wait_until(lambda: svc.proc.poll() is None and _subscribed(key, svc.pid), 15, "the service to subscribe",
               detail=svc.log)
    a = clients(key, "quiet-a")
    a.kill()
    svc.wait_event("exit", name="quiet-a")        # a warning
    assert not svc.events("registered"), svc.log()[-2000:]     # info, logged before the exit if at all
    # Planted with no generation bump: only a reconcile (periodic, or after a
    # respawn, which no exit causes from here on) looks at it.
    pid, start = _dead_pid()
    t = Table.attach(key)
    try:
        plant_slot(t, 5, pid, start, name="dead-d")
        t.set32(5, abi.S_HEARTBEAT_MS, 0)
    finally:
        t.detach()
    write(cfg, """
        [service]
        log_level = "info"
        reconcile_interval = 0.2
        """)
    assert slot_word(key, 5)[0] == pid                 # not found before the reload
    svc.proc.send_signal(signal.SIGHUP)
    line = wait_until(lambda: next((ln for ln in log_lines(svc) if "configuration reloaded from" in ln), None),
                      10, "the reload line (info)", detail=lambda: svc.log()[-2000:])
    assert "log_level" in line and "reconcile_interval" in line, line
    b = clients(key, "loud-b")
    svc.wait_event("registered", name="loud-b", pid=b.pid)
    e = svc.wait_event("found_dead", name="dead-d", pid=pid)
    assert e["cause"] == "found_dead"


def test_metrics_of_a_real_service_count_what_happened(key, service, clients, compiled, tmp_path):
    """Scraped from a real service, each counter after the real thing it counts:
    an overflow (a 4 KiB socket buffer in a fork storm), a found-dead slot, a
    corrupt slot, a hook run, an unregister."""
    port = free_port()
    out = tmp_path / "env"
    out.mkdir()
    cfg = write(tmp_path / "procwatch.toml", f"""
        [[rule]]
        name = "m-*"
        [rule.hooks]
        on_exit = [{q(PY)}, "-c", {q(DUMP_ENV)}, {q(out)}]
        """)
    svc = service("--config", str(cfg), "--metrics", f"127.0.0.1:{port}", "--backend", "connector",
                  "--rcvbuf", "4096", "--reconcile-interval", "0.2")
    m = scrape_metrics(port)
    # (Not the overflows: with 8 KiB, any burst of exits elsewhere on the machine may overflow.)
    for name in ("procwatch_found_dead_total", "procwatch_corrupt_slots_total", "procwatch_hook_runs_total"):
        assert metric_value(m, name) == 0, name
    assert metric_value(m, "procwatch_exits_total", cause="unregistered") == 0

    storm = subprocess.Popen([str(compiled("storm")), "-n", "200000", "-d", "10"])
    try:
        svc.wait_event("overflow")
    finally:
        storm.terminate()
        storm.wait(30)
    hooked = clients(key, "m-1")
    hooked.kill()
    wait_until(lambda: (out / "m-1-exit.json").exists(), 15, "the exit hook to run", detail=lambda: svc.log()[-2000:])
    code = ("import procwatch, sys; r = procwatch.register_pid('leaver', key=int(sys.argv[1], 0)); "
            "print('R', flush=True); sys.stdin.readline(); r.unregister()")
    leaver = subprocess.Popen([PY, "-c", code, hex(key)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert leaver.stdout.readline() == "R\n"
        svc.wait_event("registered", name="leaver")
        leaver.communicate("go\n", timeout=60)
        assert leaver.returncode == 0
    finally:
        if leaver.poll() is None:
            leaver.kill()
            leaver.wait()
    svc.wait_event("unregistered", name="leaver")
    pid, start = _dead_pid()
    t = Table.attach(key)
    try:
        plant_slot(t, 20, pid, start, name="gone-by")
        plant_slot(t, 21, 0xFFFFFFF0, 1, name="forged")     # no kernel hands out that PID
        for i in (20, 21):
            t.set32(i, abi.S_HEARTBEAT_MS, 0)
    finally:
        t.detach()
    svc.wait_event("found_dead", name="gone-by", pid=pid)
    svc.wait_event("corrupt", slot=21)

    def counted():
        m = scrape_metrics(port)
        return m if (metric_value(m, "procwatch_hook_runs_total") == 1
                     and metric_value(m, "procwatch_exits_total", cause="unregistered") == 1
                     and metric_value(m, "procwatch_corrupt_slots_total") >= 1) else None
    m = wait_until(counted, 10, "the counters to catch up", detail=lambda: svc.log()[-2000:])
    assert metric_value(m, "procwatch_overflows_total") >= 1
    assert metric_value(m, "procwatch_found_dead_total") >= 1
    # gone-by's end is labelled found_dead, or found_dead_overflow when the 4 KiB buffer overflowed
    # again since the last reconcile (any burst of exits on a busy machine does it; seen in full runs).
    assert (metric_value(m, "procwatch_exits_total", cause="found_dead")
            + metric_value(m, "procwatch_exits_total", cause="found_dead_overflow")) >= 1
    assert metric_value(m, "procwatch_exits_total", cause="exited") >= 1
    assert metric_value(m, "procwatch_hook_failures_total") == 0


def test_a_real_core_dump_is_reported_with_core_dumped_1(key, service, tmp_path):
    """SIGABRT with core dumps allowed: the kernel writes a core and says so in the
    wait status (WCOREDUMP), and the exit hook gets PROCWATCH_CORE_DUMPED=1."""
    import resource
    out = tmp_path / "env"
    out.mkdir()
    cfg = write(tmp_path / "procwatch.toml", f"""
        [[rule]]
        name = "dumper"
        hooks = {{ on_exit = [{q(PY)}, "-c", {q(DUMP_ENV)}, {q(out)}] }}
        """)
    svc = service("--config", str(cfg))
    cores = tmp_path / "cores"
    cores.mkdir()
    p = subprocess.Popen(["sleep", "600"], cwd=cores,       # core_pattern "core": written in its cwd
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY,) * 2))
    status = None
    try:
        reg = procwatch.register_pid("dumper", pid=p.pid, key=key)
        svc.wait_event("registered", name="dumper")
        os.kill(p.pid, signal.SIGABRT)
        _, status = os.waitpid(p.pid, 0)    # the raw wait status: Popen drops the core flag
        p.returncode = -signal.SIGABRT      # reaped here: Popen must not wait for it again
    finally:
        if status is None:
            p.kill()
            p.wait()
    if not os.WCOREDUMP(status):
        pytest.skip(f"this host wrote no core (kernel.core_pattern "
                    f"{open('/proc/sys/kernel/core_pattern').read().strip()!r})")
    e = svc.wait_event("exit", name="dumper", pid=p.pid)
    assert (e["signal"], e["core_dumped"]) == ("SIGABRT", "1") and "(core dumped)" in e["message"]
    wait_until(lambda: (out / "dumper-exit.json").exists(), 15, "the exit hook", detail=lambda: svc.log()[-2000:])
    env = json.loads((out / "dumper-exit.json").read_text())
    assert (env["PROCWATCH_SIGNAL"], env["PROCWATCH_CORE_DUMPED"], env["PROCWATCH_PID"]) == \
        ("SIGABRT", "1", str(p.pid))
    reg.unregister()


def test_rules_look_only_at_registrations_new_since_their_last_look(key, monkeypatch):
    """apply_rules() after a registration looks at that registration alone, not at every watched
    entry (issue 16: milliseconds per registration with thousands live): with the others hidden
    from it, the new slot still gets its rule's heartbeat.  A reload still looks at every one."""
    from procwatch import config
    from procwatch.ops import Operations
    from procwatch.stats import Stats
    from procwatch.watch import Reporter
    rule = '[[rule]]\nname = "hb-*"\nheartbeat = {}\n'
    t, _ = Table.create_or_adopt(key, 64)
    r = Reporter(t, Stats())
    targets, regs = [], []

    def register(name):
        targets.append(subprocess.Popen(["sleep", "600"]))
        regs.append(procwatch.register_pid(name, pid=targets[-1].pid, key=key, arm=False))
        return regs[-1]
    try:
        ops = Operations(config.parse(rule.format(2.5)), r.stats, key=key, table=lambda: t)
        for i in range(10):
            register(f"hb-{i}")
        r.watch.sync()
        ops.apply_rules(r.watch)                    # the first look: every entry
        assert [t.heartbeat_ms(w.slot) for w in r.watch.entries()] == [2500] * 10
        new = register("hb-new")
        r.watch.sync()
        with monkeypatch.context() as m:
            m.setattr(r.watch, "entries", lambda: pytest.fail("apply_rules() walked every watched entry"))
            ops.apply_rules(r.watch)
        assert t.heartbeat_ms(new.slot) == 2500
        ops.apply_rules(r.watch)                    # nothing new: nothing written
        ops.config = config.parse(rule.format(4))
        ops.apply_rules(r.watch, force=True)        # a reload: every slot at our value takes the new one
        assert [t.heartbeat_ms(w.slot) for w in r.watch.entries()] == [4000] * 11
    finally:
        r.watch.close()
        for reg in regs:
            reg.table.detach()
        t.remove()
        for p in targets:
            p.kill()
            p.wait()
