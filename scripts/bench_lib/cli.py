"""scripts/bench: argument parsing and the run.

get_psr() -> main(argv) -> run(), the pattern of pyroute2's dhcp/cli.py.
"""

import argparse as _argparse
import datetime as _datetime
import os as _os
import shlex as _shlex
import sys as _sys
import time as _time

from . import bigtargets as _bigtargets
from . import build as _build
from . import etcdfleet as _etcdfleet
from . import latency as _latency
from . import pictures as _pictures
from . import procs as _procs
from . import pwsuite as _pwsuite
from . import report as _report

ROOT = _os.path.dirname(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))))
HELPERS = ("cnlisten", "observer", "forker", "target", "pwwait", "cnrelay")
BASELINES = ("cn", "cn-default", "cn-py", "relay", "relay-py", "pidfd", "procpoll")
# The "random" condition: kills 5-100 ms after the peer sleeps (issue 16), for these only.
RANDOM_OBSERVERS = ("cn", "relay", "relay-py", "pw-futex", "pw-peer")
RANDOM_DELAY = (0.005, 0.100)
PROCWATCH = ("pw-futex", "pw-peer", "pw-pidfd")


class Ctx:
    """What every measurement of one run shares."""

    def __init__(self, args, bins, started):
        self.args = args
        self.bins = bins
        self.started = started
        self.final_deadline = started + args.max_seconds
        # The kill rows stop early enough for measurements 2-5.
        self.deadline = self.final_deadline - _pwsuite.reserve_seconds(args.quick)
        self.top_rate = None        # exits/s the storm reached alone

    def left(self):
        return self.deadline - _time.monotonic()

    def final_left(self):
        return self.final_deadline - _time.monotonic()

    def storm(self, seconds):
        return _procs.Storm(self.bins["forker"], rate=self.args.storm_rate,
                            workers=self.args.storm_workers, seconds=seconds)


def get_psr():
    cores = len(_os.sched_getaffinity(0))
    psr = _argparse.ArgumentParser(
        prog="scripts/bench",
        formatter_class=_argparse.ArgumentDefaultsHelpFormatter,
        description="Measure how soon a peer learns that a process died: procwatch against a bare "
                    "proc-connector listener, pidfd_open+poll and a /proc poller, idle and under an "
                    "exit storm. Prints a table, writes JSON and the markdown of BENCHMARKS.md.",
        epilog="Needs gcc (the helpers are compiled on the fly) and root for the proc connector. "
               "SIGINT/SIGTERM end the run; every process it started is ended by PID. "
               "Reproduce BENCHMARKS.md with: scripts/bench --markdown BENCHMARKS.md")
    psr.add_argument("--quick", action="store_true", help="~2 min run: fewer kills, shorter budget")
    psr.add_argument("--kills", type=int, default=None, help="kills per observer and condition (1000; --quick 500)")
    psr.add_argument("--observers", default=",".join(BASELINES + PROCWATCH),
                     help="observers of the kill rows (baselines and procwatch's)")
    psr.add_argument("--conditions", default="idle,random,storm",
                     help="idle (kill once the peer and the service sleep), random (kill 5-100 ms later: at "
                          "random moments of a quiet machine) and/or storm")
    psr.add_argument("--random-kills", type=int, default=None,
                     help="kills per observer in the random condition (300; --quick 120)")
    psr.add_argument("--rounds", type=int, default=None,
                     help="rounds the kills of each row are split into, the rows taking turns (5; --quick 3)")
    psr.add_argument("--storm-rate", type=int, default=0, help="storm exits/s; 0 = as fast as it goes")
    psr.add_argument("--storm-workers", type=int, default=cores, help="forking processes in the storm")
    psr.add_argument("--rcvbuf", type=int, default=8 << 20, help="SO_RCVBUFFORCE of the bare listener 'cn'")
    psr.add_argument("--poll-interval-ms", type=int, default=100, help="period of the /proc poller")
    psr.add_argument("--max-seconds", type=float, default=None, help="budget of the whole run (600; --quick 300)")
    psr.add_argument("--etcd-kills", type=int, default=None,
                     help="kills of the etcd row (issue 17; 500; --quick 200; 0 leaves the etcd rows out)")
    psr.add_argument("--etcd-lease-samples", type=int, default=20,
                     help="processes of the own-lease baseline row (each sample takes about etcd's minimum TTL)")
    psr.add_argument("--big-sizes", default=None,
                     help="MiB touched by the big targets (issue 14), comma-separated (64,1024,4096; --quick "
                          "64,1024: a 4 GiB target takes seconds to touch); a size is left out when memory is short")
    psr.add_argument("--big-kills", type=int, default=None,
                     help="kills per big-target row and size (10; --quick 5; 0 leaves the rows out)")
    psr.add_argument("--only-idle", action="store_true",
                     help="measure only the idle service (own CPU and wake-ups by table size, register_pid() "
                          "at 1024 and 65536 slots), nothing else")
    psr.add_argument("--only-big", action="store_true",
                     help="measure only the big-target rows (issue 14), nothing else")
    psr.add_argument("--out", default=_os.path.join(ROOT, "bench-out"), help="directory for JSON, markdown, helpers")
    psr.add_argument("--json", default=None, help="JSON path (OUT/bench.json)")
    psr.add_argument("--markdown", default=None, help="markdown path (OUT/BENCHMARKS.md)")
    return psr


def _merge_stats(parts):
    """One observer's stats over its rounds: counters summed, CPU as the sum of per-round deltas."""
    out = {"cpu_us": 0, "cpu_us_at_ready": 0}
    for st in parts:
        for k, v in st.items():
            if k == "cpu_us" and v is not None:
                out["cpu_us"] += v - st.get("cpu_us_at_ready", 0)
            elif k == "causes":
                for c, n in v.items():
                    out.setdefault("causes", {})[c] = out.get("causes", {}).get(c, 0) + n
            elif isinstance(v, int) and k != "cpu_us_at_ready":
                out[k] = out.get(k, 0) + v
            elif k not in out:
                out[k] = v
    return out


def _kill_row(obs, condition, res, stats, storm):
    lat = _report.summarize_ns([t1 - t0 for _, t0, t1, _ in res["samples"]])
    events = stats.get("events") or stats.get("seen") or 0
    row = {"observer": obs.label, "key": obs.key, "condition": condition,
           "kills": res["attempted"], "lost": len(res["lost"]), **lat,
           "storm_rate": storm.get("rate"), "cpu_us_per_event": None, "cpu_us_per_kill": None,
           "samples_us": [round((t1 - t0) / 1000, 1) for _, t0, t1, _ in res["samples"]],
           "enobufs": stats.get("enobufs"), "found_dead": stats.get("found_dead"), "observer_stats": stats}
    if events and stats.get("cpu_us") is not None:
        row["cpu_us_per_event"] = round((stats["cpu_us"] - stats.get("cpu_us_at_ready", 0)) / events, 2)
    if res["attempted"] and stats.get("cpu_us") is not None:
        # Every kill is one cycle: for procwatch a register_pid() and a kill; the
        # observer's CPU over the cycles, unrelated exits in between included.
        row["cpu_us_per_kill"] = round((stats["cpu_us"] - stats.get("cpu_us_at_ready", 0)) / res["attempted"], 1)
    if obs.has_kernel_ts:
        ks = [(t0, t1, k) for _, t0, t1, k in res["samples"] if k]
        row["kill_to_kernel"] = _report.summarize_ns([k - t0 for t0, _, k in ks])
        row["kernel_to_seen"] = _report.summarize_ns([t1 - k for _, t1, k in ks])
    return row


def measure_kills(ctx, observers):
    """Run every observer under every condition; return the rows and {id(row): [observers]}.

    ``observers``: (key, factory) pairs.  The kills of each condition run in
    ``--rounds`` rounds, every observer taking its turn in each round with a
    fresh instance, so that a burst of load from elsewhere on a shared
    machine falls on every row alike rather than on one.  Under storm one
    storm runs through all the rounds.
    """
    args = ctx.args
    conditions = args.conditions.split(",")
    rows, by_row = [], {}
    for ci, condition in enumerate(conditions):
        kills = args.random_kills if condition == "random" else args.kills
        rounds = max(1, min(args.rounds, kills))
        per_round = -(-kills // rounds)
        these = [(k, m) for k, m in observers if condition != "random" or k in RANDOM_OBSERVERS]
        budget = ctx.left() / (len(conditions) - ci)
        if budget < 5:
            print(f"bench: budget spent, skipping the {condition} rows", file=_sys.stderr)
            continue
        end = _time.monotonic() + budget
        acc = {key: {"samples": [], "lost": [], "attempted": 0, "stats": [], "obs": []} for key, _ in these}
        storm = ctx.storm(budget + 5) if condition == "storm" else _procs.null_storm()
        print(f"bench: {condition}: {rounds} rounds of {per_round} kills per observer", file=_sys.stderr)
        with storm:
            slots = rounds * len(these)
            for r in range(rounds):
                for oi, (key, make) in enumerate(these):
                    left = end - _time.monotonic()
                    if left < 1:
                        break
                    per = left / (slots - r * len(these) - oi)
                    a = acc[key]
                    if a.get("error"):
                        continue
                    obs = make()
                    try:
                        obs.start()
                        try:
                            res = _latency.measure(obs, ctx.bins["target"], per_round, _time.monotonic() + per,
                                                   seed=7 + r, delay=RANDOM_DELAY if condition == "random" else None)
                        finally:
                            stats = obs.stop()
                    except _procs.HelperDied as err:     # a row lost, not the run
                        a["error"] = str(err).splitlines()[0]
                        print(f"bench: {key} {condition}: {a['error']}; no more rounds for it", file=_sys.stderr)
                        continue
                    a["samples"] += res["samples"]
                    a["lost"] += res["lost"]
                    a["attempted"] += res["attempted"]
                    a["stats"].append(stats)
                    a["obs"].append(obs)
        for key, _ in these:
            a = acc[key]
            if not a["obs"]:
                continue
            row = _kill_row(a["obs"][0], condition, a, _merge_stats(a["stats"]), storm.result)
            if a.get("error"):
                row["error"] = a["error"]
            rows.append(row)
            by_row[id(row)] = a["obs"]
            print(f"bench: {key:>11} {condition:<5} {row['kills']} kills, {row['lost']} lost, "
                  f"p50 {row['p50_us']} µs, p99 {row['p99_us']} µs", file=_sys.stderr)
    # ratio of p50 to the bare listener's in the same condition
    floor = {r["condition"]: r["p50_us"] for r in rows if r["key"] == "cn" and r["p50_us"]}
    for r in rows:
        if r["p50_us"] and r["condition"] in floor:
            r["p50_vs_cn"] = round(r["p50_us"] / floor[r["condition"]], 2)
    return rows, by_row


def _observers(ctx):
    args, bins = ctx.args, ctx.bins
    made = {
        "cn": lambda: _latency.ConnectorObserver(bins["cnlisten"], rcvbuf=args.rcvbuf),
        "cn-default": lambda: _latency.ConnectorObserver(bins["cnlisten"], key="cn-default",
                                                         label="bare connector listener (C, default rcvbuf)"),
        "cn-py": lambda: _latency.ConnectorObserver(
            [_sys.executable, _os.path.join(_os.path.dirname(__file__), "pycnlisten.py")], rcvbuf=args.rcvbuf,
            key="cn-py", label=f"bare connector listener (Python, rcvbuf {args.rcvbuf >> 20} MiB)"),
        "relay": lambda: _latency.RelayObserver(bins["cnrelay"], bins["pwwait"], _pwsuite.private_key(),
                                                rcvbuf=args.rcvbuf),
        "relay-py": lambda: _latency.RelayObserver(
            bins["cnrelay"], [_sys.executable, _os.path.join(_os.path.dirname(__file__), "pywait.py")],
            _pwsuite.private_key(), rcvbuf=args.rcvbuf, python_waiter=True),
        "pidfd": lambda: _latency.WatchObserver(bins["observer"], "pidfd"),
        "procpoll": lambda: _latency.WatchObserver(bins["observer"], "procpoll", args.poll_interval_ms),
        **_pwsuite.observers(ctx),
    }
    out = []
    for key in [k.strip() for k in args.observers.split(",") if k.strip()]:
        if key not in made:
            raise SystemExit(f"bench: unknown observer '{key}' (known: {', '.join(made)})")
        out.append((key, made[key]))
    return out


def latency_sections(ctx, rows):
    alone = f"{ctx.top_rate:,.0f}" if ctx.top_rate else "not measured"
    storm_note = (f"storm: {ctx.args.storm_workers} processes forking+reaping (vfork) as fast as they can "
                  f"(alone: {alone} exits/s); one storm runs through all the rounds of the storm rows, and "
                  f"'storm exits/s' is what it reached over them"
                  if ctx.args.storm_rate == 0 else f"storm: asked for {ctx.args.storm_rate} exits/s")
    kill = {
        "id": "kill_to_seen",
        "title": "kill -> a peer sees the exit (µs, CLOCK_MONOTONIC, t0 right before kill(SIGKILL))",
        "columns": [["observer", "observer"], ["condition", "condition"], ["kills", "kills"], ["lost", "lost"],
                    ["p50_us", "p50"], ["p99_us", "p99"], ["max_us", "max"], ["p50_vs_cn", "p50 / cn"],
                    ["storm_rate", "storm exits/s"], ["cpu_us_per_event", "observer CPU µs/event"],
                    ["cpu_us_per_kill", "observer CPU µs/kill"],
                    ["enobufs", "ENOBUFS"], ["found_dead", "found dead"]],
        "rows": rows,
        "notes": [f"{ctx.args.kills} kills per row in {ctx.args.rounds} rounds: each round runs every observer in turn, "
                  "so load from elsewhere falls on all rows alike; t1 is taken by the observer process",
                  storm_note,
                  "lost = not reported within the observer's timeout; a connector listener loses exits "
                  "when its receive buffer overflows (ENOBUFS)",
                  "observer CPU µs/event: the observer's utime+stime after start-up over the events it received "
                  "(for connector listeners: every exit of the storm, each an unrelated exit)",
                  "observer CPU µs/kill: the same CPU (utime+stime of the whole process, every thread, ended "
                  "ones included, from READY to the row's last kill) over the kills; for procwatch (the service "
                  "process) each kill is one register_pid() + kill cycle (the registration, its sync and log "
                  "line, the exit, its record, log line and respawn), plus the service's idle CPU between "
                  "kills and the unrelated exits of the machine meanwhile; /proc/PID/stat counts in clock "
                  "ticks, so each round's figure is good to one tick (10 ms at 100 Hz) over its kills",
                  f"random: {ctx.args.random_kills} kills per row, each {RANDOM_DELAY[0] * 1000:g}-"
                  f"{RANDOM_DELAY[1] * 1000:g} ms (uniform) after the peer sleeps, so the kill falls at a random "
                  "moment of the observer's life; relay-py is the relay with a Python futex waiter, the baseline "
                  "of pw-peer",
                  *_pwsuite.notes_for_latency(ctx),
                  *[f"{r['key']} {r['condition']}: rounds stopped early: {r['error']}" for r in rows if r.get("error")]],
    }
    krows = []
    for r in rows:
        if "kill_to_kernel" in r:
            a, b = r["kill_to_kernel"], r["kernel_to_seen"]
            krows.append({"observer": r["observer"], "condition": r["condition"], "n": a["n"],
                          "k_p50": a["p50_us"], "k_p99": a["p99_us"], "k_max": a["max_us"],
                          "s_p50": b["p50_us"], "s_p99": b["p99_us"], "s_max": b["max_us"]})
    kern = {
        "id": "kernel_ts",
        "title": "kernel event timestamp (ktime_get_ns in the EXIT event) against kill and observer (µs)",
        "columns": [["observer", "observer"], ["condition", "condition"], ["n", "n"],
                    ["k_p50", "kill->event p50"], ["k_p99", "p99"], ["k_max", "max"],
                    ["s_p50", "event->seen p50"], ["s_p99", "p99"], ["s_max", "max"]],
        "rows": krows,
        "notes": ["kill->event: the kernel's own work (signal delivery, scheduling the victim, do_exit); "
                  "event->seen: socket queue + wake-up + the observer's recv and decode"],
    }
    return [kill, kern]


def calibrate(ctx):
    """The storm's exit rate with nothing else running: 'the machine's top exit rate'."""
    with _procs.Storm(ctx.bins["forker"], rate=0, workers=ctx.args.storm_workers, seconds=1.0, warmup=0) as s:
        _time.sleep(0.8)
    return s.result.get("rate") or 0


def main(argv=None):
    psr = get_psr()
    args = psr.parse_args(argv)
    if args.kills is None:
        args.kills = 500 if args.quick else 1000
    if args.random_kills is None:
        args.random_kills = 120 if args.quick else 300
    if args.rounds is None:
        args.rounds = 3 if args.quick else 5
    if args.etcd_kills is None:
        args.etcd_kills = 200 if args.quick else 500
    if args.max_seconds is None:
        args.max_seconds = 300.0 if args.quick else 600.0
    if args.big_kills is None:
        args.big_kills = 5 if args.quick else 10
    if args.big_sizes is None:
        args.big_sizes = "64,1024" if args.quick else "64,1024,4096"
    if args.kills < 1 or args.rounds < 1 or args.storm_workers < 1 or args.storm_workers > 64:
        psr.error("--kills and --rounds must be >= 1 and --storm-workers in 1..64")
    args.conditions = ",".join(c.strip() for c in args.conditions.split(",") if c.strip())
    if not args.conditions or set(args.conditions.split(",")) - {"idle", "random", "storm"}:
        psr.error("--conditions takes idle, random and/or storm, comma separated")
    if _os.geteuid() != 0:
        print("bench: not root: the proc connector needs CAP_NET_ADMIN; connector rows will fail", file=_sys.stderr)
    _procs.install_cleanup()
    started_wall = _datetime.datetime.now(_datetime.timezone.utc).replace(microsecond=0).isoformat()
    started = _time.monotonic()
    _os.makedirs(args.out, exist_ok=True)
    try:
        bins = _build.build_all(HELPERS, args.out)
    except _build.BuildError as err:
        print(f"bench: {err}", file=_sys.stderr)
        return 1
    ctx = Ctx(args, bins, started)
    machine = _report.machine()
    if args.only_idle and args.only_big:
        psr.error("--only-idle and --only-big each measure one section: give one")
    if "storm" in args.conditions.split(",") and not (args.only_big or args.only_idle):
        ctx.top_rate = calibrate(ctx)
        print(f"bench: storm alone reaches {ctx.top_rate:,.0f} exits/s with {args.storm_workers} workers",
              file=_sys.stderr)
    if args.only_big:
        rows = []                       # no kill-latency rows: only the big-target section
        sections = [_bigtargets.section(ctx)]
    elif args.only_idle:
        rows = []                       # no kill-latency rows: only the idle section
        sections = [_pwsuite.idle_cost(ctx, 4.0 if args.quick else 8.0)]
    else:
        observers = _observers(ctx)
        rows, by_row = measure_kills(ctx, observers)
        head, tail = _pwsuite.sections(ctx, rows, by_row)
        sections = head + latency_sections(ctx, rows) + tail + [_etcdfleet.section(ctx)]
        if args.big_kills:
            sections.append(_bigtargets.section(ctx))
    machine["storm_top_rate"] = ctx.top_rate
    machine["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    result = {"machine": machine,
              "command": "scripts/bench " + " ".join(_shlex.quote(a) for a in (argv if argv is not None else _sys.argv[1:])),
              "started": started_wall, "seconds": round(_time.monotonic() - started, 1),
              "args": vars(args), "sections": sections}
    json_path = args.json or _os.path.join(args.out, "bench.json")
    md_path = args.markdown or _os.path.join(args.out, "BENCHMARKS.md")
    result["pictures"] = _pictures.draw(result, rows, _os.path.dirname(_os.path.abspath(md_path)))
    for r in rows:
        r.pop("samples_us", None)       # drawn; the JSON keeps the summaries
    _report.write_json(result, json_path)
    _report.write_markdown(result, md_path)
    print(f"bench: wrote {json_path} and {md_path}", file=_sys.stderr)
    print(_report.table(result), flush=True)
    return 0


def run():
    _sys.exit(main())
