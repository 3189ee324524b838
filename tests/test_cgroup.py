"""The cgroup side of hang verdicts on real cgroups: v1 where the cpu controller is there, v2 too.

Each test makes its own cgroup (conftest's ``cpu_cgroup``), moves only a
process it started, and removes the cgroup afterwards.
"""

import os
import signal
import subprocess
import sys

import pytest

from conftest import wait_until
from procwatch import cgroup

SPIN = "import time\nend = time.monotonic() + 60\nwhile time.monotonic() < end: pass\n"


@pytest.fixture
def spinner():
    p = subprocess.Popen([sys.executable, "-c", SPIN])
    yield p
    os.kill(p.pid, signal.SIGKILL)
    p.wait(10)


@pytest.mark.parametrize("version", [1, 2])
def test_sample_reads_the_limit_and_counts_throttling(cpu_cgroup, spinner, version):
    cg = cpu_cgroup(version)
    cg.limit(1000, 100_000)
    cg.add(spinner.pid)
    s = cgroup.sample(spinner.pid)
    name = "/" + os.path.basename(cg.path)
    assert (s.version, s.path) == (version, name)
    assert [(lv.path, lv.quota_us, lv.period_us) for lv in s.levels] == [(name, 1000, 100_000)]
    first = s
    later = wait_until(lambda: (x := cgroup.sample(spinner.pid)).levels[0].nr_throttled
                       > first.levels[0].nr_throttled and x, 10, "the loop to be throttled")
    level, periods, _ = cgroup.throttled_between(first, later)
    assert level.path == name and periods >= 1
    assert cgroup.describe_limit(version, level).startswith("cpu.max 1000 100000" if version == 2
                                                            else "cpu.cfs_quota_us 1000 per 100000")
    cg.lift()
    assert cgroup.sample(spinner.pid).levels == ()
    assert cgroup.throttled_between(first, cgroup.sample(spinner.pid)) is None


def test_pressure_comes_from_the_processs_v2_cgroup(spinner):
    """On v2 and on hybrid machines (v1 controllers, a cgroup2 mount without them)."""
    m = cgroup.mounts()
    if m.v2 is None:
        pytest.skip("no cgroup2 mount")
    path = f"{m.v2[0]}/procwatch-test-{os.getpid()}-pressure"
    try:
        os.mkdir(path)
    except OSError as e:
        pytest.skip(f"cannot create {path}: {e.strerror}")
    old = cgroup.paths(spinner.pid, "/proc")[""]
    try:
        with open(f"{path}/cgroup.procs", "w") as f:
            f.write(str(spinner.pid))
        if not os.path.exists(f"{path}/cpu.pressure"):
            pytest.skip("no cpu.pressure (kernel without PSI)")
        s = cgroup.sample(spinner.pid)
        with open(f"{path}/cpu.pressure") as f:
            total = int(f.readline().split("total=")[1])
        assert s.pressure_us is not None and s.pressure_us >= total
    finally:
        with open(cgroup.directory(m.v2, old) + "/cgroup.procs", "w") as f:
            f.write(str(spinner.pid))
        os.rmdir(path)


def test_the_root_cgroups_pressure_is_not_taken_for_the_processs_own():
    """The root cgroup's cpu.pressure is the whole machine's."""
    paths = cgroup.paths(os.getpid(), "/proc")
    if paths.get("", "/") != "/" or paths.get("cpu", "/") != "/":
        pytest.skip("this test runs in a cgroup of its own, not in the root cgroup")
    assert cgroup.sample(os.getpid()).pressure_us is None


def test_a_process_that_is_gone_has_no_sample():
    p = subprocess.Popen(["true"])
    p.wait(10)
    assert cgroup.sample(p.pid) is None


def test_v2_files_are_read_as_the_kernel_writes_them(tmp_path):
    """The v2 parsers on files in the kernel's format (cgroup-v2.rst), for machines without v2's cpu here.

    Only the text is recorded: which process is where, and whether it is
    throttled, is left to the real-cgroup tests above.
    """
    root = tmp_path / "cg"
    leaf = root / "app.slice" / "worker"
    leaf.mkdir(parents=True)
    (root / "app.slice" / "cpu.max").write_text("max 100000\n")
    (root / "app.slice" / "cpu.stat").write_text("usage_usec 10\nnr_periods 0\nnr_throttled 0\nthrottled_usec 0\n")
    (leaf / "cpu.max").write_text("1000 1000000\n")
    (leaf / "cpu.stat").write_text("usage_usec 5012\nuser_usec 4000\nsystem_usec 1012\nnr_periods 7\n"
                                   "nr_throttled 6\nthrottled_usec 5994123\nnr_bursts 0\nburst_usec 0\n")
    (leaf / "cpu.pressure").write_text("some avg10=99.00 avg60=80.00 avg300=20.00 total=6012345\n"
                                       "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    levels = cgroup._levels((str(root), "/"), "/app.slice/worker", 2)
    assert levels == (cgroup.CpuLevel("/app.slice/worker", 1000, 1_000_000, 6, 5_994_123),)
    assert cgroup._pressure_some(str(leaf)) == 6_012_345
    before = cgroup.CgroupSample(2, "/app.slice/worker", levels, 6_012_345)
    (leaf / "cpu.stat").write_text("nr_throttled 9\nthrottled_usec 8994123\n")
    after = cgroup.CgroupSample(2, "/app.slice/worker", cgroup._levels((str(root), "/"), "/app.slice/worker", 2),
                                9_012_345)
    level, periods, throttled = cgroup.throttled_between(before, after)
    assert (level.path, periods, throttled) == ("/app.slice/worker", 3, 3_000_000)
    assert cgroup.describe_limit(2, level) == "cpu.max 1000 1000000 at /app.slice/worker"
    # A parent's limit counts too: a limit on app.slice shows as a second level.
    (root / "app.slice" / "cpu.max").write_text("50000 100000\n")
    assert [lv.path for lv in cgroup._levels((str(root), "/"), "/app.slice/worker", 2)] == [
        "/app.slice/worker", "/app.slice"]
