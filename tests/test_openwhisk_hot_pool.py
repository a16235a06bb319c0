"""The OpenWhisk provider's hot-path connection pool (providers/openwhisk/http.py):
keep-alive reuse, connections the server closed, what is repeated and what
is not, timeouts and closing; on a scripted server on 127.0.0.1."""
from __future__ import annotations

import datetime
import http.client
import socket
import ssl
import threading
import time

import pytest

from fedkeeper.config import OpenWhiskCluster
from fedkeeper.providers.base import ErrorClass, ProviderContext, ProviderError
from fedkeeper.providers.openwhisk import OpenWhiskProvider
from fedkeeper.providers.openwhisk.errors import transport_error
from fedkeeper.providers.openwhisk.http import ConnectFailed, KeepAlivePool

pytestmark = pytest.mark.timeout(60)

IO_TIMEOUT_S = 10.0
ANSWER = (b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: 22\r\n"
          b"x-openwhisk-activation-id: 0123456789abcdef\r\n\r\n{\"activationId\":\"x1\"}\n")


class ScriptedServer:
    """Accepts connections; `plan(conn_no, req_no)` says what to do with the
    req_no-th request (0-based) on the conn_no-th connection: "answer",
    "answer-then-close" (close the idle connection right after answering),
    "drop" (read it, close without an answer) or "hang" (never answer)."""

    def __init__(self, plan, tls: ssl.SSLContext | None = None):
        self.plan = plan
        self.tls = tls
        self.requests: list[tuple[int, str]] = []   # (connection number, request line)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(IO_TIMEOUT_S)
        self.port = self.sock.getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        n = 0
        while not self._stop.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self._conns.append(c)
            threading.Thread(target=self._serve, args=(c, n), daemon=True).start()
            n += 1

    def _serve(self, c: socket.socket, conn_no: int) -> None:
        buf = b""
        try:
            c.settimeout(IO_TIMEOUT_S)
            if self.tls is not None:
                c = self.tls.wrap_socket(c, server_side=True)
            for req_no in range(100):
                while b"\r\n\r\n" not in buf:
                    data = c.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                length = next((int(v) for k, _, v in (h.partition(":") for h in lines[1:])
                               if k.strip().lower() == "content-length"), 0)
                while len(buf) < length:
                    buf += c.recv(65536)
                buf = buf[length:]
                self.requests.append((conn_no, lines[0]))
                what = self.plan(conn_no, req_no)
                if what == "drop":
                    return
                if what == "hang":
                    self._stop.wait(IO_TIMEOUT_S)
                    return
                c.sendall(ANSWER)
                if what == "answer-then-close":
                    return
        except OSError:
            return
        finally:
            c.close()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()
        for c in self._conns:
            c.close()


@pytest.fixture
def server_factory():
    made = []

    def make(plan, tls=None):
        s = ScriptedServer(plan, tls)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


def pool_for(url: str, **kw) -> KeepAlivePool:
    return KeepAlivePool(url, {"Authorization": "Basic eDp5"}, connect_timeout=2.0,
                         read_timeout=kw.pop("read_timeout", IO_TIMEOUT_S), **kw)


def wait_until(cond, timeout_s: float = IO_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.01)


def test_requests_reuse_one_kept_alive_connection(server_factory):
    srv = server_factory(lambda conn, req: "answer")
    pool = pool_for(srv.url + "/base/")
    try:
        for i in range(5):
            r = pool.request("POST", f"/actions/a?n={i}", b"{}")
            assert r.status == 202 and r.data.startswith(b'{"activationId"')
            assert r.headers.get("X-OpenWhisk-Activation-Id") == "0123456789abcdef"
    finally:
        pool.close()
    assert [c for c, _ in srv.requests] == [0] * 5
    # origin-form targets below the base URL's path
    assert srv.requests[0][1] == "POST /base/actions/a?n=0 HTTP/1.1"


def test_a_connection_the_server_closed_while_idle_is_not_used(server_factory):
    srv = server_factory(lambda conn, req: "answer-then-close")
    pool = pool_for(srv.url)
    try:
        assert pool.request("POST", "/a", b"{}").status == 202
        wait_until(lambda: len(srv._conns) == 1 and srv._conns[0].fileno() == -1)
        # a POST is never repeated, so it must not be sent on the dead connection
        assert pool.request("POST", "/a", b"{}").status == 202
    finally:
        pool.close()
    assert [c for c, _ in srv.requests] == [0, 1]


def test_a_get_dropped_on_a_reused_connection_is_sent_again_a_post_is_not(server_factory):
    # every connection answers its first request and drops its second
    srv = server_factory(lambda conn, req: "answer" if req == 0 else "drop")
    pool = pool_for(srv.url)
    try:
        assert pool.request("GET", "/activations").status == 202
        r = pool.request("GET", "/activations")
        assert r.status == 202
        assert [c for c, _ in srv.requests] == [0, 0, 1]
        # connection 1 is idle again; its next request is dropped
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            pool.request("POST", "/actions/a", b"{}")
        assert [line.split()[0] for _, line in srv.requests] == ["GET", "GET", "GET", "POST"]
    finally:
        pool.close()


def test_a_read_timeout_and_a_closed_pool_are_unreachable(server_factory):
    srv = server_factory(lambda conn, req: "hang")
    pool = pool_for(srv.url, read_timeout=0.2)
    with pytest.raises(TimeoutError) as e:
        pool.request("GET", "/activations")
    err = transport_error("cluster c", e.value)
    assert err.error_class == ErrorClass.UNREACHABLE and "did not answer in time" in str(err)
    pool.close()
    with pytest.raises(ConnectFailed):
        pool.request("GET", "/activations")


def test_idle_connections_are_bounded(server_factory):
    srv = server_factory(lambda conn, req: "answer")
    pool = pool_for(srv.url, maxsize=2)
    try:
        conns = [pool._open() for _ in range(4)]
        for c in conns:
            pool._give_back(c)
        assert len(pool._idle) == 2
        assert sum(c.sock is None for c in conns) == 2
    finally:
        pool.close()
    assert all(c.sock is None for c in conns)


@pytest.mark.parametrize("exc, reason", [
    (ConnectFailed("[Errno 113] No route to host"), "cannot connect"),
    (http.client.RemoteDisconnected("Remote end closed connection without response"), "connection closed"),
    (ConnectionResetError(104, "Connection reset by peer"), "connection closed"),
    (ConnectionRefusedError(111, "Connection refused"), "connection refused"),
    (socket.gaierror(-2, "Name or service not known"), "host name not found"),
])
def test_standard_library_transport_errors_are_classified(exc, reason):
    err = transport_error("OpenWhisk cluster c at http://h", exc)
    assert err.error_class == ErrorClass.UNREACHABLE and f"({reason})" in str(err)


def test_provider_invoke_through_the_pool_and_dropped_post_is_unreachable(server_factory, tmp_path):
    srv = server_factory(lambda conn, req: "answer" if req == 0 else "drop")
    cfg = OpenWhiskCluster(base_url=srv.url, auth={"ow_auth": "u:secretkey"}, namespace="ns one")
    p = OpenWhiskProvider("ow-scripted", cfg, ProviderContext(state_dir=tmp_path))
    try:
        inv = p.invoke("pkg/act", {"x": 1})
        assert inv.platform_id == "0123456789abcdef" and inv.payload_bytes == len(b'{"x":1}')
        with pytest.raises(ProviderError) as e:
            p.invoke("pkg/act", {"x": 2})
        assert e.value.error_class == ErrorClass.UNREACHABLE and "secretkey" not in str(e.value)
    finally:
        p.close()
    assert srv.requests[0][1] == "POST /api/v1/namespaces/ns%20one/actions/pkg/act?blocking=false HTTP/1.1"
    assert len(srv.requests) == 2


def self_signed_tls(tmp_path) -> ssl.SSLContext:
    """A server context with a fresh self-signed certificate for 127.0.0.1."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def test_tls_hot_path_verifies_the_certificate_unless_insecure(server_factory, tmp_path):
    srv = server_factory(lambda conn, req: "answer", tls=self_signed_tls(tmp_path))
    cfg = OpenWhiskCluster(base_url=srv.url, auth={"ow_auth": "u:secretkey"})
    p = OpenWhiskProvider("ow-tls", cfg, ProviderContext(state_dir=tmp_path))
    try:
        with pytest.raises(ProviderError) as e:
            p.invoke("act", {})
        assert e.value.error_class == ErrorClass.UNREACHABLE and "TLS with" in str(e.value)
    finally:
        p.close()
    cfg = OpenWhiskCluster(base_url=srv.url, auth={"ow_auth": "u:secretkey"}, insecure=True)
    p = OpenWhiskProvider("ow-tls", cfg, ProviderContext(state_dir=tmp_path))
    try:
        assert p.invoke("act", {}).platform_id == "0123456789abcdef"
        assert p.invoke("act", {}).platform_id == "0123456789abcdef"
    finally:
        p.close()
    # the refused handshake, then one kept-alive connection for both invokes
    assert [c for c, _ in srv.requests] == [1, 1]
