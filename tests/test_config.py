"""procwatch.config: every documented key accepted, every mistake a one-line error with its line."""

import pathlib
import pickle
import re
import signal
import tomllib

import hypothesis
import hypothesis.strategies as st
import pytest

from procwatch import abi, config
from procwatch.config import Address, ConfigError
from procwatch.errors import ProcwatchError

EXAMPLE = pathlib.Path(__file__).resolve().parent.parent / "procwatch.example.toml"


def uncommented(text):
    """The example with its commented-out ``# key = value`` lines (and ``# [etcd]``) enabled."""
    text = re.sub(r"(?m)^# (\[[a-z_]+\])$", r"\1", text)
    return re.sub(r"(?m)^# ?([a-z_]+ = )", r"\1", text)


def flat_keys(data, prefix=""):
    keys = set()
    for key, value in data.items():
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for table in value:
                keys |= flat_keys(table, f"{prefix}{key}.")
        elif isinstance(value, dict):
            keys |= flat_keys(value, f"{prefix}{key}.")
        else:
            keys.add(prefix + key)
    return keys


# -- the shipped example --------------------------------------------------------

def test_example_parses():
    cfg = config.load(EXAMPLE)
    assert cfg.path == str(EXAMPLE)
    assert cfg.key == abi.DEFAULT_KEY
    assert cfg.metrics is None
    dp = config.policy_for(cfg, "dp-2")
    assert dp.signal == signal.SIGABRT and dp.hook_timeout == 30.0
    assert dp.on_exit[0] == "systemctl"


def test_example_shows_every_documented_key():
    text = EXAMPLE.read_text()
    assert flat_keys(tomllib.loads(uncommented(text))) == set(config.documented_keys())


def test_example_commented_keys_are_valid_too():
    cfg = config.parse(uncommented(EXAMPLE.read_text()), "example")
    assert cfg.rcvbuf == 8388608 and cfg.group == "procwatch"


def test_example_defaults_match_builtin_defaults():
    """Where the example shows a service-wide value, it is the built-in default."""
    cfg = config.load(EXAMPLE)
    assert (cfg.key, cfg.slots, cfg.backend, cfg.reconcile_interval, cfg.log_level) == \
        (config.Config().key, config.Config().slots, "auto", 1.0, "info")
    assert cfg.hang == config.HangSettings() and cfg.hooks == config.HookSettings()


# -- files -------------------------------------------------------------------------

def test_missing_default_file_means_defaults(tmp_path):
    cfg = config.load(default_path=tmp_path / "absent.toml")
    assert cfg == config.Config()


def test_default_file_is_read_when_present(tmp_path):
    path = tmp_path / "procwatch.toml"
    path.write_text("[service]\nslots = 16\n")
    assert config.load(default_path=path).slots == 16


def test_missing_explicit_file_is_an_error(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value) == f"{path}: no such file: check the --config path"


def test_unreadable_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        config.load(tmp_path)           # a directory


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_bytes(b"[service]\n# caf\xe9\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert info.value.line == 2 and "UTF-8" in str(info.value)


def test_empty_file_is_defaults():
    assert config.parse("", "x") == config.Config(path="x")


# -- errors: unknown keys, wrong types, bad values ---------------------------------------

BAD = [
    # (text, line, keypath, fragment of the message)
    ("[service]\nslot = 3\n", 2, "service.slot", "did you mean 'slots'?"),
    ("servce = 1\n", 1, "servce", "unknown key"),
    ("[sevrice]\n", 1, "sevrice", "did you mean 'service'?"),
    ("[service]\nslots = -1\n", 2, "service.slots", "expected an integer from 1 to 65536, got integer -1"),
    ("[service]\nslots = 0\n", 2, "service.slots", "got integer 0"),
    ("[service]\nslots = \"many\"\n", 2, "service.slots", "got string 'many'"),
    ("[service]\nslots = true\n", 2, "service.slots", "got boolean true"),
    ("[service]\nslots = 1.5\n", 2, "service.slots", "got float 1.5"),
    ("[service]\nkey = \"0x70770001\"\n", 2, "service.key", "no quotes"),
    ("[service]\nkey = 0\n", 2, "service.key", "SysV key"),
    ("[service]\nbackend = \"ebpf\"\n", 2, "service.backend", "'auto', 'connector', 'pidfd'"),
    ("[service]\nrcvbuf = 12\n", 2, "service.rcvbuf", "bytes"),
    ("[service]\nreconcile_interval = -1\n", 2, "service.reconcile_interval", "seconds"),
    ("[service]\nreconcile_interval = nan\n", 2, "service.reconcile_interval", "seconds"),
    ("[service]\ngroup = \"a b\"\n", 2, "service.group", "group name"),
    ("[service]\nlog_level = \"loud\"\n", 2, "service.log_level", "'debug'"),
    ("service = 3\n", 1, "service", "expected a table, got integer 3"),
    ("[hang]\naction = \"restart\"\n", 2, "hang.action", "'kill', 'log'"),
    ("[hang]\nsignal = \"SIGKIL\"\n", 2, "hang.signal", "got string 'SIGKIL'"),
    ("[hang]\nsignal = 9\n", 2, "hang.signal", "signal name"),
    ("[hang]\nsignal = \"SIGSTOP\"\n", 2, "hang.signal", "default action ends the process"),
    ("[hang]\nmax_misses = 0\n", 2, "hang.max_misses", "from 1"),
    ("[hang]\nstarved = \"ignore\"\n", 2, "hang.starved", "one of 'kill', 'log', got string 'ignore'"),
    ("[hang]\nstarved = true\n", 2, "hang.starved", "got boolean true"),
    ("[[rule]]\nname = \"x\"\nstarved = \"KILL\"\n", 3, "rule[0].starved", "one of 'kill', 'log'"),
    ("[metrics]\naddress = \"127.0.0.1\"\n", 2, "metrics.address", "HOST:PORT"),
    ("[metrics]\naddress = \"127.0.0.1:0\"\n", 2, "metrics.address", "port from 1 to 65535"),
    ("[metrics]\naddress = \"127.0.0.1:70000\"\n", 2, "metrics.address", "port from 1 to 65535"),
    ("[metrics]\naddress = \"::1:9464\"\n", 2, "metrics.address", "[::1]:9464"),
    ("[metrics]\naddress = 9464\n", 2, "metrics.address", "got integer 9464"),
    ("[metrics]\naddress = \"off\"\nport = 1\n", 3, "metrics.port", "unknown key"),
    ("[hooks]\nworkers = 0\n", 2, "hooks.workers", "from 1 to 64"),
    ("[hooks]\nqueue = -5\n", 2, "hooks.queue", "got integer -5"),
    ("[hooks]\ntimeout = 0\n", 2, "hooks.timeout", "seconds"),
    ("[hooks]\non_exit = [\"true\"]\n", 2, "hooks.on_exit", "unknown key"),
    ("rule = 5\n", 1, "rule", "[[rule]]"),
    ("[rule]\nname = \"x\"\n", 1, "rule", "got a table"),
    ("[[rule]]\nheartbeat = 1\n", 1, "rule[0].name", "missing"),
    ("[[rule]]\nname = \"\"\n", 2, "rule[0].name", "name pattern"),
    ("[[rule]]\nname = \"x\"\nheartbeat = -1\n", 3, "rule[0].heartbeat", "0 (off) or"),
    ("[[rule]]\nname = \"x\"\nheartbeat = 0.0001\n", 3, "rule[0].heartbeat", "from 0.001"),
    ("[[rule]]\nname = \"x\"\nhearbeat = 1\n", 3, "rule[0].hearbeat", "did you mean 'heartbeat'?"),
    ("[[rule]]\nname = \"x\"\n[rule.hooks]\non_exit = \"systemctl restart x\"\n", 4,
     "rule[0].hooks.on_exit", "never run a shell"),
    ("[[rule]]\nname = \"x\"\n[rule.hooks]\non_exit = []\n", 4, "rule[0].hooks.on_exit", "non-empty list"),
    ("[[rule]]\nname = \"x\"\n[rule.hooks]\non_hung = [\"\"]\n", 4, "rule[0].hooks.on_hung", "non-empty"),
    ("[[rule]]\nname = \"x\"\n[rule.hooks]\non_kill = [\"a\"]\n", 4, "rule[0].hooks.on_kill", "unknown key"),
    ("[[rule]]\nname = \"x\"\nhooks = { on_exit = [1] }\n", 3, "rule[0].hooks.on_exit", "got array [1]"),
    ("[[rule]]\nname = \"x\"\nhooks.timeout = \"10s\"\n", 3, "rule[0].hooks.timeout", "got string '10s'"),
]


@pytest.mark.parametrize("text,line,keypath,fragment", BAD, ids=[b[2] + ":" + b[3][:20] for b in BAD])
def test_bad_input_names_file_line_and_key(text, line, keypath, fragment):
    with pytest.raises(ConfigError) as info:
        config.parse(text, "/etc/procwatch/procwatch.toml")
    err = info.value
    assert (err.line, err.keypath) == (line, keypath), str(err)
    assert fragment in str(err)
    assert str(err).startswith(f"/etc/procwatch/procwatch.toml:{line}: key '{keypath}': ")
    assert "\n" not in str(err)


def test_error_in_later_rule_points_at_that_rule():
    text = ('[[rule]]\nname = "a"\nsignal = "SIGTERM"\n\n'
            '[[rule]]\nname = "b"\n[rule.hooks]\ntimeout = 5\n\n'
            '[[rule]]\nname = "c"\nsignal = "SIGTREM"\n')
    with pytest.raises(ConfigError) as info:
        config.parse(text, "f")
    assert (info.value.line, info.value.keypath) == (12, "rule[2].signal")


def test_error_in_nested_table_of_later_rule():
    text = ('[[rule]]\nname = "a"\n[rule.hooks]\ntimeout = 5\n'
            '[[rule]]\nname = "b"\n[rule.hooks]\ntimeout = -5\n')
    with pytest.raises(ConfigError) as info:
        config.parse(text, "f")
    assert (info.value.line, info.value.keypath) == (8, "rule[1].hooks.timeout")


def test_repeated_rule_pattern_is_refused():
    with pytest.raises(ConfigError, match=r"repeats rule\[0\]") as info:
        config.parse('[[rule]]\nname = "dp-*"\n[[rule]]\nname = "dp-*"\n', "f")
    assert info.value.line == 4


def test_toml_syntax_error_has_its_line():
    with pytest.raises(ConfigError) as info:
        config.parse("[service]\nslots = = 3\n", "f")
    assert info.value.line == 2 and str(info.value).startswith("f:2: invalid TOML: ")


def test_toml_error_at_end_of_file():
    with pytest.raises(ConfigError) as info:
        config.parse('[[rule]]\nname = "x"\non_exit = [\n', "f")
    assert info.value.line == 3


def test_config_error_is_a_procwatch_error_and_pickles():
    err = ConfigError("f.toml", 3, "service.slots", "expected X, got Y")
    assert isinstance(err, ProcwatchError)
    copy = pickle.loads(pickle.dumps(err))
    assert str(copy) == str(err) == "f.toml:3: key 'service.slots': expected X, got Y"


# -- values that are accepted ----------------------------------------------------------

def test_every_setting_accepted():
    cfg = config.parse("""
[service]
key = 0x1234
slots = 16
backend = "pidfd"
rcvbuf = 1048576
reconcile_interval = 2
group = "procwatch"
log_level = "DEBUG"
[hang]
action = "log"
signal = "ABRT"
max_misses = 5
[metrics]
address = "[::1]:9464"
[hooks]
workers = 4
queue = 8
timeout = 2.5
[[rule]]
name = "dp-?"
heartbeat = 0
[rule.hooks]
on_hung = ["logger", "hung"]
""", "f")
    assert (cfg.key, cfg.slots, cfg.backend, cfg.rcvbuf) == (0x1234, 16, "pidfd", 1048576)
    assert cfg.reconcile_interval == 2.0 and cfg.group == "procwatch" and cfg.log_level == "debug"
    assert cfg.hang == config.HangSettings("log", signal.SIGABRT, 5)
    assert cfg.metrics == Address("::1", 9464) and str(cfg.metrics) == "[::1]:9464"
    assert cfg.hooks == config.HookSettings(4, 8, 2.5)
    assert cfg.rules[0].heartbeat == 0.0
    assert cfg.rules[0].hooks.on_hung == ("logger", "hung")


def test_metrics_address_hostname():
    cfg = config.parse('[metrics]\naddress = "localhost:9464"\n', "f")
    assert cfg.metrics == Address("localhost", 9464) and str(cfg.metrics) == "localhost:9464"


# -- rules ----------------------------------------------------------------------------

RULES = """
[hang]
signal = "SIGTERM"
starved = "kill"
[hooks]
timeout = 7
[[rule]]
name = "dp-1"
action = "log"
starved = "log"
[[rule]]
name = "dp-*"
heartbeat = 0.5
signal = "SIGABRT"
[rule.hooks]
on_exit = ["true"]
"""


def test_first_matching_rule_wins():
    cfg = config.parse(RULES, "f")
    assert config.rule_for(cfg, "dp-1").name == "dp-1"
    assert config.rule_for(cfg, "dp-2").name == "dp-*"
    assert config.rule_for(cfg, "DP-2") is None       # case-sensitive
    assert config.rule_for(cfg, "other") is None


def test_policy_merges_rule_over_defaults():
    cfg = config.parse(RULES, "f")
    p1 = config.policy_for(cfg, "dp-1")
    assert (p1.action, p1.signal, p1.max_misses, p1.heartbeat) == ("log", signal.SIGTERM, 3, None)
    assert p1.on_exit is None and p1.hook_timeout == 7.0
    p2 = config.policy_for(cfg, "dp-2")
    assert (p2.action, p2.signal, p2.heartbeat) == ("kill", signal.SIGABRT, 0.5)
    assert (p1.starved, p2.starved) == ("log", "kill")          # the rule's, else [hang]'s
    assert config.policy_for(config.parse("", "f"), "x").starved == "log"    # the built-in default
    assert p2.on_exit == ("true",) and p2.on_hung is None
    none = config.policy_for(cfg, "x")
    assert none.rule is None and none.signal == signal.SIGTERM


# -- command line wins ----------------------------------------------------------------------

def test_merge_command_line_wins():
    cfg = config.parse('[service]\nslots = 16\nbackend = "pidfd"\n[hang]\nmax_misses = 4\n', "f")
    merged = config.merge(cfg, {"slots": 32, "backend": None, "hang_signal": "SIGABRT",
                                "metrics": "127.0.0.1:9464", "key": 0x99})
    assert (merged.slots, merged.backend, merged.key) == (32, "pidfd", 0x99)
    assert merged.hang == config.HangSettings("kill", signal.SIGABRT, 4)
    assert config.merge(cfg, {"hang_starved": "kill"}).hang.starved == "kill"
    assert merged.metrics == Address("127.0.0.1", 9464)
    assert cfg.slots == 16          # frozen; merge made a copy


def test_merge_all_none_changes_nothing():
    cfg = config.parse(RULES, "f")
    assert config.merge(cfg, dict.fromkeys(config.OVERRIDES)) == cfg


def test_merge_metrics_off():
    cfg = config.parse('[metrics]\naddress = "127.0.0.1:1"\n', "f")
    assert config.merge(cfg, {"metrics": "off"}).metrics is None


def test_merge_rejects_bad_option_values():
    with pytest.raises(ConfigError) as info:
        config.merge(config.Config(), {"hang_signal": "SIGFOO"})
    assert str(info.value).startswith("<command line>: option '--hang-signal': expected ")
    with pytest.raises(ConfigError, match="--slots"):
        config.merge(config.Config(), {"slots": 0})


def test_merge_unknown_override_is_a_bug():
    with pytest.raises(TypeError):
        config.merge(config.Config(), {"slot": 3})


# -- properties ----------------------------------------------------------------------------

@hypothesis.given(st.text(max_size=200))
def test_any_text_gives_a_config_or_a_config_error(text):
    try:
        config.parse(text, "f")
    except ConfigError as err:
        assert "\n" not in str(err)


@hypothesis.given(st.integers(min_value=-2**63, max_value=2**63 - 1))
def test_slots_accepted_exactly_in_range(n):
    text = f"[service]\nslots = {n}\n"
    if 1 <= n <= abi.MAX_SLOTS:
        assert config.parse(text, "f").slots == n
    else:
        with pytest.raises(ConfigError) as info:
            config.parse(text, "f")
        assert info.value.line == 2


@hypothesis.given(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=6, unique=True),
                  st.integers(min_value=0, max_value=5))
def test_line_found_for_bad_key_in_any_rule(names, bad):
    bad %= len(names)
    lines = []
    for i, name in enumerate(names):
        lines += ["[[rule]]", f'name = "{name}"']
        if i == bad:
            lines.append("heartbeat = -1")
            expected = len(lines)
    with pytest.raises(ConfigError) as info:
        config.parse("\n".join(lines) + "\n", "f")
    assert (info.value.line, info.value.keypath) == (expected, f"rule[{bad}].heartbeat")


def test_find_line_dotted_and_quoted_keys():
    text = '[service]\n"slots" = 3\n[[rule]]\nname = "a"\nhooks.on_exit = ["x"]\n'
    assert config.find_line(text, ("service", "slots")) == 2
    assert config.find_line(text, ("rule", 0, "hooks", "on_exit")) == 5
    assert config.find_line(text, ("rule", 3, "name")) is None


# -- procwatch check-config --------------------------------------------------------------

def check_config(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "procwatch", "check-config", *args],
                          capture_output=True, text=True, cwd=EXAMPLE.parent, timeout=60)


def test_check_config_accepts_the_example():
    out = check_config(str(EXAMPLE))
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{EXAMPLE}: OK (2 rules, metrics off, etcd off, key 0x70770001)\n"


def test_check_config_refuses_in_one_line(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[service]\nslots = 8\n\n[[rule]]\nname = "dp-*"\nsignal = "SIGKIL"\n')
    out = check_config(str(path))
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == (f"procwatch: {path}:6: key 'rule[0].signal': expected a signal name whose "
                          f"default action ends the process, such as 'SIGKILL', 'SIGABRT' or 'SIGTERM', "
                          f"got string 'SIGKIL'\n")
    path.write_text('[[rule]]\nname = "dp-*"\nstarved = "restart"\n')
    out = check_config(str(path))
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == (f"procwatch: {path}:3: key 'rule[0].starved': expected one of 'kill', 'log', "
                          f"got string 'restart'\n")
    out = check_config(str(tmp_path / "absent.toml"))
    assert out.returncode == 1
    assert out.stderr == f"procwatch: {tmp_path / 'absent.toml'}: no such file: check the --config path\n"


def test_serve_help_documents_config_and_sighup():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "procwatch", "serve", "--help"], capture_output=True,
                         text=True, cwd=EXAMPLE.parent, timeout=60)
    assert out.returncode == 0
    for word in ("--config", "--metrics", "SIGHUP", "/etc/procwatch/procwatch.toml", "need a restart"):
        assert word in out.stdout, word


def test_readme_examples_are_valid():
    readme = (EXAMPLE.parent / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", readme, re.S)
    assert len(blocks) >= 2
    for i, text in enumerate(blocks):
        config.parse(text, f"README.md toml block {i}")


# -- [etcd] (issue 17) ----------------------------------------------------------------

def test_etcd_absent_is_off_and_present_takes_defaults():
    assert config.parse("").etcd is None
    e = config.parse("[etcd]\n").etcd
    assert e == config.EtcdSettings() and e.endpoints == ("http://127.0.0.1:2379",) and e.ttl == 5
    assert config.parse('[[rule]]\nname = "x"\npublish = false\n').rules[0].publish is False


@pytest.mark.parametrize("body, where, what", [
    ('endpoints = ["127.0.0.1:2379"]', "etcd.endpoints", "expected a non-empty list of URLs"),
    ('endpoints = []', "etcd.endpoints", "expected a non-empty list of URLs"),
    ('endpoints = "http://a:1"', "etcd.endpoints", "expected a non-empty list of URLs"),
    ('prefix = "procwatch"', "etcd.prefix", "starts and ends with '/'"),
    ('host = "ended"', "etcd.host", "not 'ended'"),
    ('host = "a/b"', "etcd.host", "without '/'"),
    ('ttl = 0', "etcd.ttl", "lease TTL in whole seconds"),
    ('ttl = 2.5', "etcd.ttl", "lease TTL in whole seconds"),
    ('cert = "/c.pem"', "etcd.cert", "needs its key: add key = ..."),
    ('user = "u"', "etcd.user", "needs a password file: add password_file = ..."),
    ('password_file = "pw"', "etcd.password_file", "an absolute file path"),
    ('ca_cert = "/ca.pem"', "etcd.ca_cert", "use https:// endpoints with TLS"),
    ('endpoint = ["http://a:1"]', "etcd.endpoint", "did you mean 'endpoints'?"),
])
def test_etcd_mistakes_are_one_line(body, where, what):
    with pytest.raises(config.ConfigError) as info:
        config.parse(f"[service]\nslots = 8\n[etcd]\n{body}\n", "f.toml")
    msg = str(info.value)
    assert msg.startswith(f"f.toml:4: key '{where}': ") and what in msg and "\n" not in msg


def test_rule_publish_must_be_a_boolean():
    with pytest.raises(config.ConfigError, match=r"key 'rule\[0\].publish': expected true or false"):
        config.parse('[[rule]]\nname = "x"\npublish = "no"\n')


def test_check_config_without_an_argument_checks_the_default_file(tmp_path):
    """No FILE: the default path.  Absent, it says the built-in defaults would
    apply (exit 0); present, it is checked like any file.  The present case runs
    in a private mount namespace with a tmpfs over /etc (the host's /etc is not
    touched); that needs root."""
    import os
    import subprocess
    import sys
    from procwatch import config
    if not os.path.exists(config.DEFAULT_PATH):
        out = check_config()
        assert (out.returncode, out.stderr) == (0, "")
        assert out.stdout == (f"{config.DEFAULT_PATH}: no such file; 'procwatch serve' would run "
                              f"with the built-in defaults\n")
    if os.geteuid() != 0:
        pytest.skip("the present-file case needs root (a private mount namespace)")
    script = (f"mount -t tmpfs none /etc && mkdir -p {os.path.dirname(config.DEFAULT_PATH)} && "
              f"cp \"$0\" {config.DEFAULT_PATH} && exec \"$1\" -m procwatch check-config")
    good = tmp_path / "good.toml"
    good.write_text('[service]\nkey = 0x7e000042\n\n[[rule]]\nname = "dp-*"\n')
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(good),
                          sys.executable], capture_output=True, text=True, cwd=EXAMPLE.parent, timeout=60)
    assert (out.returncode, out.stderr) == (0, ""), out
    assert out.stdout == f"{config.DEFAULT_PATH}: OK (1 rule, metrics off, etcd off, key 0x7e000042)\n"
    bad = tmp_path / "bad.toml"
    bad.write_text('[service]\nslots = "many"\n')
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(bad),
                          sys.executable], capture_output=True, text=True, cwd=EXAMPLE.parent, timeout=60)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr.startswith(f"procwatch: {config.DEFAULT_PATH}:2: key 'service.slots'"), out.stderr
    assert len(out.stderr.splitlines()) == 1
