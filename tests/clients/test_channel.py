"""The SDK's channel: several targets as one round-robin target, and bounded retries."""

from __future__ import annotations

import json

import pytest

from nnserve_client._channel import channel_authority, channel_target, service_config

pytestmark = pytest.mark.fast  # in process: no torch, no subprocess, no extra venv (make test-fast)


def test_several_targets_become_one_round_robin_target() -> None:
    assert channel_target("127.0.0.1:8001") == "127.0.0.1:8001"
    assert channel_target(["127.0.0.1:1", "127.0.0.2:2"]) == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert channel_target(["[::1]:1", "127.0.0.1:2"]) == "ipv6:[::1]:1,[::ffff:127.0.0.1]:2"
    assert channel_target(["localhost:5", "127.0.0.1:6"]).startswith(("ipv4:", "ipv6:"))
    with pytest.raises(ValueError, match="host:port"):
        channel_target(["dns:///nnserve:8001", "127.0.0.1:1"])
    with pytest.raises(ValueError, match="at least one"):
        channel_target([])


def test_several_targets_name_the_first_as_their_authority() -> None:
    """gRPC would send the whole list ("a:1,b:2"), which h2-based servers (the native transport) reset
    with PROTOCOL_ERROR; tests/e2e/test_load_spreading.py fails without this."""
    assert channel_authority("127.0.0.1:8001") is None
    assert channel_authority(["127.0.0.1:8001"]) is None
    assert channel_authority(["127.0.0.2:1", "127.0.0.1:2"]) == "127.0.0.2:1"
    assert channel_authority(["[::1]:1", "127.0.0.1:2"]) == "[::1]:1"


def test_retries_cover_a_stopping_servers_statuses_and_are_bounded() -> None:
    (method,) = json.loads(service_config(retries=3))["methodConfig"]
    policy = method["retryPolicy"]
    assert policy["maxAttempts"] == 4
    # UNAVAILABLE: refused or gone; CANCELLED: calls no handler had taken when the server stopped.
    assert sorted(policy["retryableStatusCodes"]) == ["CANCELLED", "UNAVAILABLE"]
    assert json.loads(service_config(retries=9))["methodConfig"][0]["retryPolicy"]["maxAttempts"] == 5
    assert "methodConfig" not in json.loads(service_config(retries=0))
