"""cli.py: one parser built from the command modules; what becomes a one-line error and what stays a bug."""

import subprocess

import pytest

from conftest import PY, ROOT
from procwatch import cli, statuscmd


def test_a_bug_inside_a_command_keeps_its_traceback(monkeypatch):
    """Only ProcwatchError (and UsageError) become one line: a ValueError is a bug (it was exit 2)."""
    def broken(args):
        raise ValueError("a bug in the status command")
    monkeypatch.setattr(statuscmd, "run", broken)
    with pytest.raises(ValueError, match="a bug in the status command"):
        cli.main(["status"])


def test_a_bad_procwatch_key_is_still_one_usage_line():
    out = subprocess.run([PY, "-m", "procwatch", "status"], capture_output=True, text=True, cwd=ROOT,
                         env={"PROCWATCH_KEY": "bogus", "PATH": "/usr/bin:/bin"}, timeout=60)
    assert out.returncode == cli.EXIT_USAGE
    assert out.stderr.count("\n") == 1 and "PROCWATCH_KEY='bogus' is not an integer" in out.stderr


def test_watch_and_json_is_a_usage_error(capsys):
    assert cli.main(["status", "--watch", "--json"]) == cli.EXIT_USAGE
    assert "--watch and --json do not combine" in capsys.readouterr().err


def test_every_command_module_has_the_same_shape():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        run = p.get_default("run")
        assert callable(run) and run.__name__ == "run", name
        assert hasattr(__import__(run.__module__, fromlist=["add_parser"]), "add_parser"), name
