"""Whose process may hold a GPU lease: one of the caller's own OS user, on this machine, never pid 1.

A lease ends when its holder exits; naming someone else's long-lived process (or init) would hold the
card for ever. The caller's OS user is the owner of the client end of its TCP connection, read from
the kernel's socket table (``/proc/net/tcp{,6}``: every socket with its uid), so it needs no trust in
anything the client says::

    uid = peer_uid("127.0.0.1", 53122, server_port=8000)       # the uid that opened that connection
    why = holder_refusal(pid, caller_uid=uid)                   # None, or why the lease is refused
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import psutil

from engines.listener import tcp_sockets


def peer_uid(client_ip: str, client_port: int, *, server_port: int, proc_net: Path = Path("/proc/net")) -> int | None:
    """The uid owning the local socket ``client_ip:client_port`` connected to ``server_port``, or None."""
    try:
        want = ipaddress.ip_address(client_ip)
    except ValueError:
        return None
    for sock in tcp_sockets(proc_net):
        if sock.local_port != client_port or sock.remote_port != server_port:
            continue
        addr = sock.local
        mapped = getattr(addr, "ipv4_mapped", None)
        if addr == want or mapped == want or (isinstance(want, ipaddress.IPv6Address) and want.ipv4_mapped == addr):
            return sock.uid
    return None


def holder_refusal(pid: int, *, caller_uid: int | None) -> str | None:
    """Why ``pid`` cannot hold a lease for a caller of ``caller_uid`` (None: it can)."""
    if pid == 1:
        return "pid 1 (init) never exits: a lease held by it would hold the card for ever; name your own process"
    if caller_uid is None:
        return (
            "the caller's OS user cannot be told (leases are granted only to clients on this machine, "
            "over 127.0.0.1); run `onecard lease` on the GPU box"
        )
    try:
        holder_uid = psutil.Process(pid).uids().real
    except psutil.NoSuchProcess:
        return f"no process has pid {pid}: a lease is held by a running process and ends with it"
    except psutil.Error as e:
        return f"pid {pid} cannot be inspected ({type(e).__name__}); name one of your own processes"
    if holder_uid != caller_uid:
        return (
            f"pid {pid} belongs to uid {holder_uid}, not to the caller's uid {caller_uid}: a lease must be "
            "held by one of the caller's own processes"
        )
    return None
