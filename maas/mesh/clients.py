"""Finding and dialling other services through etcd (never from a list of addresses)."""

from __future__ import annotations

import random
from types import TracebackType

import aetcd
import aetcd.exceptions
import grpc

from maas.mesh.config import parse_host_port
from maas.mesh.errors import StartupError, Unavailable
from maas.mesh.keys import Keys
from maas.mesh.server import GRPC_OPTIONS
from maas.v1 import mesh_pb2


async def live_services(client: aetcd.Client, keys: Keys, kind: str) -> list[mesh_pb2.ServiceInfo]:
    found = []
    for kv in await client.get_prefix(keys.services(kind)):
        info = mesh_pb2.ServiceInfo()
        info.ParseFromString(kv.value)
        found.append(info)
    return found


async def pick_endpoint(client: aetcd.Client, keys: Keys, kind: str) -> str:
    services = await live_services(client, keys, kind)
    if not services:
        raise Unavailable(f"no {kind} is running (none registered in etcd under {keys.services(kind).decode()})")
    return random.choice(services).endpoint


def dial(endpoint: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(endpoint, options=GRPC_OPTIONS)


class MeshClient:
    """A read-only view of a mesh for the CLI and tests: etcd lookups plus channels by kind."""

    def __init__(self, etcd_url: str, prefix: str = "/maas/", timeout: float = 5.0) -> None:
        host, port = parse_host_port(etcd_url, 2379)
        self.etcd_url = etcd_url
        self.keys = Keys(prefix)
        self.etcd = aetcd.Client(host=host, port=port, timeout=timeout)
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def __aenter__(self) -> MeshClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def channel(self, kind: str) -> grpc.aio.Channel:
        if kind not in self._channels:
            try:
                endpoint = await pick_endpoint(self.etcd, self.keys, kind)
            except (TimeoutError, aetcd.exceptions.ClientError):
                raise StartupError(f"cannot reach etcd at {self.etcd_url}; is the stack running "
                                   "(`maas up`), or pass --etcd / MAAS_ETCD") from None
            self._channels[kind] = dial(endpoint)
        return self._channels[kind]

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()
        await self.etcd.close()
