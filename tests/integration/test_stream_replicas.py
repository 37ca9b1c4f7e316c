"""MAAS_STREAM_REPLICAS reaches a real nats-server: the mesh's streams are made with that
many replicas (a one-server JetStream holds one, and refuses three naming the shortfall)."""

import uuid

import nats
import nats.js.api as js_api
import nats.js.errors
import pytest

from maas.mesh.events import put_stream


async def test_streams_are_made_with_the_replicas_asked_for(nats_url: str, monkeypatch: pytest.MonkeyPatch):
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        name = f"R{uuid.uuid4().hex[:8]}"
        config = js_api.StreamConfig(name=name, subjects=[f"{name}.>"])
        monkeypatch.setenv("MAAS_STREAM_REPLICAS", "3")
        with pytest.raises(nats.js.errors.APIError, match="(?i)replicas|resources|peers"):
            await put_stream(js, config)  # three copies need three servers
        monkeypatch.setenv("MAAS_STREAM_REPLICAS", "1")
        await put_stream(js, config)
        assert (await js.stream_info(name)).config.num_replicas == 1
        assert config.num_replicas is None  # the caller's config is left as it was
        await js.delete_stream(name)
    finally:
        await nc.close()
