from maas.v1 import access_pb2 as _access_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReplayRequest(_message.Message):
    __slots__ = ("pipeline", "against", "limit")
    PIPELINE_FIELD_NUMBER: _ClassVar[int]
    AGAINST_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    pipeline: str
    against: str
    limit: int
    def __init__(self, pipeline: _Optional[str] = ..., against: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class StepChange(_message.Message):
    __slots__ = ("step", "old_status", "new_status", "old_ms", "new_ms", "same_output", "old_output", "new_output")
    STEP_FIELD_NUMBER: _ClassVar[int]
    OLD_STATUS_FIELD_NUMBER: _ClassVar[int]
    NEW_STATUS_FIELD_NUMBER: _ClassVar[int]
    OLD_MS_FIELD_NUMBER: _ClassVar[int]
    NEW_MS_FIELD_NUMBER: _ClassVar[int]
    SAME_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    OLD_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    NEW_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    step: str
    old_status: str
    new_status: str
    old_ms: float
    new_ms: float
    same_output: bool
    old_output: str
    new_output: str
    def __init__(self, step: _Optional[str] = ..., old_status: _Optional[str] = ..., new_status: _Optional[str] = ..., old_ms: _Optional[float] = ..., new_ms: _Optional[float] = ..., same_output: _Optional[bool] = ..., old_output: _Optional[str] = ..., new_output: _Optional[str] = ...) -> None: ...

class ReplayResult(_message.Message):
    __slots__ = ("request_id", "captured_ms", "question", "same_answer", "old_answer", "new_answer", "steps", "error", "old_version", "new_version")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CAPTURED_MS_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    SAME_ANSWER_FIELD_NUMBER: _ClassVar[int]
    OLD_ANSWER_FIELD_NUMBER: _ClassVar[int]
    NEW_ANSWER_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    OLD_VERSION_FIELD_NUMBER: _ClassVar[int]
    NEW_VERSION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    captured_ms: int
    question: str
    same_answer: bool
    old_answer: str
    new_answer: str
    steps: _containers.RepeatedCompositeFieldContainer[StepChange]
    error: str
    old_version: str
    new_version: str
    def __init__(self, request_id: _Optional[str] = ..., captured_ms: _Optional[int] = ..., question: _Optional[str] = ..., same_answer: _Optional[bool] = ..., old_answer: _Optional[str] = ..., new_answer: _Optional[str] = ..., steps: _Optional[_Iterable[_Union[StepChange, _Mapping]]] = ..., error: _Optional[str] = ..., old_version: _Optional[str] = ..., new_version: _Optional[str] = ...) -> None: ...
