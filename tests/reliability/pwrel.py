"""Helpers of the reliability tests: forked clients, storms, test users, process figures.

Everything is real: clients are processes forked from the test that call
register_pid() and really die; users and groups are made with groupadd and
useradd and removed afterwards; figures come from /proc.
"""

import contextlib
import ctypes
import os
import re
import select
import signal
import subprocess
import time

import pytest
import sysv_ipc

import procwatch
from procwatch.segment import Table

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


# -- clients forked from the test -----------------------------------------------
class Forked:
    """A client process forked from the test: registers under ``name``, then waits.

    The child reports ``READY <slot>`` (or ``NONE`` / ``ERROR ...``) on a
    pipe, then blocks reading its order pipe: a number is its exit code, EOF
    (the test died) ends it too, and it dies with the test (PDEATHSIG).
    """

    def __init__(self, key, name, register=True):
        self.key, self.name = key, name
        self.slot = None
        self.status = None
        parent = os.getpid()
        r, w = os.pipe()
        order_r, order_w = os.pipe()
        pid = os.fork()
        if pid == 0:                                    # the client
            code = 97
            try:
                os.close(r)
                os.close(order_w)
                _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
                if os.getppid() != parent:
                    os._exit(96)
                reg = procwatch.register_pid(name, key=key) if register else None
                os.write(w, f"READY {reg.slot}\n".encode() if reg else b"NONE\n")
                data = os.read(order_r, 16)
                code = int(data) if data.strip() else 0
            except BaseException as e:                  # noqa: B036 - the child must never return
                with contextlib.suppress(OSError):
                    os.write(w, f"ERROR {type(e).__name__}: {e}\n".encode())
            finally:
                os._exit(code)
        os.close(w)
        os.close(order_r)
        self.pid = pid
        self._out = r
        self._order = order_w

    def ready(self, timeout=10.0):
        """Wait for the child's first line; returns it (``READY n`` sets ``slot``)."""
        r, _, _ = select.select([self._out], [], [], timeout)
        line = os.read(self._out, 256).decode().strip() if r else f"(nothing within {timeout:g} s)"
        if line.startswith("READY"):
            self.slot = int(line.split()[1])
        return line

    def exit(self, code=0):
        """Tell it to exit with ``code``; reaps it."""
        os.write(self._order, f"{code}\n".encode())
        return self.reap()

    def kill(self, sig=signal.SIGKILL):
        os.kill(self.pid, sig)
        return self.reap()

    def reap(self):
        if self.status is None:
            _, self.status = os.waitpid(self.pid, 0)
            for fd in (self._out, self._order):
                with contextlib.suppress(OSError):
                    os.close(fd)
        return self.status

    def end(self):
        """Teardown: kill it if it still runs (by PID), reap it."""
        if self.status is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.reap()


@pytest.fixture
def forked():
    """Factory: ``forked(key, name)`` forks a client and waits for READY."""
    made = []

    def spawn(key, name, wait=True, register=True):
        c = Forked(key, name, register)
        made.append(c)
        if wait:
            line = c.ready()
            if not line.startswith("READY"):
                pytest.fail(f"client {name} did not register: {line}")
        return c
    yield spawn
    for c in made:
        c.end()


# -- the storm ----------------------------------------------------------------------
class Storm:
    """tests/progs/storm.c in the background: unrelated processes exiting."""

    def __init__(self, exe, *args):
        self.proc = subprocess.Popen([str(exe), *args], stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        assert line == "STORM started", line
        self.exits = None

    def finish(self, timeout=60):
        out = self.proc.communicate(timeout=timeout)[0]
        m = re.search(r"exits=(\d+)", out)
        self.exits = int(m.group(1)) if m else 0
        return self.exits

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.finish()


# -- the table --------------------------------------------------------------------------
@contextlib.contextmanager
def attached(key):
    t = Table.attach(key)
    try:
        yield t
    finally:
        t.detach()


def semaphore_value(key):
    return sysv_ipc.Semaphore(key).value


def used_slots(key):
    with attached(key) as t:
        return t.used_slots()


def sysv_info(kind, key):
    """The /proc/sysvipc/{shm,sem} row of ``key`` as a dict of its header names."""
    with open(f"/proc/sysvipc/{kind}") as f:
        head = f.readline().split()
        for line in f:
            row = dict(zip(head, line.split()))
            if int(row["key"]) == key:
                return row
    return None


# -- process figures ----------------------------------------------------------------------
def figures(pid):
    """RSS (KiB), open fds and threads of ``pid``, from /proc."""
    rss = threads = None
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
            elif line.startswith("Threads:"):
                threads = int(line.split()[1])
    return {"rss_kib": rss, "fds": len(os.listdir(f"/proc/{pid}/fd")), "threads": threads}


def connector_sockets(pid):
    """fd -> inode of ``pid``'s NETLINK_CONNECTOR sockets (/proc/net/netlink, Eth 11)."""
    inodes = set()
    with open(f"/proc/{pid}/net/netlink") as f:
        head = f.readline().split()
        for line in f:
            row = dict(zip(head, line.split()))
            if row.get("Eth") == "11":
                inodes.add(row["Inode"])
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
            if m and m.group(1) in inodes:
                out[int(fd)] = m.group(1)
    return out


# -- users and groups made for the test --------------------------------------------------------
def _retry(cmd, attempts=20):
    """useradd & co. fail while another process holds /etc/passwd's lock: retry, bounded."""
    for _ in range(attempts):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode == 0:
            return
        if "lock" not in r.stderr:
            raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
        time.sleep(0.1)
    raise RuntimeError(f"{' '.join(cmd)}: /etc/passwd stayed locked")


class MadeUsers:
    """A group and users made for one test (names carry our PID), removed after."""

    def __init__(self):
        tag = f"pw{os.getpid() % 100000}"
        self.group = f"{tag}g"
        self.users = {}
        self._made_users = []
        self._made_group = False
        self._tag = tag

    def make(self, members=(), outsiders=()):
        import grp
        import pwd
        _retry(["groupadd", self.group])
        self._made_group = True
        for suffix in list(members) + list(outsiders):
            name = f"{self._tag}{suffix}"
            cmd = ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "--no-user-group",
                   "--gid", "nogroup"]
            if suffix in members:
                cmd += ["--groups", self.group]
            _retry(cmd + [name])
            self._made_users.append(name)
            self.users[suffix] = pwd.getpwnam(name)
        self.gid = grp.getgrnam(self.group).gr_gid
        return self

    def remove(self):
        for name in self._made_users:
            _retry(["userdel", name])
        if self._made_group:
            _retry(["groupdel", self.group])

    def as_user(self, suffix):
        """setpriv prefix running a command as test user ``suffix`` with its groups."""
        u = self.users[suffix]
        return ["setpriv", f"--reuid={u.pw_uid}", f"--regid={u.pw_gid}", "--init-groups"]


# -- a private mount namespace for the service (preexec_fn) ------------------------------------
CLONE_NEWNS = 0x00020000
MS_BIND, MS_REC, MS_PRIVATE = 0x1000, 0x4000, 1 << 18
PR_CAPBSET_DROP, CAP_SYS_PTRACE = 24, 19


def _ok(rc, what):
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def mount(source, target, fstype=None, flags=0, data=None):
    enc = (lambda s: s.encode() if isinstance(s, str) else s)
    _ok(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
        f"mount {source} {target}")


def private_mounts(*steps, drop_ptrace=False):
    """A preexec_fn: a mount namespace of the service's own, then ``steps`` (callables).

    Only the service sees what the steps mount; the host's mounts and files
    are untouched.  ``drop_ptrace`` removes CAP_SYS_PTRACE from the bounding
    set, so root keeps every other capability but may no longer look into
    other users' /proc entries where hidepid= says no.
    """
    def preexec():
        _ok(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
        mount(None, "/", None, MS_REC | MS_PRIVATE)
        for step in steps:
            step()
        if drop_ptrace:
            _ok(_libc.prctl(PR_CAPBSET_DROP, CAP_SYS_PTRACE, 0, 0, 0), "drop CAP_SYS_PTRACE")
    return preexec


def cap_eff(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0
