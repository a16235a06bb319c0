"""A scripted HTTP/1.1 server on 127.0.0.1 for the tests of the providers'
keep-alive connections (tests/test_openwhisk_hot_pool.py,
tests/test_http_invoker.py): raw sockets, so that each request can be
answered, dropped, left hanging or answered through a forward proxy, as a
test plans it; every socket operation bounded in time."""
from __future__ import annotations

import datetime
import socket
import ssl
import threading

import pytest

IO_TIMEOUT_S = 10.0
ANSWER = (b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: 22\r\n"
          b"x-openwhisk-activation-id: 0123456789abcdef\r\n\r\n{\"activationId\":\"x1\"}\n")

REJECTED = (b"HTTP/1.1 413 Payload Too Large\r\nContent-Type: application/json\r\nContent-Length: 26\r\n"
            b"Connection: close\r\n\r\n{\"error\":\"entity too big\"}")


def json_answer(status: int, body: bytes, extra: str = "") -> bytes:
    """A complete HTTP/1.1 answer with a JSON body (`extra`: header lines)."""
    return (f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"{extra}\r\n").encode() + body


class ScriptedServer:
    """Accepts connections; `plan(conn_no, req_no)` says what to do with the
    req_no-th request (0-based) on the conn_no-th connection: "answer",
    "answer-then-close" (close the idle connection right after answering),
    "drop" (read it, close without an answer), "hang" (never answer),
    "reject-early" (413 and close before reading the body), or the bytes
    of a whole answer to send."""

    def __init__(self, plan, tls: ssl.SSLContext | None = None):
        self.plan = plan
        self.tls = tls
        self.requests: list[tuple[int, str]] = []   # (connection number, request line)
        self.heads: list[str] = []                   # each request's head, as received
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
                self.requests.append((conn_no, lines[0]))
                self.heads.append(head.decode())
                what = self.plan(conn_no, req_no)
                if what == "reject-early":
                    # 413 from the head alone, the body left unread, as the
                    # fabric and front ends refuse a body over their limit
                    c.sendall(REJECTED)
                    return
                while len(buf) < length:
                    data = c.recv(65536)
                    if not data:     # the client closed mid-body
                        return
                    buf += data
                buf = buf[length:]
                if what == "drop":
                    return
                if what == "hang":
                    self._stop.wait(IO_TIMEOUT_S)
                    return
                c.sendall(what if isinstance(what, bytes) else ANSWER)
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
    """make(plan, tls=None) -> a ScriptedServer, closed after the test."""
    made = []

    def make(plan, tls=None):
        s = ScriptedServer(plan, tls)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


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
