"""Command line: ``procwatch serve | status | check-config | run | wait | events``, and ``--include-dir``.

Exit statuses follow the LSB convention that ``systemctl status`` uses:
0 fine, 1 a runtime failure (the one-line message of a ProcwatchError),
2 a usage error (argparse), 3 ``status`` found no running service.
"""

import argparse as _argparse
import json as _json
import logging as _logging
import os as _os
import sys as _sys
import time as _time

from . import __version__
from . import abi as _abi
from .errors import ProcwatchError, SegmentMissing

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_NOT_RUNNING = 0, 1, 2, 3

_EPILOG = """\
environment:
  PROCWATCH_KEY   SysV key of the slot table when --key is not given
                  (default 0x70770001)

signals (serve):
  SIGTERM, SIGINT  stop cleanly; the table stays, so clients keep their slots
  SIGHUP           reload the configuration file (a bad file is refused, logged)

exit status:
  0 success, 1 runtime failure, 2 usage error, 3 service not running (status)

files:
  /etc/procwatch/procwatch.toml  configuration (serve --config FILE to use another)
  docs/ABI.md      the slot table's layout, for clients in other languages
  procwatch.h      the C client: cc -I"$(procwatch --include-dir)" client.c

See 'procwatch COMMAND --help' for each command."""


def _key(text):
    try:
        key = int(text, 0)
    except ValueError:
        raise _argparse.ArgumentTypeError(f"{text!r} is not an integer key (e.g. 0x70770001)") from None
    if not 0 < key <= 0x7FFFFFFF:
        raise _argparse.ArgumentTypeError(f"key {text} is out of range 1..0x7fffffff")
    return key


def _positive_int(lo, hi):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise _argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not lo <= v <= hi:
            raise _argparse.ArgumentTypeError(f"{v} is out of range {lo}..{hi}")
        return v
    return parse


def _seconds(text):
    try:
        v = float(text)
    except ValueError:
        raise _argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < v <= 3600:
        raise _argparse.ArgumentTypeError(f"{v:g} s is out of range (0, 3600]")
    return v


def _signal_arg(text):
    from .client import hang_signal_value
    try:
        return hang_signal_value(text)
    except ValueError as e:
        raise _argparse.ArgumentTypeError(str(e)) from None


def _interval(text):
    v = _seconds(text)
    if v < 0.05:
        raise _argparse.ArgumentTypeError(f"{v:g} s is too short: use at least 0.05")
    return v


class _IncludeDir(_argparse.Action):
    """``--include-dir``: print where procwatch.h is, then exit (like --version)."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=_argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        from . import cheader
        print(cheader.include_dir())
        parser.exit()


def build_parser():
    fmt = _argparse.RawDescriptionHelpFormatter
    p = _argparse.ArgumentParser(
        prog="procwatch", formatter_class=fmt, epilog=_EPILOG,
        description="Tell other processes, within a millisecond, that a watched process "
                    "has died or hung.\n\nClients register in a SysV shared-memory slot table; "
                    "the service zeroes a\nslot's PID word the moment the kernel reports that "
                    "process's exit.")
    p.add_argument("--version", action="version", version=f"procwatch {__version__}")
    p.add_argument("--include-dir", action=_IncludeDir,
                   help="print the directory of the C header procwatch.h, and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    key_help = "SysV key of the slot table (default: $PROCWATCH_KEY, else 0x70770001)"

    s = sub.add_parser(
        "serve", formatter_class=fmt, help="run the service in the foreground",
        description="Create (or re-adopt) the slot table and watch every registered process.\n\n"
                    "On a registered process's exit, zero its slot's PID word, wake the peers\n"
                    "waiting on it, record the exit status and log one line (journald when\n"
                    "available, else stderr).  The proc connector needs CAP_NET_ADMIN in the\n"
                    "initial namespaces; elsewhere --backend auto falls back to pidfd.",
        epilog="Options given here win over the configuration file; options left out\n"
               "come from the file, else from the built-in defaults shown.\n\n"
               "signals:\n  SIGTERM, SIGINT  stop cleanly; the table stays for the clients\n"
               "  SIGHUP           reload the configuration file; a bad file is refused and\n"
               "                   logged, and the old settings stay (key, slots, backend,\n"
               "                   rcvbuf and group need a restart)\n\n"
               "example:\n  sudo procwatch serve --config /etc/procwatch/procwatch.toml --slots 4096")
    # Defaults of None: "not given", so the file's value applies (config.merge).
    s.add_argument("--config", metavar="FILE",
                   help="configuration file (default /etc/procwatch/procwatch.toml; "
                        "when that is missing, the built-in defaults)")
    s.add_argument("--key", type=_key, help=key_help + ", else the file's service.key")
    s.add_argument("--slots", type=_positive_int(1, _abi.MAX_SLOTS),
                   help=f"slots of a new table (default {_abi.DEFAULT_SLOTS}; an adopted table keeps its own)")
    s.add_argument("--backend", choices=("auto", "connector", "pidfd"),
                   help="exit-detection backend (default auto: the proc connector where it "
                        "works, else pidfd; the 'started' log line says which and why)")
    s.add_argument("--rcvbuf", type=_positive_int(4096, 1 << 30), metavar="BYTES",
                   help="connector socket receive buffer (default 4 MiB)")
    s.add_argument("--reconcile-interval", type=_seconds, metavar="S",
                   help="seconds between full checks of the table (default 1.0)")
    s.add_argument("--group", metavar="NAME",
                   help="group that owns the table (mode 0660); its members may register "
                        "(default: 'procwatch' if that group exists, else root's)")
    s.add_argument("--hang-action", choices=("kill", "log"),
                   help="what to do to a hung process whose slot does not say (default kill)")
    s.add_argument("--hang-signal", type=_signal_arg, metavar="NAME",
                   help="signal for the kill action (default SIGKILL; SIGABRT dumps core)")
    s.add_argument("--max-misses", type=_positive_int(1, 1000), metavar="N",
                   help="heartbeat checks in a row without progress before a process is hung "
                        "(default 3)")
    s.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics, e.g. 127.0.0.1:9464 "
                        "(default off; 'off' turns off what the file enables)")
    s.add_argument("--log", choices=("auto", "journal", "stderr"), default="auto",
                   help="where events go (default %(default)s: journald if reachable)")
    s.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   help="least severe events to log (default info)")

    c = sub.add_parser(
        "check-config", formatter_class=fmt, help="check a configuration file without starting anything",
        description="Parse and check a configuration file as 'serve' and SIGHUP would.",
        epilog="exit status:\n  0 the file is valid (or the default file is absent: built-in defaults),\n"
               "  1 it is not: one line names the file, the line, the key and what was expected\n\n"
               "example:\n  procwatch check-config /etc/procwatch/procwatch.toml && systemctl reload procwatch")
    c.add_argument("file", nargs="?", metavar="FILE",
                   help="the file to check (default /etc/procwatch/procwatch.toml)")

    st = sub.add_parser(
        "status", formatter_class=fmt, help="show the service and the registered processes",
        description="Show whether the service runs, then one row per used slot.",
        epilog="exit status:\n  0 the service runs, 3 it does not (or no table exists), 1 error\n\n"
               "--json prints one object: {\"key\", \"service\": {\"pid\", \"alive\", \"backend\",\n"
               "\"heartbeat\"}, \"slot_count\", \"exits\", \"slots\": [{\"slot\", \"name\", \"pid\",\n"
               "\"state\", \"since\", \"cause\", \"exit_status\", \"exit_code\", \"signal\",\n"
               "\"core_dumped\", \"latency_us\", \"heartbeat_ms\", \"misses\", \"last_beat_age_s\",\n"
               "\"hang_action\", \"hang_signal\", \"kill_sent\"}]}.\n"
               "Times are Unix seconds; absent values are null.  hang_action and hang_signal are\n"
               "the slot's own (null: the service's --hang-action, --hang-signal); kill_sent is\n"
               "true while a hung process has been sent its signal and has not exited yet.")
    st.add_argument("--key", type=_key, help=key_help)
    st.add_argument("--json", action="store_true", help="machine-readable output (stable schema)")
    st.add_argument("--watch", action="store_true",
                    help="a live view refreshed in place, like top (q or Ctrl-C quits); "
                         "when stdout is not a terminal, one plain table per refresh")
    st.add_argument("--interval", type=_interval, default=1.0, metavar="S",
                    help="seconds between refreshes with --watch (default %(default)s)")
    st.add_argument("--count", type=_positive_int(1, 1 << 31), metavar="N",
                    help="with --watch, stop after N refreshes (default: until q or Ctrl-C)")

    from . import runwait
    runwait.add_parsers(sub, fmt, _key, key_help)
    from . import events
    events.add_parser(sub, fmt)
    from . import fleetcmd
    fleetcmd.add_parser(sub, fmt)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from . import runwait
        from .events import cmd_events
        if args.command == "fleet":
            from . import fleetcmd
            return fleetcmd.run(args)
        return {"serve": cmd_serve, "status": cmd_status, "check-config": cmd_check_config,
                "run": runwait.cmd_run, "wait": runwait.cmd_wait, "events": cmd_events}[args.command](args)
    except ProcwatchError as e:
        print(f"procwatch: {e}", file=_sys.stderr)
        return EXIT_FAILURE
    except ValueError as e:            # bad values that argparse could not see (env)
        print(f"procwatch: {e}", file=_sys.stderr)
        return EXIT_USAGE


def serve_config(args):
    """(config, loader): the file merged with the options given, and how to
    redo that on SIGHUP.  Precedence: --key, $PROCWATCH_KEY, the file, built-in."""
    from . import config
    from .segment import resolve_key
    overrides = {name: getattr(args, name, None) for name in config.OVERRIDES}
    if overrides["key"] is None and _os.environ.get("PROCWATCH_KEY"):
        overrides["key"] = resolve_key(None)
    if overrides["hang_signal"] is not None:        # _signal_arg gives a number; the file a name
        import signal
        overrides["hang_signal"] = signal.Signals(overrides["hang_signal"]).name

    def load():
        return config.merge(config.load(args.config), overrides)
    return load(), load


def cmd_serve(args):
    from . import journal
    from .service import Service
    cfg, loader = serve_config(args)
    journal.setup(args.log, getattr(_logging, cfg.log_level.upper()))
    service = Service(key=cfg.key, slots=cfg.slots, backend=cfg.backend, rcvbuf=cfg.rcvbuf,
                      reconcile_interval=cfg.reconcile_interval, group=cfg.group,
                      hang_action=_abi.HangAction[cfg.hang.action.upper()],
                      hang_signal=cfg.hang.signal, max_misses=cfg.hang.max_misses,
                      config=cfg, load_config=loader)
    return service.run()


def cmd_check_config(args):
    from . import config
    if args.file is None and not _os.path.exists(config.DEFAULT_PATH):
        print(f"{config.DEFAULT_PATH}: no such file; 'procwatch serve' would run with the built-in defaults")
        return EXIT_OK
    cfg = config.load(args.file)      # ConfigError: main() prints its one line, exit 1
    rules = len(cfg.rules)
    etcd = "etcd off"
    if cfg.etcd is not None:
        from . import fleet
        fleet.check_files(cfg.etcd)     # EtcdCredentials: one line, exit 1
        etcd = f"etcd {','.join(cfg.etcd.endpoints)} as host {fleet.host_of(cfg.etcd)}"
    print(f"{cfg.path}: OK ({rules} rule{'' if rules == 1 else 's'}, "
          f"metrics {cfg.metrics or 'off'}, {etcd}, key {cfg.key:#010x})")
    return EXIT_OK


def _slot_json(s, now_ns):
    import signal
    status = s.exit_status if s.exit_status != _abi.EXIT_STATUS_UNKNOWN and s.state in (
        _abi.State.EXITED,) else None
    code = sig = core = None
    if status is not None:
        if _os.WIFSIGNALED(status):
            try:
                sig = signal.Signals(_os.WTERMSIG(status)).name
            except ValueError:
                sig = str(_os.WTERMSIG(status))
            core = bool(_os.WCOREDUMP(status))
        else:
            code = _os.WEXITSTATUS(status)
    ended = s.state in (_abi.State.EXITED, _abi.State.FOUND_DEAD, _abi.State.UNREGISTERED)
    return {
        "slot": s.index, "name": s.name, "pid": s.pid, "state": s.state_name,
        "since": (s.exit_time_ns if ended else s.registered_ns) / 1e9 or None,
        "cause": s.cause_name if ended else None,
        "exit_status": status, "exit_code": code, "signal": sig, "core_dumped": core,
        "latency_us": None if s.latency_us == _abi.LATENCY_UNKNOWN else s.latency_us,
        "heartbeat_ms": s.heartbeat_ms,
        "misses": s.misses,
        "last_beat_age_s": round((now_ns - s.last_beat_ns) / 1e9, 3) if s.heartbeat_ms and s.last_beat_ns else None,
        "hang_action": _hang_action_name(s.heartbeat_action),
        "hang_signal": _signal_name(s.heartbeat_signal) if s.heartbeat_signal else None,
        "kill_sent": s.state == _abi.State.HUNG and s.cause == _abi.Cause.KILLED_HUNG,
    }


def _hang_action_name(value):
    """The slot's own hang action, or None for the service's default."""
    try:
        action = _abi.HangAction(value)
    except ValueError:
        return f"invalid({value})"
    return None if action == _abi.HangAction.DEFAULT else action.name.lower()


def _signal_name(num):
    import signal
    try:
        return signal.Signals(num).name
    except ValueError:
        return str(num)


def _age(seconds):
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h ago"
    return f"{seconds / 86400:.0f} d ago"


def status_snapshot(key=None):
    """The data of ``procwatch status --json`` (None when no table exists)."""
    from . import client
    from .segment import Table
    try:
        table = Table.attach(key)
    except SegmentMissing:
        return None
    try:
        h = table.header()
        now_ns = _time.time_ns()
        alive = client.monitor_alive(table.key)
        try:
            backend = _abi.Backend(h["backend"]).name.lower()
        except ValueError:
            backend = f"invalid({h['backend']})"
        return {
            "key": f"{table.key:#010x}",
            "service": {"pid": h["service_pid"] or None, "alive": alive,
                        "backend": backend if alive else None, "heartbeat": h["service_heartbeat"]},
            "slot_count": table.slot_count,
            "exits": h["exits"],
            "slots": [_slot_json(s, now_ns) for s in table.used_slots()],
        }
    finally:
        table.detach()


def cmd_status(args):
    from .segment import resolve_key
    key = resolve_key(args.key)
    if args.watch:
        if args.json:
            raise ValueError("--watch and --json do not combine: poll 'status --json' instead")
        from . import liveview
        return liveview.run(key, args.interval, args.count)
    snap = status_snapshot(key)
    if snap is None:
        if args.json:
            print(_json.dumps({"key": f"{key:#010x}", "service": {"pid": None, "alive": False},
                               "slots": []}))
        else:
            print(f"procwatch: no slot table at key {key:#010x}: the service is not running")
        return EXIT_NOT_RUNNING
    if args.json:
        print(_json.dumps(snap, indent=2))
    else:
        print(format_status(snap))
    return EXIT_OK if snap["service"]["alive"] else EXIT_NOT_RUNNING


def format_status(snap):
    svc = snap["service"]
    if svc["alive"]:
        head = f"procwatch: running, PID {svc['pid']}, {svc['backend']} backend"
    else:
        head = "procwatch: NOT running" + (f" (last PID {svc['pid']})" if svc["pid"] else "")
    used = snap["slots"]
    live = sum(1 for s in used if s["state"] in ("alive", "hung"))
    lines = [head, f"table {snap['key']}: {live} live, {len(used)} used of {snap['slot_count']} slots, "
                   f"{snap['exits']} exits", ""]
    now = _time.time()
    rows = [("SLOT", "NAME", "PID", "STATE", "SINCE", "LAST EXIT", "BEAT")]
    for s in used:
        if s["signal"]:
            last = f"killed by {s['signal']}" + (" (core)" if s["core_dumped"] else "")
        elif s["exit_code"] is not None:
            last = f"exit code {s['exit_code']}"
        elif s["cause"]:
            last = s["cause"].replace("_", " ")
        else:
            last = "-"
        if s["cause"] == "killed_hung":
            last += ", hung"
        beat = "-"
        if s["heartbeat_ms"]:
            age = s["last_beat_age_s"]
            age = f"{age:.1f} s ago" if age is not None and age < 10 else _age(age)
            beat = f"{s['heartbeat_ms'] / 1000:g}s/{age}/{s['misses']} missed"
            if s["hang_action"] or s["hang_signal"]:
                beat += f" ({s['hang_action'] or 'kill'}" + (f" {s['hang_signal']})" if s["hang_signal"] else ")")
            if s["kill_sent"]:
                beat += ", kill sent"
        rows.append((str(s["slot"]), s["name"], str(s["pid"] or "-"), s["state"],
                     _age(now - s["since"]) if s["since"] else "-", last, beat))
    if len(rows) == 1:
        lines.append("no registered processes")
    else:
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    _sys.exit(main())
