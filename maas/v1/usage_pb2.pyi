from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UsageRecord(_message.Message):
    __slots__ = ("id", "request_id", "time_ms", "tenant", "key_id", "model", "adapter", "deployment", "model_version", "prompt_tokens", "completion_tokens", "status", "router", "kind", "partial_completion_tokens", "duration_ms")
    ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ROUTER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DURATION_MS_FIELD_NUMBER: _ClassVar[int]
    id: str
    request_id: str
    time_ms: int
    tenant: str
    key_id: str
    model: str
    adapter: str
    deployment: str
    model_version: str
    prompt_tokens: int
    completion_tokens: int
    status: str
    router: str
    kind: str
    partial_completion_tokens: int
    duration_ms: int
    def __init__(self, id: _Optional[str] = ..., request_id: _Optional[str] = ..., time_ms: _Optional[int] = ..., tenant: _Optional[str] = ..., key_id: _Optional[str] = ..., model: _Optional[str] = ..., adapter: _Optional[str] = ..., deployment: _Optional[str] = ..., model_version: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., status: _Optional[str] = ..., router: _Optional[str] = ..., kind: _Optional[str] = ..., partial_completion_tokens: _Optional[int] = ..., duration_ms: _Optional[int] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("tenant", "since_ms", "until_ms", "by")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SINCE_MS_FIELD_NUMBER: _ClassVar[int]
    UNTIL_MS_FIELD_NUMBER: _ClassVar[int]
    BY_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    since_ms: int
    until_ms: int
    by: str
    def __init__(self, tenant: _Optional[str] = ..., since_ms: _Optional[int] = ..., until_ms: _Optional[int] = ..., by: _Optional[str] = ...) -> None: ...

class UsageTotals(_message.Message):
    __slots__ = ("requests", "errors", "prompt_tokens", "completion_tokens", "partial_completion_tokens")
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    partial_completion_tokens: int
    def __init__(self, requests: _Optional[int] = ..., errors: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., partial_completion_tokens: _Optional[int] = ...) -> None: ...

class UsageRow(_message.Message):
    __slots__ = ("tenant", "group", "adapter", "totals")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    TOTALS_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    group: str
    adapter: str
    totals: UsageTotals
    def __init__(self, tenant: _Optional[str] = ..., group: _Optional[str] = ..., adapter: _Optional[str] = ..., totals: _Optional[_Union[UsageTotals, _Mapping]] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("totals", "rows", "tenant", "since_ms", "until_ms", "by", "duplicates_skipped")
    TOTALS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SINCE_MS_FIELD_NUMBER: _ClassVar[int]
    UNTIL_MS_FIELD_NUMBER: _ClassVar[int]
    BY_FIELD_NUMBER: _ClassVar[int]
    DUPLICATES_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    totals: UsageTotals
    rows: _containers.RepeatedCompositeFieldContainer[UsageRow]
    tenant: str
    since_ms: int
    until_ms: int
    by: str
    duplicates_skipped: int
    def __init__(self, totals: _Optional[_Union[UsageTotals, _Mapping]] = ..., rows: _Optional[_Iterable[_Union[UsageRow, _Mapping]]] = ..., tenant: _Optional[str] = ..., since_ms: _Optional[int] = ..., until_ms: _Optional[int] = ..., by: _Optional[str] = ..., duplicates_skipped: _Optional[int] = ...) -> None: ...
