"""The local services as processes: what an action's environment holds, the
identity check before any signal, activation records bounded by bytes, and
services shared between commands (leases), down to `fabric down`."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedkeeper.config import GoogleCluster, OpenWhiskCluster
from fedkeeper.local import fabric, shutdown_local_services, supervisor
from fedkeeper.local.cloud_functions import LocalCloudFunctionsProvider
from fedkeeper.local.fabric.entities import DEFAULT_STEM_CELLS, DEFAULT_USER_MEMORY_MB
from fedkeeper.local.openwhisk import LocalOpenWhiskProvider
from fedkeeper.local.store import EmbeddedMongo
from fedkeeper.local.supervisor import ProcessRecord, pid_alive
from fedkeeper.providers.base import FunctionSpec, ProviderContext
from fixtures_fabric import ECHO, FabricClient, wait_for
from fixtures_fabric import make_artifact as ow_artifact
from test_gcf_local import make_artifact as gcf_artifact

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True)
def _nothing_left_running(tmp_path):
    """Whatever a test started under its state directory is stopped, even
    when an assertion ends the test early (the services run in sessions of
    their own and would outlive pytest)."""
    yield
    shutdown_local_services(tmp_path)

SECRETS = {"FEDKEEPER_TOKEN_SECRET": "tok-3c1d", "FEDKEEPER_STATE_DIR_HINT": "x",
           "MONGO_PASSWORD": "hunter2-mongo", "OW_OTHER_CLUSTER_KEY": "other:cluster-key",
           "GOOGLE_APPLICATION_CREDENTIALS": "/secret/sa.json"}

DUMP_ENV_ACTION = '''
import os
def main(args):
    return {"env": dict(os.environ), "args": sorted(args)}
'''

DUMP_ENV_FUNCTION = '''
import os
import functions_framework


@functions_framework.http
def echo(request):
    return {"env": dict(os.environ)}
'''


def _assert_no_secrets(env: dict, allowed_extra: set[str]) -> None:
    leaked = {k for k in env if k.startswith("FEDKEEPER_") or k in SECRETS}
    assert not leaked, leaked
    assert not [v for v in env.values() if any(s in v for s in SECRETS.values())]
    assert set(env) <= set(supervisor.PASS_ENV) | allowed_extra, set(env) - set(supervisor.PASS_ENV) - allowed_extra


def test_fabric_actions_see_only_what_openwhisk_gives_them(tmp_path, monkeypatch):
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    info = fabric.fabric_up(tmp_path / "fab")
    try:
        # nor does the fabric server itself hold the keeper's secrets
        _assert_no_secrets(psutil.Process(info["pid"]).environ(), {"PYTHONPATH"})
        c = FabricClient(info)
        assert c.put_action("dump", source=DUMP_ENV_ACTION, parameters={"bound": "p"}).status_code == 200
        res = c.invoke("dump", {"x": 1}, blocking=True, result=True).json()
        env = res["env"]
        assert res["args"] == ["bound", "x"]                      # parameters arrive as arguments
        assert env["__OW_ACTION_NAME"] == "/guest/dump" and "__OW_API_KEY" not in env
        ow = {k for k in env if k.startswith("__OW_")}
        _assert_no_secrets(env, ow | {"PYTHONDONTWRITEBYTECODE", "LC_CTYPE"})
    finally:
        fabric.fabric_down(tmp_path / "fab")


def test_cloud_functions_host_passes_only_the_bound_configuration(tmp_path, monkeypatch):
    for k, v in SECRETS.items():
        monkeypatch.setenv(k, v)
    p = LocalCloudFunctionsProvider("iso", GoogleCluster(kind="local"), ProviderContext(state_dir=tmp_path))
    try:
        bound = {"FK_FUNCTION": "echo", "FK_STORE_DB": "db"}
        p.deploy(FunctionSpec(name="echo", source="echo", timeout_s=20, bound=bound),
                 gcf_artifact(DUMP_ENV_FUNCTION))
        out = p.call("echo", {}, timeout_s=20)
        assert out.ok, out
        env = out.result["env"]
        assert env["FK_STORE_DB"] == "db"
        _assert_no_secrets(env, set(bound) | {"PYTHONPATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE",
                                              "FUNCTION_TARGET", "FUNCTION_SIGNATURE_TYPE", "K_SERVICE",
                                              "LC_CTYPE"})
    finally:
        p.close()


def test_nothing_is_signalled_unless_the_pid_is_still_the_recorded_process(tmp_path):
    proc, rec = supervisor.spawn([sys.executable, "-c", "import time; time.sleep(60)"],
                                 log_path=tmp_path / "p.log")
    try:
        assert supervisor.is_running(rec) and rec.cmdline
        older = ProcessRecord(rec.pid, rec.create_time - 30.0, rec.cmdline)
        other = ProcessRecord(rec.pid, rec.create_time, (sys.executable, "-c", "something else"))
        assert not supervisor.stop(older) and not supervisor.stop(other)
        assert proc.poll() is None
        # The embedded store's record naming this pid does not make it the store.
        (tmp_path / "mongo").mkdir()
        (tmp_path / "mongo" / "server.json").write_text(json.dumps({"pid": rec.pid, "port": 1}))
        assert not EmbeddedMongo(tmp_path / "mongo").shutdown()
        (tmp_path / "mongo" / "server.json").write_text(json.dumps(
            {"pid": rec.pid, "port": 1, "process": older.to_json()}))
        assert not EmbeddedMongo(tmp_path / "mongo").stop()
        assert proc.poll() is None
        assert supervisor.stop(rec, grace_s=2.0)
        assert proc.poll() is not None
    finally:
        proc.kill()
        proc.wait()


def test_activation_records_are_bounded_by_bytes(tmp_path):
    info = fabric.fabric_up(tmp_path / "fab")
    try:
        c = FabricClient(info)
        c.put_action("big", source="def main(a):\n    return {'blob': 'x' * 50000, 'i': a.get('i')}\n")
        c.admin("limits", {"recordBytes": 300_000})
        ids = [c.invoke("big", {"i": i}, blocking=True).json()["activationId"] for i in range(20)]
        status = c.admin("status")["namespaces"]["guest"]
        assert status["record_bytes"] <= 300_000 and status["records"] < 20
        assert c.s.get(f"{c.api()}/activations/{ids[0]}").status_code == 404       # oldest dropped
        assert c.activation(ids[-1])["response"]["result"]["i"] == 19             # newest kept
        listed = c.s.get(f"{c.api()}/activations", params={"name": "big", "limit": 200}).json()
        assert [a["activationId"] for a in listed] == ids[::-1][:len(listed)]
    finally:
        fabric.fabric_down(tmp_path / "fab")


# --------------------------------------------------------------------------- shared services

def _ow(sdir: Path, keep: bool = False) -> LocalOpenWhiskProvider:
    return LocalOpenWhiskProvider("ow", OpenWhiskCluster(kind="local"),
                                  ProviderContext(state_dir=sdir, keep_local_services=keep))


def test_two_commands_do_not_stop_each_others_fabric(tmp_path):
    first = _ow(tmp_path)
    second = _ow(tmp_path)
    assert first.started_fabric and not second.started_fabric
    first.close()
    assert fabric.fabric_status(tmp_path / "fabric") is not None, "the first command stopped a shared fabric"
    second.close()
    assert fabric.fabric_status(tmp_path / "fabric") is None, "the last holder left the fabric running"


def test_a_fabric_started_with_fabric_up_outlives_the_commands_that_use_it(tmp_path):
    fdir = tmp_path / "fabric"
    info = fabric.fabric_up(fdir)              # as `fedkeeper fabric up` starts it
    try:
        user = _ow(tmp_path)
        assert not user.started_fabric
        user.close()
        assert fabric.fabric_status(fdir)["pid"] == info["pid"]
    finally:
        assert fabric.fabric_down(fdir)


def test_a_command_whose_config_sets_no_capacity_gets_the_fabrics_own_not_the_last_commands(tmp_path, caplog):
    """A fabric kept between commands (`fabric up`): a config without
    user_memory_mb or stem_cells runs with the fabric's default capacity,
    not with what the command before it set (a 512 MB action was refused
    as above the 256 MB an earlier config had left). The change is logged:
    the fabric is shared, the latest command's config wins."""
    fdir = tmp_path / "fabric"
    fabric.fabric_up(fdir)
    try:
        small = LocalOpenWhiskProvider("ow", OpenWhiskCluster(kind="local", user_memory_mb=256,
                                                              stem_cells={"tensorflow": 0}),
                                       ProviderContext(state_dir=tmp_path))
        st = small.fabric_admin("status")
        assert st["user_memory_mb"] == 256 and st["stem_cells"] == {"tensorflow": 0}
        small.close()
        with caplog.at_level("WARNING", logger="fedkeeper.local"):
            plain = _ow(tmp_path)
        try:
            st = plain.fabric_admin("status")
            assert st["user_memory_mb"] == DEFAULT_USER_MEMORY_MB and st["stem_cells"] == DEFAULT_STEM_CELLS
            assert "the latest one's config wins" in caplog.text and "were 256 MB" in caplog.text
            plain.deploy(FunctionSpec(name="big", source="echo", memory_mb=512, timeout_s=20,
                                      bound={"FK_FUNCTION": "echo"}), ow_artifact(ECHO))
            out = plain.call("big", {}, timeout_s=20)
            assert out.ok, out
        finally:
            plain.close()
    finally:
        assert fabric.fabric_down(fdir)


def test_a_holder_in_another_process_keeps_the_fabric_until_it_is_gone(tmp_path):
    fdir = tmp_path / "fabric"
    mine = _ow(tmp_path)
    code = ("import sys, time\nfrom fedkeeper.local import fabric\n"
            f"fabric.fabric_up({str(fdir)!r}, hold=True, auto_stop=True)\n"
            "print('held', flush=True)\ntime.sleep(120)\n")
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "held"
        mine.close()
        assert fabric.fabric_status(fdir) is not None
    finally:
        other.kill()
        other.wait()
    # Its lease died with it: the next command's close stops the fabric.
    again = _ow(tmp_path)
    again.close()
    assert fabric.fabric_status(fdir) is None


def test_kept_services_outlive_their_command_and_fabric_down_stops_everything(tmp_path):
    kept = _ow(tmp_path, keep=True)
    gcf = LocalCloudFunctionsProvider("g", GoogleCluster(kind="local"),
                                      ProviderContext(state_dir=tmp_path, keep_local_services=True))
    gcf.deploy(FunctionSpec(name="echo", source="echo", timeout_s=20, bound={"FK_FUNCTION": "echo"}),
               gcf_artifact())
    store = EmbeddedMongo(tmp_path / "mongo")
    url, started = store.start()
    assert started
    fabric_pid = fabric.fabric_status(tmp_path / "fabric")["pid"]
    host_pid = gcf.host.lookup("echo").pid
    kept.close()
    gcf.close()
    # --keep-services: the runtime does not stop its store either.
    assert fabric.fabric_status(tmp_path / "fabric") is not None and gcf.host.lookup("echo") is not None
    assert shutdown_local_services(tmp_path)
    assert fabric.fabric_status(tmp_path / "fabric") is None
    assert EmbeddedMongo(tmp_path / "mongo").running_url() is None
    wait_for(lambda: not pid_alive(fabric_pid) and not pid_alive(host_pid), 10)
    assert not shutdown_local_services(tmp_path)


def test_the_store_stops_only_with_its_last_holder(tmp_path):
    d = tmp_path / "m"
    mine = EmbeddedMongo(d)
    url, started = mine.start()
    assert started
    code = ("import sys, time\nfrom fedkeeper.local.store import EmbeddedMongo\n"
            f"print(EmbeddedMongo({str(d)!r}).start()[0], flush=True)\ntime.sleep(120)\n")
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == url
        assert not mine.stop(), "a store another command still uses was stopped"
        assert mine.running_url() == url
    finally:
        other.kill()
        other.wait()
    # The other command is gone (killed: its lease is stale), so this one stops it.
    mine.start()
    assert mine.stop()
    assert mine.running_url() is None


def _store_config(tmp_path: Path, store_dir: Path | None = None) -> Path:
    cfg = tmp_path / "cfg.yaml"
    where = f", state_dir: {str(store_dir)!r}" if store_dir else ""
    cfg.write_text("name: t\nproviders:\n  openwhisk:\n    c1: {kind: local}\nscenarios:\n"
                   "  federated_learning:\n    clients_info: {total_num_clients: 2, num_clients_per_round: 2,"
                   f" clusters: {{c1: 2}}}}\n    mongo_config: {{url: embedded, db: t{where}}}\n")
    return cfg


@pytest.mark.parametrize("starter_keeps", [False, True], ids=["auto-stop", "kept"])
def test_a_store_reused_by_another_command_stops_with_its_last_holder(tmp_path, monkeypatch, starter_keeps):
    """Command A starts the store, command B reuses it, A ends first: the
    store runs on for B and stops when B closes, unless A kept it
    (--keep-services), which only `fabric down` undoes."""
    from fedkeeper.config import load_config
    from fedkeeper.runtime import Runtime
    state = tmp_path / "state"
    monkeypatch.setenv("FEDKEEPER_STATE_DIR", str(state))
    cfg = _store_config(tmp_path)
    code = ("import sys\nfrom fedkeeper.config import load_config\nfrom fedkeeper.runtime import Runtime\n"
            f"rt = Runtime.open(load_config({str(cfg)!r}))\nprint(rt.store_url, flush=True)\n"
            f"sys.stdin.readline()\nrt.close(stop_store={not starter_keeps})\n")
    starter = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
    store = EmbeddedMongo(state / "mongo")
    try:
        url = starter.stdout.readline().strip()
        assert url.startswith("mongodb://")
        reuser = Runtime.open(load_config(cfg))
        assert reuser.store_url == url and not reuser._started_store
        starter.stdin.write("\n")
        starter.stdin.flush()
        assert starter.wait(timeout=60) == 0
        assert store.running_url() == url, "the store stopped under a command still using it"
        reuser.close()
        if starter_keeps:
            assert store.running_url() == url, "a kept store was stopped by a command that only reused it"
        else:
            assert store.running_url() is None, "the store's last holder left it running"
    finally:
        starter.kill()
        starter.wait()
        shutdown_local_services(state)
    assert store.running_url() is None


def test_fabric_down_finds_a_store_kept_outside_the_state_directory(tmp_path, monkeypatch):
    """mongo_config.state_dir puts the embedded store elsewhere; the state
    directory records where, so `fabric down` stops it all the same."""
    from fedkeeper.config import load_config
    from fedkeeper.runtime import Runtime
    state, elsewhere = tmp_path / "state", tmp_path / "elsewhere" / "mongo"
    monkeypatch.setenv("FEDKEEPER_STATE_DIR", str(state))
    rt = Runtime.open(load_config(_store_config(tmp_path, elsewhere)))
    url = rt.store_url
    rt.close(stop_store=False)  # kept, as after --keep-services
    store = EmbeddedMongo(elsewhere)
    try:
        assert store.running_url() == url and not (state / "mongo").exists()
        assert shutdown_local_services(state)
        assert store.running_url() is None
        assert not shutdown_local_services(state)
    finally:
        store.shutdown()


def test_cloud_functions_stop_with_their_last_holder(tmp_path):
    spec = FunctionSpec(name="echo", source="echo", timeout_s=20, bound={"FK_FUNCTION": "echo"})
    first = LocalCloudFunctionsProvider("g", GoogleCluster(kind="local"), ProviderContext(state_dir=tmp_path))
    second = LocalCloudFunctionsProvider("g", GoogleCluster(kind="local"), ProviderContext(state_dir=tmp_path))
    try:
        first.deploy(spec, gcf_artifact())
        first.close()
        assert second.call("echo", {"n": 3}, timeout_s=20).result["echo"] == 3
    finally:
        second.close()
    assert not second.exists("echo")


def test_a_real_timeout_on_the_cloud_functions_host_lasts_the_function_limit(tmp_path):
    from fedkeeper.config import FaultConfig
    from fedkeeper.providers.base import ErrorClass
    p = LocalCloudFunctionsProvider("t", GoogleCluster(kind="local", faults=FaultConfig(timeout=1.0)),
                                    ProviderContext(state_dir=tmp_path))
    try:
        p.deploy(FunctionSpec(name="echo", source="echo", timeout_s=1.5, bound={"FK_FUNCTION": "echo"}),
                 gcf_artifact())
        t0 = time.monotonic()
        out = p.call("echo", {"n": 1}, timeout_s=10)
        held = time.monotonic() - t0
        assert out.error_class is ErrorClass.TIMEOUT
        assert held >= 1.5, "the timeout fault answered before the function's limit"
    finally:
        p.close()


def test_a_logs_tail_reads_only_its_end(tmp_path):
    """What a failed start quotes of a log: its last lines, read from the
    log's end, however long the log grew."""
    import tracemalloc
    log = tmp_path / "function.log"
    with open(log, "w") as f:
        for i in range(300_000):
            f.write(f"line {i}\n")
    tracemalloc.start()
    try:
        assert supervisor.tail(log, 3) == "line 299997\nline 299998\nline 299999"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak   # the 3.3 MB log was not read whole
    assert supervisor.tail(tmp_path / "missing.log") == ""
    log.write_text("only one line, no newline")
    assert supervisor.tail(log) == "only one line, no newline"


def test_the_embedded_store_gets_none_of_the_commands_secrets(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-for-the-store")
    store = EmbeddedMongo(tmp_path / "mongo")
    store.start()
    try:
        pid = json.loads((tmp_path / "mongo" / "server.json").read_text())["pid"]
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert not [v for v in environ if b"not-for-the-store" in v] and any(v.startswith(b"PATH=") for v in environ)
    finally:
        assert store.stop()


def test_a_start_interrupted_while_the_store_comes_up_leaves_no_server_behind(tmp_path, monkeypatch):
    store = EmbeddedMongo(tmp_path / "mongo")

    def interrupted(url, ms):
        # the command's record of the server is written before it answers
        assert (tmp_path / "mongo" / "server.json").exists()
        raise KeyboardInterrupt
    monkeypatch.setattr(store, "_answers", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.start()
    assert not (tmp_path / "mongo" / "server.json").exists()
    assert not [p for p in psutil.process_iter(["cmdline"])
                if str(tmp_path / "mongo") in " ".join(p.info["cmdline"] or [])]


def test_a_creation_time_a_second_off_is_still_the_recorded_process(tmp_path):
    """psutil derives creation times from the boot time, which moves when
    the wall clock is stepped: a live service is still itself."""
    proc, rec = supervisor.spawn([sys.executable, "-c", "import time; time.sleep(60)"],
                                 log_path=tmp_path / "p.log")
    try:
        assert supervisor.is_running(ProcessRecord(rec.pid, rec.create_time + 1.0, rec.cmdline))
        assert not supervisor.is_running(ProcessRecord(rec.pid, rec.create_time - 30.0, rec.cmdline))
    finally:
        proc.kill()
        proc.wait()


def test_a_local_cluster_that_sets_no_capacity_keeps_what_its_sibling_in_the_config_sets(tmp_path):
    """Two local OpenWhisk clusters of one config share the fabric: the one
    that leaves user_memory_mb out must not undo the other's 4096 MB by
    connecting after it (nor before it)."""
    big = OpenWhiskCluster(kind="local", user_memory_mb=4096)
    plain = OpenWhiskCluster(kind="local")
    clusters = {"ow_big": ("openwhisk", big), "ow_plain": ("openwhisk", plain)}
    ctx = ProviderContext(state_dir=tmp_path, clusters=clusters)
    first = LocalOpenWhiskProvider("ow_plain", plain, ctx)
    try:
        second = LocalOpenWhiskProvider("ow_big", big, ctx)
        third = LocalOpenWhiskProvider("ow_plain", plain, ctx)
        try:
            assert third.fabric_admin("status")["user_memory_mb"] == 4096
        finally:
            third.close()
            second.close()
    finally:
        first.close()
