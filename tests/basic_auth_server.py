"""A loopback HTTP server that serves one file to one Basic-auth user only,
and records the Authorization header of every request it gets."""
from __future__ import annotations

import base64
import http.server
import io
import threading

import numpy as np

from flcommon.data import load_digits_split


class BasicAuthFile(http.server.BaseHTTPRequestHandler):
    """Serves `body` at `path` to `user`:`password` only (401 otherwise);
    `/moved` redirects to `elsewhere`. Subclass it per server: the class
    attributes are that server's settings and its `seen` headers."""
    path_served, body, user, password, elsewhere = "/data.npz", b"", "", "", ""
    seen: list[str | None] = []

    def log_message(self, *args):
        pass

    def do_GET(self):
        type(self).seen.append(self.headers.get("Authorization"))
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", self.elsewhere)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        want = "Basic " + base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        ok = self.path == self.path_served and self.headers.get("Authorization") == want
        body = self.body if ok else b""
        self.send_response(200 if ok else 401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def serve(handler: type[BasicAuthFile]) -> http.server.ThreadingHTTPServer:
    """`handler` served on a free 127.0.0.1 port, in a daemon thread; the
    caller shuts it down."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def digits_npz() -> bytes:
    """The built-in digits split as a Keras mnist.npz-style file."""
    x_tr, y_tr, x_te, y_te = load_digits_split()
    out = io.BytesIO()
    np.savez(out, x_train=x_tr, y_train=y_tr, x_test=x_te, y_test=y_te)
    return out.getvalue()
