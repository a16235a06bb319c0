"""Session reports from real sessions on the local fabric: the files exist,
the PNGs are PNGs, the HTML needs nothing outside itself, and every series
in report.json is what the store holds."""
from __future__ import annotations

import base64
import json
import math
import re
from collections import Counter
from pathlib import Path

import matplotlib.image
import pymongo
import pytest
import yaml
from click.testing import CliRunner

from fedkeeper.cli import main as cli
from fedkeeper.cli import run_start
from fedkeeper.config import load_config
from fedkeeper.cost import session_cost
from fedkeeper.report import PARTICIPATION_COLOURS, write_report
from fedkeeper.store import connect
from flcommon import store as fs

from test_training_e2e import write_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DB_NAME = "report_e2e"


@pytest.fixture(scope="module")
def sessions(fabric_state, mongo_url, tmp_path_factory):
    """Two finished sessions in one database: crashes injected into the
    clients (so rounds have retries and failed attempts), then the same
    setup without local training (local_epochs 0) for an overlay."""
    d = tmp_path_factory.mktemp("report")
    # Fault draws are a pure function of the seed; seed 1 crashes some of the
    # first client invocations on both clusters.
    cfg_path = write_config(d / "cfg.yaml", mongo_url, DB_NAME, rounds=3, clients=4, per_round=3,
                            faults="{crash: 0.3, seed: 1, functions: [fl_client]}")
    assert run_start(load_config(cfg_path), None, keep_services=True) == 0
    db = pymongo.MongoClient(mongo_url)[DB_NAME]
    first = db[fs.SESSIONS].find_one(sort=[("created", -1)])["_id"]
    data = yaml.safe_load(cfg_path.read_text())
    data["scenarios"]["federated_learning"]["model_params"]["local_epochs"] = "0"
    data["scenarios"]["federated_learning"]["training"]["rounds"] = 2
    no_training = d / "cfg-epochs0.yaml"
    no_training.write_text(yaml.safe_dump(data))
    assert run_start(load_config(no_training), None, keep_services=True) == 0
    second = db[fs.SESSIONS].find_one(sort=[("created", -1)])["_id"]
    assert second != first
    return {"config": cfg_path, "db": db, "ids": [first, second]}


@pytest.fixture(scope="module")
def store_for(mongo_url):
    s = connect(mongo_url, DB_NAME)
    yield s
    s.close()


def check_files(report: dict, out: Path) -> None:
    files = report["files"]
    html_path, json_path = Path(files["html"]), Path(files["json"])
    assert html_path.parent == out and json_path.parent == out
    pngs = [Path(p) for p in files["png"].values()]
    # Overlaid accuracy and loss, and three plots per session.
    assert len(pngs) == 2 + 3 * len(report["sessions"])
    page = html_path.read_text(encoding="utf-8")
    for p in pngs:
        raw = p.read_bytes()
        assert raw[:8] == PNG_MAGIC, p
        pixels = matplotlib.image.imread(p)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100, p
        assert f"data:image/png;base64,{base64.b64encode(raw).decode()}" in page, f"{p.name} not inline"
    # Self-contained: every reference is a data URI; nothing is fetched.
    refs = re.findall(r"""(?:src|href)\s*=\s*["']([^"']*)""", page, flags=re.I)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs), refs
    assert not re.search(r"<(?:link|script|iframe)\b|url\(|@import", page, flags=re.I)
    assert json.loads(json_path.read_text()) == json.loads(json.dumps(report, default=str))


def check_against_store(s: dict, db) -> None:
    """Every series of one session in report.json against the documents."""
    sid = s["session"]
    session = db[fs.SESSIONS].find_one({"_id": sid})
    rounds = list(db[fs.ROUNDS].find({"session": sid}).sort("round", 1))
    attempts = list(db[fs.INVOCATIONS].find({"session": sid}))
    client_attempts = [a for a in attempts if not a["client"].startswith("_")]
    assert [row["round"] for row in s["rounds"]] == [r["round"] + 1 for r in rounds]  # counted from 1
    retries = Counter(a["round"] for a in attempts if a["attempt"] > 1)
    client_retries = Counter(a["round"] for a in client_attempts if a["attempt"] > 1)
    failed = Counter(a["round"] for a in client_attempts if a["state"] != "succeeded")
    for row, rd in zip(s["rounds"], rounds):
        r = rd["round"]
        model = db[fs.MODELS].find_one({"session": sid, "round": r + 1})
        assert row["accuracy"] == model["metrics"]["accuracy"] == rd["accuracy"]
        assert row["loss"] == model["metrics"]["loss"]
        assert row["retries"] == retries[r] == rd["retries"]
        assert row["client_retries"] == client_retries[r]
        assert row["failed_attempts"] == failed[r] == sum(row["failures_by_class"].values())
        assert (row["selected"], row["included"], row["failed_clients"]) == (
            len(rd["selected"]), len(rd["included"]), rd["failed"])
        assert math.isclose(row["ended_s"], rd["ended"] - session["created"], abs_tol=1e-6)
        assert math.isclose(row["started_s"], rd["started"] - session["created"], abs_tol=1e-6)
    # Durations and cold-start flags per cluster: the same multiset of attempts.
    assert set(s["clusters"]) == {a["cluster"] for a in client_attempts}
    for name, c in s["clusters"].items():
        mine = [a for a in client_attempts if a["cluster"] == name]
        assert sorted(d for d in c["durations_ms"] if d is not None) == \
            sorted(a["duration_ms"] for a in mine if a.get("duration_ms") is not None)
        assert Counter(zip(c["durations_ms"], c["cold_start"], c["states"])) == \
            Counter((a.get("duration_ms"), a.get("cold_start"), a["state"]) for a in mine)
        assert c["stats"]["attempts"] == len(mine)
    # Participation: who was aggregated, refused, left out, each round.
    p = s["participation"]
    assert p["clients"] == session["spec"]["clients"]
    assert p["rounds"] == [r["round"] + 1 for r in rounds]
    by_client = dict(zip(p["clients"], p["states"]))
    assert all(set(states) <= set(PARTICIPATION_COLOURS) for states in p["states"])
    for j, rd in enumerate(rounds):
        model = db[fs.MODELS].find_one({"session": sid, "round": rd["round"] + 1})
        state = {c: by_client[c][j] for c in p["clients"]}
        assert {c for c, v in state.items() if v == "accepted"} == set(model["accepted_clients"])
        assert {c for c, v in state.items() if v in ("accepted", "rejected")} == set(rd["included"])
        assert {c for c, v in state.items() if v == "idle"} == set(p["clients"]) - set(rd["selected"])


def test_report_of_a_session_with_retries_matches_the_store(sessions, store_for, tmp_path):
    sid = sessions["ids"][0]
    db = sessions["db"]
    out = tmp_path / "one"
    report = write_report(store_for, [sid], out, load_config(sessions["config"]))
    check_files(report, out)
    (s,) = report["sessions"]
    assert s["session"] == sid and s["state"] == "finished"
    check_against_store(s, db)
    # The injected crashes show up: retries and failed attempts exist.
    assert sum(row["client_retries"] for row in s["rounds"]) > 0
    assert sum(row["failed_attempts"] for row in s["rounds"]) > 0
    assert s["final_accuracy"] == db[fs.SESSIONS].find_one({"_id": sid})["final_accuracy"]
    page = Path(report["files"]["html"]).read_text()
    assert sid in page
    # Cost per round and per session, as fedkeeper.cost estimates it.
    expected = session_cost(store_for, sid, load_config(sessions["config"]))
    assert s["cost"]["total"] == pytest.approx(expected["total"]) and s["cost"]["total"] > 0
    assert s["cost"]["currency"] == expected["currency"]
    per_round = {int(k): v["cost"] for k, v in expected["per_round"].items()}
    assert [row["cost"] for row in s["rounds"]] == pytest.approx([per_round[row["round"] - 1] for row in s["rounds"]])
    assert "estimated cost" in page


def test_cli_overlays_sessions_and_names_unknown_ones(sessions, tmp_path, monkeypatch):
    first, second = sessions["ids"]
    cfg = str(sessions["config"])
    out = tmp_path / "overlay"
    res = CliRunner().invoke(cli, ["report", first, second, "-c", cfg, "-o", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    printed = set(re.findall(r"^wrote (.+)$", res.output, flags=re.M))
    assert printed == {report["files"]["html"], report["files"]["json"], *report["files"]["png"].values()}
    check_files(report, out)
    assert [s["session"] for s in report["sessions"]] == [first, second]
    for s in report["sessions"]:
        check_against_store(s, sessions["db"])
    # The legend tells the sweep's runs apart by the setting that differs.
    assert report["labels"] == [f"{first} (local_epochs=1)", f"{second} (local_epochs=0)"]
    # Without -o: reports/<session id>/ under the working directory.
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    as_json = CliRunner().invoke(cli, ["report", second, "-c", cfg, "--json"])
    assert as_json.exit_code == 0, as_json.output
    printed = json.loads(as_json.stdout)
    assert [s["session"] for s in printed["sessions"]] == [second]
    assert Path(printed["files"]["html"]).resolve() == (cwd / "reports" / second / "report.html").resolve()
    assert (cwd / "reports" / second / "report.html").is_file()
    missing = CliRunner().invoke(cli, ["report", first, "no-such-session", "-c", cfg, "-o", str(tmp_path / "x")])
    assert missing.exit_code == 2   # bad input, as for `status`
    assert missing.output.startswith("Error: no session 'no-such-session' in the store")
    assert not (tmp_path / "x").exists()


def test_participation_of_stale_rejected_late_and_failed_updates(store, tmp_path):
    """A semi-async session's documents as the keeper and aggregator write
    them: every participation state, and a report that still renders with
    rounds still running and no invocation durations."""
    sid = "semi-1"
    clients = [f"client_{i}" for i in range(7)]
    c = clients
    store.create_session({"_id": sid, "state": "running", "created": 1000.0,
                          "spec": {"clients": clients, "mode": "semi_async", "strategy": {"name": "fedavgm"}}})
    # Round 0: client_2, _5 and _6 deliver after the round closed (late); client_3 never delivers.
    store.upsert_round(sid, 0, selected=[c[0], c[1], c[2], c[3], c[5], c[6]], included=[c[0], c[1]],
                       state="done", started=1001.0, ended=1011.0, retries=0, failed=1, mode="semi_async")
    # Round 1: the keeper offers the three late round-0 updates. client_2's is
    # aggregated; client_5's is refused (offered, not aggregated); client_6 is
    # selected again and both its fresh and its stale update are aggregated;
    # client_4's fresh update is refused.
    store.upsert_round(sid, 1, selected=[c[0], c[4], c[6]], included=[c[0], c[4], c[6]],
                       stale_included=[{"client": x, "round": 0} for x in (c[2], c[5], c[6])], state="done",
                       started=1011.0, ended=1020.0, retries=0, failed=0, mode="semi_async")
    store.upsert_round(sid, 2, selected=["client_1", "client_3"], state="running", started=1020.0)
    store.db[fs.UPDATES].insert_many([
        {"session": sid, "round": 0, "client": x, "status": "accepted"} for x in (c[0], c[1], c[2], c[5], c[6])])

    def part(client, rnd, staleness):
        return {"client": client, "round": rnd, "staleness": staleness, "num_examples": 10,
                "weight": 10 * (1 + staleness) ** -0.5}

    store.db[fs.MODELS].insert_many([
        {"session": sid, "round": 1, "metrics": {"accuracy": 0.5, "loss": 1.5}, "accepted": 2,
         "accepted_clients": ["client_0", "client_1"], "rejected": [],
         "contributions": [part(c[0], 0, 0), part(c[1], 0, 0)]},
        {"session": sid, "round": 2, "metrics": {"accuracy": 0.6, "loss": 1.2}, "accepted": 4,
         "accepted_clients": [c[0], c[6], c[2], c[6]],
         "contributions": [part(c[0], 1, 0), part(c[6], 1, 0), part(c[2], 0, 1), part(c[6], 0, 1)],
         "rejected": [{"client": "client_4", "round": 1, "reason": "update blob does not exist"},
                      {"client": "client_5", "round": 0, "reason": "update is not finite"}]}])
    report = write_report(store, [sid], tmp_path / "semi")
    check_files(report, tmp_path / "semi")
    (s,) = report["sessions"]
    states = dict(zip(s["participation"]["clients"], s["participation"]["states"]))
    assert states == {
        "client_0": ["accepted", "accepted", "idle"],
        "client_1": ["accepted", "idle", "pending"],
        "client_2": ["late", "stale", "idle"],
        "client_3": ["failed", "idle", "pending"],
        "client_4": ["idle", "rejected", "idle"],
        "client_5": ["late", "rejected", "idle"],     # offered as stale, refused: not aggregated
        "client_6": ["late", "accepted", "idle"],     # its own round's outcome; the stale update is marked
    }
    # Every late update aggregated, by aggregation round (from models.contributions).
    assert s["participation"]["stale"] == [["client_2", 2], ["client_6", 2]]  # rounds from 1
    assert [row["stale_included"] for row in s["rounds"]] == [0, 3, 0]
    assert [row["accuracy"] for row in s["rounds"]] == [0.5, 0.6, None]
    assert [row["ended_s"] for row in s["rounds"]] == [11.0, 20.0, None]
    assert s["params"]["strategy"] == "fedavgm" and s["params"]["mode"] == "semi_async"
    assert s["clusters"] == {}


def test_retries_axis_starts_at_0_and_the_participation_title_clears_its_legend(store):
    """A session without a single retry: the retries plot reads 0 to 1, not
    the symmetric range around zero; the participation title is the
    figure's (placed above the outside legend), not the axes'."""
    from fedkeeper.report import session_series
    from fedkeeper.report.plots import participation_figure, retries_figure
    sid = "calm-1"
    store.create_session({"_id": sid, "state": "finished", "created": 1000.0, "ended": 1034.0,
                          "spec": {"clients": ["client_0", "client_1"]}})
    store.upsert_round(sid, 0, selected=["client_0", "client_1"], included=["client_0", "client_1"],
                       state="done", started=1001.0, ended=1011.0, retries=0, failed=0)
    s = session_series(store, sid)
    assert [row["round"] for row in s["rounds"]] == [1] and s["participation"]["rounds"] == [1]
    assert s["wall_time_s"] == 34.0  # creation to end, as `fedkeeper start` reports it
    (ax,) = retries_figure(s).axes
    low, high = ax.get_ylim()
    assert low == 0 and high >= 1
    fig = participation_figure(s)
    assert fig._suptitle is not None and fig._suptitle.get_text() == f"client participation: {sid}"
    assert all(not a.get_title() for a in fig.axes)


def test_report_command_on_a_planted_session(store, mongo_url, tmp_path, isolated_dirs):
    """The command without a training run: rounds from 1 in report.json, an
    unknown session is exit 1 with the common error prefix."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"name": "rep", "providers": {"openwhisk": {"ow1": {"kind": "local"}}},
                                   "scenarios": {"federated_learning": {
                                       "clients_info": {"total_num_clients": 2, "num_clients_per_round": 2,
                                                        "ow_clients_count": 2},
                                       "mongo_config": {"url": mongo_url, "db": store.db.name}}}}))
    store.create_session({"_id": "rep-1", "state": "finished", "created": 1000.0, "ended": 1020.0,
                          "spec": {"clients": ["client_0", "client_1"]}})
    for r in range(2):
        store.upsert_round("rep-1", r, selected=["client_0", "client_1"], included=["client_0", "client_1"],
                           state="done", started=1001.0 + 9 * r, ended=1010.0 + 9 * r, retries=0, failed=0,
                           epsilon=1.5 * (r + 1))
    # round 1: client_1 was retried once, client_0 was hedged (a hedge is no retry)
    store.insert_attempts([
        {"session": "rep-1", "round": 0, "client": "client_0", "attempt": 1, "state": "hedged"},
        {"session": "rep-1", "round": 0, "client": "client_0", "attempt": 2, "state": "succeeded", "hedge": True},
        {"session": "rep-1", "round": 0, "client": "client_1", "attempt": 1, "state": "failed"},
        {"session": "rep-1", "round": 0, "client": "client_1", "attempt": 2, "state": "succeeded"},
    ])
    res = CliRunner().invoke(cli, ["report", "rep-1", "-c", str(cfg), "-o", str(tmp_path / "out"), "--json"])
    assert res.exit_code == 0, res.output
    (s,) = json.loads(res.stdout)["sessions"]
    assert [row["round"] for row in s["rounds"]] == [1, 2] and s["wall_time_s"] == 20.0
    assert [row["epsilon"] for row in s["rounds"]] == [1.5, 3.0]
    assert (s["rounds"][0]["retries"], s["rounds"][0]["hedges"]) == (1, 1)
    page = next((tmp_path / "out").glob("*.html")).read_text()
    assert "<th>epsilon</th>" in page and "<th>hedges</th>" in page
    missing = CliRunner().invoke(cli, ["report", "nope", "-c", str(cfg), "-o", str(tmp_path / "x")])
    assert missing.exit_code == 2 and missing.output.startswith("Error: no session 'nope' in the store")
