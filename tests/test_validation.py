from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import _validate_metric_name

from trackhouse.ingest import validation
from trackhouse.ingest.errors import InvalidArgumentError

KEYS = [
    "loss",
    "train/loss",
    "layer.0.grad_norm",
    "a b:c-d_e",
    "x" * 250,
    "x" * 251,
    "",
    ".",
    "..",
    "../up",
    "a/../b",
    "/abs",
    "a//b",
    "trailing/",
    "bad!char",
    "semi;colon",
    "quote'",
    "ünïcode",
    "tab\tkey",
    "loss\n",
]


def mlflow_accepts(key: str) -> bool:
    try:
        _validate_metric_name(key)  # type: ignore[no-untyped-call]
    except MlflowException:
        return False
    return len(key) <= validation.MAX_KEY_LENGTH  # MLflow checks the length in log_batch


@pytest.mark.parametrize("key", KEYS)
def test_keys_are_judged_exactly_as_mlflow_judges_them(key: str) -> None:
    assert (validation.key_problem(key) is None) == mlflow_accepts(key)


def test_error_names_the_key() -> None:
    with pytest.raises(InvalidArgumentError, match="bad!char"):
        validation.check_key("bad!char")


def test_long_values_truncate_by_default_and_reject_when_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    long_value = "v" * (validation.MAX_PARAM_VALUE_LENGTH + 5)
    assert validation.fit_value("param", "p", long_value, validation.MAX_PARAM_VALUE_LENGTH) == "v" * 6000
    monkeypatch.setenv(validation.ENV_TRUNCATE_LONG_VALUES, "false")
    with pytest.raises(InvalidArgumentError, match="'p' value is 6005 characters"):
        validation.fit_value("param", "p", long_value, validation.MAX_PARAM_VALUE_LENGTH)


@pytest.mark.parametrize("run_id", ["", "-lead", "a" * 257, "has space", "x'; DROP"])
def test_invalid_run_ids(run_id: str) -> None:
    with pytest.raises(InvalidArgumentError):
        validation.check_run_id(run_id)


def test_experiment_name_limit() -> None:
    validation.check_experiment_name("e" * 500)
    with pytest.raises(InvalidArgumentError, match="501 characters"):
        validation.check_experiment_name("e" * 501)
