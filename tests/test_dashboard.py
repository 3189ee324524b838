"""grafana/procwatch-fleet.json against a real scrape of a real service.

The dashboard is only as good as the names it queries: a renamed metric
leaves a panel silently empty.  So every ``procwatch_*`` name in every
query must be a series that a running service (with metrics and an
``[etcd]`` table, so the etcd series exist too) really exposes, and every
label a query groups by, other than the ones Prometheus adds itself, must
be on that series.  And every histogram the service exposes must have a
panel drawing its quantiles: a histogram added later without a panel (as the
death word's two were, issue 14) fails here.
"""

import json
import re
import urllib.request
from pathlib import Path

import pytest

from conftest import ServiceProcess, fresh_key, remove_ipc, require_root, wait_until
from etcdserver import EtcdServer, free_port

pytest.importorskip("prometheus_client")
pytest.importorskip("pyetcd")
pytestmark = [require_root()]

DASHBOARD = Path(__file__).resolve().parent.parent / "grafana" / "procwatch-fleet.json"
PROMETHEUS_LABELS = {"instance", "job", "le"}      # added by Prometheus, or the histogram's own


def queries(dashboard):
    out = []
    for panel in dashboard["panels"]:
        out += [t["expr"] for t in panel.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        q = var.get("query")
        if isinstance(q, dict):
            out.append(q["query"])
    return out


def histograms(text):
    """Names of the histogram families of a Prometheus text exposition (its ``# TYPE`` lines)."""
    return {m[1] for m in re.finditer(r"^# TYPE ([a-zA-Z_:][a-zA-Z0-9_:]*) histogram$", text, re.M)}


def parse_exposition(text):
    """{series name: set of label names} of a Prometheus text exposition."""
    series = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s", line)
        labels = set(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', m[3] or ""))
        series.setdefault(m[1], set()).update(labels)
    return series


def test_dashboard_is_well_formed():
    d = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    assert all(p["targets"] and p["datasource"]["uid"] == "${datasource}" for p in d["panels"])
    titles = " ".join(p["title"].lower() for p in d["panels"])
    for topic in ("exits by cause", "detection latency", "death-word latency", "teardown", "hung and killed",
                  "overflows", "hooks", "etcd"):
        assert topic in titles, topic


@pytest.fixture(scope="module")
def exposition(tmp_path_factory):
    """The text of one real scrape of a real service with metrics and an ``[etcd]`` table."""
    tmp = tmp_path_factory.mktemp("dashboard")
    key = fresh_key()
    remove_ipc(key)
    etcd = EtcdServer(tmp / "etcd").start()
    svc = None
    try:
        cfg = tmp / "pw.toml"
        cfg.write_text(f'[etcd]\nendpoints = ["{etcd.url}"]\nhost = "dash"\n')
        port = free_port()
        svc = ServiceProcess(key, tmp / "service.log", "--config", str(cfg), "--metrics", f"127.0.0.1:{port}")
        svc.wait_ready()
        wait_until(lambda: "publishing to" in svc.log(), what="the publisher to connect")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()
    finally:
        if svc is not None:
            svc.stop()
        etcd.remove()
        remove_ipc(key)


def test_every_queried_metric_exists_in_a_real_scrape(exposition):
    scraped = parse_exposition(exposition)
    d = json.loads(DASHBOARD.read_text())
    missing, bad_labels = [], []
    for expr in queries(d):
        for name in set(re.findall(r"\bprocwatch_[a-z0-9_]+", expr)):
            if name not in scraped:
                missing.append((name, expr))
                continue
            for group in re.findall(r"\bby \(([^)]*)\)", expr):
                for label in (x.strip() for x in group.split(",")):
                    if label not in PROMETHEUS_LABELS and label not in scraped[name]:
                        bad_labels.append((name, label))
    assert not missing, f"queried but not exposed: {missing}"
    assert not bad_labels, f"grouped by a label the series lacks: {bad_labels}"
    assert any("etcd" in n for n in scraped), "the etcd series were not exposed"


def test_every_exposed_histogram_has_a_quantile_panel(exposition):
    exposed = histograms(exposition)
    assert "procwatch_teardown_seconds" in exposed, sorted(exposed)     # the scrape has the death word's too
    d = json.loads(DASHBOARD.read_text())
    drawn = set()
    for panel in d["panels"]:
        for t in panel.get("targets", []):
            if "histogram_quantile(" in t["expr"]:
                drawn |= set(re.findall(r"\b([a-z0-9_]+)_bucket\b", t["expr"]))
    assert not exposed - drawn, f"histograms with no panel drawing their quantiles: {sorted(exposed - drawn)}"
