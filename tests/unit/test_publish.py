"""Where a token may publish, read from the local Hub's whoami: classic roles and fine-grained scopes."""

from __future__ import annotations

import pytest

from udquant.errors import InputError
from udquant.publish import plan_target

FINE = "hf_test_token_fine"


def scope(kind: str, name: str, *permissions: str) -> dict:
    return {"entity": {"type": kind, "name": name, "_id": "0" * 24}, "permissions": list(permissions)}


def target(token: str, output_repo: str | None = None):
    return plan_target("M", "someone/M", output_repo=output_repo, private=False, token=token)


def test_a_fine_grained_token_publishes_only_where_its_scopes_let_it_write(hub):
    hub.state.tokens[FINE] = "tester"
    hub.state.orgs["tester"] = ["team", "lab"]
    hub.state.fine_grained[FINE] = [scope("user", "tester", "repo.content.read", "repo.write"),
                                    scope("org", "team", "repo.content.read"),
                                    scope("model", "lab/Shared-UD-GGUF", "repo.write"),
                                    scope("model", "lab/Missing-UD-GGUF", "repo.write")]
    hub.state.add_repo("lab/Shared-UD-GGUF", {})
    assert target(FINE).repo_id == "tester/M-UD-GGUF"
    assert target(FINE, "lab/Shared-UD-GGUF").repo_id == "lab/Shared-UD-GGUF"
    with pytest.raises(InputError, match=r"fine-grained token in HF_TOKEN may not write team/M-UD-GGUF: it has "
                                         r"write access \(repo\.write\) to tester/\*, lab/Missing-UD-GGUF, "
                                         r"lab/Shared-UD-GGUF") as err:
        target(FINE, "team/M-UD-GGUF")
    assert "give it write access to team's repos" in str(err.value.hint)
    with pytest.raises(InputError, match="may write lab/Missing-UD-GGUF, which does not exist, but not create"):
        target(FINE, "lab/Missing-UD-GGUF")
    # The same user's classic write token may write every namespace it is a member of.
    assert target("hf_test_token_owner", "team/M-UD-GGUF").repo_id == "team/M-UD-GGUF"


def test_a_fine_grained_token_without_write_scopes_is_refused_before_any_work(hub):
    hub.state.tokens[FINE] = "tester"
    hub.state.fine_grained[FINE] = [scope("user", "tester", "repo.content.read")]
    with pytest.raises(InputError, match=r"may not write tester/M-UD-GGUF: it has write access \(repo\.write\) "
                                         r"to no repos"):
        target(FINE)


def test_scopes_named_only_by_id_are_left_to_the_hub(hub):
    hub.state.tokens[FINE] = "tester"
    hub.state.fine_grained[FINE] = [{"entity": {"type": "user", "_id": "0" * 24}, "permissions": ["repo.write"]}]
    assert target(FINE).repo_id == "tester/M-UD-GGUF"


def test_a_bad_output_repo_is_refused_before_any_request(hub):
    with pytest.raises(InputError, match="--output-repo 'alice/x y' is not a Hugging Face repo id"):
        target("hf_test_token_owner", "alice/x y")
    assert hub.state.requests == []


def test_a_refused_token_is_told_apart_from_no_answer_and_offline_mode(hub, monkeypatch):
    import socket

    from huggingface_hub import constants

    from udquant.errors import HubError

    with pytest.raises(HubError, match=r"the Hub refused the token in HF_TOKEN \(HTTP 401\)"):
        target("hf_garbage")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="uploading needs the Hub, and HF_HUB_OFFLINE is set") as offline:
        target("hf_garbage")
    assert "refused the token" not in str(offline.value)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}"  # nothing listens once the probe is closed
    monkeypatch.setattr(constants, "ENDPOINT", closed)
    with pytest.raises(HubError, match=f"cannot reach the Hub at {closed} to check the token") as unanswered:
        target("hf_garbage")
    assert "refused the token" not in str(unanswered.value)
