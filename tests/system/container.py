"""A throw-away systemd for system tests: systemd-nspawn over a tmpfs root.

The hazard
----------
procwatch's system tests need a real systemd (PID 1) and a real journald,
and the machines that run them (CI, developers) do not boot systemd.
Booting systemd on the host's own root would let its tmpfiles, sysusers and
preset machinery rewrite the host's /etc, /tmp and /run.  So systemd runs
as PID 1 of a ``systemd-nspawn --volatile=yes -D /`` container: its root is
a new, empty tmpfs; the host's /usr is bound read-only (or under an
overlay, ``writable_usr=True``, whose writes vanish at stop); /etc, /var,
/run, /tmp and /dev/shm are the container's own.  This protects against
accidents, it is not a security boundary: root inside keeps CAP_SYS_ADMIN.

What each nspawn option is for (each fixed a failure seen on Debian 12,
systemd 252, a hybrid cgroup host whose PID 1 is not systemd):

* ``--register=no --keep-unit``: no machined and no D-Bus on the host;
  without them nspawn exits with "Failed to open system bus".
* ``systemd.firstboot=off``: an empty /etc looks like a first boot, and
  systemd-firstboot would wait for a key press.
* a ``disable *`` preset bound in: a first boot runs preset-all, and
  Debian ships no ``disable *``, so every installed service (cron,
  postgresql, networkd...) would start.
* ``--bind-ro=/etc/alternatives``: otherwise awk, which, pager are missing.
* ``SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1``: on a hybrid host nspawn fails
  with "Failed to create symlink /sys/fs/cgroup/cpu"; the container gets a
  plain cgroup2 tree (no controllers: MemoryMax= is accepted, not enforced).
* nspawn is started inside a cgroup of its own (``procwatch-ct-NAME`` in
  every hierarchy that tracks processes), because it creates ``payload/``
  and ``supervisor/`` next to itself and would leave them in the root.
* ``--private-network`` (the default): the container has only ``lo``.
  The proc connector therefore refuses subscriptions inside (ECONNREFUSED),
  which is what makes procwatch fall back to its pidfd backend there.

Facts a test must know: the container has its own SysV IPC namespace (a
segment made inside is invisible outside), the journal is volatile
(/run/log/journal) and is lost at stop, commands run through ``nsenter``
into PID 1's namespaces with an empty environment (``env -i``).

Teardown is orderly first (SIGTERM to nspawn, which forwards SIGRTMIN+3:
PID 1 powers off), then SIGKILL to the container's PID 1 (which ends its
whole PID namespace), then to nspawn.  Every PID is checked before a signal
is sent: executable, start time (field 22 of /proc/PID/stat) and, for
nspawn, ``--machine=NAME`` on its command line.  ``stop()`` is idempotent,
and :func:`reap_stale` stops containers whose test runner died (nspawn runs
in its own session, so a SIGKILLed runner leaves it running).
"""

import json as _json
import os as _os
import re as _re
import shutil as _shutil
import signal as _signal
import subprocess as _subprocess
import time as _time
from pathlib import Path as _Path

__all__ = ("Container", "ContainerError", "reap_stale", "poll_until", "STATE_ROOT")

# Per-container state on the host: state.json, console.log, the preset,
# the /usr overlay's upper directory.  Not /tmp: nothing there may be
# shared with a container, and a tmp cleaner must not eat a live upper dir.
STATE_ROOT = _Path(_os.environ.get("PROCWATCH_CT_STATE", "/run/procwatch-ct"))
CGROUP_PREFIX = "procwatch-ct-"

INNER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
INNER_ENV = {"PATH": INNER_PATH, "HOME": "/root", "LANG": "C.UTF-8", "TERM": "dumb",
             "SYSTEMD_PAGER": "", "SYSTEMD_COLORS": "0"}

# Destinations a bind must never cover: the container's tmpfiles owns the
# temporary directories and would clean the host's files through the bind.
_FORBIDDEN_DST = ("/tmp", "/var/tmp", "/run", "/dev", "/proc", "/sys")
_NAME_RE = _re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9-]{0,47}$")
_CONSOLE_TAIL = 30


class ContainerError(Exception):
    """The container could not be booted, reached or stopped.

    ``str()`` is one line saying what went wrong, followed by the last lines
    of the container's console when there is one: a failed boot must show
    why in the test report, not just "failed".
    """

    def __init__(self, name, why, console=""):
        self.name, self.why, self.console = name, why, console
        super().__init__(name, why, console)

    def __str__(self):
        s = f"container {self.name}: {self.why}"
        if self.console:
            s += f"\n--- last lines of the console ---\n{self.console.rstrip()}"
        return s


# -- process identity ------------------------------------------------------

def _start_time(pid):
    """Field 22 of /proc/PID/stat (clock ticks since boot), None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may contain spaces and ')': split after the last ')'.
    fields = stat[stat.rindex(b")") + 2:].split()
    if fields[0] == b"Z":      # a zombie is gone for our purposes
        return None
    return int(fields[19])


def _exe(pid):
    try:
        return _os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def _same_process(ident, exe_suffixes):
    """True if ``ident`` = [pid, start_time] still names a live process whose
    executable ends in one of ``exe_suffixes``: PID + start time defeats PID
    reuse, the executable guards against a stale state file."""
    if not ident:
        return False
    pid, start = ident
    return _start_time(pid) == start and _exe(pid).endswith(tuple(exe_suffixes))


def _identity(pid):
    st = _start_time(pid)
    return None if st is None else [pid, st]


# -- cgroups ---------------------------------------------------------------

def _cgroup_roots():
    """Hierarchies that track processes: cgroup2 and/or v1 name=systemd."""
    base = _Path("/sys/fs/cgroup")
    if (base / "cgroup.controllers").exists():
        return [base]                                   # pure cgroup2
    roots = []
    if (base / "systemd" / "cgroup.procs").exists():
        roots.append(base / "systemd")
    if (base / "unified" / "cgroup.controllers").exists():
        roots.append(base / "unified")
    return roots


def _cgroup_dirs(name):
    return [r / f"{CGROUP_PREFIX}{name}" for r in _cgroup_roots()]


def _cgroup_pids(name):
    pids = set()
    for d in _cgroup_dirs(name):
        for procs in d.rglob("cgroup.procs") if d.is_dir() else ():
            try:
                pids.update(int(p) for p in procs.read_text().split())
            except OSError:
                pass            # the directory went away while we walked it
    return pids


def _cgroup_remove(name, timeout=5.0):
    """rmdir our cgroup subtree depth-first; retry while the kernel releases
    it (a cgroup is busy for a moment after its last process exits)."""
    deadline = _time.monotonic() + timeout
    for d in _cgroup_dirs(name):
        while d.exists():
            for sub in sorted((p for p in d.rglob("*") if p.is_dir()),
                              key=lambda p: len(p.parts), reverse=True) + [d]:
                try:
                    sub.rmdir()
                except FileNotFoundError:
                    pass
                except OSError:
                    break
            if not d.exists() or _time.monotonic() > deadline:
                break
            _time.sleep(0.05)
    return [str(d) for d in _cgroup_dirs(name) if d.exists()]


def _cgroup_kill(name):
    """Last resort after a failed stop: cgroup.kill (Linux >= 5.14) signals
    exactly the members of our cgroup2 subtree, so no PID can be wrong."""
    for d in _cgroup_dirs(name):
        kill = d / "cgroup.kill"
        if kill.exists():
            kill.write_text("1")
            return True
    return False


# -- helpers -----------------------------------------------------------------

def poll_until(predicate, timeout=10.0, interval=0.05):
    """Poll ``predicate`` until it returns a true value or ``timeout`` passes.

    Returns the last value, and never fails a test: teardown code uses it
    too, and callers assert (tests/conftest.py's ``wait_until`` is the one
    that fails the test).  Tests use this instead of sleeping: a deadline
    bounds the wait, the interval only bounds the cost of asking.
    """
    deadline = _time.monotonic() + timeout
    while True:
        value = predicate()
        if value or _time.monotonic() >= deadline:
            return value
        _time.sleep(interval)


_ANSI = _re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _tail(path, n=_CONSOLE_TAIL):
    """Last ``n`` non-empty lines of the console, without colour codes."""
    try:
        text = _Path(path).read_text(errors="replace")
    except OSError:
        return ""
    lines = [ln.rstrip() for ln in _ANSI.sub("", text).replace("\r", "").splitlines()]
    return "\n".join([ln for ln in lines if ln.strip()][-n:])


class Container:
    """One systemd-nspawn container with systemd as PID 1.

    >>> with Container("pw-demo", binds_ro=[REPO]) as ct:      # doctest: +SKIP
    ...     ct.exec("systemctl", "is-system-running").stdout
    'running\\n'

    ``binds_ro`` / ``binds``: host paths, or ``(src, dst)`` pairs, bound
    read-only / writable; a plain path is bound at the same absolute path,
    so shebangs, ``.pth`` files and editable installs still resolve.
    ``writable_usr``: /usr is an overlay over the host's (for installs);
    writes land in the state directory and are deleted at stop.
    ``nspawn_args``: more systemd-nspawn options (``--setenv=...``).
    Needs root, systemd-nspawn (apt: systemd-container) and nsenter.
    """

    # boot and stop durations of every container of this process, for the
    # test report (timings are reported, never asserted)
    timings = []

    def __init__(self, name, *, binds_ro=(), binds=(), writable_usr=False, nspawn_args=(),
                 boot_timeout=60.0, stop_timeout=20.0, state_root=None):
        if not _NAME_RE.match(name):
            raise ValueError(f"bad container name {name!r}: use [a-zA-Z0-9-], at most 48 characters")
        self.name = name
        self.state_dir = _Path(state_root or STATE_ROOT) / name
        self.binds_ro = [self._bind(b) for b in binds_ro]
        self.binds = [self._bind(b) for b in binds]
        self.writable_usr = writable_usr
        self.nspawn_args = list(nspawn_args)
        self.boot_timeout = boot_timeout
        self.stop_timeout = stop_timeout
        self.leader = None          # host PID of the container's PID 1
        self.boot_seconds = None
        self.stop_seconds = None
        self._proc = None           # our Popen of systemd-nspawn, when we started it
        self._state = {}

    @staticmethod
    def _bind(spec):
        src, dst = (spec, spec) if isinstance(spec, (str, _os.PathLike)) else spec
        src, dst = str(src), str(dst)
        if not _os.path.isabs(src) or not _os.path.isabs(dst):
            raise ValueError(f"bind {src}:{dst}: paths must be absolute")
        d = _os.path.normpath(dst)
        if d == "/" or any(d == f or d.startswith(f + "/") for f in _FORBIDDEN_DST):
            raise ValueError(f"bind {src}:{dst}: the container's tmpfiles/API mounts own {d}; "
                             f"bind it elsewhere, e.g. {src}:/src")
        return src, d

    # -- state file ----------------------------------------------------------
    @property
    def _state_file(self):
        return self.state_dir / "state.json"

    @property
    def console_log(self):
        return self.state_dir / "console.log"

    def _save_state(self):
        tmp = self._state_file.with_suffix(".tmp")
        tmp.write_text(_json.dumps(self._state))
        tmp.replace(self._state_file)

    def _load_state(self):
        try:
            self._state = _json.loads(self._state_file.read_text())
        except (OSError, ValueError):
            self._state = {}
        return self._state

    def _nspawn_alive(self):
        ident = self._state.get("nspawn")
        if not _same_process(ident, ("/systemd-nspawn",)):
            return False
        try:
            argv = _Path(f"/proc/{ident[0]}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return f"--machine={self.name}".encode() in argv

    def _leader_alive(self, shutting_down=False):
        # At poweroff PID 1 execs systemd-shutdown: same PID and start time.
        exes = ("/systemd", "/systemd-shutdown") if shutting_down else ("/systemd",)
        return _same_process(self._state.get("leader"), exes)

    # -- start -----------------------------------------------------------------
    def start(self):
        """Boot; return once ``systemctl is-system-running --wait`` says
        running or degraded.  Raises :class:`ContainerError` (with the
        console's last lines) when the boot fails or times out."""
        if _os.geteuid() != 0:
            raise ContainerError(self.name, "system tests must run as root (systemd-nspawn needs it)")
        for tool, pkg in (("systemd-nspawn", "systemd-container"), ("nsenter", "util-linux")):
            if not _shutil.which(tool):
                raise ContainerError(self.name, f"{tool} not found: apt-get install -y {pkg}")
        for src, _dst in self.binds_ro + self.binds:
            if not _os.path.exists(src):
                raise ContainerError(self.name, f"bind source {src} does not exist")
        self._load_state()
        if self._nspawn_alive():
            raise ContainerError(self.name, "already running: stop it first (Container(name).stop())")
        self.stop()                 # leftovers of an earlier run under this name
        self.state_dir.mkdir(parents=True, exist_ok=True)
        preset = self.state_dir / "00-procwatch-ct.preset"
        preset.write_text("disable *\n")

        argv = ["systemd-nspawn", "--quiet", "--boot", "--directory=/", "--volatile=yes",
                f"--machine={self.name}", "--register=no", "--keep-unit",
                "--private-network", "--resolv-conf=off", "--timezone=off",
                "--link-journal=no", "--console=read-only",
                "--bind-ro=/etc/alternatives",
                f"--bind-ro={preset}:/etc/systemd/system-preset/00-procwatch-ct.preset"]
        if self.writable_usr:
            upper = self.state_dir / "usr-upper"
            upper.mkdir()
            argv.append(f"--overlay=/usr:{upper}:/usr")
        argv += [f"--bind-ro={s}:{d}" for s, d in self.binds_ro]
        argv += [f"--bind={s}:{d}" for s, d in self.binds]
        argv += self.nspawn_args
        argv.append("systemd.firstboot=off")      # kernel-style argument for PID 1

        cgroups = _cgroup_dirs(self.name)
        for d in cgroups:
            d.mkdir(exist_ok=True)

        def enter_cgroups():        # runs in the child between fork and exec
            for d in cgroups:
                with open(d / "cgroup.procs", "w") as f:
                    f.write(str(_os.getpid()))

        env = dict(_os.environ, SYSTEMD_NSPAWN_UNIFIED_HIERARCHY="1")
        t0 = _time.monotonic()
        with open(self.console_log, "wb") as console:
            self._proc = _subprocess.Popen(
                argv, stdin=_subprocess.DEVNULL, stdout=console, stderr=_subprocess.STDOUT,
                env=env, start_new_session=True, preexec_fn=enter_cgroups)
        me = _identity(_os.getpid())
        self._state = {"nspawn": _identity(self._proc.pid), "owner": me, "leader": None}
        self._save_state()
        try:
            self._wait_boot(t0)
        except BaseException:
            self.stop()
            raise
        self.boot_seconds = _time.monotonic() - t0
        Container.timings.append((self.name, "boot", self.boot_seconds))
        return self

    def _fail(self, why):
        raise ContainerError(self.name, why, _tail(self.console_log))

    def _wait_boot(self, t0):
        deadline = t0 + self.boot_timeout
        while self.leader is None:
            if self._proc.poll() is not None:
                self._fail(f"systemd-nspawn exited with status {self._proc.returncode} during boot")
            self.leader = self._find_leader()
            if self.leader is None:
                if _time.monotonic() > deadline:
                    self._fail(f"no PID 1 after {self.boot_timeout:g} s")
                _time.sleep(0.02)
        self._state["leader"] = _identity(self.leader)
        self._save_state()
        state = ""
        while True:
            left = deadline - _time.monotonic()
            if left <= 0:
                self._fail(f"boot did not finish in {self.boot_timeout:g} s (state {state!r})")
            try:
                r = self.exec("systemctl", "is-system-running", "--wait", timeout=left)
                state = r.stdout.strip()
            except _subprocess.TimeoutExpired:
                continue
            if state in ("running", "degraded"):
                break
            if self._proc.poll() is not None:
                self._fail(f"systemd-nspawn exited with status {self._proc.returncode} during boot")
            # "offline": systemctl reached no manager yet (PID 1 found by its
            # executable, but /run/systemd/private not there yet); seen once
            # in about 20 boots.  It is retried until the deadline like the others.
            if state not in ("initializing", "starting", "offline", ""):
                failed = self.exec("systemctl", "--failed", "--no-legend", timeout=10).stdout
                self._fail(f"boot ended in state {state!r}; failed units: {failed.strip() or 'none'}")
            _time.sleep(0.05)
        self.system_state = state

    def _find_leader(self):
        """The container's PID 1: nspawn's child whose executable is systemd."""
        ns = self._proc.pid
        try:
            children = _Path(f"/proc/{ns}/task/{ns}/children").read_text().split()
        except OSError:
            return None
        for c in map(int, children):
            if _exe(c).endswith("/systemd"):
                return c
        return None

    # -- use -------------------------------------------------------------------
    def _nsenter(self):
        if not self._load_state() or not self._leader_alive():
            raise ContainerError(self.name, "not running (its PID 1 is gone)", _tail(self.console_log))
        leader = self._state["leader"][0]
        return ["nsenter", "-t", str(leader), "-m", "-u", "-i", "-n", "-p", "-C", "-r", "-w", "--"]

    def exec(self, *cmd, timeout=60.0, check=False, input=None, env=None):
        """Run ``cmd`` inside (all of PID 1's namespaces, its root and cwd, an
        empty environment plus ``env``); return the CompletedProcess (text).

        stdout, stderr and the exit status pass through unchanged; a command
        still running after ``timeout`` seconds raises TimeoutExpired.  The
        process is in no unit: use :meth:`run` for a cgroup and
        ``_SYSTEMD_UNIT`` in the journal.
        """
        inner = dict(INNER_ENV, **(env or {}))
        # The deadline is enforced inside by coreutils' timeout, which kills
        # the command's whole process group: killing nsenter from outside
        # would leave its child running in the container (util-linux 2.38's
        # nsenter has no --kill-child).
        argv = (self._nsenter() + ["env", "-i"] + [f"{k}={v}" for k, v in inner.items()]
                + ["timeout", "--kill-after=2", f"{timeout:.3f}"] + list(cmd))
        t0 = _time.monotonic()
        r = _subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 10,
                            input=input, stdin=None if input is not None else _subprocess.DEVNULL)
        if r.returncode in (124, 137) and _time.monotonic() - t0 >= timeout:
            raise _subprocess.TimeoutExpired(list(cmd), timeout, r.stdout, r.stderr)
        if check and r.returncode:
            raise _subprocess.CalledProcessError(r.returncode, list(cmd), r.stdout, r.stderr)
        r.args = list(cmd)
        return r

    def run(self, *cmd, timeout=60.0, check=False, input=None, properties=()):
        """Run ``cmd`` as a transient service of the container's systemd
        (``systemd-run --wait --pipe``): exit status and output are kept."""
        props = [f"--property={p}" for p in properties]
        return self.exec("systemd-run", "--quiet", "--wait", "--pipe", "--collect",
                         "--service-type=exec", *props, "--", *cmd,
                         timeout=timeout, check=check, input=input)

    def systemctl(self, *args, timeout=60.0, check=False):
        return self.exec("systemctl", "--no-pager", *args, timeout=timeout, check=check)

    def show(self, unit, prop):
        """``systemctl show -P PROP UNIT`` as a string."""
        return self.systemctl("show", "-P", prop, unit, check=True).stdout.strip()

    def journal(self, *args, timeout=30.0):
        """Journal entries as dicts: ``journalctl -o json ARGS`` inside."""
        self.exec("journalctl", "--sync", timeout=timeout)
        r = self.exec("journalctl", "--no-pager", "-o", "json", *args, timeout=timeout, check=True)
        return [_json.loads(line) for line in r.stdout.splitlines() if line.strip()]

    def install_file(self, text, path, mode=0o644):
        """Write ``text`` to ``path`` inside the container."""
        self.exec("sh", "-c", f'mkdir -p "$(dirname "$1")" && cat > "$1" && chmod {mode:o} "$1"',
                  "sh", path, input=text, check=True)

    def pid_namespace(self):
        """Inode of the container's PID namespace, e.g. 'pid:[4026532612]'."""
        return _os.readlink(f"/proc/{self._state['leader'][0]}/ns/pid")

    # -- stop ------------------------------------------------------------------
    def stop(self, timeout=None):
        """Orderly poweroff, then SIGKILL; remove cgroups and state.  Safe to
        call twice, on a container never started, or on one whose runner
        died.  Returns the list of leftovers it could not remove (empty)."""
        timeout = self.stop_timeout if timeout is None else timeout
        t0 = _time.monotonic()
        self._load_state()
        was_running = self._nspawn_alive() or self._leader_alive(shutting_down=True)
        if self._nspawn_alive():
            if _os.environ.get("PROCWATCH_CT_KEEP_LOG") == "1" and self._leader_alive():
                self._save_journal()
            _os.kill(self._state["nspawn"][0], _signal.SIGTERM)   # nspawn: SIGRTMIN+3 to PID 1
            poll_until(lambda: not self._nspawn_alive(), timeout, 0.02)
        if self._leader_alive(shutting_down=True):
            # No orderly poweroff in time (or nspawn died and left PID 1
            # running): SIGKILL to the namespace's init kills all in it.
            _os.kill(self._state["leader"][0], _signal.SIGKILL)
            poll_until(lambda: not self._leader_alive(shutting_down=True), 5.0)
        if not poll_until(lambda: not self._nspawn_alive(), 5.0):
            _os.kill(self._state["nspawn"][0], _signal.SIGKILL)
            poll_until(lambda: not self._nspawn_alive(), 5.0)
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5)         # reap our child: no zombie
            except _subprocess.TimeoutExpired:
                pass
            self._proc = None
        left = _cgroup_remove(self.name)
        if left and _cgroup_pids(self.name):
            # Something survived nspawn: end exactly the members of our cgroup.
            _cgroup_kill(self.name)
            poll_until(lambda: not _cgroup_pids(self.name), 5.0)
            left = _cgroup_remove(self.name)
        self._cleanup_files(keep_log=_os.environ.get("PROCWATCH_CT_KEEP_LOG") == "1")
        self.leader = None
        if was_running:
            self.stop_seconds = _time.monotonic() - t0
            Container.timings.append((self.name, "stop", self.stop_seconds))
        return left

    def _save_journal(self):
        try:
            r = self.exec("journalctl", "-b", "--no-pager", "-o", "short-monotonic", timeout=15)
            (self.state_dir / "journal.txt").write_text(r.stdout + r.stderr)
        except (OSError, _subprocess.SubprocessError, ContainerError):
            pass            # the log is a convenience; the stop must go on

    def _cleanup_files(self, keep_log=False):
        # nspawn leaves an empty mount-propagation directory on a host whose
        # /run is not a tmpfs ("Attempted to remove disk file system")
        try:
            _os.rmdir(f"/run/systemd/nspawn/propagate/{self.name}")
        except OSError:
            pass
        if not self.state_dir.exists():
            return
        if keep_log:
            for p in self.state_dir.iterdir():
                if p.name not in ("console.log", "journal.txt"):
                    _shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        else:
            _shutil.rmtree(self.state_dir)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def __repr__(self):
        return f"Container({self.name!r}, leader={self.leader})"


def reap_stale(state_root=None, prefix=""):
    """Stop every container under ``state_root`` whose test runner is gone.

    A runner killed with SIGKILL cannot stop its container (nspawn runs in a
    session of its own), so each start records the runner's PID and start
    time; a later run calls this first.  Returns the names it stopped.
    """
    root = _Path(state_root or STATE_ROOT)
    stopped = []
    if not root.is_dir():
        return stopped
    for d in sorted(root.iterdir()):
        if not d.is_dir() or not d.name.startswith(prefix) or not _NAME_RE.match(d.name):
            continue
        ct = Container(d.name, state_root=root)
        state = ct._load_state()
        owner = state.get("owner")
        if owner and _start_time(owner[0]) == owner[1]:
            continue            # its runner is alive: not ours to stop
        ct.stop()
        stopped.append(d.name)
    return stopped
