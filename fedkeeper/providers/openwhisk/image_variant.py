"""The OpenWhisk variant of a runtime's image: a Docker action's image
(`exec.kind: blackbox`, `image`), with the function's zip as `exec.code`;
the base image's action loop runs the zip's `__main__.py` main(args).
`fedkeeper.runtimes.images` finds it through the provider registry."""
from __future__ import annotations

from ...runtimes.images import ImageVariant

#: OpenWhisk's Python 3.11 action runtime (apache/openwhisk-runtime-python),
#: whose action loop accepts a zip with `__main__.py` as a Docker action's
#: code. Its CI tags each build with the commit (besides a moving `nightly`);
#: a fixed one (Python 3.11.7, as the tests run) keeps an image's content
#: hash meaning one content.
OPENWHISK_PYTHON_BASE = "openwhisk/action-python-v3.11:c0a1e6d"

IMAGE_VARIANT = ImageVariant(
    name="openwhisk",
    base_image=OPENWHISK_PYTHON_BASE,
    http_entry=False,  # the action loop calls main(args); no HTTP server of ours
    header=("FedKeeper runtime {runtime} for OpenWhisk Docker actions (exec.kind: blackbox).\n"
            "The function's zip arrives as exec.code; the action loop of the base\n"
            "image runs its __main__.py main(args)."),
)
