"""Shared pieces of the fabric and OpenWhisk provider tests: a real fabric
process on 127.0.0.1 per test module, tiny action zips made on the spot, and
an authenticated HTTP session."""
from __future__ import annotations

import base64
import hashlib
import io
import time
import zipfile

import pytest
import requests

from fedkeeper.providers.base import Artifact
from fedkeeper.local import fabric


def make_zip(source: str, extra: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(zipfile.ZipInfo("__main__.py", date_time=(1980, 1, 1, 0, 0, 0)), source)
        for name, text in (extra or {}).items():
            zf.writestr(zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0)), text)
    return buf.getvalue()


def make_artifact(source: str) -> Artifact:
    data = make_zip(source)
    return Artifact(data=data, sha256=hashlib.sha256(data).hexdigest(), entry="openwhisk")


# One action that can do whatever a test asks through its args.
ECHO = '''
import os, sys, time
def main(args):
    if args.get("sleep"):
        time.sleep(args["sleep"])
    if args.get("fail"):
        return {"error": "refused: " + str(args["fail"])}
    if args.get("raise"):
        raise ValueError(args["raise"])
    if args.get("exit"):
        os._exit(3)
    if args.get("nondict"):
        return [1, 2]
    if args.get("nan"):
        return {"loss": float("nan")}
    if args.get("alloc_mb"):
        block = b"x" * (args["alloc_mb"] * 1024 * 1024)
        time.sleep(3)
        return {"len": len(block)}
    env = {k: v for k, v in os.environ.items() if k.startswith("__OW_")}
    return {"pid": os.getpid(), "args": {k: v for k, v in args.items()}, "env": env}
'''


class FabricClient:
    """Raw HTTP against the fabric, as OpenWhisk's REST API is used."""

    def __init__(self, info: dict):
        self.info = info
        self.url = info["url"]
        self.auth = info["auth"]
        self.s = requests.Session()
        self.s.auth = tuple(info["auth"].split(":", 1))

    def __enter__(self) -> "FabricClient":
        return self

    def __exit__(self, *exc) -> None:
        self.s.close()

    def api(self, ns: str = "_") -> str:
        return f"{self.url}/api/v1/namespaces/{ns}"

    def put_action(self, name: str, source: str = ECHO, ns: str = "_", overwrite: bool = True,
                   limits: dict | None = None, parameters: dict | None = None,
                   annotations: list | None = None, kind: str = "python:3",
                   files: dict[str, str] | None = None, **exec_extra):
        body = {"exec": {"kind": kind, "code": base64.b64encode(make_zip(source, files)).decode(),
                         "binary": True, **exec_extra}}
        if limits:
            body["limits"] = limits
        if parameters:
            body["parameters"] = [{"key": k, "value": v} for k, v in parameters.items()]
        if annotations:
            body["annotations"] = annotations
        return self.s.put(f"{self.api(ns)}/actions/{name}", params={"overwrite": str(overwrite).lower()},
                          json=body)

    def invoke(self, name: str, args: dict | None = None, ns: str = "_", blocking: bool = False,
               **params):
        q = {"blocking": str(blocking).lower(), **{k: str(v).lower() if isinstance(v, bool) else v
                                                   for k, v in params.items()}}
        return self.s.post(f"{self.api(ns)}/actions/{name}", params=q, json=args or {})

    def activation(self, aid: str, ns: str = "_", timeout_s: float = 20.0) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            r = self.s.get(f"{self.api(ns)}/activations/{aid}")
            if r.status_code == 200:
                return r.json()
            assert r.status_code == 404, r.text
            time.sleep(0.01)
        raise AssertionError(f"activation {aid} did not finish within {timeout_s}s")

    def admin(self, what: str, body=None, ns: str = "_"):
        url = f"{self.url}/_fabric/{what}"
        if body is None:
            return self.s.get(url, params={"namespace": ns}).json()
        r = self.s.put(url, params={"namespace": ns}, json=body)
        assert r.status_code == 200, r.text
        return r.json()


def ann(record: dict) -> dict:
    return {a["key"]: a["value"] for a in record.get("annotations", [])}


def wait_for(predicate, timeout_s: float = 10.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


@pytest.fixture(scope="module")
def fabric_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("fabric")
    yield d
    fabric.fabric_down(d)


@pytest.fixture(scope="module")
def fabric_info(fabric_dir):
    info = fabric.fabric_up(fabric_dir)
    assert info["started"]
    return info


@pytest.fixture(scope="module")
def fw(fabric_info):
    c = FabricClient(fabric_info)
    yield c
    c.s.close()
