"""``procwatch run`` and ``procwatch wait``: procwatch for programs and scripts as they are.

``run`` registers its own PID and then exec(2)s the command, so the slot
follows the real process: same PID, same start time (``/proc/PID/stat``
field 22 is not changed by exec), and the caller's wait() sees the command's
own exit status or signal.  Three things make that exact:

* Nothing unregisters at exit: the registration is data in the segment, not
  a resource of the process (the mapping itself goes away with exec), and
  exec runs no atexit handlers.
* Python ignores SIGPIPE and SIGXFSZ at start-up, and an ignored signal stays
  ignored across exec (signal(7)), so both go back to SIG_DFL first, as
  subprocess does (restore_signals).  Everything else the caller set up
  (an ignored SIGINT under nohup, the signal mask) passes through.
* The command is looked up on PATH *before* registering, so "not found" (127)
  and "not executable" (126) never leave a slot behind; if exec still fails,
  the registration is undone.

The command gets ``PROCWATCH_NAME`` and ``PROCWATCH_KEY`` in its
environment.  A command that registers that name itself (``register_pid``,
``procwatch_register``) adopts the slot ``run`` made for its PID, and with
``--heartbeat S`` its beats are what keep it from being declared hung.

The death word (issue 14): execve(2) releases the robust mutexes of the old
image, so ``run`` cannot arm before the exec.  It registers the slot as
PRELOAD and puts the package's preload library (procwatch/_preload*.so) in
LD_PRELOAD with PROCWATCH_ARM=key:slot:pid:start_time; its constructor arms
the slot from inside CMD, and only in CMD itself (children inherit the
environment but have other PIDs).  A statically linked CMD never loads it
and glibc ignores it for a setuid/setgid one: those slots are
NOT_PRELOADABLE, connector-only, and ``status`` says so.

``wait`` sleeps in FUTEX_WAIT on the name's PID word (Peer.wait_exit: no
polling) and prints how the process ended, from its slot.
"""

import argparse as _argparse
import errno as _errno
import os as _os
import signal as _signal
import sys as _sys
import time as _time

from . import abi as _abi
from . import argtypes as _argtypes
from .signals import describe_status as _describe_status     # before the wait: see cmd_wait

# Exit statuses of 'run' for its own failures, as timeout(1), env(1) and the shell use them.
EXIT_RUN_FAILED = 125       # procwatch could not register: CMD was not started
EXIT_CANNOT_EXECUTE = 126
EXIT_NOT_FOUND = 127
# ... and of 'wait'.
EXIT_ENDED, EXIT_FAILURE, EXIT_NO_SUCH_NAME, EXIT_TIMEOUT = 0, 1, 2, 124

RECORD_WAIT = 1.0           # s 'wait' gives the service to record an end it has signalled


def add_parser(sub):
    """Add the 'run' and 'wait' subcommands to ``sub`` (cli.build_parser)."""
    formatter, key_type, key_help = _argtypes.FORMATTER, _argtypes.key, _argtypes.KEY_HELP
    r = sub.add_parser(
        "run", formatter_class=formatter, help="register, then exec a command (same PID)",
        usage="procwatch run [-h] [--name NAME] [--heartbeat S] [--key KEY] -- CMD [ARGS...]",
        description="Register this process under NAME, then exec CMD in its place: same PID,\n"
                    "same start time, so the slot follows CMD, and CMD's exit status and\n"
                    "signals reach the caller unchanged.  For programs nobody can modify.\n"
                    "With no service running (no table), CMD runs anyway after one warning.\n\n"
                    "CMD finds NAME and the table key in $PROCWATCH_NAME and $PROCWATCH_KEY.\n"
                    "With --heartbeat, CMD must beat: it registers NAME itself, which adopts\n"
                    "the slot run made for its PID (the slot is kept, never cleared), then\n"
                    "beats it.  A CMD that never beats is declared hung after --max-misses.",
        epilog="exit status:\n"
               "  CMD's own; 125 procwatch could not register (CMD not started),\n"
               "  126 CMD is not executable, 127 CMD not found, 2 usage error\n\n"
               "examples:\n"
               "  procwatch run --name dataplane -- /usr/sbin/dataplane --port 9000\n\n"
               "  procwatch run --name worker --heartbeat 2 -- python3 worker.py\n"
               "  # worker.py: reg = procwatch.register_pid(os.environ['PROCWATCH_NAME'])\n"
               "  #            while True: do_work(); reg.beat()\n"
               "  # in C: procwatch_register(&reg, getenv(\"PROCWATCH_NAME\"), 0); procwatch_beat(&reg);")
    r.add_argument("--name", help="slot name, 1..31 bytes of UTF-8 (default: CMD's file name)")
    r.add_argument("--heartbeat", type=_argtypes.seconds(49 * _argtypes.DAY, zero=True), default=0, metavar="S",
                   help="expect a beat every S seconds (default 0: no hang detection); "
                        "only for a CMD that registers NAME itself (adopting the slot) and beats it")
    r.add_argument("--key", type=key_type, help=key_help)
    r.add_argument("cmd", nargs=_argparse.REMAINDER, metavar="-- CMD [ARGS...]",
                   help="the command, looked up on PATH like a shell does")

    w = sub.add_parser(
        "wait", formatter_class=formatter, help="block until a named process is gone",
        description="Sleep (on the slot's futex, no polling) until the process registered\n"
                    "under NAME is gone, then print how it ended: exit code, signal, found\n"
                    "dead, or unregistered.  Returns at once if it is already gone.  For\n"
                    "shell scripts and systemd ExecStartPre=.",
        epilog="exit status:\n"
               "  0 it ended (or had ended), 124 --timeout passed first,\n"
               "  2 no slot carries NAME (or a usage error), 1 no slot table (no service);\n"
               "  with --etcd: 2 no key and no ended record for HOST/NAME, 1 etcd unreachable\n\n"
               "example:\n"
               "  procwatch wait dataplane --timeout 30 || echo 'still running'\n"
               "  procwatch wait dp-host-2/dataplane --etcd http://etcd-1:2379")
    w.add_argument("name", metavar="NAME", help="the registered name")
    w.add_argument("--timeout", type=_argtypes.seconds(49 * _argtypes.DAY, zero=True), metavar="S",
                   help="give up after S seconds (exit 124); 0 only checks (default: wait for ever)")
    w.add_argument("--key", type=key_type, help=key_help)
    w.add_argument("--etcd", nargs="?", const="", metavar="URLS",
                   help="NAME is HOST/NAME on another host: wait on etcd for its key to go "
                        "(comma-separated client URLs; alone: the config file's [etcd] endpoints)")
    from . import fleetcmd
    fleetcmd.add_arguments(w)
    r.set_defaults(run=run)
    w.set_defaults(run=run)


def run(args):
    return cmd_run(args) if args.command == "run" else cmd_wait(args)


# -- run ------------------------------------------------------------------------

def _find_command(cmd):
    """(path, None) for CMD as execvp(3) finds it, or (None, errno)."""
    if "/" in cmd:
        if not _os.path.exists(cmd):
            return None, _errno.ENOENT
        if _os.path.isdir(cmd) or not _os.access(cmd, _os.X_OK):
            return None, _errno.EACCES
        return cmd, None
    seen = _errno.ENOENT
    for d in _os.get_exec_path():
        path = _os.path.join(d or ".", cmd)
        if _os.path.isfile(path):
            if _os.access(path, _os.X_OK):
                return path, None
            seen = _errno.EACCES        # execvp goes on, and reports EACCES if nothing else fits
    return None, seen


def _elf_interpreter(path):
    """Whether the ELF file at ``path`` has a PT_INTERP (is dynamically linked); None if not ELF.

    A damaged ELF header is None too: the exec will say what is wrong with it.
    """
    import struct
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if head[:4] != b"\x7fELF":
                return None
            is64, little = head[4] == 2, head[5] == 1
            end = "<" if little else ">"
            if is64:
                phoff, = struct.unpack_from(end + "Q", head, 32)
                phentsize, phnum = struct.unpack_from(end + "HH", head, 54)
            else:
                phoff, = struct.unpack_from(end + "I", head, 28)
                phentsize, phnum = struct.unpack_from(end + "HH", head, 42)
            f.seek(phoff)
            table = f.read(phentsize * phnum)
        PT_INTERP = 3                       # include/uapi/linux/elf.h
        return any(struct.unpack_from(end + "I", table, k * phentsize)[0] == PT_INTERP for k in range(phnum))
    except (OSError, struct.error, ValueError):
        return None


def _script_interpreter(path):
    """The interpreter path of a '#!' script, or None."""
    try:
        with open(path, "rb") as f:
            line = f.readline(256)
    except OSError:
        return None
    if not line.startswith(b"#!"):
        return None
    parts = line[2:].split()
    return _os.fsdecode(parts[0]) if parts else None


def preload_library():
    """Path of the package's preload library, or None when it was not built."""
    import glob
    found = sorted(glob.glob(_os.path.join(_os.path.dirname(__file__), "_preload*.so")))
    return found[0] if found else None


def preload_arm(path):
    """(abi.Arm, library) for running ``path`` under 'run': PRELOAD with the library, or why not."""
    lib = preload_library()
    if lib is None:
        return _abi.Arm.UNAVAILABLE, None
    target = _os.path.realpath(path)
    for _ in range(4):                     # '#!' chains, as the kernel allows (binfmt_script)
        interp = _script_interpreter(target)
        if interp is None:
            break
        target = _os.path.realpath(interp)
    try:
        st = _os.stat(target)
    except OSError:
        return _abi.Arm.UNAVAILABLE, None
    if st.st_mode & 0o6000 or _elf_interpreter(target) is False:   # setuid, setgid: inode(7)
        return _abi.Arm.NOT_PRELOADABLE, None      # secure execution, or static: no LD_PRELOAD
    return _abi.Arm.PRELOAD, lib


def _default_name(cmd):
    """CMD's file name, cut to NAME_MAX bytes of UTF-8 on a character boundary."""
    raw = _os.path.basename(cmd).encode("utf-8", "surrogateescape")[:_abi.NAME_MAX]
    return raw.decode("utf-8", "ignore") or "cmd"


def _say(prog, message):
    print(f"procwatch {prog}: {message}", file=_sys.stderr, flush=True)


def cmd_run(args):
    from . import client
    from .errors import ProcwatchError
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        _say("run", "no command given: procwatch run [--name NAME] -- CMD [ARGS...]")
        return 2
    path, err = _find_command(cmd[0])
    if path is None:
        if err == _errno.ENOENT:
            _say("run", f"{cmd[0]}: command not found (check the name and $PATH)")
            return EXIT_NOT_FOUND
        _say("run", f"{cmd[0]}: permission denied: not an executable file (chmod +x?)")
        return EXIT_CANNOT_EXECUTE
    name = args.name if args.name is not None else _default_name(cmd[0])
    arm, lib = preload_arm(path)
    try:
        reg = client.register_pid(name, key=args.key, heartbeat=args.heartbeat, arm=arm)
    except (ProcwatchError, ValueError) as e:
        _say("run", f"{e}; {cmd[0]} not started")
        return EXIT_RUN_FAILED
    for sig in (_signal.SIGPIPE, _signal.SIGXFSZ):       # ignored by Python, not by CMD
        _signal.signal(sig, _signal.SIG_DFL)
    if reg is not None:             # so that CMD can register the same name (adopt) and beat
        _os.environ["PROCWATCH_NAME"] = reg.name
        _os.environ["PROCWATCH_KEY"] = f"{reg.table.key:#010x}"
    env = None
    if reg is not None and lib is not None:
        env = dict(_os.environ)
        env["LD_PRELOAD"] = f"{lib} {env['LD_PRELOAD']}" if env.get("LD_PRELOAD") else lib
        env["PROCWATCH_ARM"] = f"{reg.table.key}:{reg.slot}:{reg.pid}:{reg.start_time}"
    _sys.stdout.flush()
    _sys.stderr.flush()
    try:
        if env is None:
            _os.execv(path, cmd)
        _os.execve(path, cmd, env)
    except OSError as e:
        if reg is not None:
            reg.unregister()
        _say("run", f"cannot execute {cmd[0]}: {e.strerror}")
        return EXIT_NOT_FOUND if e.errno == _errno.ENOENT else EXIT_CANNOT_EXECUTE


# -- wait -------------------------------------------------------------------------

def describe_end(slot, name, pid):
    """One line for how ``pid`` (registered as ``name``) ended, from ``slot`` (a Slot), or None.

    None when the slot does not say yet (the service zeroes the word first
    and records the end right after).
    """
    who = f"{name} (pid {pid})" if pid else name
    if slot.raw_name != name.encode("utf-8"):
        return f"{who} is gone; its slot has been given to another name since"
    if slot.pid not in (0, pid) and pid:
        return f"{who} is gone; {name} is now registered by pid {slot.pid}"
    state, cause = slot.state, slot.cause
    if state == _abi.State.EXITED:
        text, _ = _describe_status(slot.exit_status)
        if cause == _abi.Cause.KILLED_HUNG:
            text = f"was hung and procwatch ended it: {text}"
        return f"{who} {text}"
    if state == _abi.State.FOUND_DEAD:
        why = {_abi.Cause.PID_REUSED: "its PID now belongs to another process",
               _abi.Cause.FOUND_DEAD_OVERFLOW: "its exit event was lost in an overflow"}.get(
                   cause, "it exited while no event reached procwatch")
        return f"{who} found dead ({why}); exit status unknown"
    if state == _abi.State.UNREGISTERED:
        return f"{who} unregistered"
    if state == _abi.State.EMPTY:
        return f"{who} is gone; its slot was cleared"
    return None


def cmd_wait(args):
    if args.etcd is not None:
        from . import fleetcmd
        return fleetcmd.wait(args)
    from . import client
    from .errors import NameNotFound, UsageError
    key = _argtypes.table_key(args.key)
    try:
        peer = client.Peer(args.name, key=key)
    except NameNotFound as e:
        _say("wait", str(e))
        return EXIT_NO_SUCH_NAME
    except ValueError as e:             # a NAME no slot can carry (too long, a control character)
        raise UsageError(str(e)) from None
    with peer:
        pid = peer.pid
        if pid and not client.monitor_alive(peer.table.key):
            _say("wait", f"no procwatch service is watching table key {peer.table.key:#010x}: "
                         f"{args.name} ends only when it unregisters or a service starts")
        try:
            ended = peer.wait_exit(args.timeout)
        except KeyboardInterrupt:
            return 128 + _signal.SIGINT
        if not ended:
            print(f"{args.name} (pid {pid}) is still running after {args.timeout:g} s", flush=True)
            return EXIT_TIMEOUT
        deadline = _time.monotonic() + RECORD_WAIT
        while True:
            line = describe_end(peer.table.read_slot(peer.slot), args.name, pid)
            if line is not None or _time.monotonic() > deadline:
                break
            _time.sleep(0.0002)         # the service records the end microseconds after zeroing
        print(line or f"{args.name} (pid {pid}) is gone; the service has not recorded how", flush=True)
        return EXIT_ENDED
