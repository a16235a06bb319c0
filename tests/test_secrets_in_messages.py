"""Secrets written into URLs of the config (user info) reach no message, no
stored spec and no printed config: OpenWhisk's ow_api_host, the messages
of ProviderErrors (which client libraries fill with URLs), a Mongo URL
whose password holds an unescaped '/', lists in `config show`, and the
Kubernetes API server that `cluster info` prints."""
from __future__ import annotations

import pytest
from click.testing import CliRunner

from fedkeeper.cli import main as cli
from fedkeeper.config import ConfigError, KnativeCluster, parse_config
from fedkeeper.providers import ErrorClass, ProviderError
from fedkeeper.providers.kube import cluster_info, format_info
from fedkeeper.providers.openwhisk.cluster import OpenWhiskCluster
from kube_emulator import EmulatedCluster

KEY = "OWSECRETKEYabcdef123456"


def scenario(*lines: str):
    """A config of one local OpenWhisk cluster and scenario `s` holding `lines`."""
    body = "".join(f"    {line}\n" for line in lines)
    return parse_config(f"providers:\n  openwhisk:\n    ow: {{kind: local}}\nscenarios:\n  s:\n{body}")


def test_openwhisk_api_host_with_user_info_is_shown_without_it():
    c = OpenWhiskCluster(auth={"ow_api_host": f"http://23bc46b1:{KEY}@127.0.0.1:18931", "ow_auth": f"23bc46b1:{KEY}"})
    assert c.api_host() == "http://127.0.0.1:18931"


def test_provider_errors_never_carry_a_urls_user_info():
    err = ProviderError(ErrorClass.AUTH, f"get function f: GET http://svc:{KEY}@127.0.0.1:1/v2/x failed; "
                                         "mail admin@example.org")
    assert KEY not in str(err) and "http://***@127.0.0.1:1/v2/x" in str(err)
    assert "admin@example.org" in str(err)   # not a URL: left as written
    at_sign = ProviderError(ErrorClass.AUTH, "GET https://bob:p@ss@127.0.0.1:1/v2/x")   # an '@' in the password
    assert "ss@" not in str(at_sign) and "https://***@127.0.0.1:1/v2/x" in str(at_sign)


def test_a_mongo_password_with_an_unescaped_slash_is_not_shown():
    with pytest.raises(ConfigError) as err:
        scenario('mongo_config: {url: "mongodb://fedkeeper:Zq9Tk7Wm/Xp2@127.0.0.1:27017/", db: t}')
    assert "Zq9" not in str(err.value) and "Xp2" not in str(err.value) and "%2F" in str(err.value)


def test_config_show_masks_urls_in_lists_and_the_spec_stores_none(tmp_path):
    p = tmp_path / "cfg.yaml"
    p.write_text("""
providers:
  openwhisk:
    ow: {kind: local}
scenarios:
  s:
    mongo_config: {url: embedded, db: t}
    training_test_data:
      dataset: digits
      mirrors: ["https://alice:LISTTOKEN_5b5b5b@data.example.org/d.npz", "https://data.example.org/e.npz"]
      train_images_url: "https://alice:LEGACYTOKEN_42@data.example.org/train_images.npz"
""")
    res = CliRunner().invoke(cli, ["config", "show", "-c", str(p)])
    assert res.exit_code == 0, res.output
    assert "LISTTOKEN" not in res.output and "https://***@data.example.org/d.npz" in res.output
    assert "https://data.example.org/e.npz" in res.output
    stored = parse_config(p.read_text()).scenarios["s"].training_test_data.stored()
    assert "TOKEN" not in str(stored) and stored["mirrors"][0] == "https://data.example.org/d.npz"


def test_cluster_info_shows_the_api_server_without_its_user_info():
    c = EmulatedCluster()
    try:
        c.add_node("n0", cpu="4", memory="8Gi")
        info = cluster_info(KnativeCluster(api_server=c.url.replace("://", "://admin:KUBETOKEN_77aa55cc@")))
        assert "KUBETOKEN" not in str(info) and "KUBETOKEN" not in format_info(info)
        assert info["api_server"].startswith("http://***@127.0.0.1:")
    finally:
        c.stop()


def test_a_sweep_over_a_data_url_shows_and_stores_it_masked():
    from types import SimpleNamespace

    from fedkeeper.sweep.plan import Run
    from fedkeeper.sweep.runner import Sweep
    url = "https://alice:GRIDTOKEN_42@data.example.org/d.npz"
    run = Run(0, {"path": url}, {"path": url}, 0, 1, "s1", cfg=None)
    assert "GRIDTOKEN" not in run.label and "https://***@data.example.org/d.npz" in run.label
    runner = Sweep.__new__(Sweep)
    runner.plan = SimpleNamespace(runs=[run])
    stored = runner._doc_runs()
    assert "GRIDTOKEN" not in str(stored) and stored["run000"]["params"]["path"].startswith("https://***@")
    assert run.params["path"] == url   # the run itself trains with the real value


@pytest.mark.parametrize("path", ["https://tok3n/SECRETPART@host/d.npz", "https://user:1234/5678@host/d.npz"])
def test_a_data_url_whose_user_info_holds_an_unescaped_slash_is_refused_unshown(path):
    with pytest.raises(ConfigError) as err:
        scenario("mongo_config: {url: embedded, db: t}", f'training_test_data: {{dataset: npz, path: "{path}"}}')
    assert "SECRET" not in str(err.value) and "5678" not in str(err.value) and "%2F" in str(err.value)


def test_a_mongo_url_with_an_at_sign_in_its_options_is_still_accepted():
    for url in ("mongodb://fk:pw@db:27017/fl?appName=fedkeeper@lab", "mongodb://db:27017?appName=x@lab"):
        cfg = scenario(f'mongo_config: {{url: "{url}", db: t}}')
        assert cfg.scenarios["s"].mongo_config.url == url
