"""``scripts/bench --quick`` runs to its end (root; slow: a few minutes).

The benchmark is where procwatch's timing goals live (ratios against
baselines measured in the same run); this test asserts none of them.  It
proves that the benchmark itself still works from a checkout as CI makes it
(a fresh clone, after scripts/setup): it compiles its helpers, starts its own
services on private keys, and finishes with its JSON and markdown, here in a
directory of the test's own.  ``--max-seconds`` bounds its budget; the
subprocess timeout bounds the test.
"""

import json
import os
import subprocess
import sys
import time

from conftest import ROOT, require_root

pytestmark = [require_root()]

BUDGET_S = 240          # --max-seconds: the bench stops starting new rounds after this


def test_bench_quick_runs_to_its_end(tmp_path):
    out = tmp_path / "bench-out"
    started = time.monotonic()
    # PROCWATCH_PYTHON: scripts/test has run scripts/setup already; use its interpreter.
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench"), "--quick", "--max-seconds", str(BUDGET_S),
                        "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=BUDGET_S + 360,
                       env=dict(os.environ, PROCWATCH_PYTHON=sys.executable))
    seconds = time.monotonic() - started
    print(f"\nBENCH --quick ran {seconds:.0f} s (load average {os.getloadavg()[0]:.1f})")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    data = json.loads((out / "bench.json").read_text())
    assert data["args"]["quick"] is True and data["sections"], sorted(data)
    rows = [row for s in data["sections"] for row in s.get("rows", [])]
    assert rows, "the bench measured nothing"
    stopped = [row for row in rows if row.get("error")]
    assert not stopped, f"rounds stopped early: {stopped}"
    assert (out / "BENCHMARKS.md").read_text().strip()
    assert not list(ROOT.glob("bench-out")) or (ROOT / "bench-out").stat().st_mtime < time.time() - seconds, \
        "the bench wrote into the checkout, not --out"
