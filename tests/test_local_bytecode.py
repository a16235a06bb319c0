"""Both local platforms compile a function's Python once, when its code is
unpacked, so that a cold start reads bytecode instead of compiling each
module again (the function processes may not write bytecode themselves)."""
from __future__ import annotations

import importlib.util
import sys

import pytest

from fedkeeper.config import GoogleCluster
from fedkeeper.local.archive import compile_python
from fedkeeper.local.cloud_functions import LocalCloudFunctionsProvider
from fedkeeper.providers.base import FunctionSpec, ProviderContext
from fixtures_fabric import fabric_dir, fabric_info, fw  # noqa: F401
from test_gcf_local import make_artifact

pytestmark = pytest.mark.timeout(120)

# PEP 552: bit 0 "hash-based", bit 1 "check the source"
CHECKED_HASH_FLAGS = 0b11


def pyc_of(path) -> bytes | None:
    pyc = importlib.util.cache_from_source(str(path))
    try:
        with open(pyc, "rb") as f:
            return f.read()
    except OSError:
        return None


def is_checked_hash_of(pyc: bytes | None, source: bytes) -> bool:
    return (pyc is not None and pyc[:4] == importlib.util.MAGIC_NUMBER
            and int.from_bytes(pyc[4:8], "little") == CHECKED_HASH_FLAGS
            and pyc[8:16] == importlib.util.source_hash(source))


def test_every_module_is_compiled_and_one_that_does_not_compile_is_left_as_source(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "deep.py").write_text("X = 1\n")
    (tmp_path / "top.py").write_text("def f():\n    return 2\n")
    (tmp_path / "broken.py").write_text("def f(:\n")
    (tmp_path / "data.txt").write_text("not python")
    compile_python(tmp_path)
    for rel in ("pkg/__init__.py", "pkg/deep.py", "top.py"):
        assert is_checked_hash_of(pyc_of(tmp_path / rel), (tmp_path / rel).read_bytes()), rel
    assert pyc_of(tmp_path / "broken.py") is None
    assert sorted(p.name for p in tmp_path.rglob("*.pyc")) == sorted(
        [f"__init__.{sys.implementation.cache_tag}.pyc", f"deep.{sys.implementation.cache_tag}.pyc",
         f"top.{sys.implementation.cache_tag}.pyc"])


# The function reports, from its own process, whether its helper module
# came with checked-hash bytecode of exactly its source, and whether the
# process could have written that bytecode itself.
HELPER = "VALUE = 41\n"
REPORT = '''
import importlib.util
import sys

import helper


def report():
    pyc = importlib.util.cache_from_source(helper.__file__)
    try:
        with open(pyc, "rb") as f:
            head = f.read(16)
    except OSError:
        head = b""
    with open(helper.__file__, "rb") as f:
        source = f.read()
    return {"value": helper.VALUE + 1, "writes_bytecode": not sys.flags.dont_write_bytecode,
            "checked_hash": len(head) == 16 and int.from_bytes(head[4:8], "little") == 3
            and head[8:16] == importlib.util.source_hash(source)}
'''


def test_a_fabric_action_runs_from_bytecode_the_fabric_compiled(fw):
    r = fw.put_action("bytecode", source=REPORT + "\ndef main(args):\n    return report()\n",
                      files={"helper.py": HELPER, "broken.py": "def f(:\n"})
    assert r.status_code == 200, r.text
    out = fw.invoke("bytecode", blocking=True, result=True)
    assert out.status_code == 200, out.text
    assert out.json() == {"value": 42, "writes_bytecode": False, "checked_hash": True}


def test_a_local_cloud_function_runs_from_bytecode_the_host_compiled(tmp_path):
    provider = LocalCloudFunctionsProvider("local_gcf", GoogleCluster(kind="local"),
                                           ProviderContext(state_dir=tmp_path))
    try:
        main = ("import functions_framework\n" + REPORT
                + "\n@functions_framework.http\ndef echo(request):\n    return report()\n")
        provider.deploy(FunctionSpec(name="echo", source="echo", memory_mb=256, timeout_s=20, bound={}),
                        make_artifact(main, {"helper.py": HELPER}))
        out = provider.call("echo", {}, timeout_s=30)
        assert out.ok, out
        assert out.result == {"value": 42, "writes_bytecode": False, "checked_hash": True}
    finally:
        provider.close()
