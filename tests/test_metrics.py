"""procwatch.stats and procwatch.metrics: real threads, a real HTTP scrape over 127.0.0.1,
parsed with prometheus_client's own text parser."""

import socket
import subprocess
import sys
import threading
import types

import pytest

from conftest import metric_value, scrape_metrics
from procwatch import abi, metrics
from procwatch.hooks import HookEvent, HookRunner
from procwatch.stats import LATENCY_BUCKETS, Stats

WAIT = 30


def slot(state):
    return types.SimpleNamespace(state=state)


@pytest.fixture
def server():
    started = []

    def start(stats, table=None):
        srv = metrics.start(("127.0.0.1", 0), stats, table)
        started.append(srv)
        return srv
    yield start
    for srv in started:
        srv.close()


# -- Stats ------------------------------------------------------------------------

def test_stats_exits_by_cause_and_found_dead():
    stats = Stats()
    stats.record_exit(abi.Cause.EXITED, latency_us=85)
    stats.record_exit(abi.Cause.KILLED_HUNG, latency_us=150)
    stats.record_exit(abi.Cause.FOUND_DEAD)
    stats.record_exit(abi.Cause.FOUND_DEAD_OVERFLOW, latency_us=abi.LATENCY_UNKNOWN)
    stats.record_exit(int(abi.Cause.PID_REUSED))
    stats.record_exit(abi.Cause.UNREGISTERED)
    snap = stats.snapshot()
    assert snap.exits == {"exited": 1, "killed_hung": 1, "found_dead": 1,
                          "found_dead_overflow": 1, "pid_reused": 1, "unregistered": 1}
    assert snap.found_dead == 3
    assert snap.latency.count == 2
    assert snap.latency.total == pytest.approx(235e-6)
    cumulative = dict(snap.latency.buckets)
    assert cumulative[50e-6] == 0 and cumulative[100e-6] == 1 and cumulative[200e-6] == 2
    assert snap.latency.buckets[-1] == (float("inf"), 2)


def test_stats_bucket_bounds_are_inclusive():
    stats = Stats()
    stats.record_exit(abi.Cause.EXITED, latency_us=100)         # exactly le=0.0001
    stats.record_exit(abi.Cause.EXITED, latency_us=5_000_000)   # beyond every bound
    buckets = dict(stats.snapshot().latency.buckets)
    assert buckets[100e-6] == 1 and buckets[LATENCY_BUCKETS[-1]] == 1 and buckets[float("inf")] == 2


def test_stats_readers_for_the_status_line():
    """The service's status line and log messages read these (they replaced detector.Stats)."""
    stats = Stats()
    stats.record_exit(abi.Cause.EXITED, latency_us=10)
    stats.record_exit(abi.Cause.KILLED_HUNG, latency_us=10)
    stats.record_exit(abi.Cause.FOUND_DEAD)
    stats.record_exit(abi.Cause.PID_REUSED)
    stats.record_overflow()
    stats.record_detector_respawn()
    stats.record_corrupt()
    stats.record_end("dp-1", "killed by SIGKILL")
    assert (stats.exits, stats.found_dead, stats.overflows, stats.respawns, stats.corrupt) == (2, 2, 1, 1, 1)
    assert stats.last_end[:2] == ("dp-1", "killed by SIGKILL")
    assert stats.snapshot().corrupt == 1


def test_stats_counts_exactly_under_threads():
    stats = Stats()
    per_thread, n_threads = 20_000, 8

    def hammer():
        for _ in range(per_thread):
            stats.record_exit(abi.Cause.EXITED, latency_us=80)
            stats.record_hung("busy")

    threads = [threading.Thread(target=hammer) for _ in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = stats.snapshot()
    assert snap.exits["exited"] == snap.hung["busy"] == snap.latency.count == per_thread * n_threads
    assert sum(snap.hung.values()) == snap.hung["busy"]


def test_service_modules_do_not_import_prometheus_client():
    code = ("import sys, procwatch.stats, procwatch.hooks, procwatch.config; "
            "print('prometheus_client' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- the HTTP endpoint -------------------------------------------------------------------

def test_scrape_shows_every_metric_and_counters_move(server):
    stats = Stats()
    table = [slot(abi.State.ALIVE), slot(abi.State.HUNG), slot(abi.State.EXITED),
             slot(abi.State.CLAIMING)]
    srv = server(stats, lambda: table)
    before = scrape_metrics(srv.port)
    assert {name: f.type for name, f in before.items()} == {
        "procwatch_registered_processes": "gauge",
        "procwatch_exits": "counter",
        "procwatch_detection_latency_seconds": "histogram",
        "procwatch_death_word_latency_seconds": "histogram",
        "procwatch_teardown_seconds": "histogram",
        "procwatch_found_dead": "counter",
        "procwatch_overflows": "counter",
        "procwatch_detector_respawns": "counter",
        "procwatch_hung": "counter",
        "procwatch_killed": "counter",
        "procwatch_hook_runs": "counter",
        "procwatch_hook_failures": "counter",
        "procwatch_hook_timeouts": "counter",
        "procwatch_hook_dropped": "counter",
        "procwatch_corrupt_slots": "counter",
        "procwatch_checker_duration_seconds": "histogram",
    }
    assert metric_value(before, "procwatch_registered_processes") == 2
    assert metric_value(before, "procwatch_exits_total", cause="exited") == 0
    assert metric_value(before, "procwatch_hook_runs_total") == 0

    # Move the counters with real work: a hook run, and the records the
    # detector and the checker make.
    done = threading.Event()
    with HookRunner(stats=stats, on_done=lambda r: done.set()) as runner:
        runner.submit(["false"], HookEvent("exit", "demo", 1, 0))
        assert done.wait(WAIT)
    stats.record_exit(abi.Cause.KILLED_HUNG, latency_us=120)
    stats.record_exit(abi.Cause.FOUND_DEAD)
    stats.record_hung("starved")
    stats.record_hung("busy")
    stats.record_killed("busy")
    stats.record_killed("no such verdict")
    stats.record_exit(abi.Cause.EXITED, latency_us=80, teardown_us=450_000)    # zeroed by a death word
    stats.record_overflow()
    stats.record_detector_respawn()
    stats.record_check(0.0004)
    stats.record_corrupt()
    table.pop(0)

    after = scrape_metrics(srv.port)
    assert metric_value(after, "procwatch_registered_processes") == 1
    assert metric_value(after, "procwatch_exits_total", cause="killed_hung") == 1
    assert metric_value(after, "procwatch_exits_total", cause="found_dead") == 1
    assert metric_value(after, "procwatch_exits_total", cause="exited") == 1
    # Each figure in its own family: a death word's 80 µs is not an exit event's latency.
    assert metric_value(after, "procwatch_death_word_latency_seconds_count") == 1
    assert metric_value(after, "procwatch_death_word_latency_seconds_sum") == pytest.approx(80e-6)
    assert metric_value(after, "procwatch_teardown_seconds_bucket", le="0.25") == 0
    assert metric_value(after, "procwatch_teardown_seconds_bucket", le="0.5") == 1
    assert metric_value(after, "procwatch_found_dead_total") == 1
    assert metric_value(after, "procwatch_hung_total", verdict="starved") == 1
    assert metric_value(after, "procwatch_hung_total", verdict="busy") == 1
    assert metric_value(after, "procwatch_killed_total", verdict="busy") == 1
    assert metric_value(after, "procwatch_killed_total", verdict="unknown") == 1     # a label outside the set
    assert {s.labels["verdict"] for s in after["procwatch_hung"].samples if s.name.endswith("_total")} == {
        "stopped", "starved", "stuck", "busy", "blocked", "unknown"}
    assert metric_value(after, "procwatch_overflows_total") == 1
    assert metric_value(after, "procwatch_detector_respawns_total") == 1
    assert metric_value(after, "procwatch_hook_runs_total") == 1
    assert metric_value(after, "procwatch_hook_failures_total") == 1
    assert metric_value(after, "procwatch_detection_latency_seconds_count") == 1
    assert metric_value(after, "procwatch_detection_latency_seconds_bucket", le="0.0002") == 1
    assert metric_value(after, "procwatch_detection_latency_seconds_bucket", le="0.0001") == 0
    assert metric_value(after, "procwatch_detection_latency_seconds_sum") == pytest.approx(120e-6)
    assert metric_value(after, "procwatch_checker_duration_seconds_bucket", le="0.0005") == 1
    assert metric_value(after, "procwatch_checker_duration_seconds_count") == 1
    assert metric_value(after, "procwatch_corrupt_slots_total") == 1


def test_no_label_of_unbounded_cardinality(server):
    stats = Stats()
    stats.record_exit(abi.Cause.EXITED, latency_us=99)
    families = scrape_metrics(server(stats, lambda: [slot(abi.State.ALIVE)]).port)
    labels = {label for f in families.values() for s in f.samples for label in s.labels}
    assert labels == {"cause", "le", "verdict"}
    # Every label's values form a fixed set, whatever was recorded.
    stats.record_hung("no such verdict")
    again = scrape_metrics(server(stats, lambda: [slot(abi.State.ALIVE)]).port)
    verdicts = {s.labels["verdict"] for f in again.values() for s in f.samples if "verdict" in s.labels}
    assert verdicts == {"stopped", "starved", "stuck", "busy", "blocked", "unknown"}
    assert all(name.startswith("procwatch_") for name in families)


def test_without_table_there_is_no_registered_gauge(server):
    families = scrape_metrics(server(Stats()).port)
    assert "procwatch_registered_processes" not in families


def test_port_in_use_is_a_one_line_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(metrics.MetricsUnavailable) as info:
            metrics.start(("127.0.0.1", port), Stats())
    assert str(info.value) == (f"cannot serve metrics on 127.0.0.1:{port}: Address already in use: "
                               f"pick another metrics address, or 'off'")


def test_close_frees_the_port():
    srv = metrics.start(("127.0.0.1", 0), Stats())
    port = srv.port
    srv.close()
    again = metrics.start(("127.0.0.1", port), Stats())    # client_python #1068
    again.close()
