"""Who listens on a port: real sockets held by this process and by a process in its own session."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from engines.listener import port_owner
from tests.support import free_port

_LISTEN = """
import socket, sys, time
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if family == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen()
print("listening", flush=True)
time.sleep(60)
"""


@contextmanager
def listener_in_own_session(host: str, port: int) -> Iterator[int]:
    proc = subprocess.Popen([sys.executable, "-c", _LISTEN, host, str(port)], stdout=subprocess.PIPE,
                            start_new_session=True, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


def test_nobody_listening_is_neither_ours_nor_foreign() -> None:
    owner = port_owner(free_port(), session=os.getsid(0))
    assert not owner.owned and not owner.foreign


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "::"])
def test_a_listener_belongs_to_its_session_only(host: str) -> None:
    if host == "::" and not socket.has_ipv6:
        pytest.skip("no IPv6")
    port = free_port()
    with listener_in_own_session(host, port) as pid:
        mine = port_owner(port, session=pid)
        assert mine.owned and not mine.foreign
        other = port_owner(port, session=os.getsid(0))  # this test's session: not the listener's
        assert other.foreign and not other.owned
        assert "held by another process" in other.describe() and str(port) in other.describe()


def test_a_listener_on_another_loopback_address_is_not_counted() -> None:
    port = free_port()
    with listener_in_own_session("127.0.0.2", port):
        assert not port_owner(port, session=os.getsid(0)).foreign  # it cannot take a connection to 127.0.0.1
