"""The house's shape, read from the source: who imports whom, and who knows an offset.

Read with ``ast`` (every import, also those inside functions), so these hold
for the code as written, not for what one run happened to import.
"""

import ast
import re
from pathlib import Path

import procwatch

PKG = Path(procwatch.__file__).parent
MODULES = {p.stem: p for p in PKG.glob("*.py")}


def _imports(path):
    """Names of the procwatch modules ``path`` imports (at any depth of the file)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 or (node.module or "").startswith("procwatch"):
                mod = (node.module or "").removeprefix("procwatch").lstrip(".")
                if mod:
                    out.add(mod.split(".")[0])
                else:                                   # from . import a, b
                    out.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith("procwatch."))
    return {m for m in out if m in MODULES and m != path.stem}


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def test_the_import_graph_has_no_cycle():
    """No module imports itself back, directly (a <-> b) or around a longer loop."""
    state = {}

    def visit(m, path):
        state[m] = "open"
        for n in sorted(GRAPH[m]):
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = "done"

    for m in sorted(GRAPH):
        if m not in state:
            visit(m, [m])


def test_the_checker_sees_a_cycle():
    """The cycle check above can fail: one planted loop is found."""
    GRAPH["abi"].add("cli")
    try:
        test_the_import_graph_has_no_cycle()
    except AssertionError as e:
        assert "abi" in str(e) and "cli" in str(e)
    else:
        raise AssertionError("a planted cycle abi -> cli -> ... -> abi was not found")
    finally:
        GRAPH["abi"].discard("cli")


# A slot or header field by offset (abi.S_PID, abi.H_GENERATION) or raw word access.
_RAW = re.compile(r"\b[SH]_[A-Z][A-Z_]+\b|\b(?:h?get|h?set)(?:32|64)\b|\.u(?:32|64)\b")


def test_only_abi_and_segment_know_an_offset():
    users = {name: len(_RAW.findall(path.read_text())) for name, path in MODULES.items()
             if name not in ("abi", "segment")}
    assert {name: n for name, n in users.items() if n} == {}


def test_heartbeat_and_the_client_do_not_know_each_other():
    """The checker, the detector and the clients meet only in the table (STYLE.md 7)."""
    for a, b in (("heartbeat", "client"), ("client", "heartbeat"), ("detector", "client"),
                 ("client", "detector"), ("heartbeat", "detector")):
        assert b not in GRAPH[a], f"{a} imports {b}"
