import pytest

from maas.mesh.config import MeshConfig, parse_host_port
from maas.mesh.errors import StartupError


def test_parse_host_port_accepts_urls_and_bare_addresses():
    assert parse_host_port("http://10.0.0.1:2379", 1) == ("10.0.0.1", 2379)
    assert parse_host_port("etcd:1234", 1) == ("etcd", 1234)
    assert parse_host_port("nats://nats", 4222) == ("nats", 4222)


@pytest.mark.parametrize("kw, message", [
    ({"lease_ttl": 1}, "lease TTL"),
    ({"port": 70000}, "out of range"),
    ({"prefix": "maas"}, "prefix"),
])
def test_invalid_config_is_rejected_with_a_clear_message(kw, message):
    with pytest.raises(StartupError, match=message):
        MeshConfig(kind="router", **kw)


def test_config_is_frozen():
    cfg = MeshConfig(kind="router")
    with pytest.raises(AttributeError):
        cfg.port = 1  # type: ignore[misc]
