"""The local fabric against Apache's official OpenWhisk JavaScript client
(npm `openwhisk`): what that client sends must be understood, and what the
fabric answers must be what the client expects of a real controller."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from fixtures_fabric import ECHO, ann, fabric_dir, fabric_info, make_zip  # noqa: F401

NPM_DIR = Path(__file__).resolve().parent / "npm"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def node_client():
    node, npm = shutil.which("node"), shutil.which("npm")
    if not node or not npm:
        pytest.skip("node and npm are needed for the official-client conformance test")
    if not (NPM_DIR / "node_modules" / "openwhisk").is_dir():
        r = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--loglevel=error"], cwd=NPM_DIR,
                           capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, f"npm install failed:\n{r.stdout}\n{r.stderr}"
    return node


def test_official_client_round_trip(node_client, fabric_info, tmp_path):
    zpath = tmp_path / "action.zip"
    zpath.write_bytes(make_zip(ECHO))
    env = {**os.environ, "FABRIC_URL": fabric_info["url"], "FABRIC_AUTH": fabric_info["auth"],
           "ACTION_ZIP": str(zpath), "ACTION_NAME": "npm-conformance"}
    r = subprocess.run([node_client, "conformance.js"], cwd=NPM_DIR, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)

    # actions.create with a zip Buffer: the client sends base64 without
    # `binary`, which the controller (and the fabric) detect.
    assert out["created"] == {"name": "npm-conformance", "version": "0.0.1", "kind": "python:3",
                              "binary": True}
    assert out["createAgain"] == {"status": 409, "error": "resource already exists"}
    assert out["got"]["parameters"] == [{"key": "bound", "value": "b"}]
    assert out["got"]["limits"]["timeout"] == 10000 and out["got"]["limits"]["memory"] == 256

    aid = out["nonBlocking"]["activationId"]
    assert list(out["nonBlocking"]) == ["activationId"] and len(aid) == 32
    rec = out["activation"]
    assert rec["activationId"] == aid and rec["response"]["status"] == "success"
    assert rec["response"]["result"]["args"] == {"bound": "b", "x": 1}
    assert rec["response"]["result"]["env"]["__OW_ACTIVATION_ID"] == aid

    assert out["blocking"]["response"]["success"] is True
    assert out["blocking"]["response"]["result"]["args"]["x"] == 2
    assert "waitTime" in ann(out["blocking"])
    assert out["blockingResult"]["args"]["x"] == 3

    # A failed blocking activation: 502 carrying the record.
    assert out["blockingFailure"]["status"] == 502
    assert out["blockingFailure"]["response"]["status"] == "application error"

    ids = [a["activationId"] for a in out["list"]]
    assert aid in ids and len(ids) == 4
    starts = [a["start"] for a in out["list"]]
    assert starts == sorted(starts, reverse=True)
    assert all(a["name"] == "npm-conformance" for a in out["list"])
    assert len(out["listSummary"]) == 2 and "response" not in out["listSummary"][0]

    assert out["deleted"] == "npm-conformance"
    assert out["afterDelete"] == {"status": 404}
