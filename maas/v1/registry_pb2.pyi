from maas.v1 import access_pb2 as _access_pb2
from maas.v1 import common_pb2 as _common_pb2
from maas.v1 import usage_pb2 as _usage_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ApiKey(_message.Message):
    __slots__ = ("id", "tenant", "rpm", "tpm", "max_concurrent", "models", "created_ms", "admin", "role", "service", "weight", "service_class")
    ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    RPM_FIELD_NUMBER: _ClassVar[int]
    TPM_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SERVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    id: str
    tenant: str
    rpm: int
    tpm: int
    max_concurrent: int
    models: _containers.RepeatedScalarFieldContainer[str]
    created_ms: int
    admin: bool
    role: str
    service: str
    weight: float
    service_class: str
    def __init__(self, id: _Optional[str] = ..., tenant: _Optional[str] = ..., rpm: _Optional[int] = ..., tpm: _Optional[int] = ..., max_concurrent: _Optional[int] = ..., models: _Optional[_Iterable[str]] = ..., created_ms: _Optional[int] = ..., admin: _Optional[bool] = ..., role: _Optional[str] = ..., service: _Optional[str] = ..., weight: _Optional[float] = ..., service_class: _Optional[str] = ...) -> None: ...

class CreateKeyRequest(_message.Message):
    __slots__ = ("tenant", "rpm", "tpm", "max_concurrent", "models", "admin", "role", "service", "weight", "service_class")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    RPM_FIELD_NUMBER: _ClassVar[int]
    TPM_FIELD_NUMBER: _ClassVar[int]
    MAX_CONCURRENT_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    ADMIN_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    SERVICE_CLASS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    rpm: int
    tpm: int
    max_concurrent: int
    models: _containers.RepeatedScalarFieldContainer[str]
    admin: bool
    role: str
    service: str
    weight: float
    service_class: str
    def __init__(self, tenant: _Optional[str] = ..., rpm: _Optional[int] = ..., tpm: _Optional[int] = ..., max_concurrent: _Optional[int] = ..., models: _Optional[_Iterable[str]] = ..., admin: _Optional[bool] = ..., role: _Optional[str] = ..., service: _Optional[str] = ..., weight: _Optional[float] = ..., service_class: _Optional[str] = ...) -> None: ...

class CreateKeyResponse(_message.Message):
    __slots__ = ("key", "info")
    KEY_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    key: str
    info: ApiKey
    def __init__(self, key: _Optional[str] = ..., info: _Optional[_Union[ApiKey, _Mapping]] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ("tenant",)
    TENANT_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    def __init__(self, tenant: _Optional[str] = ...) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[ApiKey]
    def __init__(self, keys: _Optional[_Iterable[_Union[ApiKey, _Mapping]]] = ...) -> None: ...

class RevokeKeyRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class RevokeKeyResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Model(_message.Message):
    __slots__ = ("name", "description", "tags", "latest_version", "aliases", "created_ms", "owner", "latest_format")
    class TagsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class AliasesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    TAGS_FIELD_NUMBER: _ClassVar[int]
    LATEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    LATEST_FORMAT_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    tags: _containers.ScalarMap[str, str]
    latest_version: int
    aliases: _containers.ScalarMap[str, int]
    created_ms: int
    owner: str
    latest_format: str
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., tags: _Optional[_Mapping[str, str]] = ..., latest_version: _Optional[int] = ..., aliases: _Optional[_Mapping[str, int]] = ..., created_ms: _Optional[int] = ..., owner: _Optional[str] = ..., latest_format: _Optional[str] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("name", "version", "format", "source", "base", "task", "resources", "options", "metadata", "artifact_digest", "created_ms", "owner")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_DIGEST_FIELD_NUMBER: _ClassVar[int]
    CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    format: str
    source: str
    base: str
    task: str
    resources: _common_pb2.Resources
    options: _containers.ScalarMap[str, str]
    metadata: _containers.ScalarMap[str, str]
    artifact_digest: str
    created_ms: int
    owner: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., format: _Optional[str] = ..., source: _Optional[str] = ..., base: _Optional[str] = ..., task: _Optional[str] = ..., resources: _Optional[_Union[_common_pb2.Resources, _Mapping]] = ..., options: _Optional[_Mapping[str, str]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., artifact_digest: _Optional[str] = ..., created_ms: _Optional[int] = ..., owner: _Optional[str] = ...) -> None: ...

class RegisterModelRequest(_message.Message):
    __slots__ = ("name", "format", "source", "base", "task", "resources", "options", "metadata", "description", "owner")
    class OptionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    BASE_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    RESOURCES_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    name: str
    format: str
    source: str
    base: str
    task: str
    resources: _common_pb2.Resources
    options: _containers.ScalarMap[str, str]
    metadata: _containers.ScalarMap[str, str]
    description: str
    owner: str
    def __init__(self, name: _Optional[str] = ..., format: _Optional[str] = ..., source: _Optional[str] = ..., base: _Optional[str] = ..., task: _Optional[str] = ..., resources: _Optional[_Union[_common_pb2.Resources, _Mapping]] = ..., options: _Optional[_Mapping[str, str]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., description: _Optional[str] = ..., owner: _Optional[str] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListRegisteredModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRegisteredModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...

class GetVersionRequest(_message.Message):
    __slots__ = ("ref",)
    REF_FIELD_NUMBER: _ClassVar[int]
    ref: str
    def __init__(self, ref: _Optional[str] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    def __init__(self, versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ...) -> None: ...

class SetAliasRequest(_message.Message):
    __slots__ = ("name", "alias", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ALIAS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    alias: str
    version: int
    def __init__(self, name: _Optional[str] = ..., alias: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class DeleteVersionRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class DeleteVersionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Artifact(_message.Message):
    __slots__ = ("sha256", "size_bytes")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size_bytes: int
    def __init__(self, sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class ArtifactChunk(_message.Message):
    __slots__ = ("data", "sha256", "total_bytes")
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    sha256: str
    total_bytes: int
    def __init__(self, data: _Optional[bytes] = ..., sha256: _Optional[str] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class DownloadArtifactRequest(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    def __init__(self, sha256: _Optional[str] = ...) -> None: ...

class DeleteArtifactRequest(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    def __init__(self, sha256: _Optional[str] = ...) -> None: ...

class DeleteArtifactResponse(_message.Message):
    __slots__ = ("size_bytes",)
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    size_bytes: int
    def __init__(self, size_bytes: _Optional[int] = ...) -> None: ...

class BackupCounts(_message.Message):
    __slots__ = ("keys", "models", "versions", "adapters", "aliases", "deployments", "artifacts", "artifact_bytes")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_BYTES_FIELD_NUMBER: _ClassVar[int]
    keys: int
    models: int
    versions: int
    adapters: int
    aliases: int
    deployments: int
    artifacts: int
    artifact_bytes: int
    def __init__(self, keys: _Optional[int] = ..., models: _Optional[int] = ..., versions: _Optional[int] = ..., adapters: _Optional[int] = ..., aliases: _Optional[int] = ..., deployments: _Optional[int] = ..., artifacts: _Optional[int] = ..., artifact_bytes: _Optional[int] = ...) -> None: ...

class BackupRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BackupChunk(_message.Message):
    __slots__ = ("data", "total_bytes", "sha256", "etcd_revision", "counts", "format", "missing_artifacts", "prefix")
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    ETCD_REVISION_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    MISSING_ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    total_bytes: int
    sha256: str
    etcd_revision: int
    counts: BackupCounts
    format: str
    missing_artifacts: _containers.RepeatedScalarFieldContainer[str]
    prefix: str
    def __init__(self, data: _Optional[bytes] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., etcd_revision: _Optional[int] = ..., counts: _Optional[_Union[BackupCounts, _Mapping]] = ..., format: _Optional[str] = ..., missing_artifacts: _Optional[_Iterable[str]] = ..., prefix: _Optional[str] = ...) -> None: ...

class RestoreChunk(_message.Message):
    __slots__ = ("data", "force", "allow_missing_artifacts", "total_bytes")
    DATA_FIELD_NUMBER: _ClassVar[int]
    FORCE_FIELD_NUMBER: _ClassVar[int]
    ALLOW_MISSING_ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    force: bool
    allow_missing_artifacts: bool
    total_bytes: int
    def __init__(self, data: _Optional[bytes] = ..., force: _Optional[bool] = ..., allow_missing_artifacts: _Optional[bool] = ..., total_bytes: _Optional[int] = ...) -> None: ...

class MissingArtifact(_message.Message):
    __slots__ = ("sha256", "problem", "used_by")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    PROBLEM_FIELD_NUMBER: _ClassVar[int]
    USED_BY_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    problem: str
    used_by: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sha256: _Optional[str] = ..., problem: _Optional[str] = ..., used_by: _Optional[_Iterable[str]] = ...) -> None: ...

class RestoreResponse(_message.Message):
    __slots__ = ("counts", "artifacts_verified", "missing_artifacts", "overwritten", "backup_revision", "backup_prefix", "backup_created_ms", "prefix", "latest_kept")
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_VERIFIED_FIELD_NUMBER: _ClassVar[int]
    MISSING_ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    OVERWRITTEN_FIELD_NUMBER: _ClassVar[int]
    BACKUP_REVISION_FIELD_NUMBER: _ClassVar[int]
    BACKUP_PREFIX_FIELD_NUMBER: _ClassVar[int]
    BACKUP_CREATED_MS_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    LATEST_KEPT_FIELD_NUMBER: _ClassVar[int]
    counts: BackupCounts
    artifacts_verified: int
    missing_artifacts: _containers.RepeatedCompositeFieldContainer[MissingArtifact]
    overwritten: int
    backup_revision: int
    backup_prefix: str
    backup_created_ms: int
    prefix: str
    latest_kept: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, counts: _Optional[_Union[BackupCounts, _Mapping]] = ..., artifacts_verified: _Optional[int] = ..., missing_artifacts: _Optional[_Iterable[_Union[MissingArtifact, _Mapping]]] = ..., overwritten: _Optional[int] = ..., backup_revision: _Optional[int] = ..., backup_prefix: _Optional[str] = ..., backup_created_ms: _Optional[int] = ..., prefix: _Optional[str] = ..., latest_kept: _Optional[_Iterable[str]] = ...) -> None: ...
