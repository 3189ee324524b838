"""Which capability does each of procwatch's kernel operations need?  Measured, not guessed.

systemd/procwatch.service runs procwatch as root with a small CapabilityBoundingSet=.
This probe is the evidence for that set.  It re-executes itself under ``setpriv(1)``
as root with only the given bounding set (root's execve() then gets exactly those
capabilities) and tries every operation the service performs on processes it does
not own: a ``sleep`` of uid 65534 and a root process that made itself non-dumpable
(``prctl(PR_SET_DUMPABLE, 0)``, as sshd and others do).

Run as root:  python3 tests/system/cap_probe.py            (a table, one row per set)
              python3 tests/system/cap_probe.py cap_kill   (one set)

Results on Linux 6.18 (tests/system/test_unit_capabilities.py checks them):

=================  ===============================================================
stat               /proc/PID/stat field 22 of another user: no capability
maps_other         /proc/PID/maps of another user: CAP_SYS_PTRACE (EACCES without;
maps_nondumpable   also for a non-dumpable root process; CAP_DAC_READ_SEARCH does
                   not help: the check is ptrace_may_access(PTRACE_MODE_READ))
exit_code_other    /proc/PID/stat field 52 (exit_code) of another user's zombie: the
                   pidfd backend's exit status before Linux 6.15. CAP_SYS_PTRACE;
                   without it the kernel prints 0 ("hidden"), which reads as "exit 0"
                   (fs/proc/array.c, do_task_stat(): ptrace_may_access(READ_FSCREDS))
pidfd_open         of another user's process: no capability
pidfd_signal       pidfd_send_signal(2), signal 0 (the permission check only):
                   CAP_KILL (EPERM without)
connector          bind CN_IDX_PROC + PROC_CN_MCAST_LISTEN, ACK err=0: no capability
                   since Linux 6.6 (commit bfdfdc2f3b70 "connector/cn_proc: Allow
                   non-root users access"); before, cn_proc_mcast_ctl() checked
                   capable(CAP_NET_ADMIN)
sysv               shmget(IPC_CREAT|IPC_EXCL, 0660), IPC_SET gid, a SEM_UNDO
                   semaphore, re-attach: no capability (uid 0 owns them)
idle_back_other    the teardown yield: sched_setscheduler(2) SCHED_IDLE, then
                   SCHED_OTHER again, on another user's process: CAP_SYS_NICE
                   (EPERM at the first call without)
idle_back_own      the same on a root process with every capability: CAP_SYS_NICE
                   too, at the first call (security/commoncap.c, cap_safe_nice():
                   the target's permitted set is not within the caller's); where
                   the first call is allowed, the way back from SCHED_IDLE needs
                   CAP_SYS_NICE or an RLIMIT_NICE of 20 (sched_setscheduler(2))
=================  ===============================================================
"""

import ctypes
import errno
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys

OPS = ("stat", "maps_other", "maps_nondumpable", "exit_code_other", "pidfd_open", "pidfd_signal",
       "connector", "sysv", "idle_back_other", "idle_back_own")
ZOMBIE_STATUS = 7 << 8               # the wait status of the uid 65534 zombie: exit(7)

# include/uapi/linux/connector.h, cn_proc.h
NETLINK_CONNECTOR = 11
CN_IDX_PROC = CN_VAL_PROC = 1
PROC_CN_MCAST_LISTEN, PROC_CN_MCAST_IGNORE = 1, 2
NLMSG_DONE = 3
SYS_pidfd_send_signal = 424          # same number on every architecture (since 5.1)
PROBE_KEY = 0x7077CA90               # a key of its own, removed after use


def _check(fn):
    try:
        r = fn()
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
    return "ok" if r is None else r


def _connector_listen():
    """Legacy 4-byte LISTEN; the ACK (what == PROC_EVENT_NONE) carries err.

    Not the 6.6+ filtered request: cn_filter() drops the ACK of a socket that
    asked for exit events only (the ACK's "what" is 0), so there is nothing
    to wait for.
    """
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_CONNECTOR)
    try:
        s.bind((0, CN_IDX_PROC))

        def send(op):
            payload = struct.pack("=I", op)
            cn = struct.pack("=IIIIHH", CN_IDX_PROC, CN_VAL_PROC, 0, 0, len(payload), 0) + payload
            s.send(struct.pack("=IHHII", 16 + len(cn), NLMSG_DONE, 0, 0, 0) + cn)

        send(PROC_CN_MCAST_LISTEN)
        try:
            while select.select([s], [], [], 1.0)[0]:
                data = s.recv(65536)
                what = struct.unpack_from("=I", data, 36)[0]     # nlmsghdr 16 + cn_msg 20
                if what == 0:
                    err = struct.unpack_from("=I", data, 52)[0]  # proc_event.event_data.ack.err
                    return "ok" if err == 0 else f"ack err={err}"
            return "no ack"
        finally:
            send(PROC_CN_MCAST_IGNORE)
    finally:
        s.close()


def _sysv():
    import sysv_ipc
    try:
        mem = sysv_ipc.SharedMemory(PROBE_KEY, sysv_ipc.IPC_CREX, mode=0o660, size=4096)
        sem = sysv_ipc.Semaphore(PROBE_KEY, sysv_ipc.IPC_CREX, mode=0o660, initial_value=1)
        try:
            mem.gid = sem.gid = 65534
            sem.undo = True
            sem.acquire(timeout=1)
            sem.release()
            again = sysv_ipc.SharedMemory(PROBE_KEY)
            again.attach()
            again.detach()
        finally:
            mem.remove()
            sem.remove()
    except sysv_ipc.Error as e:
        return f"{type(e).__name__}"


def _pidfd_signal(pid):
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.pidfd_open(pid)
    try:
        if libc.syscall(SYS_pidfd_send_signal, fd, 0, None, 0) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
    finally:
        os.close(fd)


def _idle_and_back(pid):
    """SCHED_IDLE, then SCHED_OTHER again: None, or the step that failed and how."""
    try:
        os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
    except OSError as e:
        return f"{errno.errorcode.get(e.errno, e.errno)} to idle"
    try:
        os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))
    except OSError as e:
        return f"{errno.errorcode.get(e.errno, e.errno)} back"


def probe(victim, nondumpable, zombie):
    """Try each operation in this process; {op: "ok" or the error}."""
    def stat22(pid):
        with open(f"/proc/{pid}/stat", "rb") as f:
            int(f.read().rsplit(b")", 1)[1].split()[19])

    def exit_code(pid):
        with open(f"/proc/{pid}/stat", "rb") as f:
            code = int(f.read().rsplit(b")", 1)[1].split()[49])       # field 52
        return None if code == ZOMBIE_STATUS else ("hidden" if code == 0 else f"got {code}")

    def maps(pid):
        with open(f"/proc/{pid}/maps") as f:
            f.read()

    return {
        "stat": _check(lambda: stat22(victim)),
        "maps_other": _check(lambda: maps(victim)),
        "maps_nondumpable": _check(lambda: maps(nondumpable)),
        "exit_code_other": _check(lambda: exit_code(zombie)),
        "pidfd_open": _check(lambda: os.close(os.pidfd_open(victim))),
        "pidfd_signal": _check(lambda: _pidfd_signal(victim)),
        "connector": _check(_connector_listen),
        "sysv": _check(_sysv),
        "idle_back_other": _check(lambda: _idle_and_back(victim)),
        "idle_back_own": _check(lambda: _idle_and_back(nondumpable)),
    }


def run_with_caps(caps, victim, nondumpable, zombie):
    """Run :func:`probe` as root with only ``caps`` (e.g. ["cap_kill"]) in
    the bounding set; return its results."""
    bset = ",".join(["-all"] + [f"+{c.lower().removeprefix('cap_')}" for c in caps])
    out = subprocess.run(
        ["setpriv", f"--bounding-set={bset}", "--inh-caps=-all", "--",
         sys.executable, os.path.abspath(__file__), "--probe", str(victim), str(nondumpable),
         str(zombie)],
        capture_output=True, text=True, check=True, timeout=30).stdout
    return json.loads(out)


class Victims:
    """A ``sleep`` of uid 65534, a non-dumpable root ``python`` and a zombie of
    uid 65534 that exited with 7 (not reaped until the end); ended by PID."""

    def __enter__(self):
        self.other = subprocess.Popen(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "600"])
        self.zombie = subprocess.Popen(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sh", "-c", "exit 7"])
        os.waitid(os.P_PID, self.zombie.pid, os.WEXITED | os.WNOWAIT)     # a zombie, still unreaped
        self.nondumpable = subprocess.Popen(
            [sys.executable, "-c", "import ctypes, sys; ctypes.CDLL(None).prctl(4, 0, 0, 0, 0); "
             "print(flush=True); sys.stdin.read()"],       # PR_SET_DUMPABLE = 4
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.nondumpable.stdout.readline()                 # prctl done
        # setpriv execs sleep: wait until the uid switch is visible
        for _ in range(200):
            try:
                with open(f"/proc/{self.other.pid}/status") as f:
                    if any(ln.startswith("Uid:\t65534") for ln in f):
                        break
            except FileNotFoundError:
                break
            select.select([], [], [], 0.01)
        return self

    def __exit__(self, *exc):
        self.other.send_signal(signal.SIGKILL)
        self.other.wait()
        self.zombie.wait()
        self.nondumpable.stdin.close()
        self.nondumpable.wait(timeout=10)


def main(argv):
    if argv[:1] == ["--probe"]:
        print(json.dumps(probe(int(argv[1]), int(argv[2]), int(argv[3]))))
        return 0
    if os.geteuid() != 0:
        print("cap_probe: run as root", file=sys.stderr)
        return 2
    sets = [argv] if argv else [[], ["cap_kill"], ["cap_sys_ptrace"], ["cap_net_admin"],
                                ["cap_dac_read_search"], ["cap_ipc_owner"],
                                ["cap_sys_nice"], ["cap_kill", "cap_sys_ptrace", "cap_net_admin", "cap_sys_nice"]]
    with Victims() as v:
        print(f"Linux {os.uname().release}; victims: uid 65534 PID {v.other.pid}, "
              f"non-dumpable root PID {v.nondumpable.pid}")
        print(f"{'bounding set':42} " + " ".join(f"{op:>16}" for op in OPS))
        for caps in sets:
            r = run_with_caps(caps, v.other.pid, v.nondumpable.pid, v.zombie.pid)
            print(f"{','.join(caps) or '(none)':42} " + " ".join(f"{r[op]:>16}" for op in OPS))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
