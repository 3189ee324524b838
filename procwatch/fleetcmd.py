"""``procwatch fleet`` and ``procwatch wait HOST/NAME --etcd``: the fleet seen from etcd.

Both read what the services of every host publish (procwatch/fleet.py):
``<prefix><host>/<name>`` while a process is alive or hung, and
``<prefix>ended/<host>/<name>`` for a while after it ended.  They need no
local service and no slot table, only etcd: the endpoints given with
``--etcd``, else the ``[etcd]`` table of the configuration file (which also
gives TLS and authentication).

``wait`` reads the key and its revision, then watches the key from the next
revision, so a delete between the two cannot be missed.  The service
deletes the key and writes the ended record in one transaction, so the
record is there when the delete is seen.  A delete with no record means
the lease expired: the service or the whole host went away, and how the
process ended is unknown.
"""

import json as _json
import queue as _queue
import sys as _sys
import time as _time

from . import config as _config

EXIT_ENDED, EXIT_FAILURE, EXIT_NO_SUCH_NAME, EXIT_TIMEOUT = 0, 1, 2, 124   # as the local 'wait'


def add_arguments(p):
    """--etcd / --config / --prefix, shared by 'fleet' and 'wait'."""
    p.add_argument("--config", metavar="FILE",
                   help="configuration file whose [etcd] table gives the endpoints, TLS and "
                        f"authentication (default {_config.DEFAULT_PATH})")
    p.add_argument("--prefix", metavar="PREFIX", help="key prefix (default: the file's, else /procwatch/)")


def add_parser(sub):
    from .argtypes import FORMATTER
    f = sub.add_parser(
        "fleet", formatter_class=FORMATTER, help="list every host's processes from etcd",
        description="List the processes the procwatch services of every host publish to etcd\n"
                    "(alive or hung), then those that ended recently and how.",
        epilog="exit status:\n  0 listed (even if empty), 1 etcd unreachable or refused us\n\n"
               "--json prints one object: {\"prefix\", \"processes\": [{\"host\", \"name\", \"pid\",\n"
               "\"start_time\", \"state\", \"heartbeat_ms\", \"since\", \"slot\"}], \"ended\": [{\"host\",\n"
               "\"name\", \"pid\", \"start_time\", \"event\", \"cause\", \"exit_code\", \"signal\",\n"
               "\"core_dumped\", \"time\", \"latency_us\"}]}; times are Unix seconds.\n\n"
               "example:\n  procwatch fleet --etcd http://etcd-1:2379 --watch")
    f.add_argument("--etcd", metavar="URLS",
                   help="comma-separated etcd client URLs (default: the file's [etcd] endpoints)")
    add_arguments(f)
    f.add_argument("--json", action="store_true", help="machine-readable output")
    f.add_argument("--watch", action="store_true",
                   help="list again at every change, as etcd reports it (Ctrl-C quits)")
    f.add_argument("--count", type=int, metavar="N", help="with --watch, stop after N listings")
    f.set_defaults(run=run)
    return f


def settings_from(args):
    """EtcdSettings from --etcd/--prefix over the configuration file's [etcd] table."""
    cfg = _config.load(args.config)
    base = cfg.etcd
    urls = getattr(args, "etcd", None)
    if urls:
        endpoints = _config.command_line("--etcd", "endpoints",
                                         [u.strip() for u in urls.split(",") if u.strip()])
        base = _config.EtcdSettings(endpoints=endpoints) if base is None else \
            _config.EtcdSettings(**{**base.__dict__, "endpoints": endpoints})
    if base is None:
        raise _config.ConfigError(cfg.path or _config.DEFAULT_PATH, None, None,
                                  "no [etcd] table: pass --etcd http://HOST:2379 or add the table")
    if args.prefix:
        prefix = _config.command_line("--prefix", "prefix", args.prefix)
        base = _config.EtcdSettings(**{**base.__dict__, "prefix": prefix})
    return base


# -- fleet ------------------------------------------------------------------------

def snapshot(client, settings):
    """The data of ``fleet --json``."""
    from .fleet import split_key
    procs, ended = [], []
    for value, meta in client.get_prefix(settings.prefix):
        where = split_key(settings.prefix, meta.key)
        if where is None:
            continue
        is_ended, host, name = where
        try:
            data = _json.loads(value)
        except ValueError:
            data = {"invalid": value.decode("utf-8", "replace")}
        (ended if is_ended else procs).append({"host": host, "name": name, **data})
    procs.sort(key=lambda p: (p["host"], p["name"]))
    ended.sort(key=lambda p: p.get("time") or 0, reverse=True)
    return {"prefix": settings.prefix, "processes": procs, "ended": ended}


def _age(t, now):
    from .status import age_text
    return age_text(max(0.0, now - t)) if t else "-"


def _columns(rows):
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def format_fleet(snap):
    from .fleet import describe_ended
    now = _time.time()
    hosts = sorted({p["host"] for p in snap["processes"]})
    lines = [f"etcd prefix {snap['prefix']}: {len(snap['processes'])} live on {len(hosts)} "
             f"host{'' if len(hosts) == 1 else 's'}, {len(snap['ended'])} ended recently", ""]
    rows = [("HOST", "NAME", "PID", "STATE", "SINCE", "HEARTBEAT")]
    for p in snap["processes"]:
        beat = f"{p['heartbeat_ms'] / 1000:g} s" if p.get("heartbeat_ms") else "-"
        rows.append((p["host"], p["name"], str(p.get("pid", "?")), str(p.get("state", "?")),
                     _age(p.get("since"), now), beat))
    lines += _columns(rows) if len(rows) > 1 else ["no live processes"]
    if snap["ended"]:
        lines.append("")
        rows = [("HOST", "NAME", "ENDED", "HOW")]
        for e in snap["ended"]:
            how = describe_ended(e["name"], e).split(") ", 1)[-1]
            rows.append((e["host"], e["name"], _age(e.get("time"), now), how))
        lines += _columns(rows)
    return "\n".join(lines)


def run(args):
    from .fleet import connect
    settings = settings_from(args)
    client = connect(settings)
    try:
        if not args.watch:
            snap = snapshot(client, settings)
            print(_json.dumps(snap, indent=2) if args.json else format_fleet(snap))
            return EXIT_ENDED
        show = _json.dumps if args.json else format_fleet
        events = _queue.Queue()
        client.add_watch_prefix_callback(settings.prefix, events.put)
        tty = _sys.stdout.isatty() and not args.json
        shown = 0
        try:
            while True:
                text = show(snapshot(client, settings))
                if tty:
                    _sys.stdout.write("\x1b[H\x1b[J" + text + "\n")
                else:
                    _sys.stdout.write(text + ("\n" if args.json else "\n\n"))
                _sys.stdout.flush()
                shown += 1
                if args.count and shown >= args.count:
                    return EXIT_ENDED
                item = events.get()
                while True:         # one listing per burst of changes
                    if not hasattr(item, "events"):
                        raise _broken(item, settings)
                    try:
                        item = events.get(timeout=0.05)
                    except _queue.Empty:
                        break
        except KeyboardInterrupt:
            return EXIT_ENDED
    finally:
        from .fleet import close
        close(client)


def _broken(item, settings):
    """The error for what a watch callback got instead of a response (None: the stream ended)."""
    from .fleet import EtcdUnavailable, translate
    err = translate(item, settings) if item is not None else None
    return err or EtcdUnavailable(settings.endpoints, f"the watch stream ended ({item!r})")


# -- wait HOST/NAME ------------------------------------------------------------------

def _say(message):
    print(f"procwatch wait: {message}", file=_sys.stderr, flush=True)


def wait(args):
    """``procwatch wait HOST/NAME --etcd [URLS]``; exit statuses as the local wait."""
    from .fleet import close, connect, describe_ended, ended_key, live_key
    host, sep, name = args.name.partition("/")
    if not sep or not host or not name:
        _say(f"{args.name!r}: with --etcd, give HOST/NAME (the host's [etcd] host, then the name)")
        return EXIT_NO_SUCH_NAME
    settings = settings_from(args)
    client = connect(settings)
    who = f"{host}/{name}"
    try:
        key, done_key = live_key(settings, name, host), ended_key(settings, name, host)
        resp = client.get_response(key)
        if not resp.kvs:
            value, _ = client.get(done_key)
            if value is None:
                _say(f"no process {who} under {settings.prefix} in etcd (check the host and the name: "
                     "procwatch fleet lists them)")
                return EXIT_NO_SUCH_NAME
            print(describe_ended(who, _json.loads(value)), flush=True)
            return EXIT_ENDED
        live = _json.loads(resp.kvs[0].value)
        pid = live.get("pid")
        if args.timeout == 0:
            print(f"{who} (pid {pid}) is still running", flush=True)
            return EXIT_TIMEOUT
        events = _queue.Queue()
        client.add_watch_callback(key, events.put, start_revision=resp.header.revision + 1)
        deadline = None if args.timeout is None else _time.monotonic() + args.timeout
        try:
            while True:
                left = None if deadline is None else max(0.0, deadline - _time.monotonic())
                try:
                    item = events.get(timeout=left)
                except _queue.Empty:
                    print(f"{who} (pid {pid}) is still running after {args.timeout:g} s", flush=True)
                    return EXIT_TIMEOUT
                if not hasattr(item, "events"):
                    raise _broken(item, settings)
                if any(type(e).__name__ == "DeleteEvent" for e in item.events):
                    break
        except KeyboardInterrupt:
            return 130
        value, _ = client.get(done_key)
        record = _json.loads(value) if value is not None else None
        if record is not None and record.get("pid") == pid:
            print(describe_ended(who, record), flush=True)
        else:
            print(f"{who} (pid {pid}) is gone: its lease expired (the procwatch service or the host "
                  f"{host} went away); how it ended is unknown", flush=True)
        return EXIT_ENDED
    finally:
        close(client)
