"""The dispatch tests' fakes of the services their backends use: HF Jobs on the local Hub server, and a
Docker engine on a unix socket."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.fakes.docker_engine import FakeDockerEngine
from tests.fakes.hub_jobs import HubJobs
from tests.hubserver import HubServer
from udquant.dispatch.base import DispatchRequest, make_request

HF_TOKEN = "hf_test-dispatch-secret-not-real"


@pytest.fixture
def jobs(hub: HubServer) -> Iterator[HubJobs]:
    fake = HubJobs(hub, users={HF_TOKEN: "alice"}).install()
    yield fake
    fake.uninstall()


@pytest.fixture
def engine(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeDockerEngine]:
    with FakeDockerEngine() as fake:
        monkeypatch.setenv("DOCKER_HOST", fake.docker_host)
        yield fake


@pytest.fixture
def job_request() -> DispatchRequest:
    return make_request("someone/Distill-8B", "alice")
