"""Smoke tests of the container helper (tests/system/container.py).

A booted container, a Type=notify unit that carries every setting of
systemd/procwatch.service (only ExecStart= differs: the hardening and the
capabilities, checked from inside), journald's JSON read back, and a stop
that leaves no process, cgroup or state file behind.  The real service's
watchdog restart and stop are tests/system/test_systemd.py's.  Boot and stop
times are printed at the end of the run.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .conftest import REPO, REPO_INSIDE, container_name, systemd_site
from .container import Container, ContainerError, _cgroup_dirs, reap_stale, poll_until

HERE = Path(__file__).resolve().parent
PROBE_KEY = 0x7077CA91
PROBE_MESSAGE_ID = "5e4c3ba0a3c94f0c8a1a5c6f0b7e1d21"
# include/uapi/linux/capability.h
CAP_BITS = {"CAP_KILL": 5, "CAP_NET_ADMIN": 12, "CAP_SYS_PTRACE": 19, "CAP_SYS_NICE": 23}


def unit_setting(text, key):
    return [ln.split("=", 1)[1] for ln in text.splitlines() if ln.startswith(key + "=")]


def processes_in(pid_ns):
    """Host PIDs of processes whose PID namespace is ``pid_ns``."""
    found = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if os.readlink(f"/proc/{p}/ns/pid") == pid_ns:
                    found.append(int(p))
            except OSError:
                pass
    return found


@pytest.fixture(scope="module")
def ct(reaped):
    site, site_inside = systemd_site()
    binds = [(str(REPO), REPO_INSIDE)]
    if site_inside != str(site):
        binds.append((str(site), site_inside))
    c = Container(container_name("smoke"), binds_ro=binds)
    c.start()
    c.site_inside = site_inside
    try:
        yield c
    finally:
        c.stop()


def test_boot_failure_fails_with_the_console_tail(reaped):
    name = container_name("badboot")
    c = Container(name, nspawn_args=["--capability=cap_no_such_thing"])
    with pytest.raises(ContainerError) as e:
        c.start()
    msg = str(e.value)
    assert "systemd-nspawn exited" in msg
    assert "last lines of the console" in msg and "capabilit" in msg.lower(), msg
    assert not c.state_dir.exists()
    assert not any(d.exists() for d in _cgroup_dirs(name))


def test_exec_passes_output_and_status_through(ct):
    r = ct.exec("sh", "-c", "echo out; echo err >&2; exit 7")
    assert (r.returncode, r.stdout, r.stderr) == (7, "out\n", "err\n")
    assert ct.exec("cat", input="in").stdout == "in"
    r = ct.run("sh", "-c", "echo unit $(cat /proc/self/cgroup)")
    assert r.returncode == 0 and "run-" in r.stdout


def test_exec_timeout_kills_the_command_inside(ct):
    with pytest.raises(subprocess.TimeoutExpired):
        ct.exec("sh", "-c", "sleep 300", timeout=0.5)
    # nothing left inside, once the container's PID 1 has reaped the orphaned sleep
    assert poll_until(lambda: ct.exec("pgrep", "-x", "sleep").returncode == 1, 10), \
        ct.exec("ps", "-ef").stdout


def test_container_is_isolated_from_the_host(ct):
    assert ct.exec("touch", "/usr/pwtest-canary").returncode != 0     # read-only /usr
    leader = ct._state["leader"][0]
    assert os.readlink(f"/proc/{leader}/ns/ipc") != os.readlink("/proc/self/ns/ipc")
    assert os.readlink(f"/proc/{leader}/ns/net") != os.readlink("/proc/self/ns/net")
    assert ct.exec("findmnt", "-no", "FSTYPE", "/").stdout.strip() == "tmpfs"


@pytest.fixture(scope="module")
def probe_unit(ct):
    """pwprobe.service: procwatch.service with ExecStart= replaced by the probe."""
    ct.exec("systemd-sysusers", f"{REPO_INSIDE}/systemd/procwatch.sysusers", check=True)
    ct.install_file((HERE / "units" / "pwprobe.py").read_text(), "/opt/pwprobe/pwprobe.py")
    ct.run("true")      # make sure systemd-run works before relying on it
    ct.exec("systemd-run", "--unit=pwvictim", "--property=User=nobody", "sleep", "600", check=True)
    victim = int(ct.show("pwvictim.service", "MainPID"))
    unit = []
    for line in (REPO / "systemd" / "procwatch.service").read_text().splitlines():
        if line.startswith("ExecStart="):
            line = ("ExecStart=/usr/bin/python3 /opt/pwprobe/pwprobe.py\n"
                    f"Environment=PYTHONPATH={ct.site_inside} PWPROBE_VICTIM={victim} "
                    f"PWPROBE_KEY={PROBE_KEY:#x} PWPROBE_GROUP=procwatch")
        unit.append(line)
    ct.install_file("\n".join(unit) + "\n", "/etc/systemd/system/pwprobe.service")
    ct.systemctl("daemon-reload", check=True)
    t0 = time.monotonic()
    r = ct.systemctl("start", "pwprobe.service", timeout=30)     # returns after READY=1
    print(f"pwprobe.service start -> active: {time.monotonic() - t0:.3f} s")
    assert r.returncode == 0, (r.stderr, ct.exec("journalctl", "-u", "pwprobe", "--no-pager").stdout)
    return victim


def probe_results(ct):
    return [json.loads(e["PWPROBE_RESULTS"])
            for e in ct.journal(f"MESSAGE_ID={PROBE_MESSAGE_ID}")]


def test_notify_unit_under_procwatch_hardening(ct, probe_unit):
    assert ct.show("pwprobe.service", "ActiveState") == "active"
    assert ct.show("pwprobe.service", "StatusText").startswith("probe done")
    entries = ct.journal(f"MESSAGE_ID={PROBE_MESSAGE_ID}")
    assert entries[-1]["_SYSTEMD_UNIT"] == "pwprobe.service"
    assert entries[-1]["OBJECT_PID"] == str(probe_unit)
    r = probe_results(ct)[-1]
    unit = (REPO / "systemd" / "procwatch.service").read_text()
    caps = unit_setting(unit, "CapabilityBoundingSet")[0].split()
    assert int(r["capeff"], 16) == sum(1 << CAP_BITS[c] for c in caps), r
    # what the service must be able to do to another user's process, under its unit
    assert (r["stat"], r["maps"], r["pidfd_open"], r["pidfd_signal"]) == ("ok",) * 4, r
    gid = ct.exec("getent", "group", "procwatch").stdout.split(":")[2]
    assert r["sysv_futex"] == f"ok gid={gid} mode=660 woken=0", r
    assert r["pyroute2"] == "ok", r                     # imports under MemoryDenyWriteExecute=
    # TCP is allowed for [metrics] and [etcd] (test_systemd's test_5 serves metrics under the unit)
    assert r["af_inet"] == "ok", r
    # what the hardening must refuse
    assert r["write_usr"] == "EROFS", r
    # the proc connector exists only in the initial network namespace
    assert r["connector"] != "ok", r


def test_stop_leaves_nothing_behind(reaped):
    name = container_name("stop")
    c = Container(name)
    c.start()
    c.exec("systemd-run", "--unit=lingering", "sleep", "600", check=True)
    pid_ns = c.pid_namespace()
    assert len(processes_in(pid_ns)) > 3
    assert c.stop() == []
    assert processes_in(pid_ns) == []
    assert not any(d.exists() for d in _cgroup_dirs(name))
    assert not c.state_dir.exists()
    assert c.stop() == [] and c.stop_seconds is not None      # idempotent
    print(f"boot {c.boot_seconds:.3f} s, stop {c.stop_seconds:.3f} s")


def test_container_of_a_killed_runner_is_reaped(reaped):
    name = container_name("stale")
    runner = subprocess.Popen(
        [sys.executable, "-c",
         f"import sys, time; sys.path.insert(0, {str(HERE)!r}); from container import Container; "
         f"c = Container({name!r}).start(); print('up', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert runner.stdout.readline() == "up\n"
    finally:
        runner.kill()           # our own child, by PID: like a runner killed by CI
        runner.wait()
    c = Container(name)
    c._load_state()
    pid_ns = os.readlink(f"/proc/{c._state['leader'][0]}/ns/pid")
    assert c._nspawn_alive()                    # nspawn outlived its runner (own session)
    assert name in reap_stale(prefix=name)
    assert processes_in(pid_ns) == []
    assert not any(d.exists() for d in _cgroup_dirs(name))
    assert not c.state_dir.exists()
