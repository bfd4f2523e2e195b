"""The client's credentials against the server's authentication: both halves, end to end.

A real server with an auth file, the real client, and MLflow's environment variables as the fallback.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from tests.conftest import RunningServer
from tests.test_auth import Users, secured, users  # noqa: F401  (fixtures)
from trackhouse import Client, IngestError


def _stored(server: RunningServer, run_id: str) -> int:
    return int(
        server.scalar(
            "SELECT count() FROM (SELECT DISTINCT * FROM trackhouse.metrics WHERE run_id = {r:String})", r=run_id
        )
    )


@pytest.mark.parametrize("how", ["token", "basic", "environment"])
def test_the_client_logs_with_mlflows_credentials(
    secured: RunningServer,  # noqa: F811
    users: Users,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    how: str,
) -> None:
    kwargs: dict[str, Any] = {}
    if how == "token":
        kwargs = {"token": users.writer_token}
    elif how == "basic":
        kwargs = {"username": Users.writer[0], "password": Users.writer[1]}
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", users.writer_token)
    with Client(secured.target, **kwargs) as client:
        run = client.start_run(experiment="auth", name=how)
        run.log_series("loss", steps=np.arange(5_000), values=np.linspace(1, 0, 5_000))
        run.finish()
    assert _stored(secured, run.run_id) == 5_000


@pytest.mark.parametrize(("credential", "refusal"), [("th_not_a_token", "UNAUTHENTICATED"), ("reader", "read role")])
def test_refused_credentials_surface_at_flush_and_are_not_retried_forever(
    secured: RunningServer,  # noqa: F811
    users: Users,  # noqa: F811
    credential: str,
    refusal: str,
) -> None:
    token = users.reader_token if credential == "reader" else credential
    client = Client(secured.target, token=token)
    try:
        client.start_run(experiment="auth", name="refused").log_metrics({"loss": 1.0}, step=0)
        with pytest.raises(IngestError, match=refusal):
            client.flush(timeout=60)
    finally:
        with pytest.raises(IngestError):
            client.close(timeout=10)
    assert secured.scalar("SELECT count() FROM trackhouse.metrics") == 0
