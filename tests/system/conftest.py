"""Fixtures of the system tier: root on the host, systemd in a container.

These tests need root and systemd-nspawn (apt: systemd-container).  Where
that is missing they FAIL with the reason: a machine that cannot boot the
container must not look green.  The one way to leave them out is explicit
and shows in the report: PROCWATCH_SKIP_SYSTEM=1.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .container import Container, reap_stale

REPO = Path(__file__).resolve().parents[2]
NAME_PREFIX = "pwtest-"

# The checkout is bound read-only at its own path (shebangs and .pth files
# keep working), except under /tmp, /var/tmp or /run, which the container's
# tmpfiles owns: then at /src.
if any(str(REPO).startswith(p) for p in ("/tmp/", "/var/tmp/", "/run/")):
    REPO_INSIDE = "/src"
else:
    REPO_INSIDE = str(REPO)


@pytest.fixture(autouse=True)
def _system_prerequisites():
    if os.environ.get("PROCWATCH_SKIP_SYSTEM") == "1":
        pytest.skip("PROCWATCH_SKIP_SYSTEM=1: system tests left out on request")
    if os.geteuid() != 0:
        # fail, do not skip: see the module docstring
        pytest.fail("system tests need root (systemd-nspawn, setpriv, other users' processes)",
                    pytrace=False)


@pytest.fixture(scope="session", autouse=True)
def _teardown_on_sigterm():
    """SIGTERM (CI timeouts, `kill`) runs the fixtures' teardown: a plain
    SIGTERM would end pytest with its containers still running."""
    def raise_exit(signum, frame):
        sys.exit(128 + signum)
    old = signal.signal(signal.SIGTERM, raise_exit)
    yield
    signal.signal(signal.SIGTERM, old)


@pytest.fixture(scope="session")
def reaped():
    """Containers left by an earlier, killed run are stopped first."""
    if os.geteuid() == 0:
        for name in reap_stale(prefix=NAME_PREFIX):
            print(f"stopped container {name} left by a killed test run")


def container_name(tag):
    return f"{NAME_PREFIX}{tag}-{os.getpid()}"


@pytest.fixture(scope="session")
def wheels(tmp_path_factory):
    """A directory of wheels of procwatch[systemd] and its dependencies, for
    offline installs inside a container.  PROCWATCH_WHEELS reuses one."""
    if os.environ.get("PROCWATCH_WHEELS"):
        return Path(os.environ["PROCWATCH_WHEELS"])
    d = tmp_path_factory.mktemp("wheels")
    r = subprocess.run([str(REPO / "scripts" / "install"), "--make-wheels", str(d)],
                       env=dict(os.environ, PYTHON=sys.executable), capture_output=True,
                       text=True, timeout=600)
    if r.returncode:
        pytest.fail(f"scripts/install --make-wheels failed:\n{r.stderr[-3000:]}", pytrace=False)
    return d


@pytest.fixture(scope="package")
def installed(reaped, wheels):
    """A booted container with procwatch installed by scripts/install (offline, from
    the wheels), over a writable /usr overlay whose writes vanish at stop: the
    host's /usr and /opt are never touched.  Shared by test_install.py and
    test_systemd.py: booting and installing once saves ~10 s.  Package scope:
    stopped when the run leaves tests/system, so no nspawn child outlives it
    (tests/test_hooks.py checks that pytest has no stray children)."""
    host_paths = {p: p.exists() for p in (Path("/usr/local/bin/procwatch"), Path("/opt/procwatch"))}
    c = Container(container_name("installed"), writable_usr=True,
                  binds_ro=[(str(REPO), REPO_INSIDE), (str(wheels), "/wheels")])
    c.start()
    try:
        t0 = time.monotonic()
        r = c.exec(f"{REPO_INSIDE}/scripts/install", "--wheels", "/wheels", timeout=300)
        c.install_seconds = time.monotonic() - t0
        Container.timings.append((c.name, "install", c.install_seconds))
        if r.returncode:
            pytest.fail(f"scripts/install --wheels failed ({r.returncode}):\n{r.stderr[-3000:]}",
                        pytrace=False)
        yield c
    finally:
        c.stop()
    assert {p: p.exists() for p in host_paths} == host_paths      # the host is untouched


def pytest_terminal_summary(terminalreporter):
    if Container.timings:
        terminalreporter.section("container boot, install and stop times")
        for name, what, seconds in Container.timings:
            terminalreporter.write_line(f"{name:32} {what:7} {seconds:6.3f} s")


def systemd_site():
    """Where the test runner's systemd-python lives, and where a container
    sees it: (host_dir, inside_dir).  A site under /usr is visible inside
    as it is; any other (a venv) is bound read-only at /opt/pwtest-site."""
    import systemd
    site = Path(systemd.__file__).resolve().parents[1]
    if str(site).startswith("/usr/"):
        return site, str(site)
    return site, "/opt/pwtest-site"
