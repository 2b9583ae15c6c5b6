"""Test-wide setup. The local Hub server starts before anything imports huggingface_hub, which
reads HF_ENDPOINT once at import; every CLI the tests start inherits the same environment."""

import os
import tempfile

import pytest

from tests.hubserver import HubServer

HUB = HubServer().start()
os.environ["HF_ENDPOINT"] = HUB.url
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="udquant-test-hf-home-")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.pop("HF_TOKEN", None)
# Progress bars off and no analytics in every test process and tool it starts.
os.environ["UDQUANT_NO_PROGRESS"] = "1"
os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"


@pytest.fixture
def hub() -> HubServer:
    HUB.state.repos.clear()
    HUB.state.served.clear()
    HUB.state.requests.clear()
    for grants in (HUB.state.read_only_tokens, HUB.state.orgs, HUB.state.read_only_orgs, HUB.state.fine_grained):
        grants.clear()
    return HUB
