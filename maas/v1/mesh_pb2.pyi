from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReplicaState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REPLICA_STATE_UNSPECIFIED: _ClassVar[ReplicaState]
    REPLICA_STATE_LOADING: _ClassVar[ReplicaState]
    REPLICA_STATE_READY: _ClassVar[ReplicaState]
    REPLICA_STATE_DRAINING: _ClassVar[ReplicaState]
    REPLICA_STATE_FAILED: _ClassVar[ReplicaState]
REPLICA_STATE_UNSPECIFIED: ReplicaState
REPLICA_STATE_LOADING: ReplicaState
REPLICA_STATE_READY: ReplicaState
REPLICA_STATE_DRAINING: ReplicaState
REPLICA_STATE_FAILED: ReplicaState

class ServiceInfo(_message.Message):
    __slots__ = ("kind", "instance", "endpoint", "version", "started_ms", "metrics_endpoint", "http_endpoint")
    KIND_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STARTED_MS_FIELD_NUMBER: _ClassVar[int]
    METRICS_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    HTTP_ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    kind: str
    instance: str
    endpoint: str
    version: str
    started_ms: int
    metrics_endpoint: str
    http_endpoint: str
    def __init__(self, kind: _Optional[str] = ..., instance: _Optional[str] = ..., endpoint: _Optional[str] = ..., version: _Optional[str] = ..., started_ms: _Optional[int] = ..., metrics_endpoint: _Optional[str] = ..., http_endpoint: _Optional[str] = ...) -> None: ...

class Device(_message.Message):
    __slots__ = ("id", "name", "memory_total_bytes", "memory_free_bytes")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    memory_total_bytes: int
    memory_free_bytes: int
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., memory_total_bytes: _Optional[int] = ..., memory_free_bytes: _Optional[int] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "endpoint", "devices", "labels", "formats", "started_ms")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    FORMATS_FIELD_NUMBER: _ClassVar[int]
    STARTED_MS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    endpoint: str
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    labels: _containers.ScalarMap[str, str]
    formats: _containers.RepeatedScalarFieldContainer[str]
    started_ms: int
    def __init__(self, worker_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., labels: _Optional[_Mapping[str, str]] = ..., formats: _Optional[_Iterable[str]] = ..., started_ms: _Optional[int] = ...) -> None: ...

class Assignment(_message.Message):
    __slots__ = ("replica_id", "deployment", "model_name", "model_version", "format", "source", "task", "options", "device_ids", "memory_bytes", "adapters")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_IDS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    deployment: str
    model_name: str
    model_version: int
    format: str
    source: str
    task: str
    options: _containers.ScalarMap[str, str]
    device_ids: _containers.RepeatedScalarFieldContainer[str]
    memory_bytes: int
    adapters: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, replica_id: _Optional[str] = ..., deployment: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ..., format: _Optional[str] = ..., source: _Optional[str] = ..., task: _Optional[str] = ..., options: _Optional[_Mapping[str, str]] = ..., device_ids: _Optional[_Iterable[str]] = ..., memory_bytes: _Optional[int] = ..., adapters: _Optional[_Iterable[str]] = ...) -> None: ...

class ReplicaInfo(_message.Message):
    __slots__ = ("replica_id", "worker_id", "endpoint", "deployment", "model_name", "model_version", "state", "message", "adapters", "device_ids", "updated_ms", "context_length", "task")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_IDS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_MS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    worker_id: str
    endpoint: str
    deployment: str
    model_name: str
    model_version: int
    state: ReplicaState
    message: str
    adapters: _containers.RepeatedScalarFieldContainer[str]
    device_ids: _containers.RepeatedScalarFieldContainer[str]
    updated_ms: int
    context_length: int
    task: str
    def __init__(self, replica_id: _Optional[str] = ..., worker_id: _Optional[str] = ..., endpoint: _Optional[str] = ..., deployment: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[int] = ..., state: _Optional[_Union[ReplicaState, str]] = ..., message: _Optional[str] = ..., adapters: _Optional[_Iterable[str]] = ..., device_ids: _Optional[_Iterable[str]] = ..., updated_ms: _Optional[int] = ..., context_length: _Optional[int] = ..., task: _Optional[str] = ...) -> None: ...

class PipelineReport(_message.Message):
    __slots__ = ("router", "versions")
    ROUTER_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    router: str
    versions: _containers.RepeatedCompositeFieldContainer[PipelineVersionStats]
    def __init__(self, router: _Optional[str] = ..., versions: _Optional[_Iterable[_Union[PipelineVersionStats, _Mapping]]] = ...) -> None: ...

class PipelineVersionStats(_message.Message):
    __slots__ = ("deployment", "version", "objectives")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OBJECTIVES_FIELD_NUMBER: _ClassVar[int]
    deployment: str
    version: str
    objectives: _containers.RepeatedCompositeFieldContainer[ObjectiveStats]
    def __init__(self, deployment: _Optional[str] = ..., version: _Optional[str] = ..., objectives: _Optional[_Iterable[_Union[ObjectiveStats, _Mapping]]] = ...) -> None: ...

class ObjectiveStats(_message.Message):
    __slots__ = ("step", "requests", "errors", "slow", "max_ms")
    STEP_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    SLOW_FIELD_NUMBER: _ClassVar[int]
    MAX_MS_FIELD_NUMBER: _ClassVar[int]
    step: str
    requests: int
    errors: int
    slow: int
    max_ms: float
    def __init__(self, step: _Optional[str] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., slow: _Optional[int] = ..., max_ms: _Optional[float] = ...) -> None: ...

class KvEvents(_message.Message):
    __slots__ = ("worker_id", "replica_id", "model", "block_size", "seq", "events")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    replica_id: str
    model: str
    block_size: int
    seq: int
    events: _containers.RepeatedCompositeFieldContainer[KvEvent]
    def __init__(self, worker_id: _Optional[str] = ..., replica_id: _Optional[str] = ..., model: _Optional[str] = ..., block_size: _Optional[int] = ..., seq: _Optional[int] = ..., events: _Optional[_Iterable[_Union[KvEvent, _Mapping]]] = ...) -> None: ...

class KvEvent(_message.Message):
    __slots__ = ("kind", "block_hashes")
    class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        KIND_UNSPECIFIED: _ClassVar[KvEvent.Kind]
        STORED: _ClassVar[KvEvent.Kind]
        REMOVED: _ClassVar[KvEvent.Kind]
        CLEARED: _ClassVar[KvEvent.Kind]
    KIND_UNSPECIFIED: KvEvent.Kind
    STORED: KvEvent.Kind
    REMOVED: KvEvent.Kind
    CLEARED: KvEvent.Kind
    KIND_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    kind: KvEvent.Kind
    block_hashes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, kind: _Optional[_Union[KvEvent.Kind, str]] = ..., block_hashes: _Optional[_Iterable[int]] = ...) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("worker_id", "in_flight", "queue_depth", "running", "kv_cache_used", "tokens_per_second", "prefix_hit_rate", "time_ms", "replicas")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_USED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    PREFIX_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    in_flight: int
    queue_depth: int
    running: int
    kv_cache_used: float
    tokens_per_second: float
    prefix_hit_rate: float
    time_ms: int
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaLoad]
    def __init__(self, worker_id: _Optional[str] = ..., in_flight: _Optional[int] = ..., queue_depth: _Optional[int] = ..., running: _Optional[int] = ..., kv_cache_used: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., prefix_hit_rate: _Optional[float] = ..., time_ms: _Optional[int] = ..., replicas: _Optional[_Iterable[_Union[ReplicaLoad, _Mapping]]] = ...) -> None: ...

class ReplicaLoad(_message.Message):
    __slots__ = ("replica_id", "deployment", "in_flight", "queue_depth", "requests_total", "idle_ms", "online_in_flight")
    REPLICA_ID_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    IDLE_MS_FIELD_NUMBER: _ClassVar[int]
    ONLINE_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    replica_id: str
    deployment: str
    in_flight: int
    queue_depth: int
    requests_total: int
    idle_ms: int
    online_in_flight: int
    def __init__(self, replica_id: _Optional[str] = ..., deployment: _Optional[str] = ..., in_flight: _Optional[int] = ..., queue_depth: _Optional[int] = ..., requests_total: _Optional[int] = ..., idle_ms: _Optional[int] = ..., online_in_flight: _Optional[int] = ...) -> None: ...

class LeaderInfo(_message.Message):
    __slots__ = ("instance", "endpoint", "since_ms")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    SINCE_MS_FIELD_NUMBER: _ClassVar[int]
    instance: str
    endpoint: str
    since_ms: int
    def __init__(self, instance: _Optional[str] = ..., endpoint: _Optional[str] = ..., since_ms: _Optional[int] = ...) -> None: ...
