"""`maas up`'s check that its ports are free: only a real listener counts, not the
TIME_WAIT connections a stack that just stopped leaves behind."""

from __future__ import annotations

import socket
import time

import pytest

from maas.stack.servers import port_in_use


def _listener(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket bound as the servers bind (SO_REUSEADDR)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen()
    return s


def _plain_bind_fails(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def test_a_port_left_in_time_wait_is_free() -> None:
    listener = _listener()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    served, _ = listener.accept()
    listener.close()
    served.close()  # the server's side closes first: its end (on `port`) goes to TIME_WAIT
    client.close()
    deadline = time.monotonic() + 5
    while not _plain_bind_fails(port):  # loopback settles at once; allow the kernel a moment
        if time.monotonic() > deadline:
            pytest.skip("no TIME_WAIT socket stayed on the port to test with")
        time.sleep(0.01)
    # what the check did without SO_REUSEADDR: "in use" for about a minute, though nothing listens
    assert not port_in_use(port)


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_a_listener_makes_the_port_in_use(host: str) -> None:
    with _listener(host) as listener:
        port = listener.getsockname()[1]
        assert port_in_use(port)
    assert not port_in_use(port)


def test_a_listener_with_connections_makes_the_port_in_use() -> None:
    with _listener() as listener:
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            served, _ = listener.accept()
            served.close()
            client.close()
            assert port_in_use(port)
