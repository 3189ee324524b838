"""grafana/procwatch-fleet.json against a real scrape of a real service.

The dashboard is only as good as the names it queries: a renamed metric
leaves a panel silently empty.  So every ``procwatch_*`` name in every
query must be a series that a running service (with metrics and an
``[etcd]`` table, so the etcd series exist too) really exposes, and every
label a query groups by, other than the ones Prometheus adds itself, must
be on that series.
"""

import json
import re
import urllib.request
from pathlib import Path

import pytest

from conftest import require_root, wait_until
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
    for topic in ("exits by cause", "detection latency", "hung and killed", "overflows", "hooks", "etcd"):
        assert topic in titles, topic


def test_every_queried_metric_exists_in_a_real_scrape(service, tmp_path):
    etcd = EtcdServer(tmp_path / "etcd").start()
    try:
        cfg = tmp_path / "pw.toml"
        cfg.write_text(f'[etcd]\nendpoints = ["{etcd.url}"]\nhost = "dash"\n')
        port = free_port()
        svc = service("--config", str(cfg), "--metrics", f"127.0.0.1:{port}")
        wait_until(lambda: "publishing to" in svc.log(), what="the publisher to connect")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            scraped = parse_exposition(r.read().decode())
    finally:
        etcd.remove()
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
