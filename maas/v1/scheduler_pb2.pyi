from maas.v1 import access_pb2 as _access_pb2
from maas.v1 import common_pb2 as _common_pb2
from maas.v1 import jobs_pb2 as _jobs_pb2
from maas.v1 import mesh_pb2 as _mesh_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Autoscale(_message.Message):
    __slots__ = ("min_replicas", "max_replicas", "target_in_flight", "scale_up_seconds", "cooldown_seconds")
    MIN_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    TARGET_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    SCALE_UP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COOLDOWN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    min_replicas: int
    max_replicas: int
    target_in_flight: float
    scale_up_seconds: float
    cooldown_seconds: float
    def __init__(self, min_replicas: _Optional[int] = ..., max_replicas: _Optional[int] = ..., target_in_flight: _Optional[float] = ..., scale_up_seconds: _Optional[float] = ..., cooldown_seconds: _Optional[float] = ...) -> None: ...

class TrafficSplit(_message.Message):
    __slots__ = ("model", "weight")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    model: str
    weight: int
    def __init__(self, model: _Optional[str] = ..., weight: _Optional[int] = ...) -> None: ...

class Deployment(_message.Message):
    __slots__ = ("name", "model", "replicas", "autoscale", "resources", "selector", "traffic", "resolved_version", "created_ms", "updated_ms", "previous_version", "adapters", "owner", "format", "rollout_note", "reservations", "replica_tokens_per_s")
    class SelectorEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ReservationsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    AUTOSCALE_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    SELECTOR_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_FIELD_NUMBER: _ClassVar[int]
    RESOLVED_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_MS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_NOTE_FIELD_NUMBER: _ClassVar[int]
    RESERVATIONS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    replicas: int
    autoscale: Autoscale
    resources: _common_pb2.Resources
    selector: _containers.ScalarMap[str, str]
    traffic: _containers.RepeatedCompositeFieldContainer[TrafficSplit]
    resolved_version: str
    created_ms: int
    updated_ms: int
    previous_version: str
    adapters: _containers.RepeatedScalarFieldContainer[str]
    owner: str
    format: str
    rollout_note: str
    reservations: _containers.ScalarMap[str, int]
    replica_tokens_per_s: int
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., replicas: _Optional[int] = ..., autoscale: _Optional[_Union[Autoscale, _Mapping]] = ..., resources: _Optional[_Union[_common_pb2.Resources, _Mapping]] = ..., selector: _Optional[_Mapping[str, str]] = ..., traffic: _Optional[_Iterable[_Union[TrafficSplit, _Mapping]]] = ..., resolved_version: _Optional[str] = ..., created_ms: _Optional[int] = ..., updated_ms: _Optional[int] = ..., previous_version: _Optional[str] = ..., adapters: _Optional[_Iterable[str]] = ..., owner: _Optional[str] = ..., format: _Optional[str] = ..., rollout_note: _Optional[str] = ..., reservations: _Optional[_Mapping[str, int]] = ..., replica_tokens_per_s: _Optional[int] = ...) -> None: ...

class DeploymentStatus(_message.Message):
    __slots__ = ("deployment", "replicas", "ready_replicas", "message")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    READY_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    deployment: Deployment
    replicas: _containers.RepeatedCompositeFieldContainer[_mesh_pb2.ReplicaInfo]
    ready_replicas: int
    message: str
    def __init__(self, deployment: _Optional[_Union[Deployment, _Mapping]] = ..., replicas: _Optional[_Iterable[_Union[_mesh_pb2.ReplicaInfo, _Mapping]]] = ..., ready_replicas: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class CreateDeploymentRequest(_message.Message):
    __slots__ = ("deployment",)
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    deployment: Deployment
    def __init__(self, deployment: _Optional[_Union[Deployment, _Mapping]] = ...) -> None: ...

class UpdateDeploymentRequest(_message.Message):
    __slots__ = ("deployment",)
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    deployment: Deployment
    def __init__(self, deployment: _Optional[_Union[Deployment, _Mapping]] = ...) -> None: ...

class GetDeploymentRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListDeploymentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListDeploymentsResponse(_message.Message):
    __slots__ = ("deployments",)
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    deployments: _containers.RepeatedCompositeFieldContainer[DeploymentStatus]
    def __init__(self, deployments: _Optional[_Iterable[_Union[DeploymentStatus, _Mapping]]] = ...) -> None: ...

class DeleteDeploymentRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteDeploymentResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ActivateRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("deployment", "tenant", "tokens_per_s", "replica_tokens_per_s")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    REPLICA_TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    tenant: str
    tokens_per_s: int
    replica_tokens_per_s: int
    def __init__(self, deployment: _Optional[str] = ..., tenant: _Optional[str] = ..., tokens_per_s: _Optional[int] = ..., replica_tokens_per_s: _Optional[int] = ...) -> None: ...

class ListWorkersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListWorkersResponse(_message.Message):
    __slots__ = ("workers",)
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    workers: _containers.RepeatedCompositeFieldContainer[WorkerStatus]
    def __init__(self, workers: _Optional[_Iterable[_Union[WorkerStatus, _Mapping]]] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("worker", "replicas", "memory_assigned_bytes")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_ASSIGNED_BYTES_FIELD_NUMBER: _ClassVar[int]
    worker: _mesh_pb2.WorkerInfo
    replicas: _containers.RepeatedCompositeFieldContainer[_mesh_pb2.ReplicaInfo]
    memory_assigned_bytes: int
    def __init__(self, worker: _Optional[_Union[_mesh_pb2.WorkerInfo, _Mapping]] = ..., replicas: _Optional[_Iterable[_Union[_mesh_pb2.ReplicaInfo, _Mapping]]] = ..., memory_assigned_bytes: _Optional[int] = ...) -> None: ...
