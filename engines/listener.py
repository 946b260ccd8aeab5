"""Who listens on an engine's port: the engine's own process, nobody yet, or another process.

An engine's port is on its command line (``ps``) and free until vLLM binds it seconds later; another
local user can bind it first and pose as the engine. Before the gateway sends an engine anything
(``/health`` included), readiness asks :func:`port_owner`: every listening socket that would take a
connection to ``127.0.0.1:port`` must be held by a process of the engine's own session (it was
started with ``start_new_session``, and no other process can join that session)::

    owner = port_owner(8123, session=proc.pid)
    if owner.foreign: ...            # refuse: never send a prompt to it
    if owner.ours: ...               # safe to talk to
    # neither: nothing listens yet

On Linux the sockets come from ``/proc/net/tcp{,6}`` (any user's, with their inode and uid) and are
matched with the socket inodes of the session's processes (``/proc/<pid>/fd``, which we may read as
they are ours). Elsewhere psutil's system-wide table is used.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import psutil

_LISTEN = "0A"
#: Addresses whose listener takes a connection to 127.0.0.1.
_CATCHES_LOOPBACK = {
    ipaddress.ip_address("127.0.0.1"),
    ipaddress.ip_address("0.0.0.0"),
    ipaddress.ip_address("::"),
    ipaddress.ip_address("::ffff:127.0.0.1"),
    ipaddress.ip_address("::ffff:0.0.0.0"),
}


@dataclass(frozen=True)
class Listener:
    inode: int
    uid: int | None
    pid: int | None = None  # known when the table says (the psutil fallback)


@dataclass(frozen=True)
class PortOwner:
    """The listeners on a port, split into the engine's and the others'."""

    port: int
    ours: tuple[Listener, ...] = ()
    others: tuple[Listener, ...] = ()

    @property
    def foreign(self) -> bool:
        return bool(self.others)

    @property
    def owned(self) -> bool:
        return bool(self.ours) and not self.others

    def describe(self) -> str:
        """``port 8123 is held by another process (uid 1001)``, for error messages."""
        who = sorted({f"pid {x.pid}" if x.pid is not None else f"uid {x.uid}" for x in self.others})
        return f"127.0.0.1:{self.port} is held by another process ({', '.join(who)}), not by the engine"


def _decode(hex_addr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An address from ``/proc/net/tcp{,6}``: 32-bit words in host (little-endian) order."""
    raw = bytes.fromhex(hex_addr)
    swapped = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return ipaddress.ip_address(swapped)


class TcpSocket(NamedTuple):
    """One row of ``/proc/net/tcp{,6}``."""

    local: ipaddress.IPv4Address | ipaddress.IPv6Address
    local_port: int
    remote_port: int
    state: str
    uid: int
    inode: int


def tcp_sockets(proc_net: Path = Path("/proc/net")) -> Iterator[TcpSocket]:
    """Every TCP socket of every user on this machine, from the kernel's tables (an unreadable table, such
    as ``tcp6`` without IPv6, is skipped)."""
    for table in (proc_net / "tcp", proc_net / "tcp6"):
        try:
            lines = table.read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            addr, _, lport = fields[1].partition(":")
            _, _, rport = fields[2].partition(":")
            yield TcpSocket(_decode(addr), int(lport, 16), int(rport, 16), fields[3], int(fields[7]), int(fields[9]))


def _proc_listeners(port: int, proc_net: Path) -> list[Listener] | None:
    if not (proc_net / "tcp").exists():
        return None
    return [
        Listener(inode=sock.inode, uid=sock.uid)
        for sock in tcp_sockets(proc_net)
        if sock.state == _LISTEN and sock.local_port == port and sock.local in _CATCHES_LOOPBACK
    ]


def _session_pids(session: int) -> set[int]:
    """The session leader and its descendants that are still in its session."""
    try:
        root = psutil.Process(session)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return set()
    pids = set()
    for p in procs:
        with contextlib.suppress(OSError):
            if os.getsid(p.pid) == session:
                pids.add(p.pid)
    return pids


def _socket_inodes(pid: int, proc: Path) -> set[int]:
    inodes: set[int] = set()
    fd_dir = proc / str(pid) / "fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return inodes
    for name in names:
        with contextlib.suppress(OSError):
            target = os.readlink(fd_dir / name)
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def _accepts(port: int, timeout_s: float = 0.5) -> bool:
    """Whether anything accepts a connection on ``127.0.0.1:port`` (a handshake; no byte is sent)."""
    with socket.socket() as s:
        s.settimeout(timeout_s)
        try:
            return s.connect_ex(("127.0.0.1", port)) == 0
        except OSError:
            return False


def port_owner(port: int, *, session: int, proc: Path = Path("/proc")) -> PortOwner:
    """Split the listeners that take connections to ``127.0.0.1:port`` into the session's and others'.

    The socket tables cost tens of milliseconds to read on a busy host, so they are read only once
    something accepts connections on the port."""
    if not _accepts(port):
        return PortOwner(port)
    listeners = _proc_listeners(port, proc / "net")
    if listeners is None:
        return _psutil_owner(port, session)
    if not listeners:
        return PortOwner(port)
    ours_inodes: set[int] = set()
    for pid in _session_pids(session):
        ours_inodes |= _socket_inodes(pid, proc)
    ours = tuple(x for x in listeners if x.inode in ours_inodes)
    others = tuple(x for x in listeners if x.inode not in ours_inodes)
    return PortOwner(port, ours, others)


def _psutil_owner(port: int, session: int) -> PortOwner:
    pids = _session_pids(session)
    ours: list[Listener] = []
    others: list[Listener] = []
    for c in psutil.net_connections(kind="tcp"):  # may need privileges outside Linux (AccessDenied)
        if c.status != psutil.CONN_LISTEN or not c.laddr or c.laddr.port != port:
            continue
        if ipaddress.ip_address(c.laddr.ip) not in _CATCHES_LOOPBACK:
            continue
        listener = Listener(inode=0, uid=None, pid=c.pid)
        (ours if c.pid in pids else others).append(listener)
    return PortOwner(port, tuple(ours), tuple(others))


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the engine may still lose it to another process: see port_owner)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
