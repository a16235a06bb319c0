"""The two keep-alive connection pools an OpenWhisk provider talks
through (provider.py says why two): a `requests` Session for the control
plane and, for the hot path, a pool of the standard library's
`http.client` connections (providers/keepalive.py), both with the namespace
key in a header only and the same TLS trust."""
from __future__ import annotations

import base64
from urllib.parse import urlsplit

import requests
import urllib3

from ..keepalive import BodyTooLarge, ConnectFailed, HotResponse, KeepAlivePool, read_bounded, tls_context

__all__ = ["BodyTooLarge", "ConnectFailed", "HotResponse", "KeepAlivePool", "connections", "read_bounded"]


def connections(api_host: str, auth: tuple[str, str], verify: bool, *, connect_timeout: float,
                read_timeout: float) -> tuple[dict[str, str], requests.Session, KeepAlivePool]:
    """(headers, control-plane session, hot-path pool) for a controller."""
    token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
    headers = {"Authorization": f"Basic {token}", "Content-Type": "application/json",
               "Accept": "application/json", "User-Agent": "fedkeeper"}
    if not verify:
        urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
    session = requests.Session()
    session.headers.update(headers)
    session.verify = verify
    adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=16)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    ctx = tls_context(verify) if urlsplit(api_host).scheme == "https" else None
    pool = KeepAlivePool(api_host, headers, connect_timeout=connect_timeout, read_timeout=read_timeout,
                         ssl_context=ctx)
    return headers, session, pool
