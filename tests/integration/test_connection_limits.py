"""The adapter's HTTP server under hostile connections (real adapter process, real sockets)."""

from __future__ import annotations

import contextlib
import resource
import select
import socket
import time

import httpx
import pytest

from tests.support.stack import running_adapter

pytestmark = pytest.mark.integration

MAX_CONNECTIONS = 1500  # above a shell's 1,024 open files: the adapter must raise its limit to hold them
HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
KEEP_ALIVE_S = 1.0


@pytest.fixture(scope="module")
def adapter(triton_server, tmp_path_factory):
    with running_adapter(triton_server, tmp_path_factory.mktemp("connections"), max_connections=str(MAX_CONNECTIONS),
                         header_timeout_s=str(HEADER_TIMEOUT_S), body_timeout_s=str(BODY_TIMEOUT_S),
                         keep_alive_timeout_s=str(KEEP_ALIVE_S), max_headers="50", max_header_bytes="8192") as url:
        yield url


def address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def read_status(sock: socket.socket, timeout_s: float) -> tuple[int | None, float]:
    """The status the server answered on ``sock`` (None: closed without one) and when, from now."""
    started = time.monotonic()
    sock.settimeout(timeout_s)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while b"\r\n" not in data:
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else None
    return status, time.monotonic() - started


def classify(url: str) -> httpx.Response:
    return httpx.post(f"{url}/classify", json={"model": "bert_classifier", "input": "fine"}, timeout=10)


def test_silent_connections_neither_exhaust_descriptors_nor_stay(adapter):
    needed = MAX_CONNECTIONS + 300
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"this machine's hard open-file limit ({hard}) is below what the test holds")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    silent = []
    try:
        for _ in range(1100):  # what exhausted a 1,024-descriptor adapter before
            silent.append(socket.create_connection(address(adapter)))
        assert classify(adapter).status_code == 200  # others are still served
        beyond = [socket.create_connection(address(adapter)) for _ in range(MAX_CONNECTIONS - len(silent) + 50)]
        silent += beyond
        refused = [read_status(sock, 5)[0] for sock in beyond[-40:]]
        assert refused.count(503) >= 35, refused  # over the bound: 503 at once, not a hang
        # The header timeout closes every silent connection (408), and the server answers again.
        status, waited = read_status(silent[0], HEADER_TIMEOUT_S + 5)
        assert status == 408 and waited < HEADER_TIMEOUT_S + 2
        deadline = time.monotonic() + 10
        while classify(adapter).status_code != 200:
            assert time.monotonic() < deadline, "the adapter did not recover from a connection flood"
            time.sleep(0.2)
    finally:
        for sock in silent:
            sock.close()


def test_a_head_sent_a_byte_at_a_time_is_cut_after_the_header_timeout(adapter):
    with socket.create_connection(address(adapter)) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\n")
        for byte in b"X-Slow: " + b"a" * 100:  # a byte every 0.25 s, never the end of the head
            if select.select([sock], [], [], 0.25)[0]:
                break  # the server answered (or closed)
            with contextlib.suppress(OSError):
                sock.sendall(bytes([byte]))
        status, _ = read_status(sock, 1)
        assert status == 408
        assert time.monotonic() - started < HEADER_TIMEOUT_S + 1.5


def test_a_slow_body_is_cut_after_the_body_timeout(adapter):
    with socket.create_connection(address(adapter)) as sock:
        sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"model\": ")
        started = time.monotonic()
        status, _ = read_status(sock, BODY_TIMEOUT_S + 5)
        assert status == 408
        assert BODY_TIMEOUT_S - 0.5 < time.monotonic() - started < BODY_TIMEOUT_S + 1.5


@pytest.mark.parametrize("headers", [
    [("X-Big", "a" * 16384)],  # one header beyond max_header_bytes
    [(f"X-H{i}", "1") for i in range(60)],  # more header fields than max_headers
])
def test_oversized_heads_are_refused_with_431(adapter, headers):
    with socket.create_connection(address(adapter)) as sock:
        head = "GET /health HTTP/1.1\r\nHost: x\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers) + "\r\n"
        with contextlib.suppress(OSError):  # the server may close before it has read everything
            sock.sendall(head.encode())
        assert read_status(sock, 5)[0] == 431
    assert httpx.get(f"{adapter}/health", headers={"X-Fine": "a" * 1000}).status_code == 200


def test_an_idle_keep_alive_connection_is_closed(adapter):
    with socket.create_connection(address(adapter)) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_status(sock, 5)[0] == 200
        started = time.monotonic()
        sock.settimeout(KEEP_ALIVE_S + 5)
        while sock.recv(4096):  # the rest of the response, then the server's close
            pass
        assert time.monotonic() - started < KEEP_ALIVE_S + 1.5
