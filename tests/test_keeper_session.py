"""Whole sessions on fakes (tests/keeper_fakes.py): every failure path of the
keeper's I/O layer, in milliseconds, without TensorFlow or processes."""
from __future__ import annotations

import logging

import pytest

from fedkeeper.keeper import ServiceLost, SessionError, SessionInterrupted
from fedkeeper.providers import ErrorClass, Outcome, ProviderError
from keeper_fakes import fake_keeper


def client_attempts(store, sid):
    return [a for a in store.attempts(sid) if a["function"] == "fl_client"]


def test_a_clean_sync_session_finishes_with_one_attempt_per_client(tmp_path):
    keeper, store, provider, _ = fake_keeper(tmp_path, rounds=3)
    events = []
    keeper.progress = lambda kind, data: events.append((kind, data))
    summary = keeper.start(session_id="s1")
    assert summary.state == "finished" and len(summary.rounds) == 3
    assert store.sessions["s1"]["state"] == "finished"
    assert all(a["state"] == "succeeded" and a["attempt"] == 1 for a in client_attempts(store, "s1"))
    rounds = [d["report"] for k, d in events if k == "round"]
    assert [r.round for r in rounds] == [0, 1, 2] and [r.round_number for r in rounds] == [1, 2, 3]
    assert all(d["round_number"] == d["round"] + 1 for k, d in events if k in ("tick", "aggregating"))


def test_run_log_and_csv_count_rounds_from_one(tmp_path, caplog):
    keeper, store, provider, _ = fake_keeper(tmp_path, rounds=2)
    with caplog.at_level(logging.INFO, logger="fedkeeper.keeper"):
        keeper.start(session_id="s1")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("round ")]
    assert lines[0].startswith("round 1: 4/4 delivered") and lines[1].startswith("round 2:")
    csvs = sorted(p.name for p in (tmp_path / "logs" / "s1").glob("round_*.csv"))
    assert csvs == ["round_001.csv", "round_002.csv"]


def test_quorum_failure_fails_the_session_with_every_clients_reason(tmp_path):
    def behave(fn, p, n):
        if fn == "fl_client" and p["client"] in ("client_0", "client_1", "client_2"):
            return Outcome("", False, ErrorClass.DEVELOPER_ERROR, "boom")
        return "ok"

    keeper, store, provider, _ = fake_keeper(tmp_path, behave, rounds=2)
    summary = keeper.start(session_id="s1")
    assert summary.state == "failed"
    assert "round 1: only 1 of 4 clients delivered, quorum needs 2" in summary.message
    assert "client_0: developer_error: boom" in summary.message
    assert store.sessions["s1"]["state"] == "failed"
    assert store.rounds_[("s1", 0)]["state"] == "failed"
    # Three attempts each, then no more.
    per_client = {}
    for a in client_attempts(store, "s1"):
        per_client[a["client"]] = max(per_client.get(a["client"], 0), a["attempt"])
    assert per_client == {"client_0": 3, "client_1": 3, "client_2": 3, "client_3": 1}
    assert (tmp_path / "logs" / "s1" / "round_001.csv").exists()


def test_a_non_retryable_error_is_not_retried(tmp_path):
    def behave(fn, p, n):
        if fn == "fl_client" and p["client"] == "client_0":
            return ProviderError(ErrorClass.AUTH, "forbidden", status=403)
        return "ok"

    keeper, store, provider, _ = fake_keeper(tmp_path, behave, rounds=1)
    summary = keeper.start(session_id="s1")
    assert summary.state == "finished"
    mine = [a for a in client_attempts(store, "s1") if a["client"] == "client_0"]
    assert len(mine) == 1 and mine[0]["error_class"] == "auth"
    assert summary.rounds[0].failed == 1 and summary.rounds[0].delivered == 3


def test_a_missing_function_is_redeployed_before_the_retry(tmp_path):
    def behave(fn, p, n):
        if fn == "fl_client" and n == 1:
            return ProviderError(ErrorClass.FUNCTION_MISSING, "no such action", status=404)
        return "ok"

    keeper, store, provider, _ = fake_keeper(tmp_path, behave, rounds=1)
    summary = keeper.start(session_id="s1", deploy=False)
    assert summary.state == "finished"
    assert provider.deployed.count("fl_client") >= 1
    assert {a["attempt"] for a in client_attempts(store, "s1") if a["state"] == "succeeded"} == {2}


def test_throttling_waits_retry_after(tmp_path):
    def behave(fn, p, n):
        if fn == "fl_client" and n == 1:
            return ProviderError(ErrorClass.THROTTLED, "slow down", retry_after=7.0, status=429)
        return "ok"

    keeper, store, provider, clock = fake_keeper(tmp_path, behave, rounds=1)
    keeper.start(session_id="s1", deploy=False)
    first = {a["client"]: a for a in client_attempts(store, "s1") if a["attempt"] == 1}
    second = {a["client"]: a for a in client_attempts(store, "s1") if a["attempt"] == 2}
    for c, a in second.items():
        assert a["submitted"] - first[c]["submitted"] >= 7.0


@pytest.mark.parametrize("fast_first_retry", [True, False])
def test_an_aggregator_that_answers_an_error_is_retried_as_a_clients_error_is(tmp_path, fast_first_retry):
    def behave(fn, p, n):
        if fn == "fl_server_aggregator" and n == 1:
            return Outcome("", True, result={"error": "the store did not answer"})
        return "ok"

    # Off, no failure is retried at once, the clients' deliveries notwithstanding.
    keeper, store, provider, clock = fake_keeper(tmp_path, behave, rounds=1, fast_first_retry=fast_first_retry)
    assert keeper.start(session_id="s1", deploy=False).state == "finished"
    agg = sorted((a for a in store.attempts("s1") if a["function"] == "fl_server_aggregator"),
                 key=lambda a: a["attempt"])
    assert [a["state"] for a in agg] == ["failed", "succeeded"]
    gap = agg[1]["submitted"] - agg[0]["finished"]
    # The function's own error: at once with fast_first_retry, else after backoff_s (0.5 s, no jitter).
    assert gap < 0.5 if fast_first_retry else gap >= 0.5


def test_an_attempt_without_outcome_is_timed_out_and_the_round_deadline_abandons(tmp_path):
    def behave(fn, p, n):
        return "hang" if fn == "fl_client" and p["client"] == "client_3" else "ok"

    keeper, store, provider, _ = fake_keeper(tmp_path, behave, rounds=1)
    summary = keeper.start(session_id="s1", deploy=False)
    assert summary.state == "finished"
    mine = [a for a in client_attempts(store, "s1") if a["client"] == "client_3"]
    states = [a["state"] for a in mine]
    # The round deadline (60 s) comes before fl_client's timeout (120 s) +
    # grace: the attempt still running then is abandoned.
    assert states[-1] == "abandoned" and all(s in ("timed_out", "abandoned") for s in states)
    assert summary.rounds[0].delivered == 3


def test_via_invoker_is_refused_on_a_platform_that_cannot_track_by_id(tmp_path):
    keeper, store, provider, _ = fake_keeper(tmp_path, extra_cluster=", invocation: via_invoker")
    with pytest.raises(SessionError, match="via_invoker needs a platform whose invocations can be tracked"):
        keeper.start(session_id="s1")
    assert store.sessions == {} and provider.invoked == []


def test_ctrl_c_marks_the_session_interrupted_and_resume_finishes_it(tmp_path):
    keeper, store, provider, _ = fake_keeper(tmp_path, rounds=3)

    def interrupt(kind, data):
        if kind == "round" and data["report"].round == 0:
            raise KeyboardInterrupt

    keeper.progress = interrupt
    with pytest.raises(SessionInterrupted) as info:
        keeper.start(session_id="s1")
    assert info.value.session == "s1" and info.value.rounds_done == 1
    assert "--resume s1" in str(info.value)
    assert store.sessions["s1"]["state"] == "interrupted"
    keeper.progress = lambda kind, data: None
    summary = keeper.start(resume="s1", deploy=False)
    assert summary.state == "finished"
    # Every round of the session counts, not only this run's.
    assert [r.round for r in summary.rounds] == [0, 1, 2] and summary.rounds_this_run == 2


def test_a_resumed_round_leaves_out_the_time_no_keeper_ran_it(tmp_path):
    """Interrupted in round 2 and resumed 1,000 s later (overnight, say):
    round 2's duration is its working time, not the night."""
    keeper, store, provider, clock = fake_keeper(tmp_path, rounds=3)

    def interrupt(kind, data):
        if kind == "round" and data["report"].round == 0:
            raise KeyboardInterrupt

    keeper.progress = interrupt
    with pytest.raises(SessionInterrupted):
        keeper.start(session_id="s1")
    # as a keeper killed in round 2 leaves it: the round open, its last heartbeat long ago
    first = store.rounds_[("s1", 0)]
    store.upsert_round("s1", 1, selected=first["selected"], state="running", started=first["ended"])
    store.sessions["s1"]["heartbeat"] = first["ended"] + 2   # its keeper's last sign of life
    clock.t += 1000   # the night
    keeper.progress = lambda kind, data: None
    assert keeper.start(resume="s1", deploy=False).state == "finished"
    second = store.rounds_[("s1", 1)]
    assert 998 <= second["paused_s"] <= 1000 and 0 <= second["duration_s"] < 100
    assert "paused_s" not in store.rounds_[("s1", 0)] and "paused_s" not in store.rounds_[("s1", 2)]


def test_a_lost_store_stops_the_session_with_one_line_saying_how_to_resume(tmp_path):
    keeper, store, provider, _ = fake_keeper(tmp_path, rounds=3)
    store.fail_on = lambda method: method == "upsert_round" and ("s1", 1) in store.rounds_
    with pytest.raises(ServiceLost) as info:
        keeper.start(session_id="s1")
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("the store at 127.0.0.1:27017 is gone")
    assert f"fedkeeper start -c {tmp_path / 'fake.yaml'} --resume s1" in text
    store.fail_on = lambda method: False
    summary = keeper.start(resume="s1", deploy=False)
    assert summary.state == "finished" and len(summary.rounds) == 3


@pytest.mark.parametrize("lost_at", ["create_session", "rounds"])
def test_a_store_lost_while_the_session_opens_is_one_line_too(tmp_path, lost_at):
    """Before the session exists there is nothing to resume; once it does,
    the line says how, and the session is not left running."""
    keeper, store, provider, _ = fake_keeper(tmp_path, rounds=1)
    store.fail_on = lambda method: method == lost_at
    with pytest.raises(SessionError if lost_at == "create_session" else ServiceLost) as info:
        keeper.start(session_id="s1", deploy=False)
    text = str(info.value)
    assert "\n" not in text and "127.0.0.1:27017" in text
    if lost_at == "create_session":
        assert "session s1 did not start" in text and "--resume s1" in text and "s1" not in store.sessions
    else:
        assert "--resume s1" in text and store.sessions["s1"]["state"] == "interrupted"


def test_a_keeper_whose_session_another_keeper_resumed_stops_and_writes_nothing_more(tmp_path):
    """Cut off from the store past the staleness limit, a keeper may find
    its session resumed by another when the store answers again: its next
    heartbeat finds another keeper named, and it stops without marking the
    session or abandoning the attempts the other keeper adopted."""
    other = {"host": "elsewhere", "pid": 4242, "started": 1.0}

    def behave(fn, p, n):
        if fn == "fl_client" and p["client"] == "client_3":
            store.sessions[p["session"]]["keeper"] = other   # resumed elsewhere meanwhile
            return "hang"
        return "ok"
    keeper, store, provider, _ = fake_keeper(tmp_path, behave, rounds=2, deadline_s=600)
    keeper.heartbeat_s = 0.01
    with pytest.raises(SessionError, match="resumed by elsewhere \\(pid 4242\\)"):
        keeper.start(session_id="s1", deploy=False)
    doc = store.sessions["s1"]
    assert doc["keeper"] == other and doc["state"] == "running"
    mine = [a for a in store.attempts("s1") if a["client"] == "client_3"]
    # not abandoned: left as it was (its running mark held), for the other keeper to settle
    assert [a["state"] for a in mine] == ["submitting"]
    assert not any(r.get("state") == "done" for r in store.rounds("s1"))


def test_a_session_another_keeper_took_over_is_not_ended_by_this_one(tmp_path):
    """Taken over between two heartbeats, just before its end: the end is
    written only while the session names this keeper."""
    other = {"host": "elsewhere", "pid": 4242, "started": 1.0}

    def behave(fn, p, n):
        if fn == "fl_server_aggregator":
            store.sessions[p["session"]]["keeper"] = other
        return "ok"
    keeper, store, provider, _ = fake_keeper(tmp_path, behave, rounds=1)
    with pytest.raises(SessionError, match="resumed by elsewhere"):
        keeper.start(session_id="s1", deploy=False)
    assert store.sessions["s1"]["state"] == "running" and "ended" not in store.sessions["s1"]


def test_a_dead_cluster_is_asked_again_with_backoff_then_given_up_resumably(tmp_path, caplog):
    def behave(fn, p, n):
        return "hang" if fn == "fl_client" else "ok"

    keeper, store, provider, clock = fake_keeper(tmp_path, behave, rounds=1, deadline_s=600)
    provider.track_error = ProviderError(ErrorClass.UNREACHABLE, "cannot reach c1 (connection refused)")
    with caplog.at_level(logging.INFO, logger="fedkeeper"), pytest.raises(ServiceLost) as info:
        keeper.start(session_id="s1", deploy=False)
    text = str(info.value)
    assert text.startswith("cluster c1 is gone") and "--resume s1" in text and "\n" not in text
    complaints = [r for r in caplog.records if "c1" in r.getMessage() and "answer" in r.getMessage()]
    # Backoff: a minute of outage is a few dozen probes, not thousands, and
    # a handful of log lines.
    assert provider.tracks < 40
    assert 1 <= len(complaints) <= 8
    assert store.sessions["s1"]["state"] == "interrupted"
    # The attempts it could not follow are left running for --resume to adopt.
    assert all(a["state"] == "running" for a in client_attempts(store, "s1"))


def test_a_cluster_whose_local_service_restarts_goes_on(tmp_path):
    def behave(fn, p, n):
        return "hang" if fn == "fl_client" and n == 1 and p["round"] == 0 else "ok"

    keeper, store, provider, clock = fake_keeper(tmp_path, behave, rounds=2)
    provider.can_restart = True
    provider.track_error = ProviderError(ErrorClass.UNREACHABLE, "connection refused")
    summary = keeper.start(session_id="s1", deploy=False)
    assert summary.state == "finished" and provider.restarts == 1
    # The attempts lost with the old service were invoked again at once, and
    # that did not count against their retries.
    first = [a for a in client_attempts(store, "s1") if a["attempt"] == 1 and a["round"] == 0]
    assert len(first) == 4 and all("restarted" in (a.get("error") or "") for a in first)
    assert all(a["attempt"] == 2 for a in client_attempts(store, "s1")
               if a["round"] == 0 and a["state"] == "succeeded")


def interrupted_with_four_running(tmp_path, first_attempt):
    """A one-round session on fakes, interrupted once its four clients'
    first attempts (behaving as `first_attempt`) run."""
    def behave(fn, p, n):
        return first_attempt if fn == "fl_client" and n == 1 else "ok"

    keeper, store, provider, clock = fake_keeper(tmp_path, behave, rounds=1)

    def interrupt(kind, data):
        if kind == "tick" and data["running"] == 4:
            raise KeyboardInterrupt

    keeper.progress = interrupt
    with pytest.raises(SessionInterrupted):
        keeper.start(session_id="s1", deploy=False)
    keeper.progress = lambda kind, data: None
    running = client_attempts(store, "s1")
    assert [a["state"] for a in running] == ["running"] * 4
    return keeper, store, provider, clock, running


def test_on_resume_attempts_the_platform_does_not_know_are_invoked_again_at_once(tmp_path):
    keeper, store, provider, clock, running = interrupted_with_four_running(tmp_path, "hang")
    provider.forgotten = {a["platform_id"] for a in running}
    t0 = clock()
    summary = keeper.start(resume="s1", deploy=False)
    assert summary.state == "finished" and summary.rounds[0].delivered == 4
    # Not waited out (120 s timeout + 5 s grace): re-invoked at once.
    assert clock() - t0 < 10
    for a in running:
        assert store.invocations[a["_id"]]["state"] == "failed"
        assert "unknown to the platform" in store.invocations[a["_id"]]["error"]


def test_on_resume_attempts_a_killed_keeper_was_submitting_are_closed_and_their_clients_invoked_again(tmp_path):
    """kill -9 between recording an attempt and recording the platform's
    answer leaves it `submitting`: resume records it abandoned, unless
    fl_invoker wrote its platform id (then it runs and is tracked)."""
    keeper, store, _, _, first = interrupted_with_four_running(tmp_path, ("after", 1.0))
    unsent, via_invoker = first[0], first[1]
    store.invocations[unsent["_id"]]["state"] = "submitting"
    del store.invocations[unsent["_id"]]["platform_id"]
    store.invocations[via_invoker["_id"]]["state"] = "submitting"
    summary = keeper.start(resume="s1", deploy=False)
    assert summary.state == "finished" and summary.rounds[0].delivered == 4
    closed = store.invocations[unsent["_id"]]
    assert closed["state"] == "abandoned" and "keeper stopped" in closed["error"]
    assert store.invocations[via_invoker["_id"]]["state"] == "succeeded"
    again = [a for a in client_attempts(store, "s1") if a["client"] == unsent["client"]]
    assert [(a["attempt"], a["state"]) for a in again] == [(1, "abandoned"), (2, "succeeded")]
    assert all(a["state"] in ("succeeded", "abandoned") for a in store.attempts("s1"))


def test_an_attempt_a_killed_keeper_left_unsent_costs_its_client_no_attempt(tmp_path):
    """With no retries allowed (max_attempts 1), a client whose only attempt
    a killed keeper left `submitting` is still invoked on resume: that
    attempt was never known to reach the platform, as an unreachable one."""
    import dataclasses
    keeper, store, _, _, first = interrupted_with_four_running(tmp_path, ("after", 1.0))
    unsent = first[0]
    store.invocations[unsent["_id"]]["state"] = "submitting"
    del store.invocations[unsent["_id"]]["platform_id"]
    keeper.dispatcher.policy = dataclasses.replace(keeper.dispatcher.policy, max_attempts=1)
    summary = keeper.start(resume="s1", deploy=False)
    assert summary.state == "finished" and summary.rounds[0].delivered == 4 and summary.rounds[0].failed == 0
    again = [a for a in client_attempts(store, "s1") if a["client"] == unsent["client"]]
    assert [(a["attempt"], a["state"]) for a in again] == [(1, "abandoned"), (2, "succeeded")]


def test_heartbeat_is_written_while_the_session_runs(tmp_path, monkeypatch):
    import fedkeeper.keeper.session as session_mod
    keeper, store, provider, _ = fake_keeper(tmp_path, rounds=1)
    assert session_mod.HEARTBEAT_S > 0
    keeper.start(session_id="s1", deploy=False)
    assert "heartbeat" in store.sessions["s1"]


@pytest.mark.parametrize("mode", ["semi_async", "async"])
def test_the_other_round_modes_finish_on_fakes(tmp_path, mode):
    keeper, store, provider, _ = fake_keeper(tmp_path, mode=mode, rounds=3)
    summary = keeper.start(session_id="s1", deploy=False)
    assert summary.state == "finished" and len(summary.rounds) == 3
    statuses = {u["status"] for u in store.updates_.values()}
    assert statuses <= {"accepted", "stale", "received"}


def test_async_clients_picked_when_the_last_step_is_already_full_are_not_listed_as_selected(tmp_path):
    """The last step opens with a full buffer (two stragglers of the first
    step stored their updates while it aggregated): the clients it picks
    are never invoked, so its round does not list them as selected."""
    sid = "s1"

    def behave(fn, p, n):
        if fn == "fl_server_aggregator" and p["round"] == 0:
            for c in ("client_2", "client_3"):
                store.add_update(sid, 0, c)   # landed while step 1 aggregated
        if fn == "fl_client" and p["client"] in ("client_2", "client_3"):
            return ("after", 100.0)   # their outcomes come long after
        return "ok"

    keeper, store, provider, _ = fake_keeper(tmp_path, behave, mode="async", rounds=2, clients=4, per_round=4,
                                             training="buffer_size: 2\n")
    assert keeper.start(session_id=sid, deploy=False).state == "finished"
    for rnd in (0, 1):
        invoked = {a["client"] for a in client_attempts(store, sid) if a["round"] == rnd}
        assert set(store.rounds_[(sid, rnd)]["selected"]) == invoked, rnd
    assert store.rounds_[(sid, 1)]["selected"] == [] and store.rounds_[(sid, 1)]["state"] == "done"
    assert len(store.rounds_[(sid, 1)]["stale_included"]) == 2


def test_async_clients_picked_when_a_step_is_already_full_train_from_the_model_current_when_invoked(tmp_path):
    """A step whose buffer is full when it tops up leaves its picks to the
    next step; that step invokes them from the model then current, and
    lists them in its own round, not in the one they were picked in."""
    sid = "s1"

    def behave(fn, p, n):
        if fn == "fl_server_aggregator" and p["round"] == 0:
            for c in ("client_2", "client_3"):
                store.add_update(sid, 0, c)   # landed while step 1 aggregated
        if fn == "fl_client" and p["client"] in ("client_2", "client_3") and p["round"] == 0:
            return ("after", 100.0)
        return "ok"

    keeper, store, provider, _ = fake_keeper(tmp_path, behave, mode="async", rounds=3, clients=6, per_round=4,
                                             training="buffer_size: 2\n")
    assert keeper.start(session_id=sid, deploy=False).state == "finished"
    newest = 0   # the newest model when each call was made: one more after each aggregation
    for name, payload in provider.invoked:
        if name == "fl_client":
            assert payload["round"] == newest, (payload["client"], payload["round"], newest)
        elif name == "fl_server_aggregator":
            newest = payload["round"] + 1
    for rnd in (0, 1, 2):
        invoked = {a["client"] for a in client_attempts(store, sid) if a["round"] == rnd}
        assert set(store.rounds_[(sid, rnd)]["selected"]) == invoked, rnd


def test_refused_connections_reported_per_invocation_end_in_a_lost_cluster_not_used_up_retries(tmp_path):
    """HTTP platforms report a refused connection as each invocation's
    outcome: those attempts never reached the function and must not use up
    the clients' retries; the cluster is given up resumably instead."""
    def behave(fn, p, n):
        if fn == "fl_client":
            return Outcome("", False, ErrorClass.UNREACHABLE, "connection refused")
        return "ok"

    keeper, store, provider, _ = fake_keeper(tmp_path, behave, rounds=1, deadline_s=600)
    with pytest.raises(ServiceLost, match="^cluster c1 is gone"):
        keeper.start(session_id="s1", deploy=False)
    attempts = client_attempts(store, "s1")
    assert max(a["attempt"] for a in attempts) > 3          # more than max_attempts, none counted
    assert len(attempts) < 4 * 40                            # but backed off, not a flood
    assert store.sessions["s1"]["state"] == "interrupted"


def test_a_session_stopped_for_a_lost_cluster_resumes_with_its_clients_retries_intact(tmp_path):
    """Refused attempts were not counted by the keeper that made them; the
    resumed keeper counted them all, found every client out of attempts
    and failed the round without invoking anyone."""
    from fedkeeper.keeper import Keeper
    down = True

    def behave(fn, p, n):
        if fn == "fl_client" and down:
            return Outcome("", False, ErrorClass.UNREACHABLE, "connection refused")
        return "ok"

    keeper, store, provider, clock = fake_keeper(tmp_path, behave, rounds=1, deadline_s=600)
    with pytest.raises(ServiceLost):
        keeper.start(session_id="s1", deploy=False)
    refused = client_attempts(store, "s1")
    assert max(a["attempt"] for a in refused) > 3
    down = False                                   # the cluster is back
    summary = Keeper(keeper.rt, clock=clock, sleep=clock.sleep).start(resume="s1", deploy=False)
    assert summary.state == "finished", summary
    assert store.rounds_[("s1", 0)]["included"] == [f"client_{i}" for i in range(4)]
    assert len(client_attempts(store, "s1")) == len(refused) + 4   # one more attempt each, and it counted


def test_a_resumed_keeper_tracks_a_running_hedge_on_the_cluster_it_runs_on(tmp_path):
    """client_0's own attempt is held on c1, its hedge runs on c2 when the
    keeper stops: the resume tracks the hedge on c2 (it was asked of c1,
    which never knew it, and recorded timed out at the round's deadline)."""
    from fedkeeper.keeper import Keeper

    def c1(fn, p, n):
        if fn != "fl_client":
            return "ok"
        return "hang" if p["client"] == "client_0" else ("after", 1.0)

    def c2(fn, p, n):
        if fn != "fl_client":
            return "ok"
        return ("after", 5.0) if p["client"] == "client_0" else ("after", 1.0)

    keeper, store, _, clock = fake_keeper(tmp_path, c1, second=c2, second_cluster=2, rounds=1,
                                          training="hedging: {enabled: true, percentile: 0.9, factor: 1.5, "
                                                   "min_peers: 3}\n")

    def interrupt(kind, data):
        if kind == "tick" and any(a.get("hedge") and a["state"] == "running" for a in store.invocations.values()):
            raise KeyboardInterrupt
    keeper.progress = interrupt
    with pytest.raises(SessionInterrupted):
        keeper.start(session_id="s1", deploy=False)
    hedge = next(a for a in client_attempts(store, "s1") if a.get("hedge"))
    assert (hedge["client"], hedge["cluster"]) == ("client_0", "c2")
    started = clock()
    resumed = Keeper(keeper.rt, clock=clock, sleep=clock.sleep)
    resumed.progress = lambda kind, data: None
    assert resumed.start(resume="s1", deploy=False).state == "finished"
    assert store.invocations[hedge["_id"]]["state"] == "succeeded"
    assert clock() - started < 30                  # not the round's deadline (600 s)
    assert "client_0" in store.rounds_[("s1", 0)]["included"]


def test_semi_async_closes_at_quorum_and_a_stragglers_update_joins_a_later_round(tmp_path):
    def behave(fn, p, n):
        if fn == "fl_client" and p["client"] == "client_3" and p["round"] == 0:
            return ("after", 5.0)
        if fn == "fl_client" and p["round"] > 0:
            return ("after", 3.0)           # the later rounds take time
        return "ok"

    keeper, store, provider, _ = fake_keeper(tmp_path, behave, mode="semi_async", rounds=3,
                                             training="staleness_tolerance: 2\n")
    summary = keeper.start(session_id="s1", deploy=False)
    assert summary.state == "finished"
    first = store.rounds_[("s1", 0)]
    assert first["included"] == ["client_0", "client_1", "client_2"]
    # Its client was busy: not selected while its attempt straggled on.
    assert "client_3" not in store.rounds_[("s1", 1)]["selected"]
    joined = [r for r in store.rounds("s1")
              if {"client": "client_3", "round": 0} in (r.get("stale_included") or [])]
    assert len(joined) == 1 and joined[0]["round"] > 0
    assert store.updates_[("s1", 0, "client_3")]["status"] == "accepted"
    assert len([a for a in client_attempts(store, "s1") if a["client"] == "client_3" and a["round"] == 0]) == 1


def test_a_finished_session_lets_its_invoke_threads_go(tmp_path):
    import threading
    keeper, store, provider, _ = fake_keeper(tmp_path, rounds=2)
    before = {t.ident for t in threading.enumerate()}
    assert keeper.start(session_id="s1").state == "finished"
    assert keeper.dispatcher._invoke_pool is None
    left = [t for t in threading.enumerate() if t.ident not in before and t.name.startswith("fk-invoke")]
    for t in left:
        t.join(timeout=5)
    assert not [t for t in left if t.is_alive()]


@pytest.mark.parametrize("mode, marked", [("sync", False), ("semi_async", True), ("async", True)])
def test_only_modes_that_find_waiting_updates_by_status_ask_for_counted_marks(tmp_path, mode, marked):
    # In sync a round lists only its own updates: the model's contributions
    # are record enough, and a mark per update would cost a write each.
    keeper, store, provider, _ = fake_keeper(tmp_path, mode=mode, rounds=2, clients=4, per_round=4)
    assert keeper.start(session_id="s1", deploy=False).state == "finished"
    assert len(provider.aggregations) == 2
    assert all(p.get("mark_counted", False) is marked for p in provider.aggregations)
    statuses = {u["status"] for u in store.updates_.values()}
    assert statuses == ({"accepted"} if marked else {"received"})


def test_each_ended_attempt_is_reported_once_and_then_forgotten(tmp_path):
    """The dispatcher keeps where each running attempt runs (for the
    metrics of its end) and forgets it once it ended: a long session does
    not hold every attempt it ever made."""
    def crash_first(fn, p, n):
        if fn == "fl_client" and p["client"] == "client_1" and n == 1:
            return Outcome("", False, ErrorClass.APPLICATION_ERROR, "crashed")
        return "ok"
    keeper, store, _, _ = fake_keeper(tmp_path, crash_first, rounds=2)
    ended = []
    keeper.attempt_ended = lambda cluster, platform, state, *rest, function: ended.append((function, state))
    assert keeper.start(session_id="s1").state == "finished"
    records = store.attempts("s1")
    assert sorted(ended) == sorted((a["function"], a["state"]) for a in records)
    assert ("fl_client", "failed") in ended
    assert keeper.dispatcher._attempt_where == {}


def test_an_attempt_that_stored_its_update_but_never_reported_teaches_no_duration(tmp_path):
    """It is delivered once its time is up (its update is there), but the
    wait was the function's timeout, not its run: a peer duration that
    long would lift the round's hedging threshold past the limit."""
    def behave(fn, p, n):
        if fn == "fl_client" and p["client"] == "client_3" and n == 1:
            store.add_update(p["session"], p["round"], "client_3", 1)   # stored, never reported
            return "hang"
        return "ok"
    keeper, store, provider, _ = fake_keeper(tmp_path, behave, rounds=1, deadline_s=600)
    summary = keeper.start(session_id="s1")
    assert summary.state == "finished" and summary.rounds[0].delivered == 4
    assert summary.rounds[0].seconds > 120   # it waited for client_3's timeout plus grace
    assert len(keeper.dispatcher.peer_durations[0]) == 3   # the three that reported
    assert max(keeper.dispatcher.peer_durations[0]) < 60


def _with_a_later_attempt(store, running: dict, state: str) -> dict:
    """A hedge of `running`'s client recorded after it (attempt 2), in
    `state`, as a keeper that stopped meanwhile left it."""
    doc = {**running, "_id": f"{running['_id']}-hedge", "attempt": 2, "hedge": True, "state": state,
           "platform_id": "act-hedge-gone"}
    store.invocations[doc["_id"]] = doc
    return doc


def test_on_resume_a_clients_running_attempt_is_tracked_though_a_later_one_failed(tmp_path):
    """client_0's own attempt runs; its hedge failed before the keeper
    stopped. Resumed, the running attempt is tracked to its end: the client
    is not invoked a third time while it runs."""
    keeper, store, _, _, running = interrupted_with_four_running(tmp_path, ("after", 1.0))
    own = running[0]
    _with_a_later_attempt(store, own, "hedged")
    summary = keeper.start(resume="s1", deploy=False)
    assert summary.state == "finished" and summary.rounds[0].delivered == 4
    mine = sorted((a["attempt"], a["state"]) for a in store.attempts("s1", 0) if a["client"] == own["client"])
    assert mine == [(1, "succeeded"), (2, "hedged")]
    assert keeper.dispatcher._attempt_where == {}   # nothing kept of the attempts that had ended


@pytest.mark.parametrize("stored_by_own", [False, True], ids=["hedge stores", "own attempt stored first"])
def test_on_resume_an_older_running_attempt_beside_a_younger_one_is_closed(tmp_path, stored_by_own):
    """Both client_0's own attempt and its hedge ran when the keeper
    stopped: the hedge is tracked, and the own attempt's record does not
    say running forever; if its update is the one stored (the hedge finds
    its own refused), its record says so."""
    keeper, store, provider, _, running = interrupted_with_four_running(tmp_path, ("after", 1.0))
    own = running[0]
    hedge = _with_a_later_attempt(store, own, "running")
    result = {"num_examples": 10}
    if stored_by_own:
        store.add_update("s1", 0, own["client"], 1)
        result.update(duplicate=True, stored_by=1)
    provider.later["act-hedge-gone"] = (0.0, "fl_client", {"session": "s1", "round": 0, "client": own["client"]},
                                        result)
    summary = keeper.start(resume="s1", deploy=False)
    assert summary.state == "finished" and summary.rounds[0].delivered == 4
    assert store.invocations[hedge["_id"]]["state"] == ("hedged" if stored_by_own else "succeeded")
    closed = store.invocations[own["_id"]]
    assert closed["state"] == "abandoned" and closed["stray"] is True   # not the client's doing: reliability skips it
    assert bool(closed.get("stored_update")) is stored_by_own
    assert ("is the one counted" if stored_by_own else "a younger attempt of its client runs") in closed["error"]
    assert all(a["state"] != "running" for a in store.attempts("s1"))


def test_a_resume_tracks_each_clients_youngest_running_attempt_and_closes_the_older():
    from fedkeeper.keeper.modes.base import youngest_running
    attempts = [{"_id": i, "client": c, "round": r, "attempt": n, "state": st, "platform_id": pid}
                for i, (c, r, n, st, pid) in enumerate([
                    ("a", 0, 2, "running", "p2"), ("a", 0, 1, "running", "p1"), ("a", 0, 3, "hedged", "p3"),
                    ("b", 0, 1, "running", "q1"), ("b", 1, 1, "running", "q2"), ("b", 1, 2, "running", None),
                    ("c", 0, 1, "failed", "r1")])]
    youngest, older = youngest_running(attempts)
    assert {k: a["platform_id"] for k, a in youngest.items()} == {("a", 0): "p2", ("b", 0): "q1", ("b", 1): "q2"}
    assert [a["platform_id"] for a in older] == ["p1"]


def test_a_resumed_straggler_is_numbered_after_every_attempt_its_client_made(tmp_path):
    """semi_async and async adopt the running attempts of earlier rounds:
    one whose hedge (attempt 2) failed before the keeper stopped is tracked
    as attempt 1, and its next attempt is numbered 3, not a second 2."""
    from fedkeeper.keeper.modes import make_mode
    keeper, store, _, _, running = interrupted_with_four_running(tmp_path, ("after", 1.0))
    own = running[0]
    _with_a_later_attempt(store, own, "hedged")
    mode = make_mode("semi_async", keeper._round_context())
    slots = {s.client: s for s in mode.adopt_running("s1", 1)}
    s = slots[own["client"]]
    assert (s.running_attempt, s.attempt, s.doc_id) == (1, 2, own["_id"])


def test_an_attempt_whose_answer_was_lost_after_it_stored_its_update_is_recorded_done(tmp_path):
    """A keeper stopped by Ctrl-C loses the answers of its HTTP calls: on
    resume those attempts report a platform error, yet their updates are
    stored and counted. They were recorded failed, so status counted the
    clients failed and reliability blamed their cluster."""
    def behave(fn, p, n):
        if fn == "fl_client" and p["client"] in ("client_0", "client_1"):
            store.add_update(p["session"], p["round"], p["client"], p["attempt"])
            return Outcome("", False, ErrorClass.PLATFORM_ERROR, "its answer was lost")
        return "ok"

    keeper, store, provider, _ = fake_keeper(tmp_path, behave, rounds=1)
    assert keeper.start(session_id="s1", deploy=False).state == "finished"
    by_client = {a["client"]: a for a in client_attempts(store, "s1")}
    assert len(client_attempts(store, "s1")) == 4                       # no retry
    for c in ("client_0", "client_1"):
        assert by_client[c]["state"] == "succeeded" and by_client[c]["stored_update"] is True
        assert by_client[c]["error_class"] is None and "its update is stored" in by_client[c]["error"]
    assert store.rounds_[("s1", 0)]["included"] == [f"client_{i}" for i in range(4)]


def test_updates_left_waiting_when_the_session_ends_are_stale(tmp_path):
    """A semi_async straggler of the last round stores its update after
    that round closed: no later round can take it, so it is stale, not
    `received` for ever (docs/round-modes.md's statuses)."""
    def behave(fn, p, n):
        if fn == "fl_client" and p["client"] == "client_3" and p["round"] == 1:
            store.add_update(p["session"], p["round"], p["client"], p["attempt"])
            return ("after", 100.0, {"num_examples": 10})
        return "ok"

    keeper, store, provider, _ = fake_keeper(tmp_path, behave, mode="semi_async", rounds=2,
                                             training="staleness_tolerance: 2\n")
    assert keeper.start(session_id="s1", deploy=False).state == "finished"
    assert "client_3" not in store.rounds_[("s1", 1)]["included"]
    assert store.updates_[("s1", 1, "client_3")]["status"] == "stale"


@pytest.mark.parametrize("training,why", [
    ("target_accuracy: 0.505\n", "target accuracy 0.505 reached: 0.51 after round 2"),
    ("", "all 3 rounds trained")])
def test_a_finished_session_says_why_it_trained_no_further(tmp_path, training, why):
    keeper, store, provider, _ = fake_keeper(tmp_path, rounds=3, training=training)
    summary = keeper.start(session_id="s1", deploy=False)
    assert summary.state == "finished" and summary.message == why
    assert store.sessions["s1"]["stopped"] == why
