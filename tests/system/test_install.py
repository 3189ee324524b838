"""scripts/install inside a container: offline from wheels, over a writable /usr overlay.

The container has no network, so the wheels are built on the host first
(``scripts/install --make-wheels``, the ``wheels`` fixture) and bound in
read-only.  The ``installed`` fixture (conftest.py) boots and installs once
for this module and test_systemd.py.
"""

from procwatch.journal import Event

from .conftest import REPO_INSIDE


def test_install_puts_everything_in_place(installed):
    c = installed
    assert c.exec("readlink", "-f", "/usr/local/bin/procwatch").stdout.strip() == \
        "/opt/procwatch/bin/procwatch"
    assert c.exec("test", "-x", "/opt/procwatch/bin/procwatch").returncode == 0
    r = c.exec("/opt/procwatch/bin/python", "-c", "import procwatch, systemd.journal")
    assert r.returncode == 0, r.stderr
    group = c.exec("getent", "group", "procwatch").stdout.split(":")
    assert group[0] == "procwatch" and int(group[2]) < 1000           # a system group
    assert c.systemctl("cat", "procwatch.service").returncode == 0   # daemon-reload done
    assert c.show("procwatch.service", "UnitFileState") == "disabled"
    assert c.show("procwatch.service", "FragmentPath") == \
        "/usr/local/lib/systemd/system/procwatch.service"
    r = c.exec("systemd-analyze", "verify", "procwatch.service")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    exposure = c.exec("systemd-analyze", "security", "--no-pager", "procwatch.service").stdout
    print(exposure.strip().splitlines()[-1])


def test_catalog_is_installed_and_explains_an_exit(installed):
    c = installed
    listed = c.exec("journalctl", "--list-catalog").stdout
    for event in Event:
        assert event.message_id.hex in listed, event
    mid = Event.EXIT.message_id.hex
    c.exec("/opt/procwatch/bin/python", "-c",
           "from systemd import journal; journal.send('exit name=demo pid=4242', "
           f"MESSAGE_ID='{mid}', PROCWATCH_EVENT='exit', PROCWATCH_NAME='demo', "
           "PROCWATCH_PID='4242', PROCWATCH_SLOT='3', PROCWATCH_SIGNAL='SIGKILL', "
           "PROCWATCH_CORE_DUMPED='0', PROCWATCH_CAUSE='exited', OBJECT_PID='4242')", check=True)
    c.exec("journalctl", "--sync")
    text = c.exec("journalctl", "-x", "--no-pager", "OBJECT_PID=4242").stdout
    assert "Subject: Watched process demo (PID 4242) exited" in text, text
    assert "@" not in text.split("Subject:", 1)[1], text     # every placeholder filled


def test_install_twice_is_harmless(installed):
    r = installed.exec(f"{REPO_INSIDE}/scripts/install", "--wheels", "/wheels", timeout=300)
    assert r.returncode == 0, r.stderr
    assert installed.exec("/opt/procwatch/bin/python", "-c", "import procwatch").returncode == 0
