"""Conformance of the local fabric with OpenWhisk's REST API and execution
model, against a real fabric process on 127.0.0.1."""
from __future__ import annotations

import json
import os
import stat
import time

import pytest
import requests

from fedkeeper.local import fabric
from fedkeeper.local.faults import FaultPlan
from fedkeeper.local.supervisor import pid_alive
from fixtures_fabric import FabricClient, ann, fabric_dir, fabric_info, fw, wait_for  # noqa: F401

pytestmark = pytest.mark.timeout(120)


def test_action_create_conflict_overwrite_get_list_delete(fw):
    r = fw.put_action("crud", overwrite=False)
    assert r.status_code == 200 and r.json()["version"] == "0.0.1"
    r = fw.put_action("crud", overwrite=False)
    assert r.status_code == 409
    assert r.json()["error"] == "resource already exists" and r.json()["code"]
    r = fw.put_action("crud", overwrite=True, limits={"timeout": 5000})
    assert r.status_code == 200 and r.json()["version"] == "0.0.2"
    got = fw.s.get(f"{fw.api()}/actions/crud").json()
    assert got["exec"]["kind"] == "python:3" and got["exec"]["binary"] is True and got["exec"]["code"]
    assert got["limits"] == {"timeout": 5000, "memory": 256, "logs": 10, "concurrency": 1}
    assert got["namespace"] == "guest"
    assert "code" not in fw.s.get(f"{fw.api()}/actions/crud", params={"code": "false"}).json()["exec"]
    # "_" and the namespace's name are the same namespace
    assert fw.s.get(f"{fw.api('guest')}/actions/crud").status_code == 200
    names = [a["name"] for a in fw.s.get(f"{fw.api()}/actions").json()]
    assert "crud" in names
    assert fw.s.delete(f"{fw.api()}/actions/crud").status_code == 200
    r = fw.s.get(f"{fw.api()}/actions/crud")
    assert r.status_code == 404 and r.json()["error"] == "The requested resource does not exist."
    assert fw.s.delete(f"{fw.api()}/actions/crud").status_code == 404
    assert fw.invoke("crud").status_code == 404


def test_bad_and_missing_auth_are_401(fw):
    assert requests.get(f"{fw.api()}/actions", auth=("nobody", "nothing")).status_code == 401
    r = requests.get(f"{fw.api()}/actions")
    assert r.status_code == 401 and "authentication" in r.json()["error"]


def test_rejects_bad_definitions(fw):
    r = fw.s.put(f"{fw.api()}/actions/bad", json={"exec": {"kind": "nodejs:20", "code": "x"}})
    assert r.status_code == 400 and "not supported" in r.json()["error"]
    r = fw.put_action("bad", limits={"memory": 10})
    assert r.status_code == 400 and "memory" in r.json()["error"]
    r = fw.s.put(f"{fw.api()}/actions/bad", json={"exec": {"kind": "python:3", "code": "bm90IGEgemlw",
                                                           "binary": True}})
    assert r.status_code == 400 and "zip" in r.json()["error"]


def test_nonblocking_invoke_and_activation_record(fw):
    fw.put_action("rec", parameters={"bound": "b"})
    r = fw.invoke("rec", {"x": 1})
    assert r.status_code == 202
    aid = r.json()["activationId"]
    assert r.headers["x-openwhisk-activation-id"] == aid and len(aid) == 32
    rec = fw.activation(aid)
    assert {"activationId", "name", "namespace", "start", "end", "duration", "response", "annotations",
            "logs", "version", "subject", "publish"} <= rec.keys()
    assert rec["activationId"] == aid and rec["name"] == "rec" and rec["namespace"] == "guest"
    assert rec["duration"] == rec["end"] - rec["start"]
    resp = rec["response"]
    assert resp["status"] == "success" and resp["statusCode"] == 0 and resp["success"] is True
    assert resp["result"]["args"] == {"bound": "b", "x": 1}
    a = ann(rec)
    assert a["path"] == "guest/rec" and a["kind"] == "python:3" and a["timeout"] is False
    assert a["limits"] == {"concurrency": 1, "logs": 10, "memory": 256, "timeout": 60000}
    assert isinstance(a["waitTime"], int) and "initTime" in a  # the first one is a cold start
    assert fw.s.get(f"{fw.api()}/activations/{aid}/result").json()["status"] == "success"
    assert fw.s.get(f"{fw.api()}/activations/{'0' * 32}").status_code == 404


def test_blocking_statuses_and_result_variant(fw):
    fw.put_action("blk")
    r = fw.invoke("blk", {"x": 2}, blocking=True)
    assert r.status_code == 200 and r.json()["response"]["result"]["args"]["x"] == 2
    assert r.headers["x-openwhisk-activation-id"] == r.json()["activationId"]
    r = fw.invoke("blk", {"x": 3}, blocking=True, result=True)
    assert r.status_code == 200 and r.json()["args"]["x"] == 3

    r = fw.invoke("blk", {"fail": "no"}, blocking=True)
    assert r.status_code == 502
    assert r.json()["response"]["status"] == "application error"
    assert r.json()["response"]["statusCode"] == 1
    assert r.json()["response"]["result"] == {"error": "refused: no"}

    r = fw.invoke("blk", {"raise": "boom"}, blocking=True)
    assert r.status_code == 502 and r.json()["response"]["status"] == "action developer error"
    assert "boom" in r.json()["response"]["result"]["error"]

    r = fw.invoke("blk", {"nondict": 1}, blocking=True)
    assert r.status_code == 502 and r.json()["response"]["status"] == "action developer error"
    assert "valid JSON response" in r.json()["response"]["result"]["error"]

    # NaN is no JSON number: a strict parser (OpenWhisk's) refuses such a result.
    r = fw.invoke("blk", {"nan": 1}, blocking=True)
    assert r.status_code == 502 and r.json()["response"]["status"] == "action developer error"
    assert "valid JSON response" in r.json()["response"]["result"]["error"]

    r = fw.invoke("blk", {"exit": 1}, blocking=True)
    assert r.status_code == 502
    assert r.json()["response"]["result"]["error"] == fabric.MSG_ABNORMAL_RUN

    # Blocking wait shorter than the run: 202 with the activation id.
    r = fw.invoke("blk", {"sleep": 0.5}, blocking=True, timeout=50)
    assert r.status_code == 202 and "activationId" in r.json()
    assert fw.activation(r.json()["activationId"])["response"]["success"] is True


def test_list_activations_filters_and_paging(fw):
    fw.put_action("lst-a")
    fw.put_action("lst-b")
    t0 = int(time.time() * 1000)
    ids = [fw.invoke("lst-a", {"i": i}, blocking=True).json()["activationId"] for i in range(5)]
    other = fw.invoke("lst-b", {}, blocking=True).json()["activationId"]
    got = fw.s.get(f"{fw.api()}/activations", params={"name": "lst-a", "docs": "true", "limit": 200}).json()
    assert [g["activationId"] for g in got] == ids[::-1]  # newest first
    assert all("response" in g for g in got)
    summary = fw.s.get(f"{fw.api()}/activations", params={"name": "lst-a"}).json()
    assert "response" not in summary[0] and summary[0]["statusCode"] == 0 and "end" in summary[0]
    page = fw.s.get(f"{fw.api()}/activations", params={"name": "lst-a", "limit": 2, "skip": 1}).json()
    assert [g["activationId"] for g in page] == ids[::-1][1:3]
    everything = fw.s.get(f"{fw.api()}/activations", params={"since": t0, "limit": 200}).json()
    assert {other, *ids} <= {g["activationId"] for g in everything}
    assert fw.s.get(f"{fw.api()}/activations", params={"since": int(time.time() * 1000) + 60000}).json() == []
    first = fw.s.get(f"{fw.api()}/activations/{ids[0]}").json()
    upto = fw.s.get(f"{fw.api()}/activations", params={"name": "lst-a", "upto": first["start"]}).json()
    assert ids[0] in [g["activationId"] for g in upto] and ids[-1] not in [g["activationId"] for g in upto]
    assert fw.s.get(f"{fw.api()}/activations", params={"name": "lst-a", "count": "true"}).json() == {
        "activations": 5}
    assert fw.s.get(f"{fw.api()}/activations", params={"limit": 201}).status_code == 400


def test_payload_over_limit_is_413(fw):
    fw.put_action("big")
    limit = fw.s.get(f"{fw.api()}/limits").json()["maxPayloadSize"]
    assert limit == 1048576
    r = fw.invoke("big", {"blob": "x" * (limit + 10)})
    assert r.status_code == 413
    # The same keep-alive session goes on working after the refused body.
    assert fw.invoke("big", {"blob": "x" * 1000}, blocking=True).status_code == 200


def test_concurrency_limit_is_429_with_openwhisk_message(fw):
    ns = "conc"
    fw.put_action("slow", ns=ns)
    fw.admin("limits", {"concurrentInvocations": 2}, ns=ns)
    assert fw.s.get(f"{fw.api(ns)}/limits").json()["concurrentInvocations"] == 2
    a = [fw.invoke("slow", {"sleep": 1.0}, ns=ns) for _ in range(2)]
    assert [r.status_code for r in a] == [202, 202]
    r = fw.invoke("slow", {}, ns=ns)
    assert r.status_code == 429
    assert r.json()["error"] == "Too many concurrent requests in flight (count: 3, allowed: 2)."
    for x in a:
        fw.activation(x.json()["activationId"], ns=ns)
    assert fw.invoke("slow", {}, ns=ns).status_code == 202


def test_per_minute_limit_is_429_with_openwhisk_message(fw):
    ns = "minute"
    fw.put_action("m", ns=ns)
    fw.admin("limits", {"invocationsPerMinute": 3}, ns=ns)
    assert [fw.invoke("m", ns=ns).status_code for _ in range(3)] == [202] * 3
    r = fw.invoke("m", ns=ns)
    assert r.status_code == 429
    assert r.json()["error"] == "Too many requests in the last minute (count: 4, allowed: 3)."


def test_timeout_kills_the_worker(fw):
    fw.put_action("to", limits={"timeout": 300})
    pid = fw.invoke("to", {}, blocking=True).json()["response"]["result"]["pid"]
    t0 = time.monotonic()
    r = fw.invoke("to", {"sleep": 10}, blocking=True)
    assert time.monotonic() - t0 < 5
    assert r.status_code == 502
    rec = r.json()
    assert rec["response"]["status"] == "action developer error"
    assert rec["response"]["result"] == {"error": "The action exceeded its time limits of 300 milliseconds."}
    assert ann(rec)["timeout"] is True
    wait_for(lambda: not pid_alive(pid), 5)
    nxt = fw.invoke("to", {}, blocking=True).json()
    assert nxt["response"]["result"]["pid"] != pid and "initTime" in ann(nxt)


def test_cold_then_warm_start_reuses_the_worker(fw):
    fw.put_action("warm")
    first = fw.invoke("warm", {}, blocking=True).json()
    second = fw.invoke("warm", {}, blocking=True).json()
    assert "initTime" in ann(first) and "initTime" not in ann(second)
    assert first["response"]["result"]["pid"] == second["response"]["result"]["pid"]
    assert first["response"]["result"]["pid"] != os.getpid()


def test_per_worker_concurrency(fw):
    fw.put_action("c3", limits={"concurrency": 3})
    ids = [fw.invoke("c3", {"sleep": 0.3}).json()["activationId"] for _ in range(3)]
    pids = {fw.activation(i)["response"]["result"]["pid"] for i in ids}
    assert len(pids) == 1
    # a busy action grows its pool into free memory (the earlier tests' idle
    # workers may fill the default user memory: they are evicted only for an
    # action's first worker)
    before = fw.admin("limits")["maxActionMemory"]
    fw.admin("limits", {"userMemoryMb": 1 << 16})
    try:
        fw.put_action("c1")
        ids = [fw.invoke("c1", {"sleep": 0.3}).json()["activationId"] for _ in range(2)]
        assert len({fw.activation(i)["response"]["result"]["pid"] for i in ids}) == 2
    finally:
        fw.admin("limits", {"userMemoryMb": before})


def test_parameters_merged_and_final_parameters_protected(fw):
    fw.put_action("params", parameters={"A": "bound", "B": 2})
    res = fw.invoke("params", {"B": 3, "C": 4}, blocking=True, result=True).json()
    assert res["args"] == {"A": "bound", "B": 3, "C": 4}
    fw.put_action("final", parameters={"SECRET": "s"}, annotations=[{"key": "final", "value": True}])
    r = fw.invoke("final", {"SECRET": "forged"})
    assert r.status_code == 400 and "not allowed" in r.json()["error"]
    assert fw.invoke("final", {"x": 1}, blocking=True, result=True).json()["args"]["SECRET"] == "s"


def test_openwhisk_environment_per_activation(fw):
    fw.put_action("env", limits={"timeout": 20000})
    rec = fw.invoke("env", {}, blocking=True).json()
    env = rec["response"]["result"]["env"]
    assert env["__OW_ACTIVATION_ID"] == rec["activationId"]
    assert env["__OW_ACTION_NAME"] == "/guest/env" and env["__OW_NAMESPACE"] == "guest"
    assert env["__OW_API_HOST"] == fw.url
    assert abs(int(env["__OW_DEADLINE"]) - (rec["start"] + 20000)) < 1000
    assert "__OW_API_KEY" not in env
    fw.put_action("env-key", annotations=[{"key": "provide-api-key", "value": True}])
    env = fw.invoke("env-key", {}, blocking=True).json()["response"]["result"]["env"]
    assert env["__OW_API_KEY"] == fw.auth


def test_redeploy_retires_old_workers(fw):
    fw.put_action("rd", source="import os\ndef main(a):\n    return {'v': 1, 'pid': os.getpid()}\n")
    old = fw.invoke("rd", {}, blocking=True, result=True).json()
    fw.put_action("rd", source="import os\ndef main(a):\n    return {'v': 2, 'pid': os.getpid()}\n")
    new = fw.invoke("rd", {}, blocking=True, result=True).json()
    assert old["v"] == 1 and new["v"] == 2 and new["pid"] != old["pid"]
    wait_for(lambda: not pid_alive(old["pid"]), 5)


def test_idle_workers_are_reaped(fw):
    fw.put_action("idle")
    pid = fw.invoke("idle", {}, blocking=True, result=True).json()["pid"]
    before = fw.admin("limits")
    try:
        fw.admin("limits", {"idleSeconds": 0.2})
        wait_for(lambda: not pid_alive(pid), 10)
        assert not [w for w in fw.admin("status")["workers"] if w["action"] == "idle"]
    finally:
        fw.admin("limits", {"idleSeconds": 600})
    assert before["concurrentInvocations"] == fw.admin("limits")["concurrentInvocations"]


def test_memory_limit_kills_the_worker(fw):
    fw.put_action("mem", limits={"memory": 128})
    r = fw.invoke("mem", {"alloc_mb": 300}, blocking=True)
    assert r.status_code == 502
    assert r.json()["response"]["result"]["error"] == "The action exhausted its memory and was aborted."


def test_init_failure_is_a_developer_error(fw):
    fw.put_action("broken", source="def main(args)\n    return {}\n")
    r = fw.invoke("broken", {}, blocking=True)
    assert r.status_code == 502
    assert r.json()["response"]["result"]["error"].startswith("The action failed during initialization")


def test_blackbox_actions(fw):
    r = fw.s.put(f"{fw.api()}/actions/bb-image", json={"exec": {"kind": "blackbox", "image": "me/img:1"}})
    assert r.status_code == 200
    r = fw.invoke("bb-image", {}, blocking=True)
    assert r.status_code == 502 and "docker image" in r.json()["response"]["result"]["error"]
    assert fw.put_action("bb-zip", kind="blackbox", image="me/img:1").status_code == 200
    assert fw.invoke("bb-zip", {"x": 1}, blocking=True, result=True).json()["args"] == {"x": 1}


def test_fault_injection_is_deterministic_per_seed(fw):
    ns = "faults"
    fw.put_action("f", ns=ns, limits={"timeout": 5000})
    cfg = {"crash": 0.25, "timeout_instant": 0.25, "throttle": 0.2, "slow_ms": 0, "seed": 11,
           "functions": None}

    def run() -> list[str]:
        fw.admin("faults", cfg, ns=ns)
        seen = []
        for _ in range(16):
            r = fw.invoke("f", {}, ns=ns, blocking=True)
            if r.status_code == 429:
                seen.append("throttle")
                continue
            rec = r.json()
            a = ann(rec)
            if a["timeout"]:
                assert a["fk-fault"] == "timeout_instant"
                assert rec["response"]["result"]["error"].startswith("The action exceeded its time limits")
                seen.append("timeout_instant")
            elif rec["response"]["success"]:
                seen.append("ok")
            else:
                assert rec["response"]["result"]["error"] == fabric.MSG_ABNORMAL_RUN
                seen.append("crash")
        return seen

    first = run()
    assert first == run()
    expected = [FaultPlan.parse(cfg).draw(ns, "f", i) or "ok" for i in range(16)]
    assert first == expected
    assert {"ok", "crash", "timeout_instant", "throttle"} <= set(first)
    # slow_ms adds to the run; a function outside `functions` is untouched.
    fw.admin("faults", {"slow_ms": 300, "functions": ["f"]}, ns=ns)
    rec = fw.invoke("f", {}, ns=ns, blocking=True).json()
    assert rec["duration"] >= 300
    fw.admin("faults", {"throttle": 1.0, "functions": ["other"]}, ns=ns)
    assert fw.invoke("f", {}, ns=ns).status_code == 202
    fw.admin("faults", {}, ns=ns)
    assert fw.admin("faults", ns=ns) == {}


def test_injected_timeout_holds_the_activation_until_its_limit(fw):
    ns = "realtimeout"
    fw.put_action("rt", ns=ns, limits={"timeout": 400})
    pid = fw.invoke("rt", {}, ns=ns, blocking=True, result=True).json()["pid"]
    fw.admin("faults", {"timeout": 1.0, "functions": ["rt"]}, ns=ns)
    rec = fw.invoke("rt", {}, ns=ns, blocking=True).json()
    assert rec["response"]["status"] == "action developer error"
    assert rec["response"]["result"] == {"error": "The action exceeded its time limits of 400 milliseconds."}
    a = ann(rec)
    assert a["timeout"] is True and a["fk-fault"] == "timeout"
    # Recorded when the limit passed, not at once, and the worker went with it.
    assert rec["duration"] >= 400
    wait_for(lambda: not pid_alive(pid), 5)
    fw.admin("faults", {}, ns=ns)
    assert fw.invoke("rt", {}, ns=ns, blocking=True, result=True).json()["pid"] != pid


def test_bad_fault_config_is_400(fw):
    r = fw.s.put(f"{fw.url}/_fabric/faults", json={"crash": 2})
    assert r.status_code == 400 and "probability" in r.json()["error"]
    r = fw.s.put(f"{fw.url}/_fabric/faults", json={"crash": 0.6, "timeout": 0.6})
    assert r.status_code == 400


def test_fabric_up_reuses_and_down_stops_everything(tmp_path):
    d = tmp_path / "fab"
    info = fabric.fabric_up(d)
    try:
        assert info["started"] and info["url"].startswith("http://127.0.0.1:")
        assert stat.S_IMODE(os.stat(d / fabric.STATE_FILE).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(d / fabric.AUTH_FILE).st_mode) == 0o600
        again = fabric.fabric_up(d)
        assert not again["started"] and again["pid"] == info["pid"]
        assert fabric.fabric_status(d)["url"] == info["url"]
        c = FabricClient(info)
        c.put_action("w")
        wpid = c.invoke("w", {}, blocking=True, result=True).json()["pid"]
        assert pid_alive(wpid)
    finally:
        assert fabric.fabric_down(d) is True
    assert fabric.fabric_status(d) is None
    assert not pid_alive(info["pid"]) and not pid_alive(wpid)
    assert fabric.fabric_down(d) is False
    # Actions survive a restart; the key stays the same.
    info2 = fabric.fabric_up(d)
    try:
        assert info2["auth"] == info["auth"]
        c = FabricClient(info2)
        assert c.invoke("w", {"x": 1}, blocking=True, result=True).json()["args"] == {"x": 1}
    finally:
        fabric.fabric_down(d)


def test_state_file_never_holds_a_stale_answer(tmp_path):
    d = tmp_path / "stale"
    d.mkdir()
    (d / fabric.STATE_FILE).write_text(json.dumps({"url": "http://127.0.0.1:9", "host": "127.0.0.1",
                                                   "port": 9, "pid": 999999, "auth": "a:b"}))
    assert fabric.fabric_status(d) is None
    assert fabric.fabric_down(d) is False


def test_fabric_status_shows_the_capacity_in_force_once(tmp_path):
    """`fabric status` shows the user memory and stem cells next to the
    pool's capacity: both are the ones a cluster's config set last, not
    the state file's copy from the fabric's start beside the live ones."""
    d = tmp_path / "fab"
    info = fabric.fabric_up(d)
    try:
        with FabricClient(info) as c:
            c.admin("limits", {"userMemoryMb": 256, "stemCells": {"light": 0}})
        st = fabric.fabric_status(d, capacity=True)
        assert st["user_memory_mb"] == st["capacity"]["user_memory_mb"] == 256
        assert st["stem_cells"] == st["capacity"]["stem_cells"] == {"light": 0}
        assert st["pid"] == info["pid"] and st["auth"] == info["auth"]   # the rest of it kept
    finally:
        assert fabric.fabric_down(d)


def test_a_capacity_limit_set_to_null_returns_to_the_fabrics_start_setting(tmp_path):
    """A cluster whose config leaves user_memory_mb or stem_cells out sends
    null for them: the fabric goes back to what it was started with, its
    command line's when given, else its defaults."""
    d = tmp_path / "fab"
    info = fabric.fabric_up(d, extra_args=["--user-memory-mb", "1024", "--stem-cells", ""])
    try:
        with FabricClient(info) as c:
            c.admin("limits", {"userMemoryMb": 256, "stemCells": {"light": 1}, "concurrentInvocations": 5})
            c.admin("limits", {"userMemoryMb": None, "stemCells": None, "concurrentInvocations": None})
            st = c.admin("status")
            assert st["user_memory_mb"] == 1024 and st["stem_cells"] == {}
            assert c.admin("limits")["concurrentInvocations"] == fabric.Settings().concurrent_invocations
    finally:
        assert fabric.fabric_down(d)


def test_user_memory_evicts_idle_workers_then_queues(fw):
    before = fw.admin("limits")["maxActionMemory"]
    for name in ("um1", "um2", "um3"):
        fw.put_action(name, limits={"memory": 256})
    fw.admin("limits", {"userMemoryMb": 512})
    try:
        p1 = fw.invoke("um1", {}, blocking=True, result=True).json()["pid"]
        p2 = fw.invoke("um2", {}, blocking=True, result=True).json()["pid"]
        fw.invoke("um3", {}, blocking=True, result=True)
        wait_for(lambda: not pid_alive(p1), 5)   # least recently used goes first
        assert pid_alive(p2)
        ids = [fw.invoke("um3", {"sleep": 0.4}).json()["activationId"] for _ in range(3)]
        recs = [fw.activation(i) for i in ids]
        # no free memory for a second worker of um3, and um2's idle worker is
        # not evicted for it (only for an action's first worker): all three
        # queue on um3's warm worker
        assert len({r["response"]["result"]["pid"] for r in recs}) == 1
        assert pid_alive(p2)
        assert max(ann(r)["waitTime"] for r in recs) >= 700               # the third waited for two
        assert fw.admin("status")["memory_used_mb"] <= 512
    finally:
        fw.admin("limits", {"userMemoryMb": before})


def test_an_action_above_a_lowered_user_memory_fails_at_once_not_queued_forever(fw):
    """The fabric's limits are shared: one cluster may lower the user
    memory below an action deployed with more. While a worker of the
    action lives, its activations wait for it as before; an action with
    none left can never be placed, and each of its activations is recorded
    as a whisk error at once instead of queueing for good (which would also
    hold back the stem cells of every runtime)."""
    before = fw.admin("limits")["maxActionMemory"]
    for name in ("big1", "big2"):
        fw.put_action(name, limits={"memory": 512})
    fw.admin("limits", {"userMemoryMb": 512})
    try:
        busy = fw.invoke("big1", {"sleep": 2}).json()["activationId"]      # holds all the memory
        wait_for(lambda: fw.admin("status")["memory_used_mb"] >= 512, 10)
        queued = fw.invoke("big1", {}).json()["activationId"]
        fw.admin("limits", {"userMemoryMb": 256})
        # big1's worker takes it once free; big2 has none and can never have one
        rec = fw.activation(fw.invoke("big2", {}).json()["activationId"], timeout_s=2)
        assert rec["response"]["status"] == "whisk internal error"
        assert "more than the invoker's user memory (256 MB)" in rec["response"]["result"]["error"]
        assert fw.activation(busy)["response"]["status"] == "success"
        assert fw.activation(queued)["response"]["status"] == "success"
        assert not [k for k, n in fw.admin("status").get("queued", {}).items() if n and "big" in k]
    finally:
        fw.admin("limits", {"userMemoryMb": before})
    assert fw.invoke("big2", {}, blocking=True, result=True).status_code == 200


def test_concurrent_writes_of_one_action_each_get_their_own_version_and_leave_it_runnable(fw):
    """PUTs of the same action at once each make a version of their own (as
    OpenWhisk's revisions do), and a DELETE racing PUTs never leaves an
    action whose code is gone."""
    from concurrent.futures import ThreadPoolExecutor
    assert fw.put_action("race").status_code == 200
    first = fw.s.get(f"{fw.api()}/actions/race").json()["version"]

    def put(i: int) -> str:
        with FabricClient(fw.info) as c:   # a connection of its own, as separate deploys have
            r = c.put_action("race", source=ECHO_AS.format(i=i))
            assert r.status_code == 200, r.text
            return r.json()["version"]
    with ThreadPoolExecutor(6) as pool:
        versions = list(pool.map(put, range(6)))
    major, minor, patch = (int(x) for x in first.split("."))
    assert sorted(versions) == [f"{major}.{minor}.{patch + k}" for k in range(1, 7)], versions
    last = versions.index(max(versions, key=lambda v: tuple(int(x) for x in v.split("."))))
    r = fw.invoke("race", {}, blocking=True, result=True)
    assert r.status_code == 200 and r.json() == {"written_by": last}

    def put_or_delete(i: int) -> int:
        with FabricClient(fw.info) as c:
            if i % 2:
                return c.s.delete(f"{c.api()}/actions/race").status_code
            return c.put_action("race", source=ECHO_AS.format(i=i)).status_code
    for _ in range(3):
        with ThreadPoolExecutor(4) as pool:
            assert set(pool.map(put_or_delete, range(4))) <= {200, 404}
        r = fw.invoke("race", {}, blocking=True, result=True)
        assert r.status_code == 404 or (r.status_code == 200 and "written_by" in r.json()), r.text


ECHO_AS = "def main(args):\n    return {{'written_by': {i}}}\n"
