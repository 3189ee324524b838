"""Argument types and shared pieces of the command modules (serve, status, runwait, events).

Each type turns bad text into ``argparse.ArgumentTypeError``, which argparse
prints as one usage line and exit status 2.  Values argparse cannot see
(``$PROCWATCH_KEY``) become :class:`procwatch.errors.UsageError`, which
cli.main() reports the same way; any other exception is a bug and keeps
its traceback.
"""

import argparse as _argparse

from .errors import UsageError

FORMATTER = _argparse.RawDescriptionHelpFormatter
KEY_HELP = "SysV key of the slot table (default: $PROCWATCH_KEY, else 0x70770001)"
DAY = 86400


def key(text):
    try:
        value = int(text, 0)
    except ValueError:
        raise _argparse.ArgumentTypeError(f"{text!r} is not an integer key (e.g. 0x70770001)") from None
    if not 0 < value <= 0x7FFFFFFF:
        raise _argparse.ArgumentTypeError(f"key {text} is out of range 1..0x7fffffff")
    return value


def table_key(given):
    """The table key a command uses: ``--key``, else $PROCWATCH_KEY, else the default."""
    from .segment import resolve_key
    try:
        return resolve_key(given)
    except ValueError as e:             # a bad $PROCWATCH_KEY: argparse never saw it
        raise UsageError(str(e)) from None


def positive_int(lo, hi):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise _argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not lo <= v <= hi:
            raise _argparse.ArgumentTypeError(f"{v} is out of range {lo}..{hi}")
        return v
    return parse


def seconds(hi=3600, zero=False, least=None):
    """A number of seconds in (0, ``hi``] (``zero``: [0, ``hi``]), at least ``least`` if given."""
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise _argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
        if not (v >= 0 if zero else v > 0) or not v <= hi:      # 'not <=' also refuses nan
            raise _argparse.ArgumentTypeError(f"{text} s is out of range {'[' if zero else '('}0, {hi:g}]")
        if least is not None and v < least:
            raise _argparse.ArgumentTypeError(f"{v:g} s is too short: use at least {least:g}")
        return v
    return parse


def checked(parse):
    """An argument type from ``parse``, whose ValueError message becomes argparse's usage line."""
    def arg(text):
        try:
            return parse(text)
        except ValueError as e:
            raise _argparse.ArgumentTypeError(str(e)) from None
    arg.__name__ = parse.__name__
    return arg


def hang_signal(text):
    """A hang signal's number: one whose default action ends the process (signals.py)."""
    from .signals import hang_signal_value
    return checked(hang_signal_value)(text)
