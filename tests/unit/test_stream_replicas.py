"""MAAS_STREAM_REPLICAS: how many NATS servers hold each of the mesh's JetStream streams."""

import pytest

from maas.mesh.errors import StartupError
from maas.mesh.events import connect_nats, stream_replicas


def test_unset_keeps_the_servers_default(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("MAAS_STREAM_REPLICAS", raising=False)
    assert stream_replicas() is None


@pytest.mark.parametrize("raw", ["0", "6", "three", "-1", "٣", "2.5"])
def test_a_bad_value_is_refused_naming_the_variable(monkeypatch: pytest.MonkeyPatch, raw: str):
    monkeypatch.setenv("MAAS_STREAM_REPLICAS", raw)
    with pytest.raises(StartupError, match="MAAS_STREAM_REPLICAS must be a whole number from 1 to 5"):
        stream_replicas()


async def test_a_bad_value_stops_a_service_before_it_connects(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MAAS_STREAM_REPLICAS", "9")
    with pytest.raises(StartupError, match="MAAS_STREAM_REPLICAS"):
        await connect_nats("nats://127.0.0.1:9", name="t", timeout=0.5)
