"""The names reports give validation metrics are names MLflow accepts
(checked by MLflow's own validator), whatever data a validation ran on."""
from __future__ import annotations

import contextlib

import pytest
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import _validate_metric_name

from fedkeeper.model_trail.tracking import MAX_METRIC_NAME, metric_name


@pytest.mark.parametrize("data, refused", [
    ("session test split", False),
    ("npz /data/sets/mnist.npz", False),                       # a path keeps its slashes
    ("npz ./d.npz", False),
    ("npz http://127.0.0.1:8000/d.npz", True),                 # '//': MLflow would take it for another path
    ("npz https://***@data.example.org/d.npz?...", True),      # user info shown as ***, the query elided
])
def test_validation_metric_names_are_accepted_by_mlflow(data, refused):
    raw = f"validation.{data}.accuracy"
    with pytest.raises(MlflowException) if refused else contextlib.nullcontext():
        _validate_metric_name(raw)        # what a report logged before
    name = metric_name(raw)
    _validate_metric_name(name)
    assert (name != raw) == refused


def test_a_long_metric_name_is_cut_to_what_mlflow_stores_and_stays_distinct():
    names = [metric_name(f"validation.npz /{'x' * 400}{i}.accuracy") for i in range(2)]
    for name in names:
        _validate_metric_name(name)
        assert len(name) == MAX_METRIC_NAME and name.endswith(".accuracy")
    assert names[0] != names[1]


def test_a_validation_stored_with_user_info_is_named_without_it():
    name = metric_name("validation.npz https://bob:hunter2@data.example.org/d.npz.accuracy")
    _validate_metric_name(name)
    assert "hunter2" not in name and "bob" not in name
