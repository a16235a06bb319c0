"""The Knative variant of a runtime's image: a plain Python image with
functions-framework; the Knative Service mounts the function's zip and
serves its `main.py` on $PORT. `fedkeeper.runtimes.images` finds it through
the provider registry."""
from __future__ import annotations

from ...runtimes.images import ImageVariant

#: the Python the tests and the OpenWhisk base image run, fixed
KNATIVE_PYTHON_BASE = "python:3.11.7-slim-bookworm"

IMAGE_VARIANT = ImageVariant(
    name="knative",
    base_image=KNATIVE_PYTHON_BASE,
    http_entry=True,  # functions-framework serves main.py
    header=("FedKeeper runtime {runtime} for Knative: the Service mounts the function's\n"
            "zip and serves its main.py with functions-framework on $PORT."),
    final_lines=("ENV PYTHONUNBUFFERED=1",),
)
