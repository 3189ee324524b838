"""The service's configuration file: TOML in, frozen dataclasses out.

An operator edits ``/etc/procwatch/procwatch.toml`` by hand on a device, often
over a slow console, and learns of a mistake only when the service refuses
to start or a SIGHUP reload is refused.  So every mistake we can see is an
error, and every error names the file, the line, the key and what was
expected::

    /etc/procwatch/procwatch.toml:12: key 'rule[0].signal': expected a signal name such as 'SIGKILL', got 'SIGKIL'

Unknown keys are errors too (a misspelt key silently doing nothing is the
worst outcome on a fleet).  Layout, all tables and keys optional::

    [service]   key slots backend rcvbuf reconcile_interval group log_level death_word_priority
                teardown_yield_ms
    [hang]      action signal max_misses starved  (service-wide defaults)
    [metrics]   address                           ("off" or "HOST:PORT")
    [hooks]     workers queue timeout             (the hook worker pool)
    [etcd]      endpoints prefix ttl host ended_ttl queue sync_interval ca_cert cert key user password_file
    [[rule]]    name heartbeat action signal max_misses starved publish
    [rule.hooks] on_exit on_found_dead on_hung timeout

Rules are tried in file order and the first whose ``name`` pattern
(:func:`fnmatch.fnmatchcase`) matches a registered name wins, like a
firewall.  ``procwatch.example.toml`` at the top of the repository documents
every key; ``tests/test_config.py`` checks that it stays complete.

Command-line options win over the file: the CLI passes its options to
:func:`merge`, which validates them with the same checks.
"""

import dataclasses as _dc
import difflib as _difflib
import fnmatch as _fnmatch
import ipaddress as _ipaddress
import math as _math
import re as _re
import signal as _signal
import tomllib as _tomllib
import typing as _typing

from procwatch import abi as _abi
from procwatch.errors import ProcwatchError
from procwatch.signals import ends_process as _ends_process

__all__ = (
    "DEFAULT_PATH", "ConfigError", "Config", "HangSettings", "HookSettings",
    "RuleHooks", "Rule", "Policy", "Address", "EtcdSettings", "load", "parse", "merge",
    "rule_for", "policy_for", "documented_keys", "find_line", "OVERRIDES", "EVENTS",
)

DEFAULT_PATH = "/etc/procwatch/procwatch.toml"

BACKENDS = ("auto", "connector", "pidfd")
HANG_ACTIONS = ("kill", "log")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
EVENTS = ("exit", "found_dead", "hung")     # hook events; PROCWATCH_EVENT values
DEFAULT_MAX_MISSES = 3                      # heartbeat checks in a row without progress: hung


class ConfigError(ProcwatchError):
    """The configuration (file or command line) holds something we refuse.

    ``str(err)`` is one line, ``FILE:LINE: key 'a.b': expected X, got Y``;
    ``line`` is None when no line applies (a missing file, a command-line
    option).
    """

    def __init__(self, path, line, keypath, msg):
        self.path, self.line, self.keypath, self.msg = path, line, keypath, msg
        super().__init__(path, line, keypath, msg)

    def __str__(self):
        where = f"{self.path}:{self.line}" if self.line else f"{self.path}"
        if not self.keypath:
            return f"{where}: {self.msg}"
        what = "option" if self.keypath.startswith("--") else "key"
        return f"{where}: {what} '{self.keypath}': {self.msg}"


# -- the result ---------------------------------------------------------------

class Address(_typing.NamedTuple):
    """Where the metrics HTTP server listens."""
    host: str
    port: int

    def __str__(self):
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@_dc.dataclass(frozen=True)
class HangSettings:
    """Service-wide hang handling; a rule may override each field."""
    action: str = "kill"
    signal: _signal.Signals = _signal.SIGKILL
    max_misses: int = DEFAULT_MAX_MISSES
    starved: str = "log"               # a starved verdict (verdict.py): "log", or "kill" like the rest


@_dc.dataclass(frozen=True)
class HookSettings:
    """The hook worker pool: at most ``workers`` hooks run and ``queue`` wait."""
    workers: int = 2
    queue: int = 64
    timeout: float = 10.0


@_dc.dataclass(frozen=True)
class RuleHooks:
    """Commands (argv tuples, never shell strings) a rule runs on events."""
    on_exit: tuple | None = None
    on_found_dead: tuple | None = None
    on_hung: tuple | None = None
    timeout: float | None = None       # None: HookSettings.timeout


@_dc.dataclass(frozen=True)
class Rule:
    """Settings for registered names matching ``name``; None = the default."""
    name: str
    heartbeat: float | None = None     # seconds; 0 = off; None = as registered
    action: str | None = None
    signal: _signal.Signals | None = None
    max_misses: int | None = None
    starved: str | None = None
    hooks: RuleHooks = RuleHooks()
    publish: bool = True               # False: never published to etcd (stays local)


@_dc.dataclass(frozen=True)
class EtcdSettings:
    """Where and how the service publishes liveness (issue 17; procwatch/fleet.py).

    Holds the *path* of the password file, never the password: a repr of
    the configuration (a log line, a traceback) cannot leak it.
    """
    endpoints: tuple = ("http://127.0.0.1:2379",)
    prefix: str = "/procwatch/"
    ttl: int = 5                       # s: lease of the live keys, kept alive while the service runs
    host: str | None = None            # None: socket.gethostname()
    ended_ttl: int = 600               # s an ended/ record stays
    queue: int = 4096                  # updates waiting for etcd at most; beyond that dropped, counted
    sync_interval: float = 1.0         # s between full compares of the table with etcd
    ca_cert: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password_file: str | None = None


@_dc.dataclass(frozen=True)
class Config:
    """Everything the service reads from its file; defaults when absent."""
    path: str | None = None            # the file read; None = built-in defaults
    key: int = _abi.DEFAULT_KEY
    slots: int = _abi.DEFAULT_SLOTS
    backend: str = "auto"
    rcvbuf: int | None = None          # bytes; None = the service's own size
    reconcile_interval: float = 1.0
    group: str | None = None           # None: the service's group
    log_level: str = "info"
    death_word_priority: int = 1       # SCHED_FIFO priority of the death-word waits; 0: none
    teardown_yield_ms: int = 0         # a confirmed death's teardown at SCHED_IDLE this long; 0: never
    hang: HangSettings = HangSettings()
    metrics: Address | None = None     # None: off
    hooks: HookSettings = HookSettings()
    rules: tuple = ()
    etcd: EtcdSettings | None = None   # None: no [etcd] table, nothing published (fleet.py not imported)


@_dc.dataclass(frozen=True)
class Policy:
    """What applies to one registered name: its rule merged over the defaults."""
    rule: Rule | None
    heartbeat: float | None
    action: str
    signal: _signal.Signals
    max_misses: int
    hook_timeout: float
    starved: str = "log"
    on_exit: tuple | None = None
    on_found_dead: tuple | None = None
    on_hung: tuple | None = None


# -- value checks ---------------------------------------------------------------
# Each check returns the converted value or raises _Invalid(what was expected).

class _Invalid(Exception):
    pass


def _integer(lo, hi, expected=None):
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise _Invalid(expected or f"an integer from {lo} to {hi}")
        return v
    return check


def _seconds(lo, hi, *, zero_ok=False):
    def check(v):
        ok = (not isinstance(v, bool) and isinstance(v, (int, float))
              and _math.isfinite(v) and (lo <= v <= hi or (zero_ok and v == 0)))
        if not ok:
            off = "0 (off) or " if zero_ok else ""
            raise _Invalid(f"{off}a number of seconds from {lo:g} to {hi:g}")
        return float(v)
    return check


def _choice(options, *, fold_case=False):
    def check(v):
        if isinstance(v, str) and (v.lower() if fold_case else v) in options:
            return v.lower() if fold_case else v
        raise _Invalid("one of " + ", ".join(f"'{o}'" for o in options))
    return check


def _sysv_key(v):
    # key_t is a signed int; keep to the positive half so 'ipcs' and our
    # hex spelling agree.  0 is IPC_PRIVATE, which nobody else could attach.
    return _integer(1, 0x7FFFFFFF, "a SysV key from 1 to 0x7fffffff, written as "
                    "a TOML integer such as 0x70770001 (no quotes)")(v)


def _group(v):
    if isinstance(v, str) and _re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]{0,31}\$?", v):
        return v
    raise _Invalid("a group name such as 'procwatch'")


def _hang_signal(v):
    if isinstance(v, _signal.Signals):
        name = v.name
    elif isinstance(v, str):
        name = v if v.startswith("SIG") else "SIG" + v
    else:
        name = None
    sig = _signal.Signals.__members__.get(name) if name else None
    if sig is None or not _ends_process(sig):
        raise _Invalid("a signal name whose default action ends the process, "
                       "such as 'SIGKILL', 'SIGABRT' or 'SIGTERM'")
    return sig


def _address(v):
    """'off' -> None; 'HOST:PORT' or '[V6]:PORT' -> Address."""
    if isinstance(v, Address):
        return v
    expected = "'off' or HOST:PORT such as '127.0.0.1:9464' or '[::1]:9464'"
    if not isinstance(v, str):
        raise _Invalid(expected)
    if v == "off":
        return None
    m = _re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]\s]+):(\d{1,5})", v)
    if not m:
        raise _Invalid(expected)
    host, port = (m[1], m[2]) if m[1] else (m[3], m[4])
    port = int(port)
    if not 1 <= port <= 65535:
        raise _Invalid(expected + " with a port from 1 to 65535")
    try:
        _ipaddress.ip_address(host)
    except ValueError:
        if not _re.fullmatch(r"(?!-)[A-Za-z0-9-]{1,63}(?:\.(?!-)[A-Za-z0-9-]{1,63})*", host):
            raise _Invalid(expected) from None
    return Address(host, port)


def _argv(v):
    if isinstance(v, str):
        raise _Invalid('an argv list such as ["systemctl", "restart", "dp@2"] '
                       "(hooks never run a shell; write [\"sh\", \"-c\", \"...\"] if you need one)")
    if (not isinstance(v, list) or not v or not all(isinstance(a, str) for a in v)
            or not v[0] or any("\0" in a for a in v)):
        raise _Invalid('a non-empty list of strings such as ["systemctl", "restart", "dp@2"]')
    return tuple(v)


def _boolean(v):
    if isinstance(v, bool):
        return v
    raise _Invalid("true or false")


def _endpoints(v):
    """A list of etcd client URLs: 'http://HOST:PORT' or 'https://HOST:PORT'."""
    expected = 'a non-empty list of URLs such as ["http://127.0.0.1:2379"] (http or https, host and port)'
    if not isinstance(v, list) or not v:
        raise _Invalid(expected)
    for url in v:
        if not isinstance(url, str):
            raise _Invalid(expected)
        m = _re.fullmatch(r"(https?)://(\[[0-9A-Fa-f:.]+\]|[^:/\[\]\s]+):(\d{1,5})/?", url)
        if not m or not 1 <= int(m[3]) <= 65535:
            raise _Invalid(expected + f"; {url!r} is not one")
    return tuple(v)


def _etcd_prefix(v):
    if isinstance(v, str) and v.startswith("/") and v.endswith("/") and "\0" not in v and len(v) <= 200:
        return v
    raise _Invalid("a key prefix that starts and ends with '/', such as '/procwatch/'")


def command_line(option, check, value):
    """``value`` of a command-line ``option`` checked as the file's key is (``check``: "endpoints"
    or "prefix"); ConfigError in the file's one-line form if it is bad."""
    try:
        return {"endpoints": _endpoints, "prefix": _etcd_prefix}[check](value)
    except _Invalid as e:
        raise ConfigError("<command line>", None, option, f"expected {e}") from None


def _etcd_host(v):
    # The first path element under the prefix; 'ended' is the ended records' own.
    if isinstance(v, str) and _re.fullmatch(r"[A-Za-z0-9_.:-]{1,253}", v) and v != "ended":
        return v
    raise _Invalid("a host name without '/' (letters, digits, '.', '-', '_', ':'), not 'ended'")


def _path(v):
    if isinstance(v, str) and v.startswith("/") and "\0" not in v:
        return v
    raise _Invalid("an absolute file path")


def _user(v):
    if isinstance(v, str) and v and not any(c.isspace() for c in v):
        return v
    raise _Invalid("an etcd user name")


def _pattern(v):
    if isinstance(v, str) and v and len(v.encode()) <= 255:
        return v
    raise _Invalid("a name pattern such as 'dp-*' (fnmatch syntax)")


# -- schema -------------------------------------------------------------------------
# Table name -> {key: check}.  The example file and documented_keys() follow it.

_SERVICE = {
    "key": _sysv_key,
    "slots": _integer(1, _abi.MAX_SLOTS),
    "backend": _choice(BACKENDS),
    "rcvbuf": _integer(4096, 2**31 - 1, "a receive buffer size in bytes from 4096 to 2147483647"),
    # From 1 ms: the long-run test (tests/reliability/test_soak.py) runs many
    # thousands of passes in a minute; the service's own default is 1 s.
    "reconcile_interval": _seconds(0.001, 3600),
    "group": _group,
    "log_level": _choice(LOG_LEVELS, fold_case=True),
    "death_word_priority": _integer(0, 99, "a SCHED_FIFO priority from 1 to 99, or 0 for none"),
    "teardown_yield_ms": _integer(0, 1000, "a whole number of milliseconds from 0 (never) to 1000"),
}
_HANG = {
    "action": _choice(HANG_ACTIONS),
    "signal": _hang_signal,
    "max_misses": _integer(1, 1000),
    "starved": _choice(HANG_ACTIONS),
}
_METRICS = {"address": _address}
_HOOKS = {
    "workers": _integer(1, 64),
    "queue": _integer(1, 100_000),
    "timeout": _seconds(0.01, 86400),
}
_ETCD = {
    "endpoints": _endpoints,
    "prefix": _etcd_prefix,
    # etcd raises a shorter TTL to its own minimum (about 2 s with the default heartbeat)
    "ttl": _integer(1, 3600, "a lease TTL in whole seconds from 1 to 3600"),
    "host": _etcd_host,
    "ended_ttl": _integer(1, 30 * 86400, "a number of whole seconds from 1 to 2592000"),
    "queue": _integer(1, 1_000_000),
    "sync_interval": _seconds(0.1, 3600),
    "ca_cert": _path,
    "cert": _path,
    "key": _path,
    "user": _user,
    "password_file": _path,
}
_RULE = {
    "name": _pattern,
    # heartbeat_ms is a u32 field of the slot
    "heartbeat": _seconds(0.001, 4294967, zero_ok=True),
    "action": _HANG["action"],
    "signal": _HANG["signal"],
    "max_misses": _HANG["max_misses"],
    "starved": _HANG["starved"],
    "publish": _boolean,                 # false: not published to etcd
    "hooks": None,                       # a table, below
}
_RULE_HOOKS = {"on_exit": _argv, "on_found_dead": _argv, "on_hung": _argv,
               "timeout": _HOOKS["timeout"]}
_TOP = {"service": _SERVICE, "hang": _HANG, "metrics": _METRICS, "hooks": _HOOKS, "etcd": _ETCD,
        "rule": _RULE}


def documented_keys():
    """Every key the file accepts, dotted: ``('service.key', ..., 'rule.hooks.timeout')``."""
    keys = []
    for table, schema in _TOP.items():
        for key in schema:
            if table == "rule" and key == "hooks":
                keys += [f"rule.hooks.{k}" for k in _RULE_HOOKS]
            else:
                keys.append(f"{table}.{key}")
    return tuple(keys)


# Command-line option (argparse dest) -> (Config field path, check).
OVERRIDES = {
    "key": (("key",), _sysv_key),
    "slots": (("slots",), _SERVICE["slots"]),
    "backend": (("backend",), _SERVICE["backend"]),
    "rcvbuf": (("rcvbuf",), _SERVICE["rcvbuf"]),
    "reconcile_interval": (("reconcile_interval",), _SERVICE["reconcile_interval"]),
    "group": (("group",), _group),
    "log_level": (("log_level",), _SERVICE["log_level"]),
    "death_word_priority": (("death_word_priority",), _SERVICE["death_word_priority"]),
    "teardown_yield_ms": (("teardown_yield_ms",), _SERVICE["teardown_yield_ms"]),
    "hang_action": (("hang", "action"), _HANG["action"]),
    "hang_signal": (("hang", "signal"), _hang_signal),
    "max_misses": (("hang", "max_misses"), _HANG["max_misses"]),
    "hang_starved": (("hang", "starved"), _HANG["starved"]),
    "metrics": (("metrics",), _address),
}


# -- locating a key in the text ------------------------------------------------------

_KEYPART = r"""[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|'[^']*'"""
_DOTTED = rf"(?:{_KEYPART})(?:\s*\.\s*(?:{_KEYPART}))*"
_ARRAY_HEADER = _re.compile(rf"\s*\[\[\s*({_DOTTED})\s*\]\]")
_TABLE_HEADER = _re.compile(rf"\s*\[\s*({_DOTTED})\s*\]")
_KEY_LINE = _re.compile(rf"\s*({_DOTTED})\s*=")


def _split_key(dotted):
    return tuple(p[1:-1] if p[0] in "\"'" else p for p in _re.findall(_KEYPART, dotted))


def find_line(text, keypath):
    """The 1-based line that defines ``keypath`` (a tuple such as
    ``('rule', 1, 'hooks', 'on_exit')``), else the line of its closest
    enclosing table or key, else None.

    XXX: tomllib keeps no positions, so this re-scans the text line by line
    for table headers and ``key =`` lines.  It does not parse multi-line
    strings: a line inside one that looks like ``key = ...`` can be taken for
    a key.  A key inside an inline table (``hooks = { on_exit = [...] }``) is
    reported at the line of the inline table's key.  Escapes inside quoted
    keys are not decoded.
    """
    target = tuple(keypath)
    arrays = {}             # resolved path of an array of tables -> current index
    table = ()
    best_len, best_line = 0, None

    def resolve(parts):
        out = ()
        for part in parts:
            out += (part,)
            if out in arrays:
                out += (arrays[out],)
        return out

    for lineno, line in enumerate(text.splitlines(), 1):
        if m := _ARRAY_HEADER.match(line):
            parts = _split_key(m[1])
            base = resolve(parts[:-1]) + parts[-1:]
            arrays[base] = arrays.get(base, -1) + 1
            table = candidate = base + (arrays[base],)
        elif m := _TABLE_HEADER.match(line):
            table = candidate = resolve(_split_key(m[1]))
        elif m := _KEY_LINE.match(line):
            candidate = table + _split_key(m[1])
        else:
            continue
        n = len(candidate)
        if n > best_len and target[:n] == candidate:
            best_len, best_line = n, lineno
            if n == len(target):
                break
    return best_line


def _dotted(keypath):
    out = ""
    for part in keypath:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _describe(v):
    """A TOML-ish rendering of a value for 'got ...'."""
    if isinstance(v, bool):
        return f"boolean {str(v).lower()}"
    if isinstance(v, int):
        return f"integer {v}"
    if isinstance(v, float):
        return f"float {v!r}"
    if isinstance(v, str):
        return f"string {v[:60]!r}"
    if isinstance(v, list):
        text = repr(v)
        return f"array {text if len(text) <= 60 else text[:57] + '...'}"
    if isinstance(v, dict):
        return "a table"
    return f"{type(v).__name__} {v}"     # TOML dates and times


# -- parsing --------------------------------------------------------------------------

class _Parser:
    def __init__(self, path, text):
        self.path, self.text = path, text

    def fail(self, keypath, msg):
        raise ConfigError(self.path, find_line(self.text, keypath), _dotted(keypath), msg)

    def table(self, value, keypath, schema):
        """Check ``value`` is a table holding only keys of ``schema``."""
        if not isinstance(value, dict):
            self.fail(keypath, f"expected a table, got {_describe(value)}")
        for key in value:
            if key not in schema:
                close = _difflib.get_close_matches(key, schema, n=1)
                hint = f"did you mean '{close[0]}'? " if close else ""
                self.fail(keypath + (key,), f"unknown key; {hint}known keys: {', '.join(schema)}")
        return value

    def fields(self, value, keypath, schema, skip=()):
        """{key: checked value} for the keys present in table ``value``."""
        out = {}
        for key, raw in self.table(value, keypath, schema).items():
            if key in skip:
                continue
            try:
                out[key] = schema[key](raw)
            except _Invalid as exc:
                self.fail(keypath + (key,), f"expected {exc}, got {_describe(raw)}")
        return out

    def config(self, data):
        self.table(data, (), _TOP)
        service = self.fields(data.get("service", {}), ("service",), _SERVICE)
        hang = self.fields(data.get("hang", {}), ("hang",), _HANG)
        metrics = self.fields(data.get("metrics", {}), ("metrics",), _METRICS)
        hooks = self.fields(data.get("hooks", {}), ("hooks",), _HOOKS)
        etcd = self.etcd(data["etcd"]) if "etcd" in data else None
        rules = data.get("rule", [])
        if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
            self.fail(("rule",), f"expected an array of tables written [[rule]], got {_describe(rules)}")
        return Config(
            path=self.path,
            hang=HangSettings(**hang),
            metrics=metrics.get("address"),
            hooks=HookSettings(**hooks),
            rules=self.rules(rules),
            etcd=etcd,
            **service,
        )

    def etcd(self, table):
        fields = self.fields(table, ("etcd",), _ETCD)
        for a, b, what in (("cert", "key", "a client certificate needs its key"),
                           ("key", "cert", "a client key needs its certificate"),
                           ("user", "password_file", "etcd authentication needs a password file"),
                           ("password_file", "user", "a password file needs its user")):
            if a in fields and b not in fields:
                self.fail(("etcd", a), f"{what}: add {b} = ... to [etcd]")
        tls = [k for k in ("ca_cert", "cert") if k in fields]
        plain = [u for u in fields.get("endpoints", EtcdSettings.endpoints) if u.startswith("http://")]
        if tls and plain:
            self.fail(("etcd", tls[0]), f"set, but endpoint {plain[0]!r} is plain http: "
                      "use https:// endpoints with TLS")
        return EtcdSettings(**fields)

    def rules(self, tables):
        out, seen = [], {}
        for i, table in enumerate(tables):
            keypath = ("rule", i)
            fields = self.fields(table, keypath, _RULE, skip=("hooks",))
            if "name" not in fields:
                self.fail(keypath + ("name",), "missing; every [[rule]] needs a name pattern such as 'dp-*'")
            if fields["name"] in seen:
                self.fail(keypath + ("name",), f"pattern {fields['name']!r} repeats rule[{seen[fields['name']]}]"
                          f", so this rule would never match; merge the two")
            seen[fields["name"]] = i
            hooks = self.fields(table.get("hooks", {}), keypath + ("hooks",), _RULE_HOOKS)
            out.append(Rule(hooks=RuleHooks(**hooks), **fields))
        return tuple(out)


def parse(text, path="<string>"):
    """A :class:`Config` from TOML ``text``; ConfigError naming ``path`` if bad."""
    try:
        data = _tomllib.loads(text)
    except _tomllib.TOMLDecodeError as exc:
        # Python 3.11's TOMLDecodeError keeps the position only in its message.
        msg = str(exc)
        m = _re.search(r" \(at line (\d+), column (\d+)\)$", msg)
        if m:
            raise ConfigError(path, int(m[1]), None,
                              f"invalid TOML: {msg[:m.start()]} at column {m[2]}") from None
        if msg.endswith(" (at end of document)"):
            raise ConfigError(path, max(len(text.splitlines()), 1), None,
                              f"invalid TOML: {msg[:-21]} at the end of the file") from None
        raise ConfigError(path, None, None, f"invalid TOML: {msg}") from None
    return _Parser(path, text).config(data)


def load(path=None, *, default_path=DEFAULT_PATH):
    """Read the configuration.

    ``path`` None means the default file, and a missing default file means
    built-in defaults (procwatch runs without a config).  A file named
    explicitly (``--config``) must exist.
    """
    explicit = path is not None
    path = str(path if explicit else default_path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        if not explicit:
            return Config()
        raise ConfigError(path, None, None, "no such file: check the --config path") from None
    except OSError as exc:
        raise ConfigError(path, None, None, f"cannot read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(path, line, None, "not UTF-8 text: TOML files must be UTF-8") from None
    return parse(text, path)


def merge(config, overrides):
    """``config`` with command-line values applied; a value of None means
    "option not given".  Keys are :data:`OVERRIDES` names (argparse dests).
    Bad values raise ConfigError naming the option."""
    top, nested = {}, {}
    for name, value in overrides.items():
        if name not in OVERRIDES:
            raise TypeError(f"merge(): unknown override {name!r}")
        if value is None:
            continue
        field, check = OVERRIDES[name]
        try:
            value = check(value)
        except _Invalid as exc:
            option = "--" + name.replace("_", "-")
            raise ConfigError("<command line>", None, option,
                              f"expected {exc}, got {value!r}") from None
        if len(field) == 1:
            top[field[0]] = value
        else:
            nested.setdefault(field[0], {})[field[1]] = value
    for table, values in nested.items():
        top[table] = _dc.replace(getattr(config, table), **values)
    return _dc.replace(config, **top)


def rule_for(config, name):
    """The first rule whose pattern matches ``name`` (case-sensitive), or None."""
    for rule in config.rules:
        if _fnmatch.fnmatchcase(name, rule.name):
            return rule
    return None


def policy_for(config, name):
    """The :class:`Policy` for registered ``name``: its rule over the defaults."""
    rule = rule_for(config, name)
    r = rule or Rule(name="*")

    def pick(value, default):
        return default if value is None else value

    return Policy(
        rule=rule,
        heartbeat=r.heartbeat,
        action=pick(r.action, config.hang.action),
        signal=pick(r.signal, config.hang.signal),
        max_misses=pick(r.max_misses, config.hang.max_misses),
        starved=pick(r.starved, config.hang.starved),
        hook_timeout=pick(r.hooks.timeout, config.hooks.timeout),
        on_exit=r.hooks.on_exit,
        on_found_dead=r.hooks.on_found_dead,
        on_hung=r.hooks.on_hung,
    )
