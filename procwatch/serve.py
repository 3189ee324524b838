"""``procwatch serve`` and ``procwatch check-config``: the service, and its configuration checked.

The options of ``serve`` win over the configuration file, which wins over
the built-in defaults (config.merge); :func:`serve_config` returns the
merged configuration and the loader that redoes the merge on SIGHUP.
"""

import logging as _logging
import os as _os

from . import abi as _abi
from . import argtypes as _argtypes

EXIT_OK = 0


def add_parser(sub):
    s = sub.add_parser(
        "serve", formatter_class=_argtypes.FORMATTER, help="run the service in the foreground",
        description="Create (or re-adopt) the slot table and watch every registered process.\n\n"
                    "On a registered process's exit, zero its slot's PID word, wake the peers\n"
                    "waiting on it, record the exit status and log one line (journald when\n"
                    "available, else stderr).  The proc connector needs the initial namespaces\n"
                    "(and CAP_NET_ADMIN before Linux 6.6); elsewhere --backend auto falls back\n"
                    "to pidfd.",
        epilog="Options given here win over the configuration file; options left out\n"
               "come from the file, else from the built-in defaults shown.\n\n"
               "signals:\n  SIGTERM, SIGINT  stop cleanly; the table stays for the clients\n"
               "  SIGHUP           reload the configuration file; a bad file is refused and\n"
               "                   logged, and the old settings stay (key, slots, backend,\n"
               "                   rcvbuf, group, death_word_priority and\n"
               "                   teardown_yield_ms need a restart)\n\n"
               "example:\n  sudo procwatch serve --config /etc/procwatch/procwatch.toml --slots 4096")
    # Defaults of None: "not given", so the file's value applies (config.merge).
    s.add_argument("--config", metavar="FILE",
                   help="configuration file (default /etc/procwatch/procwatch.toml; "
                        "when that is missing, the built-in defaults)")
    s.add_argument("--key", type=_argtypes.key, help=_argtypes.KEY_HELP + ", else the file's service.key")
    s.add_argument("--slots", type=_argtypes.positive_int(1, _abi.MAX_SLOTS),
                   help=f"slots of a new table (default {_abi.DEFAULT_SLOTS}; an adopted table keeps its own)")
    s.add_argument("--backend", choices=("auto", "connector", "pidfd"),
                   help="exit-detection backend (default auto: the proc connector where it "
                        "works, else pidfd; the 'started' log line says which and why)")
    s.add_argument("--rcvbuf", type=_argtypes.positive_int(4096, 1 << 30), metavar="BYTES",
                   help="connector socket receive buffer (default 4 MiB)")
    s.add_argument("--reconcile-interval", type=_argtypes.seconds(), metavar="S",
                   help="seconds between full checks of the table (default 1.0)")
    s.add_argument("--group", metavar="NAME",
                   help="group that owns the table (mode 0660); its members may register "
                        "(default: 'procwatch' if that group exists, else root's)")
    s.add_argument("--hang-action", choices=("kill", "log"),
                   help="what to do to a hung process whose slot does not say (default kill)")
    s.add_argument("--hang-signal", type=_argtypes.hang_signal, metavar="NAME",
                   help="signal for the kill action (default SIGKILL; SIGABRT dumps core)")
    s.add_argument("--max-misses", type=_argtypes.positive_int(1, 1000), metavar="N",
                   help="heartbeat checks in a row without progress before a process is hung "
                        "(default 3)")
    s.add_argument("--hang-starved", choices=("log", "kill"),
                   help="what a hung process judged starved (runnable, given no CPU) gets when "
                        "the action is kill (default log: logged and still watched)")
    s.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics, e.g. 127.0.0.1:9464 "
                        "(default off; 'off' turns off what the file enables)")
    s.add_argument("--log", choices=("auto", "journal", "stderr"), default="auto",
                   help="where events go (default %(default)s: journald if reachable)")
    s.add_argument("--log-level", choices=("debug", "info", "warning", "error"),
                   help="least severe events to log (default info)")
    s.add_argument("--death-word-priority", type=_argtypes.positive_int(0, 99), metavar="N",
                   help="SCHED_FIFO priority the death-word waiters wait at, from their sleep to "
                        "the peers' wake (tens of µs a death), so that a dying process tearing "
                        "its memory down cannot hold them back (default 1; 0: normal priority; "
                        "needs CAP_SYS_NICE or LimitRTPRIO=N, else the start-up line says so)")
    s.add_argument("--teardown-yield-ms", type=_argtypes.positive_int(0, 1000), metavar="MS",
                   help="once a death word's process is confirmed dying and its peers are woken, "
                        "its threads run at SCHED_IDLE for MS milliseconds, so that the teardown of "
                        "its memory (in the kernel, ~50 ms a GiB) gives up its CPU to a woken peer "
                        "at once; then their own policy comes back (default 0: never, as no gain "
                        "was measured on a 2-vCPU VM, see BENCHMARKS.md; needs CAP_SYS_NICE to give "
                        "it back, else off and the start-up line says so)")
    s.set_defaults(run=run)

    c = sub.add_parser(
        "check-config", formatter_class=_argtypes.FORMATTER, help="check a configuration file without starting anything",
        description="Parse and check a configuration file as 'serve' and SIGHUP would.",
        epilog="exit status:\n  0 the file is valid (or the default file is absent: built-in defaults),\n"
               "  1 it is not: one line names the file, the line, the key and what was expected\n\n"
               "example:\n  procwatch check-config /etc/procwatch/procwatch.toml && systemctl reload procwatch")
    c.add_argument("file", nargs="?", metavar="FILE",
                   help="the file to check (default /etc/procwatch/procwatch.toml)")
    c.set_defaults(run=run)
    return s


def run(args):
    return run_check_config(args) if args.command == "check-config" else run_serve(args)


def serve_config(args):
    """(config, loader): the file merged with the options given, and how to
    redo that on SIGHUP.  Precedence: --key, $PROCWATCH_KEY, the file, built-in."""
    from . import config
    overrides = {name: getattr(args, name, None) for name in config.OVERRIDES}
    if overrides["key"] is None and _os.environ.get("PROCWATCH_KEY"):
        overrides["key"] = _argtypes.table_key(None)
    if overrides["hang_signal"] is not None:        # argtypes.hang_signal gives a number; the file a name
        import signal
        overrides["hang_signal"] = signal.Signals(overrides["hang_signal"]).name

    def load():
        return config.merge(config.load(args.config), overrides)
    return load(), load


def run_serve(args):
    from . import journal
    from .service import Service
    cfg, loader = serve_config(args)
    journal.setup(args.log, getattr(_logging, cfg.log_level.upper()))
    return Service(cfg, load_config=loader).run()


def run_check_config(args):
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
