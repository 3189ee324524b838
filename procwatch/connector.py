"""The kernel's process connector: a socket of exit events.

The socket is ours from ``socket()`` on (the constants follow pyroute2's
``cn_proc.py``), for four reasons learnt the hard way (see docs and STYLE.md's
notes on pyroute2 #1038/#1039):

* Importing any part of pyroute2 runs its ``__init__``, which loads the whole
  library: ~80 ms and ~18 MB of RSS for two system calls (socket, bind).
  And its sockets are non-blocking: a dup of one shares the O_NONBLOCK file
  status, which turned the detector's blocking ``recv_into`` into a busy
  loop at 100 % CPU (issue 7).

* ``ProcEventSocket.control()`` sends only the legacy 4-byte request, so the
  exit-only filter of kernels >= 6.6 (``struct proc_input``) cannot be asked
  for through it; and it waits for the acknowledgement with no deadline,
  while the kernel *never* acknowledges a requester outside the initial user
  and PID namespaces (``cn_proc_mcast_ctl``).  We send the request ourselves
  and wait for the ack with a deadline.
* pyroute2's generic decoder costs ~48 µs an event and lost half of a fork
  storm here; one precompiled ``Struct.unpack_from`` over ``recv_into`` a
  reusable buffer costs a few µs.
* ENOBUFS must be seen, not hidden (no NETLINK_NO_ENOBUFS): it means events
  were dropped, and the caller reconciles the table at once.

Message layout (include/uapi/linux/netlink.h, connector.h, cn_proc.h)::

    0   struct nlmsghdr   16 bytes
    16  struct cn_msg     20 bytes  (idx, val, seq, ack, len, flags)
    36  struct proc_event: what u32, cpu u32, timestamp_ns u64 (ktime_get_ns)
    52    exit: process_pid, process_tgid, exit_code, exit_signal, parent_pid, parent_tgid

"process ID = tgid, thread ID = pid" (cn_proc.h): an EXIT arrives for every
thread, and ``exit_code`` is a wait(2) status (``task->exit_code``).
"""

import errno as _errno
import os as _os
import select as _select
import socket as _socket
import struct as _struct
import time as _time

from .errors import ConnectorUnavailable

# include/uapi/linux/connector.h, cn_proc.h
CN_IDX_PROC = 0x1
CN_VAL_PROC = 0x1
PROC_CN_MCAST_LISTEN = 1
PROC_CN_MCAST_IGNORE = 2
PROC_EVENT_NONE = 0x00000000
PROC_EVENT_EXIT = 0x80000000
NLMSG_DONE = 0x3
NETLINK_CONNECTOR = 11                           # include/uapi/linux/netlink.h
SOL_NETLINK = 270
SO_RCVBUFFORCE = 33

_NLMSGHDR = _struct.Struct("=IHHII")            # len, type, flags, seq, pid
_CN_MSG = _struct.Struct("=IIIIHH")             # idx, val, seq, ack, len, flags
_HEAD = _struct.Struct("=IHHII" "IIIIHH" "IIQ")  # nlmsghdr + cn_msg + proc_event head
# The hot decode: what, cpu, timestamp_ns, pid, tgid, exit_code at offset 36.
EXIT_EVENT = _struct.Struct("=IIQIII")
EXIT_OFFSET = 36                                 # 16 (nlmsghdr) + 20 (cn_msg)
MIN_EXIT_LEN = EXIT_OFFSET + EXIT_EVENT.size
_ACK_ERR = _struct.Struct("=I")                  # event_data.ack.err at offset 52

DEFAULT_RCVBUF = 4 << 20
ACK_DEADLINE = 2.0                               # s to wait for the kernel's ack (0.5 s timed out once at load 10)


class Overflow(Exception):
    """recv() failed with ENOBUFS: the kernel dropped events for this socket."""


def kernel_has_filter(release=None):
    """Whether the kernel takes the exit-only filter (proc_input; kernel >= 6.6)."""
    release = release or _os.uname().release
    try:
        major, minor = (int(x) for x in release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (6, 6)


def subscribe_request(op, cookie, filtered):
    """Bytes of a PROC_CN_MCAST_LISTEN/IGNORE request; ``filtered`` asks for exits only.

    ``cookie`` goes in cn_msg.ack: the kernel answers with ack = cookie + 1.
    (It overwrites the reply's seq with a per-CPU counter, so seq cannot
    match a reply to its request: drivers/connector/cn_proc.c, send_msg().)
    """
    payload = _struct.pack("=II", op, PROC_EVENT_EXIT) if filtered else _struct.pack("=I", op)
    cn = _CN_MSG.pack(CN_IDX_PROC, CN_VAL_PROC, 0, cookie, len(payload), 0)
    return _NLMSGHDR.pack(_NLMSGHDR.size + len(cn) + len(payload), NLMSG_DONE, 0, 0, 0) + cn + payload


def decode_exit(buf, n):
    """(tgid, exit_code, timestamp_ns, pid) of an EXIT message, else None.

    Anything shorter than an exit event, or of another kind, is None: the
    socket only ever hands us kernel messages, but a decoder that can crash
    on short input is a decoder that will.
    """
    if n < MIN_EXIT_LEN:
        return None
    what, _cpu, ts, pid, tgid, code = EXIT_EVENT.unpack_from(buf, EXIT_OFFSET)
    if what != PROC_EVENT_EXIT:
        return None
    return tgid, code, ts, pid


def decode_ack(buf, n):
    """(seq, ack, err) of a PROC_EVENT_NONE acknowledgement, else None."""
    if n < EXIT_OFFSET + 20:
        return None
    f = _HEAD.unpack_from(buf, 0)
    if f[11] != PROC_EVENT_NONE:
        return None
    return f[7], f[8], _ACK_ERR.unpack_from(buf, 52)[0]


class ProcConnector:
    """A subscribed proc-connector socket.  Not thread safe: one reader.

    ``mode`` tells how it subscribed: ``"filtered"`` (exit events only) or
    ``"legacy"`` (every event; the decoder drops all but EXIT).
    """

    def __init__(self, rcvbuf=DEFAULT_RCVBUF, timeout=0.25):
        self.rcvbuf = rcvbuf
        self.mode = None
        self.sock = self._open()
        st = _os.fstat(self.sock.fileno())
        self._ident = (st.st_dev, st.st_ino)
        # The ack of our subscription queues behind every event already
        # multicast to the group (another listener enables them): with a small
        # buffer a storm drops it and we would give up (issue 7).  So subscribe
        # with at least DEFAULT_RCVBUF, then shrink to what was asked for.
        self._set_rcvbuf(max(rcvbuf, DEFAULT_RCVBUF))
        # Blocking reads that give up after ``timeout`` (SO_RCVTIMEO) so the
        # reader can notice a stop request: one syscall per event, no poll().
        self.sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVTIMEO,
                             _struct.pack("@ll", int(timeout), int(timeout % 1 * 1e6)))
        try:
            self._subscribe()
        except BaseException:
            self.sock.close()
            raise
        if rcvbuf < DEFAULT_RCVBUF:
            self._set_rcvbuf(rcvbuf)

    @staticmethod
    def _open():
        """A blocking NETLINK_CONNECTOR socket bound to the proc multicast group."""
        try:
            sock = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_DGRAM, NETLINK_CONNECTOR)
        except OSError as e:
            raise ConnectorUnavailable(f"cannot open a NETLINK_CONNECTOR socket ({e.strerror})",
                                       "use --backend pidfd") from None
        try:
            sock.bind((0, CN_IDX_PROC))      # port id 0: the kernel picks one
        except PermissionError:
            sock.close()
            raise ConnectorUnavailable(
                "binding to the proc multicast group needs CAP_NET_ADMIN (before Linux 6.6)",
                "run as root, grant CAP_NET_ADMIN (AmbientCapabilities=CAP_NET_ADMIN), "
                "or use --backend pidfd") from None
        return sock

    def _set_rcvbuf(self, size):
        """Size the receive buffer on purpose: a fork storm fills the default in ms."""
        try:
            self.sock.setsockopt(_socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
        except PermissionError:     # SO_RCVBUFFORCE needs CAP_NET_ADMIN; capped by rmem_max
            self.sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVBUF, size)
        self.rcvbuf_effective = self.sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_RCVBUF)

    def _request(self, op, filtered, deadline_s):
        """Send a listen/ignore request; True once the kernel acknowledged it."""
        cookie = int.from_bytes(_os.urandom(4), "little") & 0x7FFFFFFF
        try:
            self.sock.sendto(subscribe_request(op, cookie, filtered), (0, 0))
        except ConnectionRefusedError:
            # The connector exists only in the initial network namespace.
            raise ConnectorUnavailable("the kernel refused the subscription (ECONNREFUSED: "
                                       "not in the initial network namespace)",
                                       "use --backend pidfd, or run on the host") from None
        if deadline_s is None:
            return True
        buf = bytearray(256)
        end = _time.monotonic() + deadline_s
        poller = _select.poll()
        poller.register(self.sock, _select.POLLIN)
        while True:
            left = end - _time.monotonic()
            if left <= 0 or not poller.poll(left * 1000):
                return False
            try:
                n = self.sock.recv_into(buf)
            except BlockingIOError:
                continue
            except OSError as e:
                if e.errno == _errno.ENOBUFS:
                    continue
                raise
            ack = decode_ack(buf, n)
            if ack and ack[1] == cookie + 1:
                if ack[2]:
                    raise ConnectorUnavailable(f"the kernel rejected the subscription "
                                               f"({_os.strerror(ack[2])})", "use --backend pidfd")
                return True

    def _subscribe(self):
        """Subscribe, proving it worked, then narrow to exit events where possible.

        The kernel acknowledges a request only to subscribers that receive
        every event: an ack is a PROC_EVENT_NONE message, which the exit-only
        filter drops (cn_filter()).  And a requester outside the initial user
        or PID namespace gets no ack at all.  So: a legacy LISTEN first, whose
        ack (with a deadline) proves the connector works for us; then, on
        kernels >= 6.6, a second LISTEN carrying struct proc_input
        {LISTEN, PROC_EVENT_EXIT}, which re-filters the same subscription
        (cn_proc_mcast_ctl() does not count a listener twice).  Older kernels
        drop the 8-byte request silently and we stay on all events, which the
        decoder filters.
        """
        if not self._request(PROC_CN_MCAST_LISTEN, False, ACK_DEADLINE):
            raise ConnectorUnavailable(
                f"the kernel did not acknowledge the subscription within {ACK_DEADLINE:g} s "
                "(outside the initial PID or user namespace?)",
                "use --backend pidfd, or run on the host")
        self.mode = "legacy"
        if kernel_has_filter():
            self._request(PROC_CN_MCAST_LISTEN, True, None)
            self.mode = "filtered"

    def fileno(self):
        return self.sock.fileno()

    def healthy(self):
        """Whether our socket is still open under its fd number.

        A raw close() of the fd (a bug elsewhere in the process, a debugger)
        leaves ``self.sock`` holding a number that is free, or already reused
        by the next open(): recv() then fails with EBADF or ENOTSOCK on every
        call, and closing the number would close somebody else's file.  The
        socket's inode, taken at open, tells ours from an impostor.
        """
        fd = self.sock.fileno()
        if fd < 0:
            return False
        try:
            st = _os.fstat(fd)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._ident

    def close(self):
        """Unsubscribe (PROC_CN_MCAST_IGNORE, as proc_filter.c does) and close.

        If the fd no longer holds our socket (see healthy()), only forget
        the number: the socket went with the fd, and its subscription with it.
        """
        if self.sock.fileno() < 0:
            return
        if not self.healthy():
            self.sock.detach()
            return
        try:
            self.sock.sendto(subscribe_request(PROC_CN_MCAST_IGNORE, 0, self.mode == "filtered"), (0, 0))
        except OSError:
            pass
        self.sock.close()
