"""The two keep-alive connection pools an OpenWhisk provider talks
through (provider.py says why two): a `requests` Session for the control
plane and a urllib3 pool for the hot path, both with the namespace key in a
header only and the same TLS trust."""
from __future__ import annotations

import base64
import os
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3


def connections(api_host: str, auth: tuple[str, str], verify: bool, hot_timeout: urllib3.Timeout
                ) -> tuple[dict[str, str], requests.Session, urllib3.HTTPConnectionPool]:
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
    kw: dict[str, Any] = {"maxsize": 32, "block": False, "retries": False, "timeout": hot_timeout}
    if urlsplit(api_host).scheme == "https":
        if verify:
            # the CA bundle `requests` uses for the control plane, so that a
            # cluster's own CA (REQUESTS_CA_BUNDLE) is trusted on both
            ca = (os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
                  or requests.certs.where())
            kw.update(cert_reqs="CERT_REQUIRED", ca_certs=ca)
        else:
            kw.update(cert_reqs="CERT_NONE", assert_hostname=False)
    return headers, session, urllib3.connection_from_url(api_host, **kw)
