"""``procwatch status [--json | --watch]``: the command; status.py renders, liveview.py redraws."""

import json as _json

from . import argtypes as _argtypes
from .errors import UsageError

EXIT_OK, EXIT_NOT_RUNNING = 0, 3


def add_parser(sub):
    st = sub.add_parser(
        "status", formatter_class=_argtypes.FORMATTER, help="show the service and the registered processes",
        description="Show whether the service runs, then one row per used slot.",
        epilog="exit status:\n  0 the service runs, 3 it does not (or no table exists), 1 error\n\n"
               "--json prints one object: {\"key\", \"service\": {\"pid\", \"alive\", \"backend\",\n"
               "\"heartbeat\", \"death_words\"}, \"slot_count\", \"exits\", \"slots\": [{\"slot\", \"name\",\n"
               "\"pid\", \"state\", \"since\", \"cause\", \"exit_status\", \"exit_code\", \"signal\",\n"
               "\"core_dumped\", \"latency_us\", \"detected_by\", \"teardown_us\", \"death_word\",\n"
               "\"heartbeat_ms\", \"misses\", \"last_beat_age_s\", \"hang_action\", \"hang_signal\",\n"
               "\"kill_sent\", \"verdict\"}]}.\n"
               "latency_us is what the service took: exit event -> zeroed (detected_by\n"
               "\"exit_event\": the event comes after the address-space teardown), or death word\n"
               "-> zeroed (\"death_word\"); teardown_us is death word -> pidfd readable.  death_word\n"
               "is \"armed\" or why the slot is connector-only (docs/ABI.md, Arm); death_words is\n"
               "\"watching\", or why the service cannot (\"no_waitv\": no futex_waitv, Linux < 5.16\n"
               "or a seccomp filter; \"no_atomics\"), and then every slot is connector-only.\n"
               "Times are Unix seconds; absent values are null.  hang_action and hang_signal are\n"
               "the slot's own (null: the service's --hang-action, --hang-signal, which is also\n"
               "what a value no action or signal has gets); kill_sent is true while a hung\n"
               "process has been sent its signal and has not exited yet; verdict (stopped,\n"
               "starved, stuck, busy, blocked, unknown) says why a hung process did not beat,\n"
               "for a hung slot and for one its hang action killed.")
    st.add_argument("--key", type=_argtypes.key, help=_argtypes.KEY_HELP)
    st.add_argument("--json", action="store_true", help="machine-readable output (stable schema)")
    st.add_argument("--watch", action="store_true",
                    help="a live view refreshed in place, like top (q or Ctrl-C quits); "
                         "when stdout is not a terminal, one plain table per refresh")
    st.add_argument("--interval", type=_argtypes.seconds(least=0.05), default=1.0, metavar="S",
                    help="seconds between refreshes with --watch (default %(default)s)")
    st.add_argument("--count", type=_argtypes.positive_int(1, 1 << 31), metavar="N",
                    help="with --watch, stop after N refreshes (default: until q or Ctrl-C)")
    st.set_defaults(run=run)
    return st


def run(args):
    key = _argtypes.table_key(args.key)
    if args.watch:
        if args.json:
            raise UsageError("--watch and --json do not combine: poll 'status --json' instead")
        from . import liveview
        return liveview.run(key, args.interval, args.count)
    from .status import format_status, status_snapshot
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
