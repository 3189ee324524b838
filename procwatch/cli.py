"""Command line: ``procwatch serve | status | check-config | run | wait | events``, and ``--include-dir``.

Exit statuses follow the LSB convention that ``systemctl status`` uses:
0 fine, 1 a runtime failure (the one-line message of a ProcwatchError),
2 a usage error (argparse), 3 ``status`` found no running service.
"""

import argparse as _argparse
import os as _os
import sys as _sys

from . import __version__
from .errors import ProcwatchError, UsageError

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


class _IncludeDir(_argparse.Action):
    """``--include-dir``: print where procwatch.h is, then exit (like --version)."""

    def __init__(self, option_strings, dest, **kw):
        super().__init__(option_strings, dest, nargs=0, default=_argparse.SUPPRESS, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        from . import cheader
        print(cheader.include_dir())
        parser.exit()


def build_parser():
    p = _argparse.ArgumentParser(
        prog="procwatch", formatter_class=_argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
        description="Tell other processes, within a millisecond, that a watched process "
                    "has died or hung.\n\nClients register in a SysV shared-memory slot table; "
                    "the service zeroes a\nslot's PID word the moment the kernel reports that "
                    "process's exit.")
    p.add_argument("--version", action="version", version=f"procwatch {__version__}")
    p.add_argument("--include-dir", action=_IncludeDir,
                   help="print the directory of the C header procwatch.h, and exit")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    # The command modules, in --help order.  Each has add_parser(sub), which
    # sets ``run``, and run(args) -> exit status.
    from . import events, fleetcmd, runwait, serve, statuscmd
    for module in (serve, statuscmd, runwait, events, fleetcmd):
        module.add_parser(sub)
    return p


def main(argv=None):
    """Run one command; its exit status.  Only a ProcwatchError becomes one line (exit 1; a
    UsageError exit 2): anything else is a bug and keeps its traceback.  ``argv`` None: this
    process's own command line."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.run(args)
        _sys.stdout.flush()             # here, so that a reader gone shows as BrokenPipeError below
    except BrokenPipeError:
        return _stdout_gone()
    except UsageError as e:            # bad values that argparse could not see ($PROCWATCH_KEY)
        print(f"procwatch: {e}", file=_sys.stderr)
        return EXIT_USAGE
    except ProcwatchError as e:
        print(f"procwatch: {e}", file=_sys.stderr)
        return EXIT_FAILURE
    if argv is None and args.command == "wait" and getattr(args, "etcd", None) is None:
        # A failover script waits for this line: the interpreter's teardown
        # (module and GC cleanup) cost ~10 ms after it (issue 13).  Output is
        # flushed; the table is detached by the kernel at exit.
        _sys.stderr.flush()
        _os._exit(code)
    return code


def _stdout_gone():
    """stdout's reader left (``procwatch status | head -1``): end quietly, as if by SIGPIPE.

    Python ignores SIGPIPE, so the write fails with EPIPE instead of ending
    the process; the interpreter would then fail again flushing stdout at
    exit.  Point stdout at /dev/null and exit 128 + SIGPIPE, the status a
    shell shows for a command SIGPIPE ended (Python's own advice, 'Note on
    SIGPIPE' in the signal module docs).
    """
    import signal
    devnull = _os.open(_os.devnull, _os.O_WRONLY)
    _os.dup2(devnull, _sys.stdout.fileno())
    _os.close(devnull)
    return 128 + signal.SIGPIPE
