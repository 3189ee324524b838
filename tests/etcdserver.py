"""A real etcd server for tests and the benchmark: loopback only, free ports, a private data dir.

Debian's ``etcd-server`` and ``etcd-client`` packages, which scripts/setup
unpacks into ``.venv/etcd`` (not installed: that would start a system etcd
wherever systemd is PID 1), give ``etcd`` and ``etcdctl``; an etcd on $PATH
serves as well.  Each server listens on 127.0.0.1 on a client and a
peer port picked free by the kernel, keeps its data in a directory of its
own, and is stopped by its PID (SIGTERM, then SIGKILL).  ``restart()``
keeps the ports and the data, as an operator's restart would.  With
``tls=True`` clients must use https and a client certificate: ``make_certs``
writes a CA, the server's certificate (for IP 127.0.0.1) and a client's,
with the openssl command.
"""

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

_UNPACKED = Path(__file__).resolve().parent.parent / ".venv" / "etcd" / "usr" / "bin"


def etcd_tool(name):
    """Path of ``etcd`` or ``etcdctl``: the one scripts/setup unpacked, else $PATH's; None if neither."""
    own = _UNPACKED / name
    return str(own) if os.access(own, os.X_OK) else shutil.which(name)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_certs(d):
    """A CA, a server certificate for 127.0.0.1 and a client certificate in ``d``; their paths."""
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)

    def ossl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True)
    ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=procwatch-test-ca",
         "-keyout", str(d / "ca-key.pem"), "-out", str(d / "ca.pem"))
    for who, ext in (("server", "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
                     ("client", "extendedKeyUsage=clientAuth")):
        (d / f"{who}.ext").write_text(ext + "\n")
        ossl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN=procwatch-test-{who}",
             "-keyout", str(d / f"{who}-key.pem"), "-out", str(d / f"{who}.csr"))
        ossl("x509", "-req", "-in", str(d / f"{who}.csr"), "-CA", str(d / "ca.pem"), "-CAkey",
             str(d / "ca-key.pem"), "-CAcreateserial", "-days", "2", "-extfile", str(d / f"{who}.ext"),
             "-out", str(d / f"{who}.pem"))
    return {k: str(d / f) for k, f in (("ca", "ca.pem"), ("server_cert", "server.pem"),
                                         ("server_key", "server-key.pem"), ("client_cert", "client.pem"),
                                         ("client_key", "client-key.pem"))}


class EtcdServer:
    def __init__(self, workdir, name="pw", tls=False):
        self.dir = Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data = self.dir / "data"
        self.name = name
        self.client_port, self.peer_port = free_port(), free_port()
        self.certs = make_certs(self.dir / "certs") if tls else None
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.client_port}"
        self.proc = None
        self._log = None

    def argv(self):
        peer = f"http://127.0.0.1:{self.peer_port}"
        return [etcd_tool("etcd"), "--name", self.name, "--data-dir", str(self.data),
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"{self.name}={peer}", "--initial-cluster-state", "new",
                *self._tls_args()]

    def _tls_args(self):
        if not self.certs:
            return []
        c = self.certs
        return ["--cert-file", c["server_cert"], "--key-file", c["server_key"],
                "--trusted-ca-file", c["ca"], "--client-cert-auth"]

    def _ctl_tls(self):
        if not self.certs:
            return []
        c = self.certs
        return ["--cacert", c["ca"], "--cert", c["client_cert"], "--key", c["client_key"]]

    def start(self, timeout=30.0):
        if etcd_tool("etcd") is None or etcd_tool("etcdctl") is None:
            raise RuntimeError("etcd is not unpacked: run scripts/setup (Debian's etcd-server and etcd-client)")
        self._log = open(self.dir / "etcd.log", "ab")
        # ETCD_* variables of the caller would change this server: none pass.
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=self._log, env=env)
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}: {self.log()[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"etcd did not get ready within {timeout:g} s: {self.log()[-2000:]}")
            time.sleep(0.05)
        return self

    def healthy(self):
        r = subprocess.run([etcd_tool("etcdctl"), "--endpoints", self.url, "--command-timeout=1s", *self._ctl_tls(),
                            "endpoint", "health"], capture_output=True, env=self._ctl_env())
        return r.returncode == 0

    def _ctl_env(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        env["ETCDCTL_API"] = "3"
        return env

    def ctl(self, *args, user=None, check=True):
        """etcdctl against this server; its stdout."""
        cmd = [etcd_tool("etcdctl"), "--endpoints", self.url, *self._ctl_tls()]
        if user:
            cmd += ["--user", user]
        r = subprocess.run([*cmd, *args], capture_output=True, text=True, env=self._ctl_env())
        if check and r.returncode != 0:
            raise RuntimeError(f"etcdctl {' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def log(self):
        return (self.dir / "etcd.log").read_text(errors="replace")

    def stop(self, timeout=10.0):
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout)
        if self._log is not None:
            self._log.close()
            self._log = None

    def restart(self):
        self.stop()
        return self.start()

    def remove(self):
        self.stop()
        shutil.rmtree(self.data, ignore_errors=True)
