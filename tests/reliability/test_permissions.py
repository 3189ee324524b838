"""Who may use the table: real users and a real group made for the test (root).

The segment and its semaphore are 0660, owned by root and the table's group.
A user outside the group gets one clear error line from register_pid() and
goes on working; a member registers its own processes, may not register a
process it could not signal itself, and cannot make the service signal a
process of another user (the hang kill's checks, procwatch/heartbeat.py).
"""

import grp
import os
import subprocess
import textwrap

import pytest

from conftest import PY, ROOT, require_root, wait_until
from procwatch import procfs, service as service_mod
from procwatch.config import Config
from pwrel import MadeUsers, attached, sysv_info

pytestmark = [require_root()]
ENV = dict(os.environ, PYTHONPATH=str(ROOT))


@pytest.fixture
def users():
    u = MadeUsers()
    try:
        yield u.make(members=("a",), outsiders=("b",))
    finally:
        u.remove()


def run_as(users, who, code, *args, **kw):
    return subprocess.Popen([*users.as_user(who), PY, "-c", textwrap.dedent(code), *map(str, args)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, env=ENV, **kw)


def sleeper(users=None, who=None):
    return subprocess.Popen([*(users.as_user(who) if users else []), "sleep", "600"])


def test_table_and_semaphore_are_0660_root_and_the_group(key, service, users):
    service("--group", users.group)
    for kind in ("shm", "sem"):
        row = sysv_info(kind, key)
        assert int(row["perms"], 8) & 0o777 == 0o660, row
        assert (int(row["uid"]), int(row["gid"])) == (0, users.gid), row


def test_default_group_is_procwatch_when_it_exists(key, service, users, monkeypatch):
    # The real default, on this machine, without creating the real group:
    try:
        expected = grp.getgrnam(service_mod.DEFAULT_GROUP).gr_gid
    except KeyError:
        expected = 0
    service()
    assert int(sysv_info("shm", key)["gid"]) == expected
    # Both branches of the choice, with the name pointed at our test group:
    monkeypatch.setattr(service_mod, "DEFAULT_GROUP", users.group)
    assert service_mod.Service(Config(key=key))._gid() == users.gid
    monkeypatch.setattr(service_mod, "DEFAULT_GROUP", users.group + "-none")
    assert service_mod.Service(Config(key=key))._gid() is None


OUTSIDER = """
    import sys, procwatch
    reg = procwatch.register_pid("outsider", key=int(sys.argv[1], 0))
    print("RESULT", reg, flush=True)
    print("STILL WORKING", flush=True)
"""


def test_outsider_gets_one_clear_error_and_keeps_working(key, service, users):
    service("--group", users.group)
    p = run_as(users, "b", OUTSIDER, hex(key))
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert out.splitlines() == ["RESULT None", "STILL WORKING"]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    uid = users.users["b"].pw_uid
    assert len(lines) == 1, err
    assert (f"cannot attach slot table key {key:#010x} (mode 0660, group {users.group}): "
            f"add user uid {uid} to group '{users.group}'") in lines[0], lines[0]
    with attached(key) as t:
        assert t.used_slots() == []


MEMBER = """
    import subprocess, sys, procwatch
    key = int(sys.argv[1], 0)
    own = procwatch.register_pid("member", key=key)
    print("OWN", own.slot, flush=True)
    child = subprocess.Popen(["sleep", "600"])
    reg = procwatch.register_pid("member-child", pid=child.pid, key=key)
    print("CHILD", child.pid, reg.slot, flush=True)
    for pid in map(int, sys.argv[2:]):
        try:
            procwatch.register_pid(f"other-{pid}", pid=pid, key=key)
            print("ALLOWED", pid, flush=True)
        except procwatch.AccessDenied as e:
            print("DENIED", pid, e, flush=True)
    print("DONE", flush=True)
    sys.stdin.readline()
    child.kill()
    child.wait()
"""


def test_member_registers_its_own_processes_only(key, service, users):
    svc = service("--group", users.group)
    others = [sleeper(users, "b"), sleeper()]          # another user's, and root's
    p = run_as(users, "a", MEMBER, hex(key), *[o.pid for o in others])
    try:
        lines = [p.stdout.readline().strip() for _ in range(5)]
        assert lines[0].startswith("OWN ") and lines[1].startswith("CHILD "), (lines, p.stderr.read())
        child = int(lines[1].split()[1])
        for line, o in zip(lines[2:4], others):
            owner = procfs.real_uid(o.pid)
            assert line.startswith(f"DENIED {o.pid} cannot register PID {o.pid}: it belongs to uid {owner}"), line
        assert lines[4] == "DONE"
        svc.wait_event("registered", name="member", pid=p.pid)
        svc.wait_event("registered", name="member-child", pid=child)
        assert not [e for e in svc.events("registered") if e["name"].startswith("other-")]
        with attached(key) as t:
            owners = {s.name: s.owner_uid for s in t.used_slots()}
        assert owners == {"member": users.users["a"].pw_uid, "member-child": users.users["a"].pw_uid}
        p.stdin.write("go\n")
        p.stdin.flush()
        assert p.wait(30) == 0
        svc.wait_event("exit", name="member-child", pid=child)
        svc.wait_event("exit", name="member", pid=p.pid)
        assert all(o.poll() is None for o in others)
    finally:
        p.kill()
        p.wait()
        for o in others:
            o.kill()
            o.wait()


FORGER = """
    import sys, procwatch
    from procwatch import abi, futex, procfs
    from procwatch.segment import Table
    key = int(sys.argv[1], 0)
    t = Table.attach(key)
    # A group member writes raw slots (no API): each names a process with its
    # true start time, asks for a 1 ms heartbeat and a SIGKILL on hang.
    for slot, pid, owner in zip(*[iter(map(int, sys.argv[2:]))] * 3):
        t.set32(slot, abi.S_STATE, abi.State.ALIVE)
        t.set64(slot, abi.S_START_TIME, procfs.start_time(pid))
        t.write_name(slot, f"forged-{slot}".encode())
        t.set32(slot, abi.S_HEARTBEAT_MS, 1)
        t.set32(slot, abi.S_HEARTBEAT_ACTION, abi.HangAction.KILL)
        t.set32(slot, abi.S_HEARTBEAT_SIGNAL, 9)
        t.set32(slot, abi.S_OWNER_UID, owner)
        t.u32[t.pid_index(slot)] = pid
    t.hset32(abi.H_GENERATION, t.generation + 1)
    futex.wake(t.address + abi.H_GENERATION)
    print("FORGED", flush=True)
"""

ATTACHED = """
    import sys, procwatch
    reg = procwatch.register_pid(sys.argv[2], key=int(sys.argv[1], 0), heartbeat=3600)
    print("READY", reg.slot, flush=True)
    sys.stdin.readline()
"""


@pytest.fixture
def three_users():
    u = MadeUsers()
    try:
        yield u.make(members=("a", "c"), outsiders=("b",))
    finally:
        u.remove()


def test_forged_slots_cannot_make_the_service_signal_another_user(key, service, three_users):
    """Member a forges hung slots (1 ms heartbeat, kill) naming processes of other users.
    The hang kill checks the kernel, not the forged bytes: start time, /proc/PID/maps,
    real uid against owner_uid.  Only a process that attached the table itself and runs
    as the forged owner can be reached: the trust boundary of docs/RELIABILITY.md."""
    users = three_users
    svc = service("--group", users.group, "--slots", "16")
    a, c = users.users["a"].pw_uid, users.users["c"].pw_uid
    b_plain = sleeper(users, "b")                            # another user's process, no client
    c_client = run_as(users, "c", ATTACHED, hex(key), "c-client")
    c_victim = run_as(users, "c", ATTACHED, hex(key), "c-victim")
    procs = [b_plain, c_client, c_victim]
    try:
        for p in (c_client, c_victim):
            assert p.stdout.readline().startswith("READY"), p.stderr.read()
        forged = {15: (b_plain.pid, a, "not_attached"), 14: (b_plain.pid, 0, "not_attached"),
                  13: (1, 0, "init"), 12: (c_client.pid, a, "uid"), 11: (svc.pid, 0, "self"),
                  10: (c_victim.pid, c, None)}
        f = run_as(users, "a", FORGER, hex(key), *[x for s, (pid, o, _) in forged.items() for x in (s, pid, o)])
        out, err = f.communicate(timeout=30)
        assert out.strip() == "FORGED", err

        def refusals():
            got = {e["name"]: e["refused"] for e in svc.events("hung") if "refused" in e}
            return got if len(got) >= 5 else None
        got = wait_until(refusals, 15, "a refusal for each forged slot", detail=lambda: svc.log()[-3000:])
        assert got == {f"forged-{s}": why for s, (_, _, why) in forged.items() if why}, got
        assert b_plain.poll() is None and c_client.poll() is None and svc.proc.poll() is None
        # The limit: a forged slot naming a client of another member, with that member's uid.
        svc.wait_event("killed", name="forged-10", pid=c_victim.pid)
        assert c_victim.wait(10) == -9
    finally:
        for p in procs:
            p.kill()
            p.wait()
